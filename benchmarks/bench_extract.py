"""Stage-one speed and memory benchmark: is `epicfeat extract` as fast as its slowest stage, in constant memory?

Generates H.264 test videos with ``epicfeat.data.synthetic`` (through ``benchmarks/common.py``, as every benchmark
does) into a work folder that is reused between runs, then measures in one run, on this machine's CPU:

  1. decode only: bare PyAV decode of every frame (no conversion), codec threads AUTO and 1;
  2. decode + preprocess: ``iter_frames`` with the default preprocessing (resize 256, centre crop 224) at fps=None
     (every frame) and fps=10, threads AUTO and 1; the per-core ratio (threads=1) to bare decode (target >= 0.5);
  3. model only: extract's own per-batch step (``ModelRunner``: uint8 -> normalise -> channels_last -> ResNet50 at
     extract's CPU precision -> float16) at batch 64 on pre-made images, and the bare forward pass on pre-normalised tensors; the
     extract step also with torch threads = cores - decode workers;
  4. end to end: the calls ``extract_features`` makes for the local executor (create_backbone, FeatureStore.create,
     select_videos, run_local; random weights, default preprocessing, fps=10, default decode workers, a fresh cache
     each time) on each file linked under several video ids, timed per written row, so the steady rate leaves out
     process start-up and the prefetched tail; plus one real ``extract_features`` call (start-up included);
     ``--thread-variants`` adds runs with torch threads = cores - decode workers;
  5. end to end / slowest stage alone (target >= 0.85), every stage in rows/s of the feature set, and beside it
     the bound for stages that share the same cores (as on a CPU-only machine);
  6. peak memory of ``extract_features`` on a 1-minute and a 10-minute video, each in a fresh subprocess
     (target: 10-minute within 10 % of the 1-minute).

The machine is shared and its load changes by the minute: measurements are interleaved and medians reported, the
load average is printed at the start and the end, and every number goes to ``--out`` for comparison.

``--gpu`` runs the GPU section instead of sections 3-6: ResNet50 frames/s at batch 256 in fp32, bf16,
bf16+channels_last and bf16+channels_last+torch.compile; extract's batch-64 step; the decode workers alone; and
end-to-end extract frames/s on the 1080p and 640x360 files with decode_workers = cores - 1 (about 3-4 minutes).

    python benchmarks/bench_extract.py              # about 5-8 minutes on 2 cores (first run: +1 min of videos)
    python benchmarks/bench_extract.py --quick      # smaller settings, about 3-4 minutes
    python benchmarks/bench_extract.py --gpu        # on a CUDA machine
    python benchmarks/bench_extract.py --out bench.json
    python benchmarks/bench_extract.py --rehearsal 120   # scale rehearsal: 120 short videos + 3 broken, three
                                                         # extract processes on one cache, 3 SIGKILLs, a rerun;
                                                         # peak memory for 30 vs 120 videos (1-3 minutes)
    python benchmarks/bench_extract.py --quick --vs-straight  # extract CLI vs a straight decode -> ResNet50 loop,
                                                              # start-up included, 1 and 3 videos, with and without
                                                              # --no-fold-bn (about 7 minutes)

The GPU section also prints the share of the pipeline's time the GPU is busy (CUDA events around each batch's copy
in, model and copy out).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from common import (  # first: the checkout on sys.path
    add_gpu,
    add_workdir,
    median_seconds,
    new_parser,
    synthetic_video,
    table,
    verdict,
)

from epicfeat.backbone import create_backbone, fold_batch_norms
from epicfeat.devices import resolve_device, resolve_precision

# Extract's per-batch model step and its decode producer, measured alone: exactly the code that `extract` runs, so
# the stage numbers cannot drift from what the pipeline does.
from epicfeat.extract import (
    DECODE_PREFETCH_BATCHES,
    DecodePool,
    ExtractConfig,
    FramesDecoded,
    ModelRunner,
    decode_workers_for,
    extract_features,
    feature_set_identity,
    prepare_model,
    preprocess_of,
    run_local,
    select_videos,
)
from epicfeat.frames import iter_frames
from epicfeat.store import FeatureStore

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def extract_step(runner: ModelRunner, images: np.ndarray) -> np.ndarray:
    """Extract's per-batch step: uint8 batch into the runner's buffer -> normalise -> model -> float16 host rows."""
    runner.next_input()[:] = images
    finished = runner.submit(len(images), None) + runner.drain()
    return finished[-1][0]

DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "epicfeat_bench_extract"
NTSC = Fraction(60000, 1001)  # 59.94 fps, the rate of most EPIC-100 videos
ROWS_FPS = 10.0  # extract's default rows per second
TARGET_DECODE_RATIO = 0.5  # decode+preprocess per core vs bare decode
TARGET_E2E_RATIO = 0.95  # end to end vs slowest stage alone (the target on CPU)
TARGET_MEMORY_GROWTH = 0.10  # 10-minute peak within 10 % of the 1-minute peak
EXTRACT_PREFETCH_ITEMS = DECODE_PREFETCH_BATCHES + 2  # batches each decode worker may hold ready, + start/end


@dataclass(frozen=True)
class Settings:
    clip_640_s: float  # seconds of the 640x360 clips (rows at fps=10 = 10 x this)
    clip_1080_s: float
    # end to end: each file linked under this many video ids (enough rows for a steady window, one file on disk)
    e2e_copies: tuple[tuple[str, int], ...]
    real_extract_copies: int  # video ids of the one real extract_features call (start-up included)
    decode_repeats: int  # interleaved repetitions of every decode measurement (median reported)
    model_batches: int  # timed batches per model variant (median reported)
    memory_fps: float  # rows/s of the memory runs
    memory_resize: int
    memory_crop: int
    gpu_copies: tuple[tuple[str, int], ...]  # video ids per file in the GPU runs, times the decode workers


GPU_COPIES = (("1920x1080@59.94", 4), ("640x360@59.94", 8))
DEFAULT = Settings(clip_640_s=12.8, clip_1080_s=6.4,
                   e2e_copies=(("640x360@59.94", 8), ("640x360@50", 8), ("1920x1080@59.94", 16)),
                   real_extract_copies=2, decode_repeats=3, model_batches=3,
                   memory_fps=10.0, memory_resize=72, memory_crop=64, gpu_copies=GPU_COPIES)
QUICK = Settings(clip_640_s=6.4, clip_1080_s=3.2,
                 e2e_copies=(("640x360@59.94", 13), ("1920x1080@59.94", 18)),
                 real_extract_copies=2, decode_repeats=2, model_batches=2,
                 memory_fps=5.0, memory_resize=72, memory_crop=64, gpu_copies=GPU_COPIES)


def parse_args(argv=None) -> argparse.Namespace:
    parser = new_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller settings (a CPU run of about 3-4 minutes)")
    add_gpu(parser, "run the GPU section (model variants, end to end on CUDA) instead of sections 3-6")
    add_workdir(parser, "the generated videos", default=DEFAULT_WORKDIR)
    parser.add_argument("--out", type=Path, default=None, help="also save every number as JSON to this file")
    parser.add_argument("--skip-memory", action="store_true", help="skip section 6 (peak memory)")
    parser.add_argument("--thread-variants", action="store_true",
                        help="also run every end-to-end file with torch threads = cores - decode workers")
    parser.add_argument("--rehearsal", type=int, default=0, metavar="N",
                        help="only the scale rehearsal: N short videos (+3 broken), 3 extract processes on one cache, "
                             "3 SIGKILLs, a rerun; and peak memory for 30 vs 120 videos (N >= 100 for the target)")
    parser.add_argument("--vs-straight", action="store_true",
                        help="only: `epicfeat extract` vs a straight decode -> ResNet50 loop, start-up included, "
                             "on one short video and on three (fp32, and bf16 where the CPU has it natively)")
    parser.add_argument("--skip-compile", action="store_true",
                        help="GPU section: leave out the torch.compile variant (its compilation takes a minute)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: one memory run
    return parser.parse_args(argv)


# ==================================================================================================================
# EPIC-like videos
# ==================================================================================================================
@dataclass(frozen=True)
class VideoSpec:
    video_id: str  # EPIC-style id: the file is <videos>/<participant>/<video_id>.MP4
    width: int
    height: int
    rate: Fraction  # exact frame rate
    seconds: float
    seed: int = 0

    @property
    def frames(self) -> int:
        return round(self.seconds * self.rate)

    def label(self) -> str:
        return f"{self.width}x{self.height}@{float(self.rate):.2f}"

    def to_dict(self) -> dict:
        return {**asdict(self), "rate": str(self.rate)}


def ensure_video(videos_root: Path, spec: VideoSpec) -> Path:
    """The video for ``spec`` under ``videos_root`` (EPIC layout), made by epicfeat.data.synthetic unless an
    identical one is there."""
    path = videos_root / spec.video_id.split("_")[0] / f"{spec.video_id}.MP4"
    started = time.perf_counter()
    synthetic_video(path, seconds=spec.seconds, width=spec.width, height=spec.height, fps=str(spec.rate),
                    seed=spec.seed)
    if time.perf_counter() - started > 1:
        print(f"  generated {path.name}: {spec.label()}, {spec.seconds:g} s ({spec.frames} frames) in "
              f"{time.perf_counter() - started:.0f} s")
    return path


def link_copies(path: Path, root: Path, copies: int) -> list[str]:
    """Link ``path`` under ``copies`` video ids in a fresh EPIC-layout folder ``root``; returns the ids.

    The end-to-end runs need several batches of rows (and the GPU run several videos per decode worker) without
    generating long videos: the pipeline sees separate videos, the disk holds one file.
    """
    shutil.rmtree(root, ignore_errors=True)
    ids = [f"{path.stem}-copy{i:02d}" for i in range(copies)]
    participant_dir = root / path.stem.split("_")[0]
    participant_dir.mkdir(parents=True)
    for video_id in ids:
        target = participant_dir / f"{video_id}.MP4"
        try:
            os.link(path, target)
        except OSError:
            target.symlink_to(path.resolve())
    return ids


def mbit_per_s(path: Path, seconds: float) -> float:
    return path.stat().st_size * 8 / seconds / 1e6


# ==================================================================================================================
# measurements
# ==================================================================================================================
def bare_decode(path: Path, threads: int) -> tuple[int, float, int]:
    """Decode every frame with PyAV, no conversion: (frames, seconds, codec threads FFmpeg used)."""
    started = time.perf_counter()
    frames = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"  # before the codec opens, as extract does
        stream.codec_context.thread_count = threads  # 0: FFmpeg's choice
        for _ in container.decode(stream):
            frames += 1
        used = stream.codec_context.thread_count
    return frames, time.perf_counter() - started, used


def decode_preprocess(path: Path, fps: float | None, threads: int) -> tuple[int, float]:
    """``iter_frames`` with the default preprocessing: (rows, seconds)."""
    preprocess = preprocess_of(ExtractConfig())
    started = time.perf_counter()
    rows = sum(len(batch) for batch in iter_frames(path, fps=fps, preprocess=preprocess, threads=threads))
    return rows, time.perf_counter() - started


def measure_decoding(files: dict[str, Path], settings: Settings) -> dict[str, dict]:
    """Sections 1-2: every variant on every file, repeated in interleaved rounds; medians in frames (rows) / s."""
    variants = {  # name -> (function, args): decode only, or iter_frames at (fps, threads)
        "bare_t1": (bare_decode, (1,)), "bare_auto": (bare_decode, (0,)),
        "all_t1": (decode_preprocess, (None, 1)), "all_auto": (decode_preprocess, (None, 0)),
        "fps10_t1": (decode_preprocess, (ROWS_FPS, 1)), "fps10_auto": (decode_preprocess, (ROWS_FPS, 0)),
    }
    timings: dict[str, dict[str, list[float]]] = {label: {name: [] for name in variants} for label in files}
    counts: dict[str, dict[str, int]] = {label: {} for label in files}
    threads_used: dict[str, int] = {}
    for round_index in range(settings.decode_repeats):
        print(f"  round {round_index + 1}/{settings.decode_repeats}", flush=True)
        for label, path in files.items():
            for name, (function, args) in variants.items():
                result = function(path, *args)
                counts[label][name] = result[0]
                timings[label][name].append(result[1])
                if name == "bare_auto":
                    threads_used[label] = result[2]
    results = {}
    for label in files:
        source_frames = counts[label]["bare_t1"]
        rate = {}
        for name in variants:
            seconds = statistics.median(timings[label][name])
            rate[name] = (source_frames if name.startswith("bare") or name.startswith("fps10") else
                          counts[label][name]) / seconds  # source frames decoded per second
        rows_fps10 = counts[label]["fps10_t1"]
        results[label] = {
            "source_frames": source_frames,
            "rows_at_fps10": rows_fps10,
            "source_frames_per_row": source_frames / rows_fps10,
            "auto_threads": threads_used[label],
            "frames_per_s": rate,
            "per_core_ratio_all": rate["all_t1"] / rate["bare_t1"],
            "per_core_ratio_fps10": rate["fps10_t1"] / rate["bare_t1"],
            "auto_ratio_all": rate["all_auto"] / rate["bare_auto"],
            "auto_ratio_fps10": rate["fps10_auto"] / rate["bare_auto"],
            "repeats": settings.decode_repeats,
        }
    return results


class CpuModel:
    """ResNet50 as extract runs it on the CPU (batch 64, its CPU precision, channels_last), on pre-made images."""

    def __init__(self):
        # extract resolves precision "auto" before it runs; do the same so both steps time what extract computes
        cpu = torch.device("cpu")
        self.config = ExtractConfig(weights="random", device="cpu", precision=resolve_precision("auto", cpu))
        self.device = torch.device("cpu")
        self.preprocess = preprocess_of(self.config)
        self.model = prepare_model(create_backbone("random"), self.config, self.device)
        # torchvision's modules as they are (--no-fold-bn), to show what folding the batch norms saves
        self.unfolded = prepare_model(create_backbone("random"), replace(self.config, fold_bn=False), self.device)
        self.runner = ModelRunner(self.model, preprocess_of(self.config), self.config, self.device)
        shape = (self.config.batch_size, self.config.crop, self.config.crop, 3)
        self.images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)  # (64, 224, 224, 3)
        pixels = self.preprocess.normalize(self.images)  # (64, 3, 224, 224)
        self.pixels = pixels.contiguous(memory_format=torch.channels_last)
        self.steps = {"extract_step": self.extract_step, "forward_only": self.forward_only,
                      "forward_unfolded": self.forward_unfolded}

    def extract_step(self) -> None:
        extract_step(self.runner, self.images)

    def forward_only(self) -> None:
        self._forward(self.model)

    def forward_unfolded(self) -> None:
        self._forward(self.unfolded)

    @torch.inference_mode()
    def _forward(self, model) -> None:
        dtype = _AUTOCAST_DTYPES.get(self.config.precision)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            model(self.pixels)

    def seconds(self, step: str, threads: int) -> float:
        """One timed batch of ``step`` with ``threads`` torch threads (restored afterwards)."""
        default_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            begin = time.perf_counter()
            self.steps[step]()
            return time.perf_counter() - begin
        finally:
            torch.set_num_threads(default_threads)


def measure_model_cpu(model: CpuModel, settings: Settings) -> dict:
    """Section 3: extract's per-batch step and the bare forward pass; the extract step also with the torch threads
    that the decode workers leave free."""
    default_threads = torch.get_num_threads()
    spare_threads = max(1, default_threads - _default_decode_workers())  # cores not taken by decode workers
    variants = {"extract_step": ("extract_step", default_threads), "forward_only": ("forward_only", default_threads),
                "forward_unfolded": ("forward_unfolded", default_threads),
                "extract_step_spare_threads": ("extract_step", spare_threads)}
    for step, threads in variants.values():  # warm up (oneDNN picks its kernels per thread count)
        model.seconds(step, threads)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(settings.model_batches):  # interleaved, so a busy spell on the machine hits every variant
        for name, (step, threads) in variants.items():
            times[name].append(model.seconds(step, threads))
    return {
        "batch_size": model.config.batch_size, "crop": model.config.crop, "precision": model.config.precision,
        "channels_last": model.config.channels_last, "torch_threads": default_threads,
        "spare_threads": spare_threads, "batches": settings.model_batches,
        **{f"{name}_rows_per_s": model.config.batch_size / statistics.median(t) for name, t in times.items()},
        **{f"{name}_seconds": t for name, t in times.items()},
    }


def _default_decode_workers() -> int:
    """Decode workers extract starts by default for a long job list (its rule: one per spare core, at most 8)."""
    return decode_workers_for(ExtractConfig().decode_workers, 1_000_000)


def _prefetch_rows(rows_per_video: list[int], batch_size: int, workers: int) -> int:
    """At most how many rows the pipeline can hold decoded ahead of the model: the decode workers' prefetched items
    (each a video start or end, or a batch of <= batch_size rows) plus a part-filled batch in the batcher."""
    items = []
    for rows in rows_per_video:
        items += [0] + [min(batch_size, rows - i) for i in range(0, rows, batch_size)] + [0]  # start, batches, end
    return sum(sorted(items, reverse=True)[:EXTRACT_PREFETCH_ITEMS * max(1, workers)]) + batch_size


def run_extract_timed(videos_root: Path, video_ids: list[str], cache: Path, config: ExtractConfig,
                      torch_threads: int | None = None) -> dict:
    """The calls ``extract_features`` makes for the local executor, timing every row as the writer stores it.

    ``steady_rows_per_s``: the rows/s between the first model batch (the decode workers' start-up, seconds of
    spawning processes that import torch, comes before it) and the point from which the rest of the rows may
    already have been decoded ahead (the prefetch buffer: after it the model runs alone, which would flatter the
    pipeline on a machine where decoding and the model share the cores). When the run is too short for that
    window (fewer than 3 batches in it), the whole run after the first batch is used and ``window_full_run`` says so.
    ``torch_threads`` sets the main process's intra-op threads for this run (None: leave torch's default).
    """
    config = replace(config, video_ids=tuple(video_ids), videos=videos_root, cache=cache, progress=False)
    stamps: list[tuple[float, int]] = []  # (time, rows) per on_rows call
    rows_per_video: dict[str, int] = {}

    def on_rows(video_id: str, rows: int, last_pts: float) -> None:
        stamps.append((time.perf_counter(), rows))
        rows_per_video[video_id] = rows_per_video.get(video_id, 0) + rows

    started = time.perf_counter()
    device = resolve_device(config.device)
    config = replace(config, precision=resolve_precision(config.precision, device))
    backbone = create_backbone(config.weights, seed=config.seed)
    store = FeatureStore.create(config.cache, feature_set_identity(config, backbone, device))
    jobs, missing = select_videos(config)
    assert not missing, missing
    pipeline_started = time.perf_counter()
    default_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(torch_threads or default_threads)
        stats: dict = {}
        results = run_local(jobs, store, backbone, config, device=device, on_rows=on_rows, stats=stats)
    finally:
        torch.set_num_threads(default_threads)
    finished = time.perf_counter()
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"extract failed: {failed}")
    rows = sum(n for _, n in stamps)
    cumulative = np.cumsum([n for _, n in stamps])  # rows written after each on_rows call
    batch = config.batch_size
    workers = decode_workers_for(config.decode_workers, len(jobs))
    ahead = _prefetch_rows(list(rows_per_video.values()), batch, workers)
    first = int(np.searchsorted(cumulative, batch))  # the call that completed the first model batch
    last = int(np.searchsorted(cumulative, rows - ahead))  # the rest may have been decoded before this
    full_run = cumulative[last] - cumulative[first] < 3 * batch
    if full_run:
        last = len(stamps) - 1
    window_rows = int(cumulative[last] - cumulative[first])
    seconds = stamps[last][0] - stamps[first][0]
    return {
        "videos": len(jobs), "rows": rows, "seconds_total": finished - started,
        "seconds_to_first_batch": stamps[first][0] - pipeline_started,
        "rows_per_s_total": rows / (finished - started),
        "steady_rows_per_s": window_rows / seconds if window_rows else float("nan"),
        "window_rows": window_rows, "window_full_run": bool(full_run), "prefetch_rows_bound": ahead,
        "decode_workers": workers, "device": str(device),
        # share of the pipeline's time in which the GPU ran a batch (CUDA events around copy in, model, copy out)
        "gpu_busy_share": stats["gpu_busy_s"] / stats["seconds"] if device.type == "cuda" else None,
        "torch_threads": torch_threads or default_threads,
    }


def measure_decode_workers(videos_root: Path, video_ids: list[str], config: ExtractConfig) -> dict:
    """Extract's decode stage alone: its DecodePool of workers, items consumed and dropped."""
    config = replace(config, video_ids=tuple(video_ids), videos=videos_root)
    jobs, _ = select_videos(config)
    workers = max(1, decode_workers_for(config.decode_workers, len(jobs)))
    pool = DecodePool(workers, config.fps, preprocess_of(config), config.batch_size, config.decode_threads)
    started = time.perf_counter()
    stamps: list[tuple[float, int]] = []
    queued = list(jobs)
    try:
        for item in pool.events(lambda: queued.pop(0) if queued else None):
            if isinstance(item, FramesDecoded):
                stamps.append((time.perf_counter(), len(item.batch)))
    finally:
        pool.close()
    rows = sum(n for _, n in stamps)
    # Steady state: from the first item to the last (workers' start-up excluded, their ramp-up not).
    steady = (rows - stamps[0][1]) / (stamps[-1][0] - stamps[0][0])
    return {"workers": workers, "decode_threads": config.decode_threads, "rows": rows,
            "seconds_total": time.perf_counter() - started, "steady_rows_per_s": steady}


