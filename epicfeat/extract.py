"""Stage one: stream every video through ResNet50 once and cache per-frame 2048-d features in a Zarr feature set.

The work is split the rechunker way: ``plan_extraction`` is a pure description of what to do (which videos, into
which feature set, which are already done), then an executor carries it out, in this process
(``run_local``) or on a dask.distributed cluster (``run_dask``), where each video goes to one worker.

``run_local`` is a three-stage pipeline so that the slowest stage runs flat out:

    decode processes (DecodePool, PyAV)  ──►  model batches (span videos)  ──►  writer thread
    a shared work queue: each free worker     normalise, autocast, ResNet50      Zarr, checksums, commit
    takes the next video; batches come        (pinned buffers and a CUDA          as soon as a video's
    through shared-memory slots               stream on a GPU)                    last row is written

Every batch given to the model has exactly ``batch_size`` rows (the last rows of a video are padded with zero
images and run as soon as the video has been decoded), so a frame's features do not depend on which other
frames shared its batch, and a video is committed the moment it is done: a kill loses at most the videos in
flight, and memory stays bounded by the number of decode workers, not the number of videos.

Many writers share one cache (several ``extract`` processes, dask workers, SLURM jobs): each video is claimed
(``FeatureStore.claim``: an O_EXCL claim file, renewed while the video is written, stale after the lease) before
it is decoded, so every video is extracted by one writer; a process that finds videos claimed by others waits for
them and exits 0 once they are complete, whoever did them.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import os
import queue
import threading
import time
import zlib
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_ready
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from epicfeat import __version__
from epicfeat.configs import ExtractConfig
from epicfeat.errors import EpicfeatError

if TYPE_CHECKING:  # torch, PyAV and zarr load lazily: `epicfeat extract` starts its decoders before importing them
    import torch

    from epicfeat.frames import FrameBatch, Preprocess, VideoMeta
    from epicfeat.store import Claim, FeatureSetIdentity, FeatureStore


# Frames whose last pts falls this far short of where the annotations (or the container) say the video ends are
# reported as truncated / too short instead of being cached as if complete.
_END_TOLERANCE_S = 1.0
#: Batches of frames each decode worker may have decoded ahead of the model (memory: 4 x batch x crop^2 x 3 bytes).
DECODE_PREFETCH_BATCHES = 4
#: Videos handed to each decode worker at once: the one it decodes and the next, so it never waits for the model.
_JOBS_PER_WORKER = 2
#: A video whose decode process dies this many times is recorded as failed (the first death is retried).
_DECODE_ATTEMPTS = 2


@dataclass(frozen=True)
class VideoJob:
    video_id: str
    path: Path
    needed_until: float | None = None  # latest stop time (s) the annotations need from this video
    duration: float | None = None  # expected duration (s), for the progress bar's ETA


@dataclass(frozen=True)
class ExtractionPlan:
    identity: FeatureSetIdentity
    jobs: tuple[VideoJob, ...]  # videos to extract, in order
    already_complete: tuple[str, ...]  # skipped: complete in the store (resume)
    missing: tuple[str, ...]  # listed by the split but not found under --videos


@dataclass(frozen=True)
class VideoResult:
    video_id: str
    ok: bool
    rows: int = 0
    duration: float = 0.0  # seconds of source video covered
    reason: str = ""
    path: str = ""  # the video file
    elsewhere: bool = False  # decided by another writer: completed (ok) or failed by it, or still held by it
    claimant: str = ""  # with elsewhere and not yet decided: the token of the other writer's claim


@dataclass(frozen=True)
class ExtractSummary:
    store: Path
    done: tuple[VideoResult, ...]
    failed: tuple[VideoResult, ...]
    skipped: tuple[str, ...]
    missing: tuple[str, ...]
    seconds: float
    bytes_written: int
    by_others: tuple[str, ...] = ()  # completed during this run by other writers sharing the cache

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.done)

    @property
    def hours(self) -> float:
        return sum(r.duration for r in self.done) / 3600


# --------------------------------------------------------------------------------------------------- planning
def preprocess_of(config: ExtractConfig) -> Preprocess:
    from epicfeat.frames import Preprocess

    return Preprocess(resize=config.resize, crop=config.crop, mean=config.mean, std=config.std)


def decoder_version() -> str:
    """PyAV and libavcodec versions: PyAV 17 changed HD colour conversion (BT.601 -> BT.709), so pixels differ."""
    import av

    libavcodec = ".".join(str(v) for v in av.library_versions.get("libavcodec", ()))
    return f"pyav-{av.__version__}-libavcodec-{libavcodec}"


def device_description(device: torch.device) -> str:
    """What computes the numbers: the CPU's vector ISA (oneDNN kernels and bf16 emulation differ) or the GPU model."""
    import torch

    if device.type == "cuda":
        return f"cuda-{torch.cuda.get_device_name(device)}"
    return f"{device.type}-{torch.backends.cpu.get_cpu_capability()}"


def numeric_settings(config: ExtractConfig, device: torch.device) -> dict:
    """Every run setting that changes the numbers (identity fields), with ``auto`` precision resolved for ``device``."""
    from epicfeat.devices import resolve_precision

    return {
        "precision": resolve_precision(config.precision, device),
        "decoder": decoder_version(),
        "device": device_description(device),
        "tf32": TF32,
        "batch_size": config.batch_size,
        "channels_last": config.channels_last,
        "compile": config.compile,
        "fold_bn": config.fold_bn,
    }


def feature_set_identity(config: ExtractConfig, backbone: torch.nn.Module, device: torch.device | None = None,
                         settings: dict | None = None) -> FeatureSetIdentity:
    """Everything that changes the cached numbers; two configs share a feature set only if all of it agrees.

    ``settings`` (from ``numeric_settings``, e.g. reported by dask workers) default to this process's on
    ``device`` (default: the CPU). Not in it, because they do not change the numbers (tests show bit-identical
    arrays): decode workers, decode threads, dask workers, the scheduler, the cache folder.
    """
    from epicfeat.devices import resolve_device
    from epicfeat.store import FeatureSetIdentity

    if settings is None:
        device = device if device is not None else resolve_device("cpu")
        settings = numeric_settings(config, device)
    return FeatureSetIdentity(
        weights=backbone.weights_name,
        weights_sha=backbone.weights_sha,
        fps=config.fps,
        resize=config.resize,
        crop=config.crop,
        mean=tuple(config.mean),
        std=tuple(config.std),
        **settings,
    )


