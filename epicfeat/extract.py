"""Stage one: stream every video through the frame encoder once and cache per-frame features in a Zarr feature set.

One pipeline, run by every writer of a cache:

    ClaimQueue          ──►  DecodePool (frames.py)    ──►  FrameEncoder        ──►  VideoWriter (store.py)
    claims the videos        spawned decode processes,      normalise, backbone,      Zarr, checksums, one
    one at a time            batches in shared memory       float16 rows              commit per video

Scale-out is N copies of this pipeline on one cache: N ``epicfeat extract`` processes, a SLURM array, or one per
dask worker (``--scheduler``); the claims divide the videos (claims.py).

Every model batch has exactly ``batch_size`` rows (a video's last batch is padded with black frames), so a frame's
features do not depend on the frames that shared its batch; a video is committed as soon as its last row is
written, so a kill loses at most the videos in flight, and memory does not grow with the number of videos.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import multiprocessing
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import av
import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from epicfeat import __version__
from epicfeat.backbone import (RESNET50, canonical_backbone, create_backbone, is_video, pretrained_data_config,
                               resize_for)
from epicfeat.claims import Claim, ClaimQueue
from epicfeat.configs import ExtractConfig
from epicfeat.data.annotations import EpicAnnotations
from epicfeat.data.videos import find_sources, source_identity
from epicfeat.devices import resolve_device, resolve_precision
from epicfeat.encoder import TF32, FrameEncoder, build_encoder
from epicfeat.errors import EpicfeatError
from epicfeat.frames import (
    DecodePool,
    DecodeSettings,
    FrameBatch,
    FramesDecoded,
    INTERPOLATIONS,
    Preprocess,
    VideoEnded,
    VideoJob,
    VideoMeta,
    VideoStarted,
    available_cores,
    codec_threads,
)
from epicfeat.recipes import save_config
from epicfeat.store import ClaimLostError, CompletedElsewhereError, FeatureSetIdentity, FeatureStore, VideoWriter
from epicfeat.store import folder_bytes
from epicfeat.windows import ClipBatch, ClipWindows, clip_decoding

try:  # only --scheduler needs dask; machines without it (the GPU check's) run extract all the same
    import dask
    from dask.distributed import Client, LocalCluster, get_worker
except ImportError:
    dask = None


@dataclass(frozen=True)
class VideoResult:
    """A video this run decided: committed (``reason`` empty) or failed (why)."""

    video_id: str
    rows: int = 0
    duration: float = 0.0  # seconds of source video covered
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class PipelineResult:
    """What one copy of the pipeline decided: its own videos, and those of its list other writers failed meanwhile."""

    results: tuple[VideoResult, ...]
    failed_by_others: tuple[VideoResult, ...]


@dataclass(frozen=True)
class ExtractSummary:
    """What this run did (its own videos, rows and rate) and the state of its videos in the feature set."""

    store: Path
    videos: int  # listed by --split / --video-ids
    done: tuple[VideoResult, ...]  # extracted by this run
    failed: tuple[VideoResult, ...]  # failed during this run: by this run, or by another writer of the cache
    failed_here: int  # how many of ``failed`` this run failed itself
    source: str  # the form read and its time base (the identity's): "video", "frames-epic", "frames-30fps"
    skipped: tuple[str, ...]  # complete before this run began
    by_others: tuple[str, ...]  # completed by other writers sharing the cache during this run
    missing: tuple[str, ...]  # listed, but no file under --videos
    incomplete: tuple[str, ...]  # neither complete nor failed at the end (another writer still holds them)
    seconds: float
    bytes_added: int  # growth of the feature set's folder during this run (every writer's)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing and not self.incomplete

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.done)

    @property
    def hours(self) -> float:
        return sum(r.duration for r in self.done) / 3600

    @property
    def complete(self) -> int:
        return len(self.skipped) + len(self.done) + len(self.by_others)


@dataclass(frozen=True)
class _Start:
    """The feature set as this run found it."""

    store: FeatureStore
    skipped: tuple[str, ...]
    bytes: int
    time: float  # time.perf_counter() when the run began


# ------------------------------------------------------------------------------------------------- planning
def preprocess_of(config: ExtractConfig) -> Preprocess:
    """How ``config``'s frames become model input (its backbone's pretrained preprocessing unless overridden)."""
    config = resolved(config, torch.device("cpu"))  # the preprocessing does not depend on the device
    return Preprocess(resize=config.resize, crop=config.crop, mean=config.mean, std=config.std,
                      interpolation=config.interpolation)


def decoder_version() -> str:
    """PyAV and libavcodec versions: PyAV 17 changed HD colour conversion (BT.601 -> BT.709), so pixels differ."""
    libavcodec = ".".join(str(v) for v in av.library_versions.get("libavcodec", ()))
    return f"pyav-{av.__version__}-libavcodec-{libavcodec}"


def device_description(device: torch.device) -> str:
    """What computes the numbers: the CPU's vector ISA (oneDNN kernels and bf16 emulation differ) or the GPU model."""
    if device.type == "cuda":
        return f"cuda-{torch.cuda.get_device_name(device)}"
    return f"{device.type}-{torch.backends.cpu.get_cpu_capability()}"


