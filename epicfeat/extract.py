"""Stage one: stream every video through ResNet50 once and cache per-frame 2048-d features in a Zarr feature set.

The work is split the rechunker way: ``plan_extraction`` is a pure description of what to do (which videos, into
which feature set, which are already done), then an executor carries it out, in this process
(``run_local``) or on a dask.distributed cluster (``run_dask``), where each video goes to exactly one worker.

``run_local`` is a three-stage pipeline so that the slowest stage runs flat out:

    decode workers (DataLoader processes, PyAV) ──► model batches (span video boundaries) ──► writer thread
    resize + centre crop to uint8, front to back     normalise, autocast, ResNet50           Zarr, atomic commit

Every batch given to the model has exactly ``batch_size`` rows (the last one is padded), so a frame's features
do not depend on which other frames shared its batch: a resumed run writes the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from epicfeat import __version__
from epicfeat.backbone import create_backbone
from epicfeat.configs import ExtractConfig
from epicfeat.devices import resolve_device, resolve_precision
from epicfeat.errors import EpicfeatError
from epicfeat.frames import FrameBatch, Preprocess, VideoError, VideoMeta, iter_frames, probe_video
from epicfeat.store import FeatureSetIdentity, FeatureStore


# Frames whose last pts falls this far short of where the annotations (or the container) say the video ends are
# reported as truncated / too short instead of being cached as if complete.
_END_TOLERANCE_S = 1.0


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


@dataclass(frozen=True)
class ExtractSummary:
    store: Path
    done: tuple[VideoResult, ...]
    failed: tuple[VideoResult, ...]
    skipped: tuple[str, ...]
    missing: tuple[str, ...]
    seconds: float
    bytes_written: int

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
    return Preprocess(resize=config.resize, crop=config.crop, mean=config.mean, std=config.std)


def feature_set_identity(config: ExtractConfig, backbone: torch.nn.Module) -> FeatureSetIdentity:
    """Everything that changes the cached numbers; two configs share a feature set only if all of it agrees."""
    return FeatureSetIdentity(
        weights=backbone.weights_name,
        weights_sha=backbone.weights_sha,
        fps=config.fps,
        resize=config.resize,
        crop=config.crop,
        mean=tuple(config.mean),
        std=tuple(config.std),
        precision=config.precision,
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
    """``epicfeat extract``: plan, run locally or on dask, record failures, and return a summary."""
    from epicfeat.config import save_config

    started = time.perf_counter()
    # The feature set records the precision that actually computes the features, never "auto".
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, resolve_device(config.device)))
    backbone = create_backbone(config.weights, seed=config.seed)
    identity = feature_set_identity(config, backbone)
    store = FeatureStore.create(config.cache, identity)
    jobs, missing = select_videos(config)
    plan = plan_extraction(identity, jobs, missing, set(store.complete_videos()))
    save_config(config, store.path / "extract_config.yaml")
    for video_id in plan.missing:
        store.record_failure(video_id, "video file not found under --videos")
    bytes_before = _folder_bytes(store.path)

    with _Progress(plan, enabled=config.progress) as progress:
        if config.scheduler:
            results = run_dask(plan, store, config, on_result=progress.video_done)
        else:
            device = resolve_device(config.device)
            results = run_local(
                plan.jobs, store, backbone, config, device=device, on_rows=progress.rows, on_result=progress.video_done
            )
    return ExtractSummary(
        store=store.path,
        done=tuple(r for r in results if r.ok),
        failed=tuple(r for r in results if not r.ok),
        skipped=plan.already_complete,
        missing=plan.missing,
        seconds=time.perf_counter() - started,
        bytes_written=_folder_bytes(store.path) - bytes_before,
    )


# ------------------------------------------------------------------------------------------ local executor
@dataclass
class _VideoStart:
    video_id: str
    meta: VideoMeta


@dataclass
class _Frames:
    video_id: str
    batch: FrameBatch


@dataclass
class _VideoEnd:
    video_id: str
    rows: int
    last_pts: float


@dataclass
class _VideoFailed:
    video_id: str
    reason: str


class _DecodeStream(torch.utils.data.IterableDataset):
    """Decodes its share of the jobs front to back and yields start / frames / end-or-failure items per video."""

    def __init__(self, jobs: list[VideoJob], fps: float | None, preprocess: Preprocess, batch_size: int, threads: int):
        self.jobs, self.fps, self.preprocess, self.batch_size, self.threads = jobs, fps, preprocess, batch_size, threads

    def __iter__(self) -> Iterator[object]:
        info = torch.utils.data.get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id :: info.num_workers]
        for job in jobs:
            yield from self._decode(job)

    def _decode(self, job: VideoJob) -> Iterator[object]:
        rows, last_pts = 0, -1.0
        try:
            meta = probe_video(job.path)
            yield _VideoStart(job.video_id, meta)
            for batch in iter_frames(
                job.path, fps=self.fps, preprocess=self.preprocess, batch_size=self.batch_size, threads=self.threads
            ):
                rows += len(batch.pts)
                last_pts = float(batch.pts[-1])
                yield _Frames(job.video_id, batch)
        except VideoError as err:
            yield _VideoFailed(job.video_id, str(err))
            return
        reason = _incomplete_reason(job, meta, rows, last_pts)
        yield _VideoFailed(job.video_id, reason) if reason else _VideoEnd(job.video_id, rows, last_pts)


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


def run_local(
    jobs: list[VideoJob] | tuple[VideoJob, ...],
    store: FeatureStore,
    backbone: torch.nn.Module,
    config: ExtractConfig,
    *,
    device: torch.device,
    on_rows: Callable[[str, int, float], None] | None = None,
    on_result: Callable[[VideoResult], None] | None = None,
) -> list[VideoResult]:
    """Extract ``jobs`` into ``store`` with the decode ► model ► write pipeline; returns one result per video."""
    preprocess = preprocess_of(config)
    model = _prepare_model(backbone, config, device)
    workers = _decode_workers(config.decode_workers, len(jobs))
    stream = _DecodeStream(list(jobs), config.fps, preprocess, config.batch_size, config.decode_threads)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,  # items are already batches of frames
        num_workers=workers,
        # spawn, not fork: the parent runs zarr's event-loop thread and an OpenMP pool, neither fork-safe
        multiprocessing_context="spawn" if workers else None,
        prefetch_factor=8 if workers else None,
    )
    writer = _WriterThread(store, config, on_rows=on_rows, on_result=on_result)
    writer.start()
    batcher = _Batcher(config.batch_size, lambda images: _features(model, images, preprocess, config, device), writer)
    try:
        for item in loader:
            writer.raise_if_failed()
            batcher.add(item)
        batcher.flush()
    finally:
        writer.close()
    return writer.results


class _Batcher:
    """Gathers frames into model batches of exactly ``batch_size`` rows, across video boundaries.

    Video starts go to the writer at once; ends and failures wait until every row queued before them has been
    run through the model, so the writer sees each video's rows before its end.
    """

    def __init__(self, batch_size: int, run_model: Callable[[np.ndarray], np.ndarray], writer: "_WriterThread"):
        self.batch_size, self.run_model, self.writer = batch_size, run_model, writer
        self.pending: list[_Frames] = []
        self.pending_rows = 0
        self.waiting_events: list[object] = []

    def add(self, item: object) -> None:
        if isinstance(item, _Frames):
            self.pending.append(item)
            self.pending_rows += len(item.batch.pts)
            while self.pending_rows >= self.batch_size:
                self._run(self.batch_size)
        elif isinstance(item, _VideoStart):
            self.writer.put(item)
        elif self.pending_rows:
            self.waiting_events.append(item)
        else:
            self.writer.put(item)

    def flush(self) -> None:
        if self.pending_rows:
            self._run(self.pending_rows)

    def _run(self, rows: int) -> None:
        taken: list[_Frames] = []
        need = rows
        while need:
            head = self.pending[0]
            n = len(head.batch.pts)
            if n <= need:
                taken.append(self.pending.pop(0))
                need -= n
            else:  # split the head item: its first `need` rows go into this batch
                taken.append(_Frames(head.video_id, _slice(head.batch, slice(0, need))))
                self.pending[0] = _Frames(head.video_id, _slice(head.batch, slice(need, None)))
                need = 0
        self.pending_rows -= rows
        images = np.concatenate([t.batch.images for t in taken])  # (rows, crop, crop, 3) uint8
        features = self.run_model(_pad_rows(images, self.batch_size))[:rows]  # (rows, 2048) float16
        start = 0
        for t in taken:
            n = len(t.batch.pts)
            self.writer.put(("rows", t.video_id, features[start : start + n], t.batch.pts, t.batch.frame_indices))
            start += n
        if not self.pending_rows:
            for event in self.waiting_events:
                self.writer.put(event)
            self.waiting_events.clear()


def _slice(batch: FrameBatch, s: slice) -> FrameBatch:
    return FrameBatch(frame_indices=batch.frame_indices[s], pts=batch.pts[s], images=batch.images[s])


def _pad_rows(images: np.ndarray, rows: int) -> np.ndarray:
    """Pad with zero images to a fixed batch: per-frame results then never depend on the batch's size."""
    if len(images) == rows:
        return images
    padding = np.zeros((rows - len(images), *images.shape[1:]), dtype=images.dtype)
    return np.concatenate([images, padding])  # (rows, crop, crop, 3)