def measure_end_to_end(files: dict[str, Path], settings: Settings, workdir: Path, config: ExtractConfig,
                       model: CpuModel, *, spare_threads: int | None) -> dict[str, dict]:
    """Section 4: per file, a fresh cache each time; then one real ``extract_features`` call on a few of the
    640x360@59.94 links; with ``spare_threads``, also runs with the model's torch threads limited to that.

    The machine's load changes from minute to minute, so one model batch is timed alone right before and right
    after every run (same torch threads); section 5 pools them with section 3's batches.
    """
    results = {}
    for label, copies in settings.e2e_copies:
        path = files[label]
        root = workdir / "e2e_videos" / path.stem
        ids = link_copies(path, root, copies)
        runs = [(label, None)] + ([(f"{label} [torch threads {spare_threads}]", spare_threads)]
                                  if spare_threads else [])
        for name, threads in runs:
            cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
            model_threads = threads or torch.get_num_threads()
            try:
                print(f"  {name}: {len(ids)} video ids x {path.name}", flush=True)
                before = model.seconds("extract_step", model_threads)
                results[name] = run_extract_timed(root, ids, cache, config, torch_threads=threads)
                after = model.seconds("extract_step", model_threads)
                results[name]["file"] = label
                results[name]["model_alone_seconds"] = [before, after]
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    label = "640x360@59.94"
    root = workdir / "e2e_videos" / f"{files[label].stem}-extract_features"
    ids = link_copies(files[label], root, settings.real_extract_copies)
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    print(f"  extract_features: {len(ids)} video ids x {files[label].name}", flush=True)
    try:
        summary = extract_features(replace(config, video_ids=tuple(ids), videos=root, cache=cache, progress=False))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert summary.ok, summary
    results["extract_features"] = {"file": label, "videos": len(ids), "rows": summary.rows,
                                   "seconds": summary.seconds, "rows_per_s": summary.rows / summary.seconds}
    return results