def select_videos(config: ExtractConfig) -> tuple[list[VideoJob], list[str]]:
    """The videos to extract (found on disk) and the ids listed but missing, from ``--split`` or ``--video-ids``."""
    from epicfeat.data.videos import find_videos

    if config.videos is None:
        raise EpicfeatError("no video folder given: pass --videos DIR (the folder holding P01/, P02/, ...)")
    needed_until: dict[str, float] = {}
    durations: dict[str, float] = {}
    if config.annotations is not None:
        from epicfeat.data.annotations import EpicAnnotations

        annotations = EpicAnnotations(config.annotations)
        durations = annotations.video_info["duration"].astype(float).to_dict()
        if not config.video_ids:
            splits = ("train", "validation", "test") if config.split == "all" else (config.split,)
            for split in splits:
                segments = annotations.segments(split)
                for video_id, stop in segments.groupby("video_id")["stop_sec"].max().items():
                    needed_until[video_id] = max(stop, needed_until.get(video_id, 0.0))
    elif not config.video_ids:
        raise EpicfeatError("--split needs the annotation CSVs: pass --annotations DIR, or list --video-ids")
    video_ids = list(config.video_ids) or sorted(needed_until)
    lookup = find_videos(config.videos, video_ids)
    jobs = [
        VideoJob(video_id, Path(lookup.found[video_id]), needed_until.get(video_id), durations.get(video_id))
        for video_id in video_ids
        if video_id in lookup.found
    ]
    return jobs, list(lookup.missing)


def plan_extraction(
    identity: FeatureSetIdentity, jobs: list[VideoJob], missing: list[str], complete: set[str]
) -> ExtractionPlan:
    """Pure: which videos still need extracting, given those already complete in the feature set."""
    todo = tuple(job for job in jobs if job.video_id not in complete)
    done = tuple(job.video_id for job in jobs if job.video_id in complete)
    return ExtractionPlan(identity=identity, jobs=todo, already_complete=done, missing=tuple(missing))


# --------------------------------------------------------------------------------------------- entry point
def extract_features(config: ExtractConfig) -> ExtractSummary:
    """``epicfeat extract``: plan, run locally or on dask, record failures, and return a summary.

    Several of these may run on one cache at once: videos claimed by another writer are waited for, and taken
    over if that writer's claim goes stale (it was killed); the summary counts them in ``by_others``.
    """
    started = time.perf_counter()
    jobs, missing = select_videos(config)
    pool = None
    if not config.scheduler:
        # Start the decode processes first: they import PyAV and decode the first video while the model loads.
        workers = decode_workers_for(config.decode_workers, len(jobs))
        if workers and jobs:
            pool = DecodePool(workers, config.fps, preprocess_of(config), config.batch_size, config.decode_threads)
            pool.start_early(jobs[0])  # its first frames decode while the model loads
    try:
        return _extract(config, jobs, missing, pool, started)
    finally:
        if pool is not None:
            pool.close()


def _extract(config: ExtractConfig, jobs: list[VideoJob], missing: list[str], pool: DecodePool | None,
             started: float) -> ExtractSummary:
    from epicfeat.backbone import create_backbone
    from epicfeat.recipes import save_config
    from epicfeat.devices import resolve_device, resolve_precision
    from epicfeat.store import FeatureStore, folder_bytes

    backbone = create_backbone(config.weights, seed=config.seed)
    if config.scheduler:
        client, cluster = _dask_client(config)
        settings = _workers_numeric_settings(client, config)
        config = dataclasses.replace(config, precision=settings["precision"])
        device = None
    else:
        client = cluster = None
        device = resolve_device(config.device)
        # The feature set records the precision that actually computes the features, never "auto".
        config = dataclasses.replace(config, precision=resolve_precision(config.precision, device))
        settings = numeric_settings(config, device)
    try:
        identity = feature_set_identity(config, backbone, settings=settings)
        store = FeatureStore.create(config.cache, identity)
        plan = plan_extraction(identity, jobs, missing, set(store.complete_videos()))
        save_config(config, store.path / "extract_config.yaml")
        for video_id in plan.missing:
            store.record_failure(video_id, "video file not found under --videos")
        bytes_before = folder_bytes(store.path)

        def execute(todo: list[VideoJob], on_result) -> list[VideoResult]:
            if client is not None:
                return run_dask(todo, store, config, client, weights_sha=identity.weights_sha, on_result=on_result)
            return run_local(todo, store, backbone, config, device=device, on_rows=progress.rows,
                             on_result=on_result, pool=pool)

        with _Progress(plan, enabled=config.progress) as progress:
            results = _run_sharing_the_cache(list(plan.jobs), store, config, execute, progress.video_done)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    mine = [r for r in results if not r.elsewhere]
    return ExtractSummary(
        store=store.path,
        done=tuple(r for r in mine if r.ok),
        failed=tuple(r for r in results if not r.ok),
        skipped=plan.already_complete,
        missing=plan.missing,
        seconds=time.perf_counter() - started,
        bytes_written=folder_bytes(store.path) - bytes_before,
        by_others=tuple(r.video_id for r in results if r.ok and r.elsewhere),
    )


def _run_sharing_the_cache(jobs: list[VideoJob], store: FeatureStore, config: ExtractConfig,
                           execute: Callable, on_result: Callable[[VideoResult], None]) -> list[VideoResult]:
    """Run ``execute`` on the jobs; wait for those other writers hold; redo those whose writer died. One result each."""
    final: dict[str, VideoResult] = {}
    todo = jobs
    while todo:
        held_elsewhere = []
        # results still held by another writer are reported once decided, below
        for result in execute(todo, lambda r: None if r.elsewhere and r.claimant else on_result(r)):
            if result.elsewhere and result.claimant:  # claimed by another writer: not decided yet
                held_elsewhere.append(result)
            else:
                final[result.video_id] = result
        by_id = {job.video_id: job for job in todo}
        todo = []
        for result in _wait_for_other_writers(store, held_elsewhere, config.claim_lease_s):
            if result is None:
                continue
            if isinstance(result, str):  # the other writer's claim vanished or went stale: ours to redo
                todo.append(by_id[result])
            else:
                final[result.video_id] = result
                on_result(result)
    return [final[job.video_id] for job in jobs if job.video_id in final]


def _wait_for_other_writers(store: FeatureStore, held: list[VideoResult], lease_s: float) -> Iterator:
    """Poll the videos other writers hold until each is complete (a result), failed by that writer (a result), or
    free again (its id: the writer died or gave up, so this process redoes it)."""
    waiting = {r.video_id: r for r in held}
    poll = min(max(lease_s / 8, 0.05), 2.0)
    while waiting:
        failures = store.failures() if waiting else {}
        for video_id, result in list(waiting.items()):
            if store.is_complete(video_id):
                attrs = store.video_attrs(video_id)
                del waiting[video_id]
                yield VideoResult(video_id, True, rows=int(attrs.get("rows", 0)),
                                  duration=float(attrs.get("duration") or 0.0), path=result.path, elsewhere=True)
                continue
            record = failures.get(video_id)
            if record is not None and record.get("claim") == result.claimant:
                del waiting[video_id]
                yield VideoResult(video_id, False, reason=record.get("reason", ""), path=result.path,
                                  elsewhere=True)
                continue
            owner = store.claim_owner(video_id, lease_s=lease_s)
            if owner is None:
                del waiting[video_id]
                yield video_id
            elif owner != result.claimant:  # taken over by a third writer: wait for that one now
                waiting[video_id] = dataclasses.replace(result, claimant=owner)
        if waiting:
            time.sleep(poll)


# ------------------------------------------------------------------------------------------ decoding
@dataclass
class VideoStarted:
    video_id: str
    meta: VideoMeta