def resolve_fold_bn(fold_bn: bool | None, device: torch.device, backbone: str = RESNET50) -> bool:
    """``None`` (auto) folds ResNet50's batch norms on a CPU, where it runs faster so, and not on a GPU (slower
    there); other backbones are never folded."""
    if fold_bn and backbone != RESNET50:
        raise EpicfeatError(f"--fold-bn folds ResNet50's batch norms only, not {backbone}'s: drop --fold-bn")
    return device.type == "cpu" and backbone == RESNET50 if fold_bn is None else fold_bn


def resolved(config: ExtractConfig, device: torch.device) -> ExtractConfig:
    """``config`` with everything left to the backbone or the device resolved, as the identity records it: the
    backbone's canonical name, its pretrained preprocessing (crop, resize, mean, std, interpolation), precision,
    fold_bn and channels_last."""
    backbone = canonical_backbone(config.backbone)
    data = pretrained_data_config(backbone)
    _check_decodable(backbone, data, config.weights)
    if "clip_len" in data and config.fps is None:
        raise EpicfeatError(f"--fps: {backbone}'s rows are clips of {data['clip_len']} frames centred on a grid of "
                            "rows per second, which every-frame rows do not give; set --fps (e.g. 10)")
    crop = config.crop or data["input_size"][-1]
    # Random weights expect no filter in particular: one the decoder lacks falls back to bilinear.
    interpolation = data["interpolation"] if data["interpolation"] in INTERPOLATIONS else "bilinear"
    return dataclasses.replace(
        config, backbone=backbone, crop=crop, resize=config.resize or resize_for(data, crop),
        mean=tuple(config.mean or data["mean"]), std=tuple(config.std or data["std"]),
        interpolation=config.interpolation or interpolation, precision=resolve_precision(config.precision, device),
        fold_bn=resolve_fold_bn(config.fold_bn, device, backbone),
        channels_last=config.channels_last and not is_video(backbone),  # clips are 5-d: no channels_last layout
    )


def clip_of(config: ExtractConfig) -> tuple[int, float | None]:
    """(frames per row, their rate): a video backbone's clip (its pretrained clip_len, clip_fps), else (1, None)."""
    data = pretrained_data_config(canonical_backbone(config.backbone))
    return data.get("clip_len", 1), data.get("clip_fps")


def _check_decodable(backbone: str, data: dict, weights: str) -> None:
    """Refuse pretrained weights whose preprocessing the decode room cannot apply: it resizes the shorter side with
    one of swscale's filters (frames.INTERPOLATIONS) and cuts a centre crop. Random weights expect nothing."""
    if weights == "random":
        return
    if data["interpolation"] not in INTERPOLATIONS or data["crop_mode"] != "center":
        raise EpicfeatError(
            f"{backbone}'s pretrained preprocessing resizes with {data['interpolation']} interpolation and a "
            f"{data['crop_mode']} crop; epicfeat's decoder resizes with {' or '.join(INTERPOLATIONS)} interpolation "
            "and a centre crop only, so its features would not be the ones the weights were trained for; "
            "--weights random runs the pipeline with this backbone"
        )