# ---------------------------------------------------------------------------------------------- peak memory
def _memory_mib(pid: int) -> tuple[float, float] | None:
    """(current, peak) resident memory of process ``pid`` in MiB (VmRSS, VmHWM in /proc); None once it is gone.

    Not ``ru_maxrss``: Linux carries it across fork + exec, so a subprocess started by a big parent (this
    benchmark, or a spawned DataLoader worker's parent) reports at least its parent's size. VmHWM belongs to the
    address space, which exec replaces.
    """
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    values[line[:5]] = int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        return None
    return (values["VmRSS"], values["VmHWM"]) if len(values) == 2 else None


def memory_child(request: str) -> None:
    """In a fresh process: run ``extract_features`` on one video and print its memory use as one JSON line.

    Every 10 ms the main process and its children (the DataLoader decode worker, multiprocessing's resource
    tracker) are read from /proc. A child's peak is its latest VmHWM before it exits: the latest, not the largest,
    because between fork and exec a child briefly reports its parent's size; and often, because a spawned worker
    swells by ~100 MiB in its last ~30 ms (interpreter teardown, whatever the video), which a slow poll would
    catch only sometimes. The sum of all processes' RSS over the run's second half gives the trend: MiB per 10
    minutes of video.
    """
    import psutil

    args = json.loads(request)
    me = psutil.Process()
    children_peak: dict[int, float] = {}  # pid -> latest VmHWM (MiB)
    trend: list[tuple[float, float]] = []  # (seconds, RSS of all processes in MiB), every ~0.25 s
    stop = threading.Event()

    def sample() -> None:
        children: list[int] = []
        tick = 0
        while not stop.wait(0.01):
            if tick % 20 == 0:  # listing processes is the expensive part: every 0.2 s
                children = [child.pid for child in me.children(recursive=True)]
            total = 0.0
            for pid in [me.pid, *children]:
                memory = _memory_mib(pid)
                if memory is None:  # exited
                    continue
                total += memory[0]
                if pid != me.pid:
                    children_peak[pid] = memory[1]
            if tick % 25 == 0:
                trend.append((time.perf_counter(), total))
            tick += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    config = ExtractConfig(video_ids=(args["video_id"],), videos=Path(args["videos"]), cache=Path(args["cache"]),
                           weights="random", fps=args["fps"], resize=args["resize"], crop=args["crop"],
                           progress=False)
    summary = extract_features(config)
    stop.set()
    sampler.join()
    main_peak = _memory_mib(os.getpid())[1]
    # RSS trend over the second half of the run (start-up, allocator warm-up and teardown left out), per 10
    # minutes of video; only for runs long enough to have a steady second half
    times = np.array([t for t, _ in trend]) - trend[0][0]
    totals = np.array([m for _, m in trend])
    half = (times > 0.5 * times[-1]) & (times < 0.95 * times[-1])
    slope = np.polyfit(times[half], totals[half], 1)[0] if times[-1] >= 15 else float("nan")  # MiB / s
    video_seconds = summary.rows / args["fps"]
    print(json.dumps({
        "rows": summary.rows, "seconds": summary.seconds, "ok": summary.ok,
        "main_peak_mb": main_peak,
        "largest_child_peak_mb": max(children_peak.values(), default=0.0),
        "all_processes_peak_mb": main_peak + sum(children_peak.values()),  # each at its own peak: an upper bound
        "children_seen": len(children_peak),
        "rss_trend_mb_per_10min_video": slope * times[-1] / video_seconds * 600,
    }))