@dataclass
class FramesDecoded:
    video_id: str
    batch: FrameBatch  # from a decode process, images travel in its shared-memory slot (images None, slot set)
    slot: int | None = None


@dataclass
class VideoDecoded:
    video_id: str
    rows: int
    last_pts: float


@dataclass
class VideoFailed:
    video_id: str
    reason: str
    path: str = ""


@dataclass
class DecoderDied:
    """The decode process of this video died mid-way: everything received for it so far is to be dropped."""

    video_id: str


def decode_video_items(job: VideoJob, fps: float | None, preprocess: Preprocess, batch_size: int,
                       threads: int) -> Iterator[object]:
    """One video front to back: VideoStarted, FramesDecoded..., then VideoDecoded or VideoFailed (never raises)."""
    from epicfeat.frames import VideoError, iter_frames, probe_video

    rows, last_pts = 0, -1.0
    try:
        meta = probe_video(job.path)
        yield VideoStarted(job.video_id, meta)
        for batch in iter_frames(job.path, fps=fps, preprocess=preprocess, batch_size=batch_size, threads=threads):
            rows += len(batch.pts)
            last_pts = float(batch.pts[-1])
            yield FramesDecoded(job.video_id, batch)
    except VideoError as err:
        yield VideoFailed(job.video_id, str(err), str(job.path))
        return
    except OSError as err:  # PermissionError, a stale NFS handle, an I/O error of the disk
        yield VideoFailed(job.video_id, f"{job.path}: cannot be read ({err.strerror or err}); check the file's "
                                        "permissions and the mount", str(job.path))
        return
    except Exception as err:  # anything else is this video's problem, not the run's
        yield VideoFailed(job.video_id, f"{job.path}: decoding failed ({type(err).__name__}: {err})", str(job.path))
        return
    reason = _incomplete_reason(job, meta, rows, last_pts)
    yield VideoFailed(job.video_id, reason, str(job.path)) if reason else VideoDecoded(job.video_id, rows, last_pts)


def _incomplete_reason(job: VideoJob, meta: VideoMeta, rows: int, last_pts: float) -> str:
    if rows == 0:
        return f"{job.path}: no frames could be decoded"
    if meta.duration and last_pts < meta.duration - _END_TOLERANCE_S:
        return (
            f"{job.path}: truncated: decoding stopped at {last_pts:.2f} s but the container says {meta.duration:.2f} s; "
            "re-download or re-copy the file"
        )
    if job.needed_until is not None and last_pts < job.needed_until - _END_TOLERANCE_S:
        return (
            f"{job.path}: video ends at {last_pts:.2f} s but its annotations run to {job.needed_until:.2f} s; "
            "the file is probably a shortened or wrong copy"
        )
    return ""


def decode_workers_for(requested: int, n_jobs: int) -> int:
    """Decode processes to start: ``requested`` (>= 0), or -1: one per spare core, at most 8 (never more than jobs)."""
    if requested >= 0:
        return min(requested, n_jobs)
    return max(0, min((os.cpu_count() or 1) - 1, n_jobs, 8))


class _SharedSlots:
    """A decode worker's ring of shared-memory buffers, each holding one batch of images for the parent.

    The images of a batch are written into the next slot instead of being pickled through the pipe, and the parent
    copies them out as the batch arrives. There are as many slots as batches a worker may have decoded ahead
    (``DECODE_PREFETCH_BATCHES``, counted by its semaphore), and batches are taken in order, so a slot is never
    written while the parent still reads it. Plain ``multiprocessing.shared_memory`` rather than torch's shared
    tensors: a decode process then never imports torch (2 s of a core and 200 MB per process at start-up, on the
    cores the model is loading on).
    """

    def __init__(self, shape: tuple[int, ...], names: list[str] | None = None):
        from multiprocessing import shared_memory

        self.shape = shape  # (batch_size, crop, crop, 3)
        size = int(np.prod(shape))
        if names is None:  # the parent makes the slots; the worker attaches to them by name
            self._blocks = [shared_memory.SharedMemory(create=True, size=size) for _ in range(DECODE_PREFETCH_BATCHES)]
        else:
            self._blocks = [shared_memory.SharedMemory(name=name) for name in names]
        self.names = [block.name for block in self._blocks]
        self._views = [np.ndarray(shape, np.uint8, buffer=block.buf) for block in self._blocks]
        self._next = 0

    def put(self, images: np.ndarray) -> int:
        """Write a batch's images into the next slot; returns its number."""
        slot = self._next
        self._next = (slot + 1) % len(self._views)
        self._views[slot][: len(images)] = images
        return slot

    def take(self, slot: int, rows: int) -> np.ndarray:
        """A copy of the first ``rows`` images of ``slot`` (the slot is free again afterwards)."""
        return self._views[slot][:rows].copy()  # (rows, crop, crop, 3)

    def close(self, *, unlink: bool) -> None:
        self._views = []
        for block in self._blocks:
            block.close()
            if unlink:
                try:
                    block.unlink()
                except FileNotFoundError:
                    pass


def _decode_process(conn, credits, slot_names, fps, preprocess, batch_size, threads) -> None:
    """A decode worker: takes videos from its pipe until None, sends their items back (images through its slots)."""
    slots = _SharedSlots((batch_size, preprocess.crop, preprocess.crop, 3), slot_names)
    try:
        while (job := conn.recv()) is not None:
            for item in decode_video_items(job, fps, preprocess, batch_size, threads):
                if isinstance(item, FramesDecoded):
                    credits.acquire()  # at most DECODE_PREFETCH_BATCHES batches wait for the model
                    item.slot = slots.put(item.batch.images)
                    item.batch.images = None
                conn.send(item)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent is gone or stopping us
    finally:
        slots.close(unlink=False)


@dataclass
class _Worker:
    process: object
    conn: object
    credits: object
    slots: _SharedSlots
    assigned: collections.deque  # (job, attempt), the first being decoded