def backbone_of(config: ExtractConfig) -> torch.nn.Module:
    """The backbone ``config`` (resolved) names, with its weights."""
    return create_backbone(config.weights, backbone=config.backbone, seed=config.seed, crop=config.crop)


def feature_set_identity(config: ExtractConfig, backbone: torch.nn.Module,
                         device: torch.device | None = None) -> FeatureSetIdentity:
    """Everything that changes the cached numbers, as run on ``device`` (default: the CPU), ``auto`` resolved.

    Not in it, because they do not change the numbers (tests show bit-identical arrays): decode workers, decode
    threads, dask workers, the scheduler, the cache folder.
    """
    device = device if device is not None else torch.device("cpu")
    config = resolved(config, device)
    clip_len, clip_fps = clip_of(config)
    return FeatureSetIdentity(
        weights=backbone.weights_name, weights_sha=backbone.weights_sha, fps=config.fps, resize=config.resize,
        crop=config.crop, mean=config.mean, std=config.std, interpolation=config.interpolation, backbone=backbone.name,
        feature_dim=backbone.num_features, precision=config.precision, decoder=decoder_version(),
        device=device_description(device), tf32=TF32, batch_size=config.batch_size,
        channels_last=config.channels_last, compile=config.compile, fold_bn=config.fold_bn,
        # select_videos resolves --source auto; a config never looked up (benchmarks, predict's) reads video files
        source=source_identity("video" if config.source == "auto" else config.source, config.frames_fps),
        clip_len=clip_len, clip_fps=clip_fps,
    )


def select_videos(config: ExtractConfig) -> tuple[list[VideoJob], list[str], ExtractConfig]:
    """The videos to extract (found on disk), the ids listed but missing, from ``--split`` or ``--video-ids``, and
    ``config`` with its ``--source auto`` resolved to the form chosen (data/videos.py's rule)."""
    if config.videos is None:
        raise EpicfeatError("no video folder given: pass --videos DIR (the folder holding P01/, P02/, ...)")
    needed_until: dict[str, float] = {}
    durations: dict[str, float] = {}
    if config.annotations is not None:
        annotations = EpicAnnotations(config.annotations)
        durations = annotations.video_info["duration"].astype(float).to_dict()
        if not config.video_ids:
            splits = ("train", "validation", "test") if config.split == "all" else (config.split,)
            segments = pd.concat([annotations.segments(split) for split in splits])
            needed_until = segments.groupby("video_id")["stop_sec"].max().astype(float).to_dict()
    elif not config.video_ids:
        raise EpicfeatError("--split needs the annotation CSVs: pass --annotations DIR, or list --video-ids")
    video_ids = list(config.video_ids) or sorted(needed_until)
    lookup = find_sources(config.videos, video_ids, source=config.source, template=config.video_path,
                          frames_fps=config.frames_fps)
    jobs = [VideoJob(video_id, source.path, needed_until.get(video_id), durations.get(video_id), source.frames_fps)
            for video_id, source in lookup.found.items()]
    return jobs, list(lookup.missing), dataclasses.replace(config, source=lookup.form)


def decode_workers_for(requested: int, n_jobs: int) -> int:
    """Decode processes to start: ``requested`` (>= 0), or -1: one per spare core, at most 8 (never more than jobs)."""
    if requested >= 0:
        return min(requested, n_jobs)
    return max(0, min(available_cores() - 1, n_jobs, 8))


def decode_settings(config: ExtractConfig, workers: int) -> DecodeSettings:
    """How ``workers`` decode processes (0: this process) decode: codec threads shared out among them."""
    threads = codec_threads(workers, config.decode_threads) if workers else config.decode_threads
    clip_len, clip_fps = clip_of(config)
    # a video backbone's frames: every one its clips hold, and one for each row's centre
    fps = config.fps if clip_len == 1 else clip_decoding(clip_fps, config.fps)[1]
    return DecodeSettings(fps, preprocess_of(config), config.batch_size, threads)