def measure_memory(videos_root: Path, specs: dict[str, VideoSpec], workdir: Path, settings: Settings) -> dict:
    """Section 6: each video extracted by ``extract_features`` in a fresh subprocess (fresh cache)."""
    results = {}
    for label, spec in specs.items():
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
        request = json.dumps({"video_id": spec.video_id, "videos": str(videos_root), "cache": str(cache),
                              "fps": settings.memory_fps, "resize": settings.memory_resize,
                              "crop": settings.memory_crop})
        print(f"  {label}: extract_features on {spec.video_id} in a subprocess ...", end="", flush=True)
        try:
            # One torch thread: on a busy 2-core machine two threads next to the decode worker run many times
            # slower; memory does not depend on it.
            done = subprocess.run([sys.executable, __file__, "--memory-child", request], capture_output=True,
                                  text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if done.returncode != 0:
            raise RuntimeError(f"memory run on {spec.video_id} failed:\n{done.stderr[-3000:]}")
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f" {results[label]['seconds']:.0f} s", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------- GPU
def measure_model_gpu(device: torch.device, batch: int = 256, iterations: int = 20, compile: bool = True) -> dict:
    """ResNet50 forward rows/s at ``batch``: fp32, bf16, bf16+channels_last, then with batch norms folded (what
    extract runs), and with torch.compile."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = {}
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)).to(device)  # (B,3,224,224)
    variants = {"fp32": (None, False, False, False), "bf16": (torch.bfloat16, False, False, False),
                "bf16+channels_last": (torch.bfloat16, True, False, False),
                "bf16+channels_last+fold_bn": (torch.bfloat16, True, True, False),
                "bf16+channels_last+fold_bn+compile": (torch.bfloat16, True, True, True)}
    if not compile:
        del variants["bf16+channels_last+fold_bn+compile"]
    for name, (dtype, channels_last, fold, compiled) in variants.items():
        model = create_backbone("random").eval()
        model = (fold_batch_norms(model) if fold else model).to(device)
        inputs = pixels
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = pixels.contiguous(memory_format=torch.channels_last)
        if compiled:
            model = torch.compile(model)

        @torch.inference_mode()
        def step(model=model, inputs=inputs, dtype=dtype):  # bound now: the loop rebinds the names
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                model(inputs)

        started = time.perf_counter()
        for _ in range(3):  # warm-up (and compilation)
            step()
        synchronize()
        warmup = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(iterations):
            step()
        synchronize()
        results[name] = {"rows_per_s": batch * iterations / (time.perf_counter() - started), "warmup_s": warmup}
        print(f"  {name}: {results[name]['rows_per_s']:,.0f} frames/s (warm-up {warmup:.1f} s)", flush=True)
        del model
    # extract's own step at its batch size: uint8 host batch -> device -> normalise -> model -> float16 host array
    config = ExtractConfig(weights="random", device=str(device))
    config = replace(config, precision=resolve_precision(config.precision, device))
    runner = ModelRunner(prepare_model(create_backbone("random"), config, device), preprocess_of(config), config,
                         device)
    images = rng.integers(0, 256, (config.batch_size, config.crop, config.crop, 3), dtype=np.uint8)
    seconds, _ = median_seconds(lambda: extract_step(runner, images), iterations, warm_up=True)
    results["extract_step_b64"] = {"rows_per_s": config.batch_size / seconds}
    print(f"  extract step (batch 64, bf16, channels_last, incl. copies): "
          f"{results['extract_step_b64']['rows_per_s']:,.0f} frames/s", flush=True)
    return {"batch": batch, "iterations": iterations, "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else str(device), "variants": results}


# ==================================================================================================================
# report
# ==================================================================================================================
def _signed(value: float) -> str:
    return "-" if value != value else f"{value:+.1f}"  # NaN: not measured


def print_decoding(decoding: dict, cores: int) -> None:
    print("\n[1-2] decode only vs decode+preprocess (iter_frames, resize 256 + crop 224), frames/s of the source")
    print(f"      threads=1: one codec thread (per core); auto: thread_type AUTO, FFmpeg's count on {cores} cores; "
          f"fps10 rows/s = frames/s / frames per row")
    rows = []
    for label, r in decoding.items():
        f = r["frames_per_s"]
        rows.append([label, r["source_frames"], f"{f['bare_t1']:,.0f}", f"{f['all_t1']:,.0f}",
                     f"{f['fps10_t1']:,.0f}", f"{r['auto_threads']}", f"{f['bare_auto']:,.0f}", f"{f['all_auto']:,.0f}",
                     f"{f['fps10_auto']:,.0f}", f"{f['fps10_auto'] / r['source_frames_per_row']:,.0f}"])
    print(table(["file", "frames", "bare t1", "all t1", "fps10 t1", "auto thr", "bare auto", "all auto",
                 "fps10 auto", "fps10 rows/s"], rows))
    print("\n      ratio decode+preprocess / bare decode, per core (threads=1); target >= "
          f"{TARGET_DECODE_RATIO} (auto-threaded ratio for reference)")
    rows = [[label, f"{r['per_core_ratio_all']:.2f}", verdict(r["per_core_ratio_all"], TARGET_DECODE_RATIO),
             f"{r['per_core_ratio_fps10']:.2f}", verdict(r["per_core_ratio_fps10"], TARGET_DECODE_RATIO),
             f"{r['auto_ratio_all']:.2f}", f"{r['auto_ratio_fps10']:.2f}"] for label, r in decoding.items()]
    print(table(["file", "every frame", "", "fps=10", "", "auto every", "auto fps=10"], rows))



# ==================================================================================================================
# Against a straight decode -> model loop (start-up included)
# ==================================================================================================================
_STRAIGHT_LOOP = r"""
import sys, numpy as np, torch
from pathlib import Path
from epicfeat.backbone import create_backbone
from epicfeat.frames import Preprocess, iter_frames
precision, paths = sys.argv[1], sys.argv[2:]
preprocess = Preprocess()
model = create_backbone("random").eval().to(memory_format=torch.channels_last)
dtype = torch.bfloat16 if precision == "bf16" else None
rows = 0
for path in paths:
    for batch in iter_frames(Path(path), fps=10.0, preprocess=preprocess, batch_size=64):
        pixels = preprocess.normalize(batch.images).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            features = model(pixels).float().numpy().astype(np.float16)  # (n, 2048)
        rows += len(features)
print(rows)
"""


def _timed_command(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def measure_vs_straight_loop(files: dict[str, Path], workdir: Path, precision: str, many: int = 3) -> dict:
    """``epicfeat extract`` (the CLI, fresh cache) against a straight iter_frames -> ResNet50 loop in a fresh
    process, all timed from launch to exit, on one short video and on ``many`` of them; interleaved, twice.

    extract runs twice: as it is (batch norms folded) and with ``--no-fold-bn``, torchvision's modules as the
    straight loop runs them, so the second ratio is the pipeline's own cost against the same model.
    """
    label = "640x360@59.94"
    variants = {"straight": None, "extract": [], "extract_unfolded": ["--no-fold-bn"]}
    results = {}
    for count in (1, many):
        root = workdir / "straight_videos" / f"{count}"
        ids = link_copies(files[label], root, count)
        paths = [str(next(root.rglob(f"{video_id}.*"))) for video_id in ids]
        times: dict[str, list[float]] = {name: [] for name in variants}
        rows = 0
        for _ in range(2):
            for name, flags in variants.items():
                if flags is None:
                    times[name].append(_timed_command([sys.executable, "-c", _STRAIGHT_LOOP, precision, *paths]))
                else:
                    seconds, rows = _timed_extract(root, ids, workdir, precision, flags)
                    times[name].append(seconds)
        results[count] = {name: rows / statistics.mean(t) for name, t in times.items()}
        results[count]["rows"] = rows
        ratio = results[count]["ratio"] = results[count]["extract"] / results[count]["straight"]
        same_model = results[count]["ratio_unfolded"] = results[count]["extract_unfolded"] / results[count]["straight"]
        print(f"  {count} x {files[label].name} ({rows} rows, {precision}): straight loop "
              f"{results[count]['straight']:.1f} rows/s, epicfeat extract {results[count]['extract']:.1f} rows/s, "
              f"ratio {ratio:.2f} {verdict(ratio, 1.0)}; with --no-fold-bn (the straight loop's model) "
              f"{results[count]['extract_unfolded']:.1f} rows/s, ratio {same_model:.2f}", flush=True)
    return results


def _timed_extract(root: Path, ids: list[str], workdir: Path, precision: str, flags: list[str]) -> tuple[float, int]:
    """(seconds from launch to exit, rows written) of one `epicfeat extract` of ``ids`` into a fresh cache."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    try:
        seconds = _timed_command([
            sys.executable, "-m", "epicfeat", "extract", "--videos", str(root), "--video-ids", ",".join(ids),
            "--cache", str(cache), "--weights", "random", "--precision", precision, "--no-progress", *flags])
        store = next(cache.glob("*/featureset.json")).parent
        return seconds, sum(FeatureStore.open(store).video_attrs(v).get("rows", 0) for v in ids)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

# ==================================================================================================================
# Scale rehearsal: many writers on one cache, kills, a rerun
# ==================================================================================================================
_REHEARSAL_CHILD = r"""
import json, os, resource, sys
import epicfeat.extract as extract
from epicfeat.recipes import from_dict, read_yaml
from epicfeat.configs import ExtractConfig

config_file, decode_log = sys.argv[1:3]
real_decode = extract.decode_video_items

def counted(job, *args):
    # one line per video decode started, written with one O_APPEND write (a local disk: lines stay whole)
    fd = os.open(decode_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (job.video_id + "\n").encode())
    os.close(fd)
    yield from real_decode(job, *args)

extract.decode_video_items = counted
summary = extract.extract_features(from_dict(ExtractConfig, read_yaml(config_file)))
print(json.dumps({"done": len(summary.done), "by_others": len(summary.by_others), "failed": len(summary.failed),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

REHEARSAL_RATES = (NTSC, Fraction(50), Fraction(30))


def make_rehearsal_videos(root: Path, good: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``good`` short clips at 59.94 / 50 / 30 fps (0.6-1.4 s) and three broken files: (good ids, broken ids)."""
    rng = np.random.default_rng(seed)
    ids = [f"P{30 + i // 100:02d}_{i % 100 + 1:03d}" for i in range(good)]
    for i, video_id in enumerate(ids):
        path = root / video_id.split("_")[0] / f"{video_id}.MP4"
        if not path.exists():
            # 96x54: decodes and runs through a 56-px ResNet50 in milliseconds
            synthetic_video(path, seconds=float(rng.uniform(0.6, 1.4)), width=96, height=54,
                            fps=str(REHEARSAL_RATES[i % 3]), seed=i)
    broken = ["P29_001", "P29_002", "P29_003"]
    (root / "P29").mkdir(parents=True, exist_ok=True)
    (root / "P29" / "P29_001.MP4").write_bytes(b"")
    (root / "P29" / "P29_002.MP4").write_text("not a video\n")
    first = (root / "P30" / "P30_001.MP4").read_bytes()
    (root / "P29" / "P29_003.MP4").write_bytes(first[: len(first) // 2])
    return ids, broken


def _rehearsal_config(root: Path, cache: Path, ids: list[str]) -> ExtractConfig:
    return ExtractConfig(video_ids=tuple(ids), videos=root, cache=cache, weights="random", fps=10.0, resize=64,
                         crop=56, precision="auto", batch_size=16, decode_workers=0, progress=False,
                         claim_lease_s=3.0)


def _start_rehearsal_child(config: ExtractConfig, workdir: Path, name: str, decode_log: Path) -> subprocess.Popen:
    from epicfeat.recipes import save_config

    config_file = workdir / f"{name}.yaml"
    save_config(config, config_file)
    return subprocess.Popen([sys.executable, "-c", _REHEARSAL_CHILD, str(config_file), str(decode_log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _child_report(process: subprocess.Popen) -> dict | None:
    out, err = process.communicate()
    if process.returncode not in (0, 1):  # 1: broken videos among them (expected); -9: killed
        return {"returncode": process.returncode, "stderr": err[-2000:]}
    lines = out.strip().splitlines()
    return {"returncode": process.returncode, **json.loads(lines[-1])} if lines else None


def run_rehearsal(workdir: Path, good: int, seed: int = 0) -> dict:
    """Three extract processes at once on one cache, three SIGKILLs at random moments, one rerun; compared with a
    single-process run of the same videos. Also each process's peak memory for 30 vs 120 videos."""
    import random

    root = workdir / "rehearsal_videos"
    print(f"\n[rehearsal] {good} short videos + 3 broken in {root} ...", flush=True)
    ids, broken = make_rehearsal_videos(root, good, seed)
    runs = workdir / "rehearsal_runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    everything = broken[:2] + ids[: len(ids) // 2] + broken[2:] + ids[len(ids) // 2 :]  # broken ones early and mid-way

    started = time.perf_counter()
    single = _start_rehearsal_child(_rehearsal_config(root, runs / "single", everything), runs, "single",
                                    runs / "single.decodes")
    single_report = _child_report(single)
    single_seconds = time.perf_counter() - started
    print(f"  single process: {single_report} in {single_seconds:.0f} s", flush=True)

    shared = _rehearsal_config(root, runs / "shared", everything)
    log = runs / "shared.decodes"
    started = time.perf_counter()
    processes = [_start_rehearsal_child(shared, runs, f"shared{i}", log) for i in range(3)]
    rng = random.Random(seed)
    kills = []
    for _ in range(3):  # kill a random live process at a random moment in the expected span of the run
        time.sleep(rng.uniform(0.1, 0.3) * single_seconds)
        alive = [p for p in processes if p.poll() is None]
        if not alive:
            break
        victim = rng.choice(alive)
        victim.send_signal(signal.SIGKILL)
        kills.append(round(time.perf_counter() - started, 1))
    reports = [_child_report(p) for p in processes]
    concurrent_log = log.read_text().split() if log.exists() else []
    rerun_started = time.time()
    rerun_report = _child_report(_start_rehearsal_child(shared, runs, "rerun", log))
    seconds = time.perf_counter() - started
    decodes = log.read_text().split()

    single_store = next((runs / "single").glob("*/featureset.json")).parent
    shared_store = next((runs / "shared").glob("*/featureset.json")).parent
    reference, store = FeatureStore.open(single_store), FeatureStore.open(shared_store)
    mismatched = [v for v in ids if not store.is_complete(v)
                  or not np.array_equal(store.read(v).features[:], reference.read(v).features[:])
                  or not np.array_equal(store.read(v).pts, reference.read(v).pts)]
    records = store.failure_records()
    concurrent_records = collections.Counter(
        r["video_id"] for r in records if datetime.fromisoformat(r["time"]).timestamp() < rerun_started)
    decoded_good_concurrent = sum(1 for v in concurrent_log if v in set(ids))
    result = {
        "videos": good, "broken": len(broken), "kills_at_s": kills, "reports": reports, "rerun": rerun_report,
        "seconds": seconds, "single_seconds": single_seconds,
        "good_complete_and_equal": len(ids) - len(mismatched), "mismatched": mismatched[:10],
        "decodes_total": len(decodes), "decodes_good_concurrent_phase": decoded_good_concurrent,
        "decode_ratio": len([v for v in decodes if v in set(ids)]) / len(ids),
        "failure_records_per_broken_video_concurrent": dict(concurrent_records),
        "partial_left": store.partial_videos(),
    }
    print(f"  3 processes + {len(kills)} kills (at {kills} s) + 1 rerun: {seconds:.0f} s")
    print(f"  good videos complete and equal to the single run: {result['good_complete_and_equal']}/{len(ids)} "
          f"{verdict(result['good_complete_and_equal'], len(ids))}")
    print(f"  videos decoded in total / videos: {result['decode_ratio']:.2f} "
          f"{verdict(result['decode_ratio'], 1.1, at_least=False)}")
    per_video = collections.Counter(r["video_id"] for r in records)
    once = sorted(per_video) == broken and all(n == 1 for n in per_video.values())
    result["failure_records_per_broken_video"] = dict(per_video)
    print(f"  failure records per broken video, after the rerun: {dict(per_video)} {'PASS' if once else 'FAIL'} "
          f"(in the concurrent phase: {dict(concurrent_records)})")
    print(f"  partial videos left: {result['partial_left'] or 'none'}")

    print("  peak memory of one process, 30 vs 120 videos (decode in-process) ...", flush=True)
    memory = {}
    for count in (30, min(120, good)):
        subset = ids[:count]
        report = _child_report(_start_rehearsal_child(_rehearsal_config(root, runs / f"mem{count}", subset), runs,
                                                      f"mem{count}", runs / f"mem{count}.decodes"))
        memory[count] = report.get("peak_rss_mib") if report else None
    result["peak_rss_mib"] = memory
    counts = sorted(memory)
    growth = memory[counts[-1]] / memory[counts[0]] - 1 if all(memory.values()) else float("nan")
    print("  peak RSS: " + ", ".join(f"{n} videos {m:,.0f} MiB" for n, m in memory.items())
          + f"; growth {growth:+.1%} {verdict(growth, TARGET_MEMORY_GROWTH, at_least=False)}")
    result["memory_growth"] = growth
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    if args.rehearsal:
        result = run_rehearsal(args.workdir, args.rehearsal)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"rehearsal": result}, indent=2, default=str))
        return 0
    settings = QUICK if args.quick else DEFAULT
    if args.vs_straight:
        from epicfeat.devices import native_bf16_cpu

        spec = VideoSpec("P03_01", 640, 360, NTSC, settings.clip_640_s, seed=1)
        files = {"640x360@59.94": ensure_video(args.workdir / "videos", spec)}
        print(f"[vs straight loop] {os.getloadavg()[0]:.1f} load; CPU native bf16: {native_bf16_cpu()}")
        result = {p: measure_vs_straight_loop(files, args.workdir, p)
                  for p in (("fp32", "bf16") if native_bf16_cpu() else ("fp32",))}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"vs_straight": result}, indent=2, default=str))
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    started = time.perf_counter()
    report: dict = {"settings": asdict(settings), "mode": "gpu" if args.gpu else ("quick" if args.quick else "default"),
                    "machine": {"cores": cores, "python": platform.python_version(), "torch": torch.__version__,
                                "av": av.__version__, "torch_threads": torch.get_num_threads(),
                                "load_average_start": os.getloadavg()}}
    print(f"epicfeat extract benchmark ({report['mode']}): {cores} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), PyAV {av.__version__}, load average {os.getloadavg()[0]:.1f}")

    videos_root = args.workdir / "videos"
    participant = "P03" if args.quick else "P01"  # --quick's shorter clips live beside the default ones
    specs = {
        "640x360@59.94": VideoSpec(f"{participant}_01", 640, 360, NTSC, settings.clip_640_s, seed=1),
        "640x360@50": VideoSpec(f"{participant}_02", 640, 360, Fraction(50), settings.clip_640_s, seed=2),
        "1920x1080@59.94": VideoSpec(f"{participant}_03", 1920, 1080, NTSC, settings.clip_1080_s, seed=3),
    }
    print(f"\nvideos in {videos_root} (reused when present):")
    files = {label: ensure_video(videos_root, spec) for label, spec in specs.items()}
    for label, path in files.items():
        seconds = specs[label].seconds
        print(f"  {path.name}: {label}, {seconds:g} s, {mbit_per_s(path, seconds):.1f} Mbit/s")
    report["videos"] = {label: {**specs[label].to_dict(), "mbit_per_s": mbit_per_s(path, specs[label].seconds)}
                        for label, path in files.items()}

    print("\n[1-2] decoding ...", flush=True)
    decoding = measure_decoding(files, settings)
    report["decoding"] = decoding
    print_decoding(decoding, cores)

    if args.gpu:
        report["gpu"] = run_gpu_section(args, settings, files, specs, decoding, cores)
    else:
        run_cpu_sections(args, settings, files, specs, decoding, cores, report, videos_root)

    report["seconds"] = time.perf_counter() - started
    report["machine"]["load_average_end"] = os.getloadavg()
    print(f"\nbenchmark finished in {report['seconds']:.0f} s (load average now {os.getloadavg()[0]:.1f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"numbers saved to {args.out}")
    return 0


def run_cpu_sections(args, settings: Settings, files: dict[str, Path], specs: dict[str, VideoSpec],
                     decoding: dict, cores: int, report: dict, videos_root: Path) -> None:
    print("\n[3] model alone (CPU) ...", flush=True)
    cpu_model = CpuModel()
    model = measure_model_cpu(cpu_model, settings)
    report["model"] = model
    print(f"      ResNet50 random weights, batch {model['batch_size']}, {model['crop']}x{model['crop']}, "
          f"{model['precision']} autocast, channels_last, pre-made uint8 images, median of {model['batches']} "
          "interleaved batches")
    print(table(["step", "torch threads", "frames/s"], [
        ["extract step (ModelRunner: normalise + model + fp16 out)", model["torch_threads"],
         f"{model['extract_step_rows_per_s']:.1f}"],
        ["forward only (pre-normalised tensors)", model["torch_threads"], f"{model['forward_only_rows_per_s']:.1f}"],
        ["forward only, batch norms not folded (--no-fold-bn)", model["torch_threads"],
         f"{model['forward_unfolded_rows_per_s']:.1f}"],
        ["extract step, threads = cores - default decode workers", model["spare_threads"],
         f"{model['extract_step_spare_threads_rows_per_s']:.1f}"]]))
    print(f"      folded / unfolded batch norms, forward only: "
          f"{model['forward_only_rows_per_s'] / model['forward_unfolded_rows_per_s']:.2f}x")

    print("\n[4] end to end (CPU, fresh cache each run) ...", flush=True)
    config = ExtractConfig(weights="random", device="cpu")  # defaults: fps 10, 256/224, auto precision, decode workers -1
    e2e = measure_end_to_end(files, settings, args.workdir, config, cpu_model,
                             spare_threads=model["spare_threads"] if args.thread_variants else None)
    real = e2e.pop("extract_features")
    report["end_to_end"], report["extract_features"] = e2e, real
    rows = []
    for name, r in e2e.items():
        window = f"{r['window_rows']}" + (" (all)" if r["window_full_run"] else "")
        rows.append([name, f"{r['videos']} x {specs[r['file']].seconds:g} s", r["rows"], r["torch_threads"],
                     f"{r['seconds_total']:.1f}", f"{r['seconds_to_first_batch']:.1f}", f"{r['rows_per_s_total']:.1f}",
                     window, f"{r['steady_rows_per_s']:.1f}"])
    print(f"      random weights, fps=10, resize 256 / crop 224, batch 64, precision auto ({model['precision']}), channels_last, decode workers "
          f"{_default_decode_workers()} (default), one run each; the video ids are links to one file;\n"
          "      steady = rows/s from the first model batch (after the workers' start-up) until the last rows that "
          "cannot have been\n      decoded ahead yet (prefetch); '(all)': run too short for that, the rest of the "
          "run is used")
    print(table(["run", "videos", "rows", "torch thr", "wall s", "1st batch s", "rows/s total", "steady rows",
                 "rows/s steady"], rows))
    print(f"      extract_features itself ({real['videos']} x {specs[real['file']].seconds:g} s of {real['file']}, "
          f"start-up included): {real['rows']} rows in {real['seconds']:.1f} s = {real['rows_per_s']:.1f} rows/s")

    print("\n[5] end to end / slowest stage alone, every stage in rows/s of the feature set (fps=10)")
    print("      decode = bare decode (auto threads) / source frames per row; decode+prep = iter_frames fps=10 (auto "
          "threads);\n      model = extract step alone at the run's torch threads: median of section 3's batches "
          "and one batch before + after every run\n      (in brackets: the two around this run); "
          "each stage alone had the whole machine.\n      shared-core bound = 1 / (1/decode+prep + 1/model): the "
          "rate if the stages took turns on the same cores (on a CPU-only\n      machine they do; the target assumes "
          "they run on different hardware, as decode workers beside a GPU do)")
    ratios = {}
    rows = []
    for name, r in e2e.items():
        d = decoding[r["file"]]
        decode = d["frames_per_s"]["bare_auto"] / d["source_frames_per_row"]
        decode_prep = d["frames_per_s"]["fps10_auto"] / d["source_frames_per_row"]
        # model alone at the run's torch threads: the median batch of section 3 and of the batches between runs
        step = "extract_step" if r["torch_threads"] == model["torch_threads"] else "extract_step_spare_threads"
        pooled = model[f"{step}_seconds"] + [t for other in e2e.values() if other["torch_threads"] == r["torch_threads"]
                                             for t in other["model_alone_seconds"]]
        model_rate = model["batch_size"] / statistics.median(pooled)
        nearby = 2 * model["batch_size"] / sum(r["model_alone_seconds"])
        slowest = min(decode, decode_prep, model_rate)
        shared = 1 / (1 / decode_prep + 1 / model_rate)
        ratio = r["steady_rows_per_s"] / slowest
        ratios[name] = {"decode_rows_per_s": decode, "decode_preprocess_rows_per_s": decode_prep,
                        "model_rows_per_s": model_rate, "model_batches_pooled": len(pooled),
                        "model_rows_per_s_around_this_run": nearby, "slowest": slowest,
                        "e2e_rows_per_s": r["steady_rows_per_s"], "ratio": ratio, "shared_core_bound": shared}
        rows.append([name, f"{d['source_frames_per_row']:.2f}", f"{decode:,.1f}", f"{decode_prep:,.1f}",
                     f"{model_rate:.1f} ({nearby:.1f})", f"{slowest:.1f}", f"{r['steady_rows_per_s']:.1f}",
                     f"{ratio:.2f}", f">= {TARGET_E2E_RATIO}", verdict(ratio, TARGET_E2E_RATIO), f"{shared:.1f}",
                     f"{r['steady_rows_per_s'] / shared:.2f}"])
    report["ratios"] = ratios
    print(table(["run", "frames/row", "decode", "decode+prep", "model", "slowest", "e2e steady", "ratio", "target",
                 "", "shared-core bound", "e2e / bound"], rows))

    if args.skip_memory:
        return
    print("\n[6] peak memory: extract_features on a 1-minute vs a 10-minute video, each in a fresh subprocess",
          flush=True)
    memory_specs = {
        "1 min": VideoSpec("P02_01", 640, 360, Fraction(30), 60, seed=4),
        "10 min": VideoSpec("P02_02", 640, 360, Fraction(30), 600, seed=4),
    }
    for spec in memory_specs.values():
        ensure_video(videos_root, spec)
    memory = measure_memory(videos_root, memory_specs, args.workdir, settings)
    report["memory"] = memory
    print(f"      640x360 at 30 fps (epicfeat.data.synthetic), fps={settings.memory_fps:g}, "
          f"resize {settings.memory_resize} / crop {settings.memory_crop} (small: the CPU model is slow; batches and "
          "buffers do not depend on video length),\n      default decode workers, OMP_NUM_THREADS=1 (speed only); "
          "peak resident memory (VmHWM) in MiB per process;\n      children: the decode worker and multiprocessing's "
          "resource tracker")
    rows = [[label, m["rows"], f"{m['seconds']:.0f}", f"{m['main_peak_mb']:.0f}", f"{m['largest_child_peak_mb']:.0f}",
             m["children_seen"], f"{m['all_processes_peak_mb']:.0f}", _signed(m["rss_trend_mb_per_10min_video"])]
            for label, m in memory.items()]
    print(table(["video", "rows", "s", "main process", "largest child", "children", "main + children",
                 "RSS trend MiB/10 min of video"], rows))
    short, long = memory["1 min"], memory["10 min"]
    growth = {name: long[key] / short[key] - 1 for name, key in (
        ("main + children", "all_processes_peak_mb"), ("main process", "main_peak_mb"),
        ("largest child (decode worker)", "largest_child_peak_mb"))}
    report["memory_growth"] = growth
    print(table(["10 min vs 1 min", "growth", "target", ""], [
        [name, f"{g:+.1%}", f"<= +{TARGET_MEMORY_GROWTH:.0%}", verdict(g, TARGET_MEMORY_GROWTH, at_least=False)]
        for name, g in growth.items()]))


def run_gpu_section(args, settings: Settings, files: dict[str, Path], specs: dict[str, VideoSpec], decoding: dict,
                    cores: int) -> dict:
    device = torch.device(args.gpu_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu: PyTorch sees no CUDA GPU here (use --gpu-device cpu only to smoke-test the code)")
    print(f"\n[GPU] ResNet50 alone on {device} ...", flush=True)
    smoke = device.type != "cuda"  # a code-path check on CPU: tiny batches
    gpu: dict = {"model": measure_model_gpu(device, batch=4 if smoke else 256, iterations=2 if smoke else 20,
                                            compile=not args.skip_compile)}
    workers = max(1, cores - 1)
    config = ExtractConfig(weights="random", device=str(device), decode_workers=workers)
    copies = dict(settings.gpu_copies)
    print(f"\n[GPU] decode workers alone and end to end, decode_workers={workers}, video ids per file: "
          + ", ".join(f"{label} x {n * workers}" for label, n in copies.items()), flush=True)
    gpu["decode_workers"], gpu["end_to_end"] = {}, {}
    for label in ("1920x1080@59.94", "640x360@59.94"):
        path = files[label]
        root = args.workdir / "gpu_videos" / path.stem
        ids = link_copies(path, root, copies[label] * workers)
        gpu["decode_workers"][label] = measure_decode_workers(root, ids, config)
        if label == "1920x1080@59.94":  # codec threads per worker: FFmpeg's choice (cores + 1 each) vs one
            gpu["decode_workers"][label + " threads=1"] = measure_decode_workers(
                root, ids, replace(config, decode_threads=1))
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=args.workdir))
        try:
            gpu["end_to_end"][label] = run_extract_timed(root, ids, cache, config)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print(f"  {label}: decode alone {gpu['decode_workers'][label]['steady_rows_per_s']:,.0f} rows/s, "
              f"end to end {gpu['end_to_end'][label]['steady_rows_per_s']:,.0f} rows/s", flush=True)

    variants = gpu["model"]["variants"]
    print(f"\n[GPU] ResNet50 frames/s, batch {gpu['model']['batch']}, {gpu['model']['device']}, pre-made "
          "normalised tensors (fp32: PyTorch's default, cuDNN may use TF32)")
    print(table(["variant", "frames/s", "warm-up s"],
                [[name, f"{v['rows_per_s']:,.0f}", f"{v['warmup_s']:.1f}" if "warmup_s" in v else "-"]
                 for name, v in variants.items()]))
    print(f"\n[GPU] end to end (random weights, fps=10, 256/224, batch 64 bf16 channels_last, decode_workers={workers},"
          " fresh cache), rows/s")
    rows = []
    for label, r in gpu["end_to_end"].items():
        decode = gpu["decode_workers"][label]["steady_rows_per_s"]
        model_rate = variants["extract_step_b64"]["rows_per_s"]
        slowest = min(decode, model_rate)
        ratio = r["steady_rows_per_s"] / slowest
        r["ratio"] = ratio
        rows.append([label, r["videos"], r["rows"], f"{decode:,.0f}", f"{model_rate:,.0f}",
                     f"{r['rows_per_s_total']:,.0f}",
                     f"{r['window_rows']}" + (" (all)" if r["window_full_run"] else ""),
                     f"{r['steady_rows_per_s']:,.0f}",
                     f"{r['steady_rows_per_s'] * decoding[label]['source_frames_per_row']:,.0f}", f"{ratio:.2f}",
                     verdict(ratio, TARGET_E2E_RATIO),
                     "-" if r["gpu_busy_share"] is None else f"{r['gpu_busy_share']:.0%}"])
    print(table(["file", "videos", "rows", "decode alone", "model b64", "e2e total", "steady rows", "e2e steady",
                 "src frames/s",
                 f"ratio (>= {TARGET_E2E_RATIO})", "", "GPU busy"], rows))
    one = gpu["decode_workers"].get("1920x1080@59.94 threads=1")
    if one:
        print(f"  1080p decode workers alone with decode_threads=1: {one['steady_rows_per_s']:,.0f} rows/s "
              f"(vs {gpu['decode_workers']['1920x1080@59.94']['steady_rows_per_s']:,.0f} with FFmpeg's choice)")
    return gpu


if __name__ == "__main__":
    sys.exit(main())