def _prepare_model(backbone: torch.nn.Module, config: ExtractConfig, device: torch.device) -> torch.nn.Module:
    model = backbone.to(device).eval()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        model = torch.compile(model)
    return model


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@torch.inference_mode()
def _features(
    model: torch.nn.Module, images: np.ndarray, preprocess: Preprocess, config: ExtractConfig, device: torch.device
) -> np.ndarray:
    pixels = torch.from_numpy(images).to(device, non_blocking=True)  # (B, H, W, 3) uint8
    pixels = preprocess.normalize(pixels)  # (B, 3, H, W) float32
    if config.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    dtype = _AUTOCAST_DTYPES.get(resolve_precision(config.precision, device))  # extract_features resolved it
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        features = model(pixels)  # (B, 2048)
    return features.float().cpu().numpy().astype(np.float16)


def _decode_workers(requested: int, n_jobs: int) -> int:
    if requested >= 0:
        return min(requested, n_jobs)
    return max(0, min((os.cpu_count() or 1) - 1, n_jobs, 8))


class _WriterThread(threading.Thread):
    """Owns every open video writer, so Zarr writes overlap the next model batch instead of stalling it."""

    def __init__(self, store: FeatureStore, config: ExtractConfig, *, on_rows=None, on_result=None):
        super().__init__(name="epicfeat-writer", daemon=True)
        self.store, self.config = store, config
        self.on_rows, self.on_result = on_rows, on_result
        self.queue: queue.Queue = queue.Queue(maxsize=16)
        self.results: list[VideoResult] = []
        self.error: BaseException | None = None
        self._open: dict[str, tuple[object, VideoMeta, int]] = {}

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
            try:
                self._handle(item)
            except BaseException as err:  # e.g. a full disk: stop the run, the video stays partial
                self.error = _writer_error(err, self.store)

    def _handle(self, item: object) -> None:
        if isinstance(item, _VideoStart):
            writer = self.store.writer(item.video_id, attrs=self._attrs(item.meta))
            writer.__enter__()
            self._open[item.video_id] = (writer, item.meta, 0)
        elif isinstance(item, tuple):
            _, video_id, features, pts, frame_indices = item
            writer, meta, rows = self._open[video_id]
            writer.append(features, pts, frame_indices)
            self._open[video_id] = (writer, meta, rows + len(pts))
            if self.on_rows:
                self.on_rows(video_id, len(pts), float(pts[-1]))
        elif isinstance(item, _VideoEnd):
            writer, meta, rows = self._open.pop(item.video_id)
            writer.commit()
            writer.__exit__(None, None, None)
            self._report(VideoResult(item.video_id, True, rows=rows, duration=meta.duration))
        elif isinstance(item, _VideoFailed):
            self._abort(item.video_id)
            self.store.record_failure(item.video_id, item.reason)
            self._report(VideoResult(item.video_id, False, reason=item.reason))

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
        }