# ---------------------------------------------------------------------------------------------- entry point
def extract_features(config: ExtractConfig) -> ExtractSummary:
    """``epicfeat extract``: one copy of the pipeline in this process (with ``--scheduler``, one on each dask
    worker) over the videos of ``--split`` / ``--video-ids``. Failures are recorded, never fatal; several runs on one
    cache share the work."""
    started = time.perf_counter()
    jobs, missing, config = select_videos(config)
    if config.scheduler:
        return _extract_on_dask(config, jobs, missing, started)
    device = resolve_device(config.device)
    config = resolved(config, device)
    workers = decode_workers_for(config.decode_workers, len(jobs))
    # The decode processes start first: they import PyAV while the model loads.
    with DecodePool(workers, decode_settings(config, workers)) as pool:
        backbone = backbone_of(config)
        identity = feature_set_identity(config, backbone, device)
        start = _open_feature_set(config, identity, missing, started)
        todo = [job for job in jobs if job.video_id not in start.skipped]
        encoder = build_encoder(backbone, identity.to_dict(), device)
        with _Progress(todo, enabled=config.progress) as progress:
            result = Pipeline(start.store, todo, encoder, config, progress).run(pool)
    return _summarize(start, jobs, missing, [result])


def _open_feature_set(config: ExtractConfig, identity: FeatureSetIdentity, missing: list[str],
                      started: float) -> _Start:
    """The feature set (made if new) with this run's config saved and its missing videos recorded."""
    store = FeatureStore.create(config.cache, identity)
    save_config(config, store.path / "extract_config.yaml")
    for video_id in missing:
        store.record_failure(video_id, _not_found(config))
    return _Start(store, tuple(store.complete_videos()), folder_bytes(store.path), started)


def _not_found(config: ExtractConfig) -> str:
    other = "frames" if config.source == "video" else "video"
    return f"not found under --videos as {config.source} (--source {other} reads the other form)"


def _summarize(start: _Start, jobs: list[VideoJob], missing: list[str],
               results: list[PipelineResult]) -> ExtractSummary:
    store = start.store
    mine = [r for result in results for r in result.results]
    done = tuple(r for r in mine if r.ok)
    own_failures = {r.video_id: r for r in mine if not r.ok}
    others = {r.video_id: r for result in results for r in result.failed_by_others}
    failed = {**{v: r for v, r in others.items() if not store.is_complete(v)}, **own_failures}
    listed = [job.video_id for job in jobs]
    complete = {v for v in listed if store.is_complete(v)}
    ours = {r.video_id for r in done}
    return ExtractSummary(
        store=store.path, source=store.identity.source, videos=len(listed) + len(missing), done=done,
        failed=tuple(failed[v] for v in listed if v in failed), failed_here=len(own_failures),
        skipped=tuple(v for v in listed if v in start.skipped),
        by_others=tuple(v for v in listed if v in complete and v not in ours and v not in start.skipped),
        missing=tuple(missing), incomplete=tuple(v for v in listed if v not in complete and v not in failed),
        seconds=time.perf_counter() - start.time, bytes_added=folder_bytes(store.path) - start.bytes,
    )