class DecodePool:
    """Decode processes fed from one shared queue of videos: whichever worker is free takes the next video.

    Each worker holds at most two videos (the one it decodes and the next), so no worker sets the pace and the
    run has no long tail of statically assigned videos. Workers are spawned (not forked: the parent runs zarr's
    event-loop thread and an OpenMP pool) as soon as the pool is made, and ``start_early`` hands one the first video
    before it can be claimed, so decoding starts while the model loads. A worker that dies (a decoder crash, the
    OOM killer) costs its video one retry on a fresh worker; a second death fails that video, never the run.
    """

    def __init__(self, workers: int, fps: float | None, preprocess: Preprocess, batch_size: int, threads: int):
        import multiprocessing

        self._context = multiprocessing.get_context("spawn")
        self._args = (fps, preprocess, batch_size, threads)
        self._image_shape = (batch_size, preprocess.crop, preprocess.crop, 3)
        self._workers = [self._spawn() for _ in range(workers)]
        self._retry: collections.deque = collections.deque()  # (job, attempt) to hand out before new ones
        self._early: VideoJob | None = None  # handed out by start_early, not yet claimed

    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe(duplex=True)
        credits = self._context.Semaphore(DECODE_PREFETCH_BATCHES)
        slots = _SharedSlots(self._image_shape)
        process = self._context.Process(target=_decode_process, args=(child, credits, slots.names, *self._args),
                                        daemon=True, name="epicfeat-decode")
        process.start()
        child.close()
        return _Worker(process, parent, credits, slots, collections.deque())

    def worker_pid(self, video_id: str) -> int | None:
        """The pid of the process decoding ``video_id`` now (for tests and diagnostics)."""
        for worker in self._workers:
            if worker.assigned and worker.assigned[0][0].video_id == video_id:
                return worker.process.pid
        return None

    def start_early(self, job: VideoJob) -> None:
        """Decode ``job`` now, before it is claimed: the claim needs the feature set, whose key needs the model's
        weights hash, so without this the first frame would wait seconds for the model to load.

        ``events`` keeps the work when the first job its ``next_job`` hands out is this video (the normal case: the
        first video of a new run). Otherwise (it is complete, or another writer holds it) that worker is restarted
        and its few batches are dropped: a worker decodes at most DECODE_PREFETCH_BATCHES ahead of ``events``.
        """
        worker = self._workers[0]
        worker.assigned.append((job, 0))
        worker.conn.send(job)
        self._early = job

    def events(self, next_job: Callable[[], VideoJob | None]) -> Iterator[object]:
        """Decode items of every job ``next_job`` hands out (None: no more), as the workers produce them."""
        next_job = self._claimed_early_job(next_job)
        exhausted = False
        while True:
            for worker in self._workers:
                while len(worker.assigned) < _JOBS_PER_WORKER:
                    if self._retry:
                        task = self._retry.popleft()
                    elif exhausted or (job := next_job()) is None:
                        exhausted = True
                        break
                    else:
                        task = (job, 0)
                    worker.assigned.append(task)
                    try:
                        worker.conn.send(task[0])
                    except OSError:  # the worker is dead: its sentinel fires below and its tasks are handed on
                        break
            busy = [w for w in self._workers if w.assigned]
            if not busy:
                return
            ready = wait_for_ready([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=1.0)
            for worker in busy:
                if worker.conn in ready:
                    yield from self._receive(worker)
                elif worker.process.sentinel in ready or not worker.process.is_alive():
                    yield from self._replace_dead(worker)

    def _claimed_early_job(self, next_job: Callable[[], VideoJob | None]) -> Callable[[], VideoJob | None]:
        """``next_job`` for ``events``, settling ``start_early``'s job against the first job handed out."""
        early, self._early = self._early, None
        if early is None:
            return next_job
        first = next_job()
        if first is not None and first.video_id == early.video_id:
            return next_job  # claimed by this process: worker 0 goes on with it
        self._restart(self._workers[0])
        handed_out = [first]

        def first_then_next_job() -> VideoJob | None:
            return handed_out.pop() if handed_out else next_job()

        return first_then_next_job

    def _restart(self, worker: _Worker) -> None:
        """Stop ``worker`` whatever it is doing (its jobs are dropped) and put a fresh process in its place."""
        worker.process.terminate()
        self._discard(worker)
        self._workers[self._workers.index(worker)] = self._spawn()

    def _discard(self, worker: _Worker) -> None:
        worker.process.join(timeout=5)
        worker.conn.close()
        worker.slots.close(unlink=True)

    def _receive(self, worker: _Worker) -> Iterator[object]:
        try:
            item = worker.conn.recv()
        except (EOFError, OSError):  # the pipe broke: the process died (its sentinel will say so)
            yield from self._replace_dead(worker)
            return
        except Exception:  # a torn message from a process killed mid-send
            yield from self._replace_dead(worker)
            return
        if isinstance(item, FramesDecoded):
            item.batch.images = worker.slots.take(item.slot, len(item.batch))
            item.slot = None
            yield item
            worker.credits.release()  # handled: the worker may decode one more batch ahead
        else:
            if isinstance(item, (VideoDecoded, VideoFailed)):
                worker.assigned.popleft()
            yield item

    def _replace_dead(self, worker: _Worker) -> Iterator[object]:
        self._discard(worker)
        code = worker.process.exitcode
        index = self._workers.index(worker)
        if worker.assigned:
            (job, attempt), *waiting = list(worker.assigned)
            self._retry.extendleft(reversed(waiting))  # not started: no attempt used
            yield DecoderDied(job.video_id)
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            if attempt + 1 < _DECODE_ATTEMPTS:
                self._retry.appendleft((job, attempt + 1))
            else:
                yield VideoFailed(job.video_id, f"{job.path}: the decode process died ({how}) on each of "
                                                f"{_DECODE_ATTEMPTS} attempts; the file may crash FFmpeg: check it "
                                                "with `ffprobe` or re-encode it", str(job.path))
        self._workers[index] = self._spawn()

    def close(self) -> None:
        if self._early is not None:  # never claimed (nothing to do, or an error first): it may be blocked mid-video
            self._workers[0].process.terminate()
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            worker.conn.close()
            worker.slots.close(unlink=True)
        self._workers = []


def _inline_events(next_job: Callable[[], VideoJob | None], config: ExtractConfig) -> Iterator[object]:
    """decode_workers=0: decode in this process, one video after the other."""
    preprocess = preprocess_of(config)
    while (job := next_job()) is not None:
        yield from decode_video_items(job, config.fps, preprocess, config.batch_size, config.decode_threads)


# ------------------------------------------------------------------------------------------ the model
#: "fp32" on a GPU is real fp32: TF32 is off around each model call (ModelRunner) and recorded in the identity;
#: bf16 / fp16 do not use TF32.
TF32 = False


def prepare_model(backbone: torch.nn.Module, config: ExtractConfig, device: torch.device) -> torch.nn.Module:
    import torch

    from epicfeat.backbone import fold_batch_norms

    model = backbone.eval()
    if config.fold_bn:
        model = fold_batch_norms(model)  # one pass per activation map instead of two
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        model = torch.compile(model)
    return model


class ModelRunner:
    """Runs fixed-size batches through the backbone; on a GPU, overlapped with the host.

    Fill ``next_input()`` (a (batch, crop, crop, 3) uint8 array; pinned memory on a GPU), then ``submit`` it with
    a tag; ``submit`` returns the (features, tag) pairs that are finished. On a GPU the copy in, the model and the
    copy out of a batch run on their own CUDA stream while the host fills the next buffer (two of each buffer, so
    nothing waits on ``.cpu()``); on a CPU each batch is computed at once. ``drain`` returns all that is left.
    """

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, config: ExtractConfig, device: torch.device):
        import torch

        self.model, self.preprocess, self.device = model, preprocess, device
        self.channels_last = config.channels_last
        self.batch_size = config.batch_size
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self._autocast = (device.type, dtype)
        self._shape = (config.batch_size, config.crop, config.crop, 3)
        self._cuda = device.type == "cuda"
        self._count = 0
        self.batches = 0  # batches run so far
        self._in_flight: collections.deque = collections.deque()
        self._cpu_input = np.zeros(0, np.uint8)
        self.gpu_seconds = 0.0  # time between a batch's start and end events (GPU busy time), when on a GPU
        if self._cuda:
            self._stream = torch.cuda.Stream(device)
            self._inputs = [torch.zeros(self._shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
            self._outputs = [torch.zeros((config.batch_size, 2048), dtype=torch.float16).pin_memory()
                             for _ in range(2)]

    def next_input(self) -> np.ndarray:
        if self._cuda:
            return self._inputs[self._count % 2].numpy()  # free: the batch that used it last has finished
        self._cpu_input = np.zeros(self._shape, np.uint8)
        return self._cpu_input

    def submit(self, rows: int, tag: object) -> list[tuple[np.ndarray, object]]:
        import torch

        slot = self._count % 2
        self._count += 1
        self.batches = self._count
        if not self._cuda:
            return [(self._forward(torch.from_numpy(self._cpu_input))[:rows], tag)]
        with torch.cuda.stream(self._stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self._stream)
            pixels = self._inputs[slot].to(self.device, non_blocking=True)  # (B, H, W, 3) uint8
            features = self._features_on_device(pixels)  # (B, 2048) float16
            self._outputs[slot].copy_(features, non_blocking=True)
            end.record(self._stream)
        self._in_flight.append((start, end, slot, rows, tag))
        done = []
        while len(self._in_flight) > 1:
            done.append(self._collect())
        return done

    def drain(self) -> list[tuple[np.ndarray, object]]:
        return [self._collect() for _ in range(len(self._in_flight))]

    def _collect(self) -> tuple[np.ndarray, object]:
        start, end, slot, rows, tag = self._in_flight.popleft()
        end.synchronize()
        self.gpu_seconds += start.elapsed_time(end) / 1000
        return self._outputs[slot][:rows].numpy().copy(), tag

    def _features_on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self._model_output(pixels).to(torch.float16)

    def _model_output(self, pixels: torch.Tensor) -> torch.Tensor:
        import torch

        from epicfeat.devices import cuda_settings

        pixels = self.preprocess.normalize(pixels)  # (B, 3, H, W) float32
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        device_type, dtype = self._autocast
        # cuDNN autotuning: one input shape for the whole run, so the fastest kernels are picked once. Scoped to
        # the call: the flags are process-wide.
        with cuda_settings(tf32=TF32, cudnn_benchmark=True), \
                torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            return self.model(pixels).float()  # (B, 2048)

    def _forward(self, pixels: torch.Tensor) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._model_output(pixels.to(self.device)).cpu().numpy().astype(np.float16)  # (B, 2048)


#: Decoded videos whose last rows may wait for the next model batch (filled with the next videos' rows) before they
#: are run padded: a video is committed at most one batch after its last frame, and no batch is wasted on padding
#: while other videos' rows keep coming.
MAX_VIDEOS_WAITING = 2


class RowBatcher:
    """Gathers decoded frames into model batches of exactly ``batch_size`` rows, across video boundaries.

    A decoded video (``finish``) goes to the writer, and is committed, as soon as all its rows are through the
    model. Its last rows ride in the next batch with the following videos' first rows; only when more than
    ``MAX_VIDEOS_WAITING`` decoded videos wait (or at the end) are the waiting rows run at once, padded with zero
    images. So commits never wait for the global count of rows to reach a multiple of the batch size, and writers
    open at once stay bounded (decode workers + MAX_VIDEOS_WAITING).
    """

    def __init__(self, runner: ModelRunner, writer: _WriterThread, max_waiting: int = MAX_VIDEOS_WAITING):
        self.runner, self.writer, self.max_waiting = runner, writer, max_waiting
        self.pending: collections.deque = collections.deque()  # (video_id, FrameBatch) not yet run
        self.pending_rows = 0
        self.unwritten: collections.Counter = collections.Counter()  # video_id -> rows not yet handed to the writer
        self.decoded: collections.deque = collections.deque()  # VideoDecoded items waiting for their last rows

    def add(self, video_id: str, batch: FrameBatch) -> None:
        self.pending.append((video_id, batch))
        self.pending_rows += len(batch.pts)
        self.unwritten[video_id] += len(batch.pts)
        while self.pending_rows >= self.runner.batch_size:
            self._run(self.runner.batch_size)
        self._release_decoded()

    def finish(self, end: VideoDecoded) -> None:
        """Every row of ``end.video_id`` has been added: its end goes to the writer once its rows have."""
        self.decoded.append(end)
        waiting = sum(1 for e in self.decoded if self.unwritten[e.video_id])
        if waiting > self.max_waiting:
            self.flush()
        else:
            self._release_decoded()

    def discard(self, video_id: str) -> None:
        """Drop the waiting rows of a video that failed or whose decoding is redone (rows already in the model
        are handed over first, so none can reach the writer after the video's abort)."""
        self._hand_over(self.runner.drain())
        kept = [(v, b) for v, b in self.pending if v != video_id]
        self.pending = collections.deque(kept)
        self.pending_rows = sum(len(b.pts) for _, b in kept)
        self.unwritten.pop(video_id, None)

    def flush(self) -> None:
        """Run every waiting row now (padded) and hand everything over."""
        if self.pending_rows:
            self._run(self.pending_rows)
        self._hand_over(self.runner.drain())
        self._release_decoded()

    def _release_decoded(self) -> None:
        while self.decoded and not self.unwritten[self.decoded[0].video_id]:
            end = self.decoded.popleft()
            self.unwritten.pop(end.video_id, None)
            self.writer.put(end)

    def _run(self, rows: int) -> None:
        images = self.runner.next_input()  # (batch_size, crop, crop, 3) uint8, zero padding after `rows`
        parts = []  # (video_id, pts, frame_indices) in batch order
        filled = 0
        while filled < rows:
            video_id, batch = self.pending[0]
            take = min(len(batch.pts), rows - filled)
            images[filled : filled + take] = np.asarray(batch.images[:take])
            parts.append((video_id, batch.pts[:take], batch.frame_indices[:take]))
            if take == len(batch.pts):
                self.pending.popleft()
            else:  # split the head item: its first `take` rows go into this batch
                self.pending[0] = (video_id, _slice(batch, slice(take, None)))
            filled += take
        images[filled:] = 0
        self.pending_rows -= rows
        self._hand_over(self.runner.submit(rows, parts))

    def _hand_over(self, finished: list[tuple[np.ndarray, list]]) -> None:
        for features, parts in finished:
            start = 0
            for video_id, pts, frame_indices in parts:
                n = len(pts)
                if video_id in self.unwritten:  # else discarded meanwhile
                    self.unwritten[video_id] -= n
                    self.writer.put(("rows", video_id, features[start : start + n], pts, frame_indices))
                start += n


def _slice(batch: FrameBatch, s: slice) -> FrameBatch:
    from epicfeat.frames import FrameBatch

    return FrameBatch(frame_indices=batch.frame_indices[s], pts=batch.pts[s], images=batch.images[s])


# ------------------------------------------------------------------------------------------ local executor
class _ClaimKeeper(threading.Thread):
    """Claims videos for this process and renews every claim it holds, so other writers see it alive."""

    def __init__(self, store: FeatureStore, lease_s: float):
        super().__init__(name="epicfeat-claims", daemon=True)
        self.store, self.lease_s = store, lease_s
        self._held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def claim(self, video_id: str) -> Claim | None:
        claim = self.store.claim(video_id, lease_s=self.lease_s)
        if claim is not None:
            with self._lock:
                self._held[video_id] = claim
        return claim

    def get(self, video_id: str) -> Claim | None:
        with self._lock:
            return self._held.get(video_id)

    def release(self, video_id: str) -> None:
        with self._lock:
            claim = self._held.pop(video_id, None)
        if claim is not None:
            claim.release()

    def run(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            with self._lock:
                claims = list(self._held.values())
            for claim in claims:
                claim.renew()

    def stop(self) -> None:
        """Stop renewing; claims still held (videos interrupted mid-way) are released for others to redo."""
        self._stop.set()
        with self._lock:
            claims, self._held = list(self._held.values()), {}
        for claim in claims:
            claim.release()


class _ClaimedJobs:
    """Hands out the videos no other writer holds, each claimed for this process first (``next``: None when none
    are left). Videos held, completed or failed by other writers meanwhile are kept aside in ``elsewhere``."""

    def __init__(self, jobs, store: FeatureStore, claims: _ClaimKeeper, writer: _WriterThread, config: ExtractConfig,
                 on_result: Callable[[VideoResult], None] | None):
        self.store, self.claims, self.writer, self.config, self.on_result = store, claims, writer, config, on_result
        self._queue = collections.deque(jobs)
        self.elsewhere: list[VideoResult] = []
        self._started_at = time.time()

    def next(self) -> VideoJob | None:
        while self._queue:
            job = self._queue.popleft()
            if self.claims.claim(job.video_id) is None:
                owner = self.store.claim_owner(job.video_id, lease_s=self.config.claim_lease_s) or "?"
                self.elsewhere.append(VideoResult(job.video_id, False, path=str(job.path), elsewhere=True,
                                                  claimant=owner, reason="held by another writer"))
                continue
            result = self._decided_elsewhere(job)
            if result is not None:
                self.claims.release(job.video_id)
                self.elsewhere.append(result)
                if self.on_result:
                    self.on_result(result)
                continue
            self.writer.paths[job.video_id] = str(job.path)
            return job
        return None

    def _decided_elsewhere(self, job: VideoJob) -> VideoResult | None:
        if self.store.is_complete(job.video_id):  # another writer committed it after we planned
            attrs = self.store.video_attrs(job.video_id)
            return VideoResult(job.video_id, True, rows=int(attrs.get("rows", 0)),
                               duration=float(attrs.get("duration") or 0.0), path=str(job.path), elsewhere=True)
        record = self.store.failure_recorded_since(job.video_id, self._started_at)
        if record is not None:  # another writer sharing the cache failed it during this run: once is enough
            return VideoResult(job.video_id, False, reason=record.get("reason", ""), path=str(job.path),
                               elsewhere=True)
        return None


def run_local(
    jobs: list[VideoJob] | tuple[VideoJob, ...],
    store: FeatureStore,
    backbone: torch.nn.Module,
    config: ExtractConfig,
    *,
    device: torch.device,
    on_rows: Callable[[str, int, float], None] | None = None,
    on_result: Callable[[VideoResult], None] | None = None,
    pool: DecodePool | None = None,
    stats: dict | None = None,
) -> list[VideoResult]:
    """Extract ``jobs`` into ``store`` with the decode ► model ► write pipeline; returns one result per video.

    ``stats`` (a dict, optional) receives the pipeline's seconds, batches and GPU-busy seconds.
    ``pool``: decode processes already started (``extract_features`` starts them before loading the model);
    without one, ``config.decode_workers`` processes are started here (0: decode in this process). Videos other
    writers hold come back as ``elsewhere`` results with the other writer's ``claimant`` token.
    """
    from epicfeat.devices import resolve_precision

    config = dataclasses.replace(config, precision=resolve_precision(config.precision, device))
    preprocess = preprocess_of(config)
    runner = ModelRunner(prepare_model(backbone, config, device), preprocess, config, device)
    claims = _ClaimKeeper(store, config.claim_lease_s)
    writer = _WriterThread(store, config, claims, on_rows=on_rows, on_result=on_result)
    batcher = RowBatcher(runner, writer)
    queue_of_jobs = _ClaimedJobs(jobs, store, claims, writer, config, on_result)
    workers = decode_workers_for(config.decode_workers, len(jobs))
    own_pool = None
    if pool is None and workers:
        pool = own_pool = DecodePool(workers, config.fps, preprocess, config.batch_size, config.decode_threads)
    events = pool.events(queue_of_jobs.next) if pool is not None else _inline_events(queue_of_jobs.next, config)
    claims.start()
    writer.start()
    started = time.perf_counter()
    try:
        for item in events:
            writer.raise_if_failed()
            _route(item, batcher, writer)
        batcher.flush()
        if stats is not None:  # for benchmarks: how busy the GPU was while the pipeline ran
            stats.update(seconds=time.perf_counter() - started, batches=runner.batches,
                         gpu_busy_s=runner.gpu_seconds)
    finally:
        try:
            writer.close()
        finally:
            claims.stop()
            if own_pool is not None:
                own_pool.close()
    return writer.results + queue_of_jobs.elsewhere


def _route(item: object, batcher: RowBatcher, writer: _WriterThread) -> None:
    if isinstance(item, FramesDecoded):
        batcher.add(item.video_id, item.batch)
    elif isinstance(item, VideoStarted):
        writer.put(item)
    elif isinstance(item, (DecoderDied, VideoFailed)):  # its waiting rows are of no use
        batcher.discard(item.video_id)
        writer.put(item)
    else:  # VideoDecoded: the batcher sends the end once the video's rows are through the model
        batcher.finish(item)


class _WriterThread(threading.Thread):
    """Owns every open video writer, so Zarr writes overlap the next model batch instead of stalling it.

    A problem with one video (its writer cannot be made, its claim was lost) is that video's result; only a full
    disk or quota stops the run (every other video would fail the same way).
    """

    def __init__(self, store: FeatureStore, config: ExtractConfig, claims: _ClaimKeeper, *, on_rows=None,
                 on_result=None):
        super().__init__(name="epicfeat-writer", daemon=True)
        self.store, self.config, self.claims = store, config, claims
        self.on_rows, self.on_result = on_rows, on_result
        self.queue: queue.Queue = queue.Queue(maxsize=16)
        self.results: list[VideoResult] = []
        self.paths: dict[str, str] = {}
        self.error: BaseException | None = None
        self._open: dict[str, list] = {}  # video_id -> [VideoWriter, VideoMeta, rows]
        self._dropped: set[str] = set()  # videos whose writer failed: their remaining rows are ignored

    def put(self, item: object) -> None:
        while True:
            self.raise_if_failed()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.is_alive():
            self.queue.put(None)
            self.join()
        for video_id in list(self._open):  # interrupted mid-video: leave it partial, never complete
            self._abort(video_id)
        self.raise_if_failed()

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain so the producer never blocks on a dead writer
            video_id = item[1] if isinstance(item, tuple) else item.video_id
            try:
                self._handle(item)
            except BaseException as err:
                if _disk_full(err):  # every later video would fail too: stop the run, this one stays partial
                    self.error = _writer_error(err, self.store)
                else:
                    self._fail(video_id, f"writing its features failed ({type(err).__name__}: {err})")

    def _handle(self, item: object) -> None:
        from epicfeat.store import ClaimLostError, CompletedElsewhereError

        if isinstance(item, VideoStarted):
            self._dropped.discard(item.video_id)
            writer = self.store.writer(item.video_id, attrs=self._attrs(item.meta),
                                       claim=self.claims.get(item.video_id))
            self._open[item.video_id] = [writer, item.meta, 0]
        elif isinstance(item, tuple):
            _, video_id, features, pts, frame_indices = item
            if video_id in self._dropped:
                return
            entry = self._open[video_id]
            entry[0].append(features, pts, frame_indices)
            entry[2] += len(pts)
            if self.on_rows:
                self.on_rows(video_id, len(pts), float(pts[-1]))
        elif isinstance(item, DecoderDied):
            self._abort(item.video_id)
        elif isinstance(item, VideoDecoded):
            if item.video_id in self._dropped:
                return
            writer, meta, rows = self._open.pop(item.video_id)
            path = self.paths.get(item.video_id, str(meta.path))
            try:
                writer.commit()
            except CompletedElsewhereError:
                result = VideoResult(item.video_id, True, rows=rows, duration=meta.duration, path=path,
                                     elsewhere=True)
            except ClaimLostError as err:  # we were cut off (paused, NFS trouble): the new owner does it
                owner = self.store.claim_owner(item.video_id, lease_s=self.config.claim_lease_s) or "?"
                result = VideoResult(item.video_id, False, reason=str(err), path=path, elsewhere=True,
                                     claimant=owner)
            else:
                result = VideoResult(item.video_id, True, rows=rows, duration=meta.duration, path=path)
            finally:
                writer.close()
            self.claims.release(item.video_id)
            self._report(result)
        elif isinstance(item, VideoFailed):
            if item.video_id in self._dropped:
                self._dropped.discard(item.video_id)
                return
            self._abort(item.video_id)
            self._fail(item.video_id, item.reason, item.path)

    def _fail(self, video_id: str, reason: str, path: str = "") -> None:
        """Record the video's failure once (with its path), release its claim, report it."""
        self._abort(video_id)
        self._dropped.add(video_id)
        path = path or self.paths.get(video_id, "")
        self.store.record_failure(video_id, reason, path=path or None, claim=self.claims.get(video_id))
        self.claims.release(video_id)
        self._report(VideoResult(video_id, False, reason=reason, path=path))

    def _abort(self, video_id: str) -> None:
        entry = self._open.pop(video_id, None)
        if entry is not None:
            entry[0].__exit__(RuntimeError, RuntimeError("extraction aborted"), None)

    def _report(self, result: VideoResult) -> None:
        self.results.append(result)
        if self.on_result:
            self.on_result(result)

    def _attrs(self, meta: VideoMeta) -> dict:
        return {
            "source_path": str(meta.path),
            "source_fps": meta.fps,
            "duration": meta.duration,
            "width": meta.width,
            "height": meta.height,
            "codec": meta.codec,
            "epicfeat_version": __version__,
            "extract_batch_size": self.config.batch_size,
            # the whole preprocessing definition, interpolation and colour conversion included (provenance)
            "preprocess": preprocess_of(self.config).identity(),
            "decoder": decoder_version(),
        }


def _disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def _writer_error(err: BaseException, store: FeatureStore) -> BaseException:
    if isinstance(err, OSError) and err.errno == errno.EDQUOT:
        return EpicfeatError(
            f"the disk quota for {store.path} is exhausted; complete videos are kept and the unfinished one stays "
            "partial. Free space within your quota (or point --cache elsewhere) and re-run the same command."
        )
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return EpicfeatError(
            f"the disk holding {store.path} is full; complete videos are kept and the unfinished one stays "
            "partial. Free space (or point --cache elsewhere) and re-run the same command to resume."
        )
    return err


# ------------------------------------------------------------------------------------------- dask executor
_WORKER_BACKBONES: dict[tuple, torch.nn.Module] = {}
_WORKER_POOLS: dict[tuple, DecodePool] = {}  # one set of decode processes per dask worker, reused by its tasks


def _worker_device(config: ExtractConfig) -> torch.device:
    """This dask worker's device: with several GPUs, the one its name's number picks (the same in every process)."""
    import torch

    from epicfeat.devices import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda" and config.device == "auto" and torch.cuda.device_count() > 1:
        device = torch.device("cuda", _worker_index() % torch.cuda.device_count())
    return device


def _worker_numeric_settings(config: ExtractConfig) -> dict:
    from epicfeat.devices import resolve_precision

    device = _worker_device(config)
    return numeric_settings(dataclasses.replace(config, precision=resolve_precision(config.precision, device)),
                            device)


def _extract_on_worker(group: list[VideoJob], config: ExtractConfig, store_path: str, weights_sha: str,
                       identity: dict) -> list[VideoResult]:
    """One dask task: a few videos (one per decode process), start to finish, on the worker the scheduler picked."""
    import multiprocessing

    from epicfeat.backbone import create_backbone
    from epicfeat.store import FeatureStore

    key = (config.weights, config.seed)
    if key not in _WORKER_BACKBONES:  # load ResNet50 once per worker process, not once per video
        _WORKER_BACKBONES[key] = create_backbone(config.weights, seed=config.seed)
    backbone = _WORKER_BACKBONES[key]
    settings = _worker_numeric_settings(config)
    differs = {k: v for k, v in settings.items() if identity.get(k) != v}
    if backbone.weights_sha != weights_sha or differs:
        reason = (f"worker loaded different weights ({backbone.weights_sha})" if backbone.weights_sha != weights_sha
                  else f"this dask worker would compute other numbers than the feature set ({differs}); give every "
                       "worker the same device and PyAV, or use one feature set per kind")
        store = FeatureStore.open(store_path)
        for job in group:
            store.record_failure(job.video_id, reason, path=job.path)
        return [VideoResult(job.video_id, False, reason=reason, path=str(job.path)) for job in group]
    store = FeatureStore.open(store_path)
    workers = decode_workers_for(config.decode_workers, len(group))
    if multiprocessing.current_process().daemon:  # a daemonic dask worker cannot start decode processes
        workers = 0
    pool = None
    if workers:
        key = (workers, config.fps, config.resize, config.crop, config.batch_size, config.decode_threads)
        if key not in _WORKER_POOLS:
            _WORKER_POOLS[key] = DecodePool(workers, config.fps, preprocess_of(config), config.batch_size,
                                            config.decode_threads)
        pool = _WORKER_POOLS[key]
    local = dataclasses.replace(config, decode_workers=workers, progress=False)
    return run_local(group, store, backbone, local, device=_worker_device(config), pool=pool)


def _worker_index() -> int:
    """A number from the worker's name ("3", "node1-gpu3" -> 3), else a hash that is stable across processes."""
    import re

    from dask.distributed import get_worker

    name = str(get_worker().name)
    digits = re.search(r"(\d+)$", name)
    return int(digits.group(1)) if digits else zlib.crc32(name.encode())


def _dask_client(config: ExtractConfig):
    """(client, cluster): a LocalCluster, a SLURM cluster through dask-jobqueue, or an existing scheduler."""
    import dask
    from dask.distributed import Client

    if config.scheduler == "local":
        from dask.distributed import LocalCluster

        # Non-daemonic workers, so each may start its own decode processes.
        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = LocalCluster(n_workers=config.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=40)
        return Client(cluster), cluster
    if config.scheduler == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise EpicfeatError("--scheduler slurm needs dask-jobqueue, which is not installed: "
                                "pip install 'epicfeat[slurm]' (or pip install dask-jobqueue)") from None
        # One job per GPU: one dask thread (one task at a time; its decode processes use the job's CPUs), a
        # non-daemonic worker so it may start them. Queue, account and walltime come from dask's jobqueue config.
        cpus = config.decode_workers + 1 if config.decode_workers > 0 else 8
        cluster = SLURMCluster(cores=1, processes=1, job_cpu=cpus, memory=f"{4 * cpus}GB",
                               job_extra_directives=["--gres=gpu:1"],
                               job_script_prologue=["export DASK_DISTRIBUTED__WORKER__DAEMON=False"])
        cluster.scale(jobs=config.workers)
        return Client(cluster), cluster
    return Client(config.scheduler), None


def _workers_numeric_settings(client, config: ExtractConfig) -> dict:
    """The numeric settings the workers will compute with; all workers must agree (one feature set)."""
    client.wait_for_workers(1)
    reported = client.run(_worker_numeric_settings, config)
    distinct = {tuple(sorted(s.items())) for s in reported.values()}
    if len(distinct) > 1:
        raise EpicfeatError(f"the dask workers would compute different numbers ({sorted(distinct)}): give them the "
                            "same kind of device and the same PyAV, or run one extract per kind")
    return dict(distinct.pop())


def run_dask(jobs: list[VideoJob], store: FeatureStore, config: ExtractConfig, client, *, weights_sha: str,
             on_result: Callable[[VideoResult], None] | None = None) -> list[VideoResult]:
    """Run the jobs on dask.distributed, one task per video. Failures are recorded by the worker (with the path,
    once); a task that dies with its worker twice (KilledWorker) is recorded here, and the run goes on."""
    from dask.distributed import as_completed

    per_task = max(1, config.decode_workers)  # a worker decodes as many videos at once as it has decoders
    groups = [list(jobs[i : i + per_task]) for i in range(0, len(jobs), per_task)]
    stamp = time.time_ns()
    futures = client.map(
        _extract_on_worker,
        groups,
        config=config,
        store_path=str(store.path),
        weights_sha=weights_sha,
        identity=store.identity.to_dict(),
        key=[f"epicfeat-extract-{group[0].video_id}-{stamp}" for group in groups],
        pure=False,
        retries=1,  # a lost worker's videos are redone elsewhere; their partial writes are never complete
    )
    by_key = {future.key: group for future, group in zip(futures, groups)}
    results: list[VideoResult] = []
    for future in as_completed(futures):
        group = by_key[future.key]
        try:
            finished = future.result()
        except Exception as err:  # the worker died on it twice, or the task raised: these videos' failure only
            finished = []
            for job in group:
                if store.is_complete(job.video_id):
                    continue  # committed before the worker died
                reason = f"{job.path}: its dask task failed ({type(err).__name__}: {err})"
                store.record_failure(job.video_id, reason, path=job.path)
                finished.append(VideoResult(job.video_id, False, reason=reason, path=str(job.path)))
        for result in finished:
            results.append(result)
            if on_result and not (result.elsewhere and result.claimant):
                on_result(result)
    return results


# ------------------------------------------------------------------------------------------------- helpers
class _Progress:
    """A rich progress bar over seconds of video, so the ETA is right for long and short videos alike."""

    def __init__(self, plan: ExtractionPlan, *, enabled: bool):
        self.enabled = enabled and bool(plan.jobs)
        self.total_videos = len(plan.jobs)
        self.videos_done = 0
        self.rows_done = 0
        self.started = time.perf_counter()
        self._expected = {job.video_id: job.duration or 0.0 for job in plan.jobs}
        self._covered: dict[str, float] = {}  # seconds of each video already shown on the bar
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]extract[/]"),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            total = sum(self._expected.values()) or None
            self._task = self._bar.add_task("extract", total=total, status=self._status())

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()

    def _status(self) -> str:
        rate = self.rows_done / max(time.perf_counter() - self.started, 1e-9)
        return f"videos {self.videos_done}/{self.total_videos}  {rate:,.1f} frames/s"

    def _advance(self, video_id: str, covered: float) -> None:
        advance = covered - self._covered.get(video_id, 0.0)
        self._covered[video_id] = covered
        if self.enabled:
            self._bar.update(self._task, advance=max(advance, 0.0), status=self._status())

    def rows(self, video_id: str, n: int, last_pts: float) -> None:
        self.rows_done += n
        self._advance(video_id, last_pts)

    def video_done(self, result: VideoResult) -> None:
        self.videos_done += 1
        if result.video_id not in self._covered and not result.elsewhere:  # a dask worker's: no per-chunk updates
            self.rows_done += result.rows
        self._advance(result.video_id, max(result.duration, self._expected.get(result.video_id, 0.0)))


def print_summary(summary: ExtractSummary) -> None:
    """The end-of-run table: what was done, how fast, where it went, and every failure with its reason."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rate = summary.rows / summary.seconds if summary.seconds else 0.0
    table = Table(title="epicfeat extract", show_header=False)
    table.add_row("feature set", str(summary.store))
    table.add_row("videos extracted", str(len(summary.done)))
    table.add_row("completed by other writers", str(len(summary.by_others)))
    table.add_row("already complete (skipped)", str(len(summary.skipped)))
    table.add_row("missing on disk", str(len(summary.missing)))
    table.add_row("failed", str(len(summary.failed)))
    table.add_row("rows written", f"{summary.rows:,}")
    table.add_row("hours of video", f"{summary.hours:.3f}")
    table.add_row("throughput", f"{rate:,.1f} frames/s over {summary.seconds:.1f} s")
    table.add_row("bytes written", f"{summary.bytes_written / 1e6:,.1f} MB")
    console.print(table)
    if summary.failed or summary.missing:
        failures = Table(title="videos not extracted (also in the feature set's failures/ folder)")
        failures.add_column("video")
        failures.add_column("reason")
        for video_id in summary.missing:
            failures.add_row(video_id, "video file not found under --videos")
        for result in summary.failed:
            failures.add_row(result.video_id, result.reason)
        console.print(failures)
        console.print("Fix or remove these files and re-run the same command: complete videos are skipped.")