def _writer_error(err: BaseException, store: FeatureStore) -> BaseException:
    if isinstance(err, OSError) and err.errno == 28:  # ENOSPC
        return EpicfeatError(
            f"the disk holding {store.path} is full; complete videos are kept and the unfinished one stays "
            "partial. Free space (or point --cache elsewhere) and re-run the same command to resume."
        )
    return err


# ------------------------------------------------------------------------------------------- dask executor
_WORKER_BACKBONES: dict[tuple, torch.nn.Module] = {}


def _extract_on_worker(job: VideoJob, config: ExtractConfig, store_path: str, weights_sha: str) -> VideoResult:
    """One dask task: one video, start to finish, on whichever worker the scheduler picked."""
    key = (config.weights, config.seed)
    if key not in _WORKER_BACKBONES:  # load ResNet50 once per worker process, not once per video
        _WORKER_BACKBONES[key] = create_backbone(config.weights, seed=config.seed)
    backbone = _WORKER_BACKBONES[key]
    if backbone.weights_sha != weights_sha:
        return VideoResult(job.video_id, False, reason=f"worker loaded different weights ({backbone.weights_sha})")
    store = FeatureStore.open(store_path)
    if store.is_complete(job.video_id):  # another worker (or an earlier run) finished it meanwhile
        video = store.read(job.video_id)
        return VideoResult(job.video_id, True, rows=len(video.pts), duration=float(video.attrs.get("duration", 0)))
    device = resolve_device(config.device)
    if device.type == "cuda" and config.device == "auto":
        device = torch.device("cuda", _worker_index() % torch.cuda.device_count())
    local = dataclasses.replace(config, decode_workers=0, progress=False)
    (result,) = run_local([job], store, backbone, local, device=device)
    return result