# ----------------------------------------------------------------------------------------------- the pipeline
class Pipeline:
    """One copy of the pipeline: ``run`` claims each video of ``jobs``, decodes it, encodes every batch and writes it
    into ``store``, committing each video as its last row is written; it returns once every video is decided, by this
    writer or another. A problem with one video is that video's failure; only a full disk or quota stops the run.
    """

    def __init__(self, store: FeatureStore, jobs: Sequence[VideoJob], encoder: FrameEncoder, config: ExtractConfig,
                 progress: _Progress):
        self.store, self.encoder, self.config, self.progress = store, encoder, config, progress
        self.jobs = {job.video_id: job for job in jobs}
        self.claim_queue = ClaimQueue(store, list(self.jobs), lease_s=config.claim_lease_s)
        self.claims: dict[str, Claim] = {}  # held: claimed and not yet committed or failed
        self.results: list[VideoResult] = []
        self._writers: dict[str, tuple[VideoWriter, VideoMeta]] = {}
        self._clip_len, clip_fps = clip_of(config)
        self._clip_step = clip_decoding(clip_fps, config.fps)[0] if self._clip_len > 1 else 1
        self._windows: dict[str, ClipWindows] = {}  # a video backbone's clip rows being gathered, per video
        self._decided: set[str] = set()  # committed, failed or given up: later events of the video are ignored
        self._stop = threading.Event()
        self._claim_error: BaseException | None = None

    def run(self, pool: DecodePool) -> PipelineResult:
        claimed: queue.Queue = queue.Queue(maxsize=max(1, pool.workers))  # claimed videos for the decoders
        threading.Thread(target=self._claim_videos, args=(claimed,), name="epicfeat-claims", daemon=True).start()
        try:
            for event in pool.decode(claimed):
                if isinstance(event, FramesDecoded):
                    self._frames(event)
                elif isinstance(event, VideoStarted):
                    self._started(event)
                else:
                    self._ended(event)
            if self._claim_error is not None:
                raise self._claim_error
        finally:
            self._stop.set()
            for video_id in list(self._writers):  # interrupted mid-video: left partial, never complete
                self._drop_writer(video_id)
            for claim in list(self.claims.values()):
                claim.release()
        failed_by_others = tuple(VideoResult(v, reason=record.get("reason", ""))
                                 for v, record in self.claim_queue.others_failed.items())
        return PipelineResult(tuple(self.results), failed_by_others)

    def _claim_videos(self, claimed: queue.Queue) -> None:
        """Claims the videos one at a time for the decoders (``ClaimQueue``: waiting for those other writers hold,
        taking over those whose writer died), in a thread of its own: a wait never stalls the videos in flight."""
        try:
            for claim in self.claim_queue:
                self.claims[claim.video_id] = claim
                if not self._put(claimed, self.jobs[claim.video_id]):
                    claim.release()  # the run stopped meanwhile
                    return
        except Exception as err:  # the cache cannot be read: the run stops with this error
            self._claim_error = err
        finally:
            self._put(claimed, None)

    def _put(self, claimed: queue.Queue, job: VideoJob | None) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                claimed.put(job, timeout=0.2)
                return True
        return False

    def _started(self, event: VideoStarted) -> None:
        if event.video_id in self._decided:
            return
        self._drop_writer(event.video_id)  # a second start: its decode process died, the rows so far are dropped
        with self._per_video(event.video_id):
            writer = self.store.writer(event.video_id, attrs=self._attrs(event.meta),
                                       claim=self.claims[event.video_id])
            self._writers[event.video_id] = (writer, event.meta)
            if self._clip_len > 1:
                self._windows[event.video_id] = ClipWindows(self._clip_len, self._clip_step, self.config.fps,
                                                            self.config.batch_size)

    def _frames(self, event: FramesDecoded) -> None:
        if event.video_id not in self._writers:  # failed meanwhile
            return
        windows = self._windows.get(event.video_id)
        for batch in [event.batch] if windows is None else windows.add(event.batch):
            self._write(event.video_id, batch)

    def _write(self, video_id: str, batch: FrameBatch | ClipBatch) -> None:
        if video_id not in self._writers:  # failed meanwhile
            return
        images = torch.from_numpy(batch.images).movedim(-1, -3)  # (n, [clip,] H, W, 3) -> (n, [clip,] 3, H, W)
        features = self.encoder.encode(images, pad_to=self.config.batch_size).cpu().numpy()  # (n, D) float16
        with self._per_video(video_id):
            self._writers[video_id][0].append(features, batch.pts, batch.frame_indices, batch.span)
        self.progress.rows(video_id, len(batch), float(batch.pts[-1]))

    def _ended(self, event: VideoEnded) -> None:
        video_id = event.video_id
        if video_id in self._decided:
            return
        if event.error:
            self._fail(video_id, event.error)
            return
        windows = self._windows.pop(video_id, None)
        for batch in windows.end() if windows is not None else []:  # the rows whose clips reach the video's end
            self._write(video_id, batch)
        if video_id in self._decided:
            return
        writer, meta = self._writers[video_id]
        with self._per_video(video_id):
            writer.commit()
            del self._writers[video_id]
            self.results.append(VideoResult(video_id, writer.rows, meta.duration))
            self._decide(video_id)

    @contextlib.contextmanager
    def _per_video(self, video_id: str):
        """Store work on one video: a problem is that video's failure; a full disk or quota stops the run; a video
        another writer took over (this one was cut off past its lease) is left to that writer."""
        try:
            yield
        except (ClaimLostError, CompletedElsewhereError):
            self._drop_writer(video_id)
            self._decide(video_id)
        except Exception as err:
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise EpicfeatError(_disk_full_message(err, self.store.path)) from None
            self._fail(video_id, f"writing its features failed ({type(err).__name__}: {err})")

    def _fail(self, video_id: str, reason: str) -> None:
        """Record the video's failure (with its path), drop its writer, release its claim."""
        self._drop_writer(video_id)
        self.store.record_failure(video_id, reason, path=self.jobs[video_id].path, claim=self.claims.get(video_id))
        self.results.append(VideoResult(video_id, reason=reason))
        self._decide(video_id)

    def _drop_writer(self, video_id: str) -> None:
        """Close the video's open writer, if any: its partial folder stays until the video's next writer removes it."""
        self._windows.pop(video_id, None)
        writer = self._writers.pop(video_id, None)
        if writer is not None:
            writer[0].close()

    def _decide(self, video_id: str) -> None:
        self._decided.add(video_id)
        claim = self.claims.pop(video_id, None)
        if claim is not None:
            claim.release()
        self.progress.video_done(video_id)

    def _attrs(self, meta: VideoMeta) -> dict:
        return {
            "source_path": str(meta.path), "source_fps": meta.fps, "duration": meta.duration, "width": meta.width,
            "height": meta.height, "codec": meta.codec, "epicfeat_version": __version__,
            "extract_batch_size": self.config.batch_size,
            # the whole preprocessing definition, interpolation and colour conversion included (provenance)
            "preprocess": preprocess_of(self.config).identity(), "decoder": decoder_version(),
        }


def _disk_full_message(err: OSError, store: Path) -> str:
    quota = err.errno == errno.EDQUOT
    what = f"the disk quota for {store} is exhausted" if quota else f"the disk holding {store} is full"
    space = "Free space within your quota" if quota else "Free space"
    return (f"{what}; complete videos are kept and the unfinished ones stay partial. {space} (or point --cache "
            "elsewhere) and re-run the same command to resume.")


# ------------------------------------------------------------------------------------------------------ dask
def _extract_on_dask(config: ExtractConfig, jobs: list[VideoJob], missing: list[str],
                     started: float) -> ExtractSummary:
    """One copy of the pipeline on each dask worker (one dask thread each), all on the feature set the workers agree
    on; a worker's pipeline that dies is redone by dask, and its claimed videos are taken over by the others."""
    if dask is None:
        raise EpicfeatError("--scheduler needs dask.distributed, which is not installed: "
                            "pip install 'dask[distributed]' (or run without --scheduler)")
    client, cluster = _dask_client(config)
    try:
        client.wait_for_workers(1)
        identities = client.run(_worker_identity, config)  # worker address -> identity dict
        if len({json.dumps(i, sort_keys=True) for i in identities.values()}) > 1:
            raise EpicfeatError(f"the dask workers would compute different numbers ({list(identities.values())}): give "
                                "them the same kind of device and the same PyAV, or run one extract per kind")
        identity = FeatureSetIdentity.from_dict(next(iter(identities.values())))
        start = _open_feature_set(config, identity, missing, started)
        todo = [job for job in jobs if job.video_id not in start.skipped]
        futures: list = []
        with _Progress(todo, enabled=config.progress) as progress:
            while True:  # one pipeline per worker, for workers that join later (SLURM jobs starting) too
                for _ in range(len(client.nthreads()) - len(futures)):
                    futures.append(client.submit(_pipeline_on_worker, config, str(start.store.path), todo,
                                                 pure=False, key=f"epicfeat-extract-{len(futures)}-{time.time_ns()}"))
                progress.poll(start.store)
                if all(future.done() for future in futures):
                    break
                time.sleep(1)
        results = [future.result() for future in futures]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return _summarize(start, jobs, missing, results)