def _worker_index() -> int:
    from dask.distributed import get_worker

    name = get_worker().name
    return int(name) if str(name).isdigit() else abs(hash(name))


def run_dask(
    plan: ExtractionPlan,
    store: FeatureStore,
    config: ExtractConfig,
    *,
    on_result: Callable[[VideoResult], None] | None = None,
) -> list[VideoResult]:
    """Run the plan on dask.distributed: a LocalCluster (``--scheduler local``) or an existing scheduler address."""
    from dask.distributed import Client, LocalCluster, as_completed

    if config.scheduler == "local":
        cluster = LocalCluster(
            n_workers=config.workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        )
        client = Client(cluster)
    else:
        cluster, client = None, Client(config.scheduler)
    results: list[VideoResult] = []
    try:
        futures = client.map(
            _extract_on_worker,
            list(plan.jobs),
            config=config,
            store_path=str(store.path),
            weights_sha=plan.identity.weights_sha,
            key=[f"epicfeat-extract-{job.video_id}" for job in plan.jobs],
            pure=False,
            retries=1,  # a lost worker's video is redone elsewhere; its partial write is never complete
        )
        for future in as_completed(futures):
            result = future.result()
            if not result.ok:
                store.record_failure(result.video_id, result.reason)
            results.append(result)
            if on_result:
                on_result(result)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return results


# ------------------------------------------------------------------------------------------------- helpers
def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


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
        if result.video_id not in self._covered:  # ran on a dask worker: no per-chunk updates came
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
    table.add_row("already complete (skipped)", str(len(summary.skipped)))
    table.add_row("missing on disk", str(len(summary.missing)))
    table.add_row("failed", str(len(summary.failed)))
    table.add_row("rows written", f"{summary.rows:,}")
    table.add_row("hours of video", f"{summary.hours:.3f}")
    table.add_row("throughput", f"{rate:,.1f} frames/s over {summary.seconds:.1f} s")
    table.add_row("bytes written", f"{summary.bytes_written / 1e6:,.1f} MB")
    console.print(table)
    if summary.failed or summary.missing:
        failures = Table(title="videos not extracted (also in failures.jsonl)")
        failures.add_column("video")
        failures.add_column("reason")
        for video_id in summary.missing:
            failures.add_row(video_id, "video file not found under --videos")
        for result in summary.failed:
            failures.add_row(result.video_id, result.reason)
        console.print(failures)
        console.print("Fix or remove these files and re-run the same command: complete videos are skipped.")