def _worker_device(config: ExtractConfig, name: object) -> torch.device:
    """The device of the dask worker ``name``. A LocalCluster names its workers 0, 1, ...: on a machine with several
    GPUs, ``auto`` gives each the GPU its number picks (a SLURM job, or a worker with CUDA_VISIBLE_DEVICES, sees
    one)."""
    device = resolve_device(config.device)
    if device.type == "cuda" and config.device == "auto" and str(name).isdigit():
        device = torch.device("cuda", int(name) % torch.cuda.device_count())
    return device


def _worker_identity(config: ExtractConfig, dask_worker) -> dict:
    """The identity a worker would compute (``client.run`` passes the worker as ``dask_worker``)."""
    device = _worker_device(config, dask_worker.name)
    return feature_set_identity(config, backbone_of(resolved(config, device)), device).to_dict()


def _pipeline_on_worker(config: ExtractConfig, store_path: str, jobs: list[VideoJob]) -> PipelineResult:
    """One dask task: the pipeline over ``jobs`` on this worker, into the feature set at ``store_path``."""
    device = _worker_device(config, get_worker().name)
    config = resolved(config, device)
    store = FeatureStore.open(store_path)
    backbone = backbone_of(config)
    identity = feature_set_identity(config, backbone, device)
    if identity != store.identity:
        raise EpicfeatError(f"dask worker {get_worker().name} would compute other numbers ({identity.to_dict()}) "
                            f"than the feature set ({store.identity.to_dict()}): give every worker the same device "
                            "and PyAV, or run one extract per kind")
    # A daemonic worker (dask's default, outside --scheduler local / slurm) may not start processes: it decodes itself.
    workers = 0 if multiprocessing.current_process().daemon else decode_workers_for(config.decode_workers, len(jobs))
    with DecodePool(workers, decode_settings(config, workers)) as pool:
        encoder = build_encoder(backbone, identity.to_dict(), device)
        return Pipeline(store, jobs, encoder, config, _Progress([], enabled=False)).run(pool)


def _dask_client(config: ExtractConfig):
    """(client, cluster): a LocalCluster, a SLURM cluster through dask-jobqueue, or an existing scheduler."""
    if config.scheduler == "local":
        # Non-daemonic workers, so each may start its own decode processes; the cores are shared out among them.
        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = LocalCluster(n_workers=config.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=40)
        return Client(cluster), cluster
    if config.scheduler == "slurm":
        SLURMCluster = _slurm_cluster_class()
        # One job per GPU: one dask thread (one pipeline), a non-daemonic worker so that it may start its decode
        # processes on the job's CPUs. Queue, account and walltime come from dask's jobqueue config.
        cpus = config.decode_workers + 1 if config.decode_workers > 0 else 8
        cluster = SLURMCluster(cores=1, processes=1, job_cpu=cpus, memory=f"{4 * cpus}GB",
                               job_extra_directives=["--gres=gpu:1"],
                               job_script_prologue=["export DASK_DISTRIBUTED__WORKER__DAEMON=False"])
        cluster.scale(jobs=config.workers)
        return Client(cluster), cluster
    return Client(config.scheduler), None


def _slurm_cluster_class() -> type:
    """dask-jobqueue's SLURMCluster, imported only for ``--scheduler slurm``: importing it replaces Ctrl-C's handler
    with a silent ``sys.exit()`` (dask_jobqueue/runner.py), which would end any run with exit 0; the handler is put
    back."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise EpicfeatError("--scheduler slurm needs dask-jobqueue, which is not installed: "
                            "pip install 'epicfeat[slurm]' (or pip install dask-jobqueue)") from None
    finally:
        signal.signal(signal.SIGINT, handler)
    return SLURMCluster


# ------------------------------------------------------------------------------------------------ reporting
class _Progress:
    """A progress bar over seconds of video (so the ETA is right for long and short videos alike) with this run's
    rate in rows/s."""

    def __init__(self, jobs: Sequence[VideoJob], *, enabled: bool):
        self.enabled = enabled and bool(jobs)
        self.total_videos, self.videos_done, self.rows_done = len(jobs), 0, 0
        self.started = time.perf_counter()
        self._expected = {job.video_id: job.duration or 0.0 for job in jobs}
        self._covered: dict[str, float] = {}  # seconds of each video already shown on the bar
        if self.enabled:
            self._bar = Progress(TextColumn("[bold]extract[/]"), BarColumn(), TextColumn("{task.fields[status]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            total = sum(self._expected.values()) or None
            self._task = self._bar.add_task("extract", total=total, status=self._status())

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()

    def rows(self, video_id: str, n: int, last_pts: float) -> None:
        self.rows_done += n
        self._advance(video_id, last_pts)

    def video_done(self, video_id: str) -> None:
        self.videos_done += 1
        self._advance(video_id, max(self._expected.get(video_id, 0.0), self._covered.get(video_id, 0.0)))

    def poll(self, store: FeatureStore) -> None:
        """Count the videos that became complete in ``store`` (dask workers' progress, seen from the client)."""
        for video_id in self._expected:
            if video_id not in self._covered and store.is_complete(video_id):
                self.rows_done += int(store.video_attrs(video_id).get("rows", 0))
                self.video_done(video_id)

    def _status(self) -> str:
        rate = self.rows_done / max(time.perf_counter() - self.started, 1e-9)
        return f"videos {self.videos_done}/{self.total_videos}  {rate:,.1f} rows/s"

    def _advance(self, video_id: str, covered: float) -> None:
        advance = covered - self._covered.get(video_id, 0.0)
        self._covered[video_id] = covered
        if self.enabled:
            self._bar.update(self._task, advance=max(advance, 0.0), status=self._status())


def print_summary(summary: ExtractSummary) -> None:
    """The end-of-run table: what this run did and how fast, then its videos' state in the feature set, and every
    failure with its reason."""
    rate = summary.rows / summary.seconds if summary.seconds else 0.0
    table = Table(title="epicfeat extract", show_header=False)
    table.add_row("feature set", str(summary.store))
    table.add_row("source", summary.source)
    table.add_row("[bold]this run[/]", "")
    table.add_row("  videos extracted", str(len(summary.done)))
    table.add_row("  rows written", f"{summary.rows:,}")
    table.add_row("  hours of video", f"{summary.hours:.3f}")
    table.add_row("  throughput", f"{rate:,.1f} rows/s over {summary.seconds:.1f} s")
    table.add_row("  failed", str(summary.failed_here))
    table.add_row("[bold]its videos in the feature set[/]", "")
    table.add_row("  complete", f"{summary.complete} / {summary.videos}")
    table.add_row("    extracted by this run", str(len(summary.done)))
    table.add_row("    by other writers meanwhile", str(len(summary.by_others)))
    table.add_row("    complete before this run", str(len(summary.skipped)))
    table.add_row("  failed (by any writer)", str(len(summary.failed)))
    table.add_row("  missing on disk", str(len(summary.missing)))
    if summary.incomplete:
        table.add_row("  still held by other writers", str(len(summary.incomplete)))
    table.add_row("  bytes added (all writers)", f"{summary.bytes_added / 1e6:,.1f} MB")
    console = Console()
    console.print(table)
    if summary.failed or summary.missing:
        failures = Table(title="videos not extracted (also in the feature set's failures/ folder)")
        failures.add_column("video")
        failures.add_column("reason")
        for video_id in summary.missing:
            failures.add_row(video_id, f"not found under --videos as {summary.source}")
        for result in summary.failed:
            failures.add_row(result.video_id, result.reason)
        console.print(failures)
        console.print("Fix or remove these files and re-run the same command: complete videos are skipped.")
