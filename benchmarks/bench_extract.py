"""Stage one's speed and memory: is `epicfeat extract` as fast as its slowest stage, in constant memory?

    python benchmarks/bench_extract.py                  # CPU sections 1-5 (about 6 minutes on 2 cores; --quick: 3)
    python benchmarks/bench_extract.py --vs-straight    # the extract CLI vs a straight PyAV -> ResNet50 loop
    ... --vs-straight --backbones resnet50,timm:resnet18,timm:vit_tiny_patch16_224   # the same, per backbone
    ... --vs-straight --backbones torchvision:r2plus1d_18 --many 1   # a video backbone (clips of 16 frames)
    python benchmarks/bench_extract.py --gpu            # the GPU section (about 80 s on a 16-core H200 host)
    python benchmarks/bench_extract.py --gpu --gpu-device cpu   # its dry run on a CPU, tiny sizes
    ... --out FILE.json                                 # every number as JSON as well

1. decode alone, per process: ``iter_frames`` at 10 rows/s with one codec thread and with FFmpeg's choice; and
   extract's decode stage alone (its ``DecodePool``) with the codec threads it picks (cores / decoders) and with
   FFmpeg's choice for every decoder.
2. the model step alone: ``FrameEncoder.encode`` on batches of 64 uint8 frames, as extract calls it (folded and
   unfolded batch norms).
3. end to end: ``extract_features`` into a fresh cache; steady rows/s (first row written to last), start-up
   included rows/s, and the shares of the run spent in the model step and in writing.
4. end to end / the slowest stage alone, and the bound of stages that share the cores (a CPU-only machine).
5. memory: peak resident memory of ``extract_features`` on a 1-minute and a 10-minute video (fresh processes).

The videos are ``epicfeat.data.synthetic``'s, made once into ``--workdir`` and reused; the end-to-end runs link one
file under many video ids (one file on disk, many videos for the pipeline). The machine is shared: measurements are
interleaved where they are compared, and the load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
import torch
from common import add_gpu, add_workdir, machine_line, new_parser, synchronize, synthetic_video, table, verdict

import epicfeat.extract as extract
from epicfeat.backbone import create_backbone, fold_batch_norms
from epicfeat.configs import ExtractConfig
from epicfeat.devices import PRECISION_DTYPES, native_bf16_cpu, resolve_device
from epicfeat.encoder import FrameEncoder, build_encoder
from epicfeat.frames import (
    DecodePool,
    DecodeSettings,
    FramesDecoded,
    Preprocess,
    VideoJob,
    available_cores,
    codec_threads,
    iter_frames,
)
from epicfeat.store import VideoWriter

ROWS_FPS = 10.0  # extract's default rows per second
BATCH = 64  # extract's default batch size
TARGET_E2E_RATIO = 0.95  # end to end / slowest stage alone
TARGET_VS_STRAIGHT = 0.9  # the extract CLI / a straight decode -> backbone loop, every backbone
# the GPU section's model steps besides ResNet50's (a video backbone's rows are 16-frame clips)
GPU_BACKBONES = ("timm:resnet18", "timm:vit_tiny_patch16_224", "timm:convnext_tiny", "torchvision:r2plus1d_18")
TARGET_MEMORY_GROWTH = 0.10  # 10-minute peak within 10 % of the 1-minute peak


@dataclass(frozen=True)
class Video:
    """A test video ``<workdir>/videos/<participant>/<video_id>.MP4``: a synthetic clip played ``repeat`` times (its
    packets copied one after another, so a long video costs no more rendering than its clip)."""

    video_id: str
    width: int
    height: int
    clip_seconds: float
    repeat: int = 1
    fps: str = "60000/1001"

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def seconds(self) -> float:
        return self.clip_seconds * self.repeat

    def clip(self, workdir: Path) -> Path:
        return workdir / "clips" / f"{self.video_id}.MP4"

    def make(self, workdir: Path) -> Path:
        clip = synthetic_video(self.clip(workdir), seconds=self.clip_seconds, width=self.width, height=self.height,
                               fps=self.fps)
        path = workdir / "videos" / self.video_id.split("_")[0] / f"{self.video_id}.MP4"
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(clip)) as source, av.open(str(path), "w", format="mp4") as out:
            template = source.streams.video[0]
            stream = out.add_stream_from_template(template)
            packets = [(p, p.pts, p.dts) for p in source.demux(template) if p.size]
            span = round(len(packets) / (template.average_rate * template.time_base))  # one clip, in stream ticks
            for k in range(self.repeat):
                for packet, pts, dts in packets:
                    packet.pts, packet.dts, packet.stream = pts + k * span, dts + k * span, stream
                    out.mux(packet)
        return path


def make_videos(videos: list[Video], workdir: Path) -> dict[str, Path]:
    """label -> path, rendered in parallel (the renderer is single-threaded; reused when already made)."""
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, min(len(videos), available_cores()))) as pool:
        paths = list(pool.map(Video.make, videos, [workdir] * len(videos)))
    print(f"  videos ready in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{v.label} {v.seconds:g} s" for v in videos), flush=True)
    return {v.label: path for v, path in zip(videos, paths)}


def link_copies(path: Path, root: Path, copies: int) -> list[str]:
    """``path`` linked under ``copies`` video ids in a fresh EPIC-layout folder ``root``; returns the ids."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "P90").mkdir(parents=True)
    ids = [f"P90_{i:04d}" for i in range(copies)]
    for video_id in ids:
        os.link(path, root / "P90" / f"{video_id}.MP4")
    return ids


# ---------------------------------------------------------------------------------------- 1. decode alone
def decode_per_process(path: Path, threads: int) -> dict:
    """``iter_frames`` at 10 rows/s, default preprocessing: rows/s and source frames/s of one process."""
    started = time.perf_counter()
    rows = sum(len(batch) for batch in iter_frames(path, fps=ROWS_FPS, preprocess=Preprocess(), threads=threads))
    seconds = time.perf_counter() - started
    with av.open(str(path)) as container:
        frames = container.streams.video[0].frames
    return {"rows_per_s": rows / seconds, "frames_per_s": frames / seconds, "rows": rows, "frames": frames}


def decode_pool(root: Path, ids: list[str], workers: int, threads: int | None = None) -> dict:
    """Extract's decode stage alone (its DecodePool, batches taken and dropped): steady rows/s from the first batch to
    the last (the workers' start-up left out). ``threads``: codec threads per worker (None: extract's choice,
    cores / workers; 0: FFmpeg's)."""
    jobs: queue.Queue = queue.Queue()
    for video_id in ids:
        jobs.put(VideoJob(video_id, root / "P90" / f"{video_id}.MP4"))
    jobs.put(None)
    settings = DecodeSettings(ROWS_FPS, Preprocess(), BATCH, codec_threads(workers) if threads is None else threads)
    stamps = []
    with DecodePool(workers, settings) as pool:
        for event in pool.decode(jobs):
            if isinstance(event, FramesDecoded):
                stamps.append((time.perf_counter(), len(event.batch)))
    rows = sum(n for _, n in stamps)
    return {"workers": workers, "codec_threads": settings.threads, "rows": rows,
            "steady_rows_per_s": (rows - stamps[0][1]) / (stamps[-1][0] - stamps[0][0])}


# ------------------------------------------------------------------------------------- 2. model step alone
def encoder_for(device: torch.device, *, fold_bn: bool | None = None, batch_size: int = BATCH,
                backbone: str = "resnet50") -> FrameEncoder:
    """The encoder extract builds on ``device`` (random weights, its precision, channels_last, fold_bn)."""
    config = extract.resolved(ExtractConfig(backbone=backbone, weights="random", device=str(device), fold_bn=fold_bn,
                                            batch_size=batch_size), device)
    model = extract.backbone_of(config)
    return build_encoder(model, extract.feature_set_identity(config, model, device).to_dict(), device)


def encode_rows_per_s(encoder: FrameEncoder, repeats: int, batch: int = BATCH, crop: int = 224,
                      clip_len: int = 1) -> float:
    """Extract's model step on uint8 host frames (to the device, normalise, backbone, float16 back): rows/s (a
    video backbone's rows: clips of ``clip_len`` frames)."""
    clip = (clip_len,) if clip_len > 1 else ()
    shape = (batch, *clip, crop, crop, 3)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    step = lambda: encoder.encode(images.movedim(-1, -3), pad_to=batch).cpu()  # noqa: E731
    step()  # warm-up: oneDNN / cuDNN pick their kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


# ---------------------------------------------------------------------------------------------- 3. end to end
class _Watch:
    """Times the pipeline's model steps and writes while ``extract_features`` runs (patched in for the run)."""

    def __init__(self, device: torch.device):
        self.device, self.rows, self.model_s, self.write_s = device, [], 0.0, 0.0

    def __enter__(self) -> _Watch:
        encode, append, commit = FrameEncoder.encode, VideoWriter.append, VideoWriter.commit

        def timed_encode(encoder, *args, **kwargs):
            started = time.perf_counter()
            out = encode(encoder, *args, **kwargs)
            synchronize(self.device)  # the GPU's time counts as model time (extract waits for it next)
            self.model_s += time.perf_counter() - started
            return out

        def timed_append(writer, features, pts, frame_indices, span=None):
            started = time.perf_counter()
            append(writer, features, pts, frame_indices, span)
            self.write_s += time.perf_counter() - started
            self.rows.append((time.perf_counter(), len(pts)))

        def timed_commit(writer, **attrs):
            started = time.perf_counter()
            commit(writer, **attrs)
            self.write_s += time.perf_counter() - started

        FrameEncoder.encode, VideoWriter.append, VideoWriter.commit = timed_encode, timed_append, timed_commit
        self._originals = (encode, append, commit)
        return self

    def __exit__(self, *exc) -> None:
        FrameEncoder.encode, VideoWriter.append, VideoWriter.commit = self._originals


def end_to_end(root: Path, ids: list[str], config: ExtractConfig, workdir: Path) -> dict:
    """``extract_features`` on the linked videos into a fresh cache: steady rows/s (first row written to the last),
    rows/s with start-up, and the shares of the run in the model step (GPU busy on a GPU) and in writing."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    device = resolve_device(config.device)
    config = replace(config, videos=root, video_ids=tuple(ids), cache=cache, progress=False)
    try:
        with _Watch(device) as watch:
            summary = extract.extract_features(config)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert summary.ok and summary.rows, summary
    (first, first_rows), (last, _) = watch.rows[0], watch.rows[-1]
    pipeline_s = last - first
    return {"videos": len(ids), "rows": summary.rows, "seconds": summary.seconds,
            "rows_per_s_total": summary.rows / summary.seconds,
            "steady_rows_per_s": (summary.rows - first_rows) / pipeline_s if pipeline_s else float("nan"),
            "seconds_to_first_row": summary.seconds - pipeline_s,
            "model_share": watch.model_s / summary.seconds, "write_share": watch.write_s / summary.seconds,
            "gpu_busy_share": watch.model_s / summary.seconds if device.type == "cuda" else None,
            "padded_rows_share": padded_share(summary.done, config.batch_size)}


def padded_share(done, batch_size: int) -> float:
    """Model work spent on padding: each video's last batch runs full (no batching across videos)."""
    rows = sum(r.rows for r in done)
    padded = sum(-r.rows % batch_size for r in done)
    return padded / (rows + padded)


# --------------------------------------------------------------------------------------------------- 5. memory
_MEMORY_CHILD = r"""
import json, resource, sys, threading, time
from pathlib import Path
import psutil
from epicfeat.configs import ExtractConfig
from epicfeat.extract import extract_features
videos, video_id, cache = sys.argv[1:4]
me, peaks, stop = psutil.Process(), {}, threading.Event()
def sample():  # every 50 ms: the peak of each child (decode processes), read before it exits
    while not stop.wait(0.05):
        for child in me.children(recursive=True):
            try:
                peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
            except psutil.Error:
                pass
threading.Thread(target=sample, daemon=True).start()
summary = extract_features(ExtractConfig(video_ids=(video_id,), videos=Path(videos), cache=Path(cache),
                                         weights="random", resize=72, crop=64, decode_workers=1, progress=False))
stop.set()
print(json.dumps({"rows": summary.rows, "seconds": summary.seconds,
                  "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "decoder_peak_mib": max(peaks.values(), default=0) / 2**20}))
"""


def memory(workdir: Path) -> dict:
    """Peak memory of extract on a 1- and a 10-minute video (small frames: the buffers do not grow with them)."""
    videos = [Video("P91_01", 160, 90, 60, 1, "30"), Video("P91_02", 160, 90, 60, 10, "30")]
    make_videos(videos, workdir)
    results = {}
    for video in videos:
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
        try:
            command = [sys.executable, "-c", _MEMORY_CHILD, str(workdir / "videos"), video.video_id, str(cache)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        results[f"{video.seconds / 60:g} min"] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# ---------------------------------------------------------------------------------------------- CPU sections
def cpu_sections(args, workdir: Path, report: dict) -> None:
    # EPIC-sized: its median video lasts about 5 minutes (--quick: 1 minute); 1080p for a minute (30 s)
    videos = [Video("P90_640", 640, 360, 5 if args.quick else 10, 12 if args.quick else 30),
              Video("P90_1080", 1920, 1080, 1 if args.quick else 2, 30)]
    files = make_videos(videos, workdir)
    clips = {video.label: video.clip(workdir) for video in videos}
    workers = max(1, extract.decode_workers_for(-1, 1000))  # extract's default for a long list of videos
    print("\n[1] decode alone (rows/s at 10 rows/s; source frames/s in brackets)", flush=True)
    decode: dict = {}
    for label, path in clips.items():  # the clips: per frame, the long videos decode as they do
        root = workdir / "links" / label
        ids = link_copies(path, root, 4 * workers)
        decode[label] = {"process_t1": decode_per_process(path, 1), "process_auto": decode_per_process(path, 0),
                         "pool": decode_pool(root, ids, workers),
                         "pool_ffmpeg_threads": decode_pool(root, ids, workers, 0)}
    report["decode"] = decode
    print(table(["file", "1 process, 1 thread", "1 process, FFmpeg's threads",
                 f"pool {workers} x {codec_threads(workers)} threads", f"pool {workers} x FFmpeg's threads"],
                [[label, f"{d['process_t1']['rows_per_s']:,.0f} ({d['process_t1']['frames_per_s']:,.0f})",
                  f"{d['process_auto']['rows_per_s']:,.0f} ({d['process_auto']['frames_per_s']:,.0f})",
                  f"{d['pool']['steady_rows_per_s']:,.0f}", f"{d['pool_ffmpeg_threads']['steady_rows_per_s']:,.0f}"]
                 for label, d in decode.items()]))

    print("\n[2] the model step alone (FrameEncoder.encode, batch 64, 224 px, uint8 in, float16 out)", flush=True)
    cpu = torch.device("cpu")
    folded, unfolded = encoder_for(cpu, fold_bn=True), encoder_for(cpu, fold_bn=False)
    repeats = 2 if args.quick else 3
    steps = {"fold_bn": [], "no_fold_bn": []}
    for _ in range(repeats):  # interleaved: a busy spell on the machine hits both
        steps["fold_bn"].append(encode_rows_per_s(folded, 1))
        steps["no_fold_bn"].append(encode_rows_per_s(unfolded, 1))
    model = {name: statistics.median(rates) for name, rates in steps.items()}
    report["model"] = {"precision": folded.precision, "torch_threads": torch.get_num_threads(), **model}
    print(f"  {folded.precision}, {torch.get_num_threads()} torch threads: folded batch norms {model['fold_bn']:.1f} "
          f"rows/s, unfolded {model['no_fold_bn']:.1f} rows/s ({model['fold_bn'] / model['no_fold_bn']:.2f}x)")

    print("\n[3-4] end to end (extract_features, random weights, defaults, fresh cache): "
          + ", ".join(f"{v.label} {v.seconds / 60:g} min" for v in videos), flush=True)
    e2e, rows = {}, []
    for label, path in files.items():
        ids = link_copies(path, workdir / "links" / label, 1)
        e2e[label] = run = end_to_end(workdir / "links" / label, ids, ExtractConfig(weights="random", device="cpu"),
                                      workdir)
        decode_rate = decode[label]["pool"]["steady_rows_per_s"]
        slowest = min(decode_rate, model["fold_bn"])
        shared = 1 / (1 / decode[label]["process_auto"]["rows_per_s"] + 1 / model["fold_bn"])
        run.update(ratio=run["steady_rows_per_s"] / slowest, shared_core_bound=shared)
        rows.append([label, run["rows"], f"{run['steady_rows_per_s']:.1f}", f"{run['rows_per_s_total']:.1f}",
                     f"{run['seconds_to_first_row']:.1f}", f"{run['model_share']:.0%}", f"{run['write_share']:.1%}",
                     f"{run['padded_rows_share']:.1%}", f"{slowest:.1f}", f"{run['ratio']:.2f}",
                     verdict(run["ratio"], TARGET_E2E_RATIO), f"{shared:.1f}",
                     f"{run['steady_rows_per_s'] / shared:.2f}"])
    report["end_to_end"] = e2e
    print(table(["file", "rows", "steady rows/s", "with start-up", "to 1st row s", "model", "writing", "padding",
                 "slowest stage", f"ratio (>= {TARGET_E2E_RATIO})", "", "shared-core bound", "e2e / bound"], rows))
    print("  model / writing: shares of the run; padding: model work on the black frames that fill each video's last "
          "batch;\n  shared-core bound = 1 / (1/decode + 1/model): the stages take turns on the same cores here")

    if args.skip_memory:
        return
    print("\n[5] peak memory: extract on a 1-minute and a 10-minute video, each in a fresh process", flush=True)
    mem = report["memory"] = memory(workdir)
    print(table(["video", "rows", "s", "main MiB", "decoder MiB"],
                [[name, m["rows"], f"{m['seconds']:.0f}", f"{m['main_peak_mib']:.0f}", f"{m['decoder_peak_mib']:.0f}"]
                 for name, m in mem.items()]))
    growth = mem["10 min"]["main_peak_mib"] / mem["1 min"]["main_peak_mib"] - 1
    report["memory_growth"] = growth
    print(f"  10 min vs 1 min, main process: {growth:+.1%} "
          f"{verdict(growth, TARGET_MEMORY_GROWTH, at_least=False)} (<= +{TARGET_MEMORY_GROWTH:.0%})")


# ------------------------------------------------------------------------------------------- vs straight loop
_STRAIGHT_LOOP = r"""
import sys, numpy as np, torch
from pathlib import Path
from epicfeat.backbone import create_backbone
from epicfeat.configs import ExtractConfig
from epicfeat.extract import clip_of, preprocess_of
from epicfeat.frames import iter_frames
backbone, precision, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
config = ExtractConfig(backbone=backbone, weights="random")
preprocess = preprocess_of(config)  # the backbone's pretrained one
clip_len, clip_fps = clip_of(config)
model = create_backbone("random", backbone=backbone).eval()
layout = torch.channels_last if clip_len == 1 else torch.contiguous_format
model = model.to(memory_format=layout)
mean = torch.tensor(preprocess.mean).view(3, 1, 1) * 255
std = torch.tensor(preprocess.std).view(3, 1, 1) * 255
dtype = torch.bfloat16 if precision == "bf16" else None

def run(images):  # (n, [clip_len,] crop, crop, 3) uint8
    pixels = (torch.from_numpy(images).movedim(-1, -3).float() - mean) / std  # (n, [clip_len,] 3, crop, crop)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        return model(pixels.contiguous(memory_format=layout)).float().numpy().astype(np.float16)

for path in paths:
    if clip_len == 1:
        for batch in iter_frames(Path(path), fps=10.0, preprocess=preprocess, batch_size=64):
            run(batch.images)
        continue
    # A video backbone, straight: every frame at the clip rate in memory, then the clip around each 0.1 s.
    batches = list(iter_frames(Path(path), fps=clip_fps, preprocess=preprocess, batch_size=64))
    frames, pts = np.concatenate([b.images for b in batches]), np.concatenate([b.pts for b in batches])
    centres = np.unique(np.searchsorted(pts, np.arange(0, pts[-1] + 1e-9, 0.1) - 1e-9))
    for start in range(0, len(centres), 64):
        c = centres[start:start + 64, None] + np.arange(clip_len) - clip_len // 2  # (n, clip_len)
        run(frames[np.clip(c, 0, len(frames) - 1)])
"""


def vs_straight(args, workdir: Path) -> dict:
    """The extract CLI (fresh cache) against a straight iter_frames -> backbone loop of the same backbone and
    preprocessing, both timed from launch to exit, on one video and on ``--many``; interleaved, twice; for every
    ``--backbones``. Extract runs as it is (CPU: resnet50's batch norms folded) and, for resnet50, with --no-fold-bn
    too (torchvision's modules, as the straight loop runs them: the pipeline's own cost)."""
    clip = min(12.0, args.seconds)
    path = make_videos([Video("P92_01", 640, 360, clip, max(1, round(args.seconds / clip)))], workdir)["640x360"]
    precisions = args.precisions or (("fp32", "bf16") if native_bf16_cpu() else ("fp32",))
    results = {}
    for backbone in args.backbones:
        for precision in precisions:
            for count in dict.fromkeys((1, args.many)):  # --many 1: one comparison
                root = workdir / "links" / f"straight{count}"
                ids = link_copies(path, root, count)
                paths = [str(root / "P90" / f"{video_id}.MP4") for video_id in ids]
                extract_cli = [sys.executable, "-m", "epicfeat", "extract", "--videos", str(root), "--video-ids",
                               ",".join(ids), "--backbone", backbone, "--weights", "random", "--precision", precision,
                               "--no-progress"]
                variants = {"straight": [sys.executable, "-c", _STRAIGHT_LOOP, backbone, precision, *paths],
                            "extract": extract_cli}
                if backbone == "resnet50":
                    variants["extract_no_fold_bn"] = [*extract_cli, "--no-fold-bn"]
                times = {name: [] for name in variants}
                for _ in range(2):
                    for name, command in variants.items():
                        times[name].append(_timed(command, workdir))
                rows = round(count * clip * max(1, round(args.seconds / clip)) * ROWS_FPS)
                rate = {name: rows / statistics.mean(t) for name, t in times.items()}
                result = results[f"{backbone} {precision} x{count}"] = {
                    "backbone": backbone, "precision": precision, "videos": count, "rows": rows,
                    **{f"{name}_rows_per_s": r for name, r in rate.items()},
                    **{f"ratio{name[len('extract'):]}": r / rate["straight"] for name, r in rate.items()
                       if name != "straight"}}
                no_fold = (f", extract --no-fold-bn {rate['extract_no_fold_bn']:.1f} (ratio "
                           f"{result['ratio_no_fold_bn']:.2f})" if "extract_no_fold_bn" in rate else "")
                print(f"  {backbone}, {precision}, {count} x {args.seconds:g} s of 640x360 ({rows} rows): straight "
                      f"loop {rate['straight']:.1f} rows/s, extract {rate['extract']:.1f} (ratio "
                      f"{result['ratio']:.2f} {verdict(result['ratio'], TARGET_VS_STRAIGHT)}){no_fold}", flush=True)
    print(table(["backbone", "precision", "videos", "rows", "straight rows/s", "extract rows/s",
                 f"ratio (>= {TARGET_VS_STRAIGHT})"],
                [[r["backbone"], r["precision"], r["videos"], r["rows"], f"{r['straight_rows_per_s']:.1f}",
                  f"{r['extract_rows_per_s']:.1f}", f"{r['ratio']:.2f} {verdict(r['ratio'], TARGET_VS_STRAIGHT)}"]
                 for r in results.values()]))
    return results


def _timed(command: list[str], workdir: Path) -> float:
    """Seconds from launch to exit, in a fresh cache (given to extract, ignored by the straight loop)."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    if "extract" in command:
        command = [*command, "--cache", str(cache)]
    try:
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------- GPU
def gpu_section(args, workdir: Path) -> dict:
    """About 80 s on a 16-core H200 host: ResNet50 variants, then per file decode alone and extract end to end."""
    device = torch.device(args.gpu_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu: PyTorch sees no CUDA GPU here (--gpu-device cpu runs the section's code on a CPU)")
    dry = device.type != "cuda"  # a code-path check on a CPU: tiny sizes
    started = time.perf_counter()
    elapsed = lambda: f"[{time.perf_counter() - started:.0f} s]"  # noqa: E731
    print(f"[GPU] on {torch.cuda.get_device_name(device) if not dry else device}; videos ...", flush=True)
    files = make_videos([Video("P93_640", 640, 360, 1.0 if dry else 5.0, 2 if dry else 8),  # 40 s: 400 rows
                         Video("P93_1080", 1920, 1080, 0.5 if dry else 1.0, 2 if dry else 10)], workdir)  # 100 rows
    gpu: dict = {"device": str(device), "model": {"batch": 4 if dry else 256, "variants": {}}}
    variants = gpu["model"]["variants"]
    for name, precision, channels_last, fold in (("fp32", "fp32", False, False), ("bf16", "bf16", False, False),
                                                 ("bf16+channels_last", "bf16", True, False),
                                                 ("bf16+channels_last+fold_bn", "bf16", True, True)):
        variants[name] = {"rows_per_s": _backbone_rows_per_s(device, precision, channels_last, fold,
                                                             gpu["model"]["batch"], 2 if dry else 20)}
        print(f"  {elapsed()} ResNet50 {name}: {variants[name]['rows_per_s']:,.0f} frames/s", flush=True)
    variants["extract_step_b64"] = {"rows_per_s": encode_rows_per_s(encoder_for(device), 2 if dry else 20,
                                                                     batch=8 if dry else BATCH)}
    print(f"  {elapsed()} extract's step (encode, batch 64, uint8 in, float16 out, fold_bn auto): "
          f"{variants['extract_step_b64']['rows_per_s']:,.0f} frames/s", flush=True)
    gpu["backbones"] = {}  # extract's step of other backbones at their pretrained input size (a few seconds each)
    for backbone in GPU_BACKBONES:
        encoder = encoder_for(device, backbone=backbone, batch_size=8 if dry else BATCH)
        crop = encoder.backbone.data_config["input_size"][-1]
        clip_len = encoder.backbone.data_config.get("clip_len", 1)
        rate = gpu["backbones"][backbone] = {
            "feature_dim": encoder.num_features, "crop": crop, "clip_len": clip_len,
            "rows_per_s": encode_rows_per_s(encoder, 2 if dry else 20, 8 if dry else BATCH, crop, clip_len)}
        what = f"{clip_len}-frame clips" if clip_len > 1 else "frames"
        print(f"  {elapsed()} extract's step, {backbone} ({rate['feature_dim']}-d, {crop} px): "
              f"{rate['rows_per_s']:,.0f} {what}/s", flush=True)
    workers = max(1, available_cores() - 1)
    config = ExtractConfig(weights="random", device=str(device), decode_workers=workers)
    gpu["decode_workers"], gpu["end_to_end"] = {}, {}
    for label in ("640x360", "1920x1080"):
        root = workdir / "links" / label
        ids = link_copies(files[label], root, 4 if dry else 2 * workers)  # two videos per decode worker
        decode = gpu["decode_workers"][label] = decode_pool(root, ids, workers)
        print(f"  {elapsed()} {label}: decode alone, {workers} workers x {decode['codec_threads']} codec threads: "
              f"{decode['steady_rows_per_s']:,.0f} rows/s", flush=True)
        run = gpu["end_to_end"][label] = end_to_end(root, ids, config, workdir)
        run["ratio"] = run["steady_rows_per_s"] / min(decode["steady_rows_per_s"],
                                                      variants["extract_step_b64"]["rows_per_s"])
        print(f"  {elapsed()} {label}: extract end to end {run['steady_rows_per_s']:,.0f} rows/s "
              f"({run['ratio']:.2f} of the slowest stage), model step busy {run['model_share']:.0%} of the run, "
              f"writing {run['write_share']:.0%}", flush=True)
    return gpu


def _backbone_rows_per_s(device: torch.device, precision: str, channels_last: bool, fold: bool, batch: int,
                         iterations: int) -> float:
    """ResNet50 alone on pre-normalised tensors (no copies): frames/s."""
    model = create_backbone("random").eval()
    model = (fold_batch_norms(model) if fold else model).to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    pixels = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=layout)  # (B, 3, 224, 224)
    dtype = PRECISION_DTYPES[precision]
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(3):
            model(pixels)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(iterations):
            model(pixels)
        synchronize(device)
    return batch * iterations / (time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = new_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter videos and fewer repeats")
    add_gpu(parser, "run the GPU section instead of the CPU sections")
    add_workdir(parser, "the generated videos", default=Path(tempfile.gettempdir()) / "epicfeat_bench_extract")
    parser.add_argument("--out", type=Path, help="also save every number as JSON to this file")
    parser.add_argument("--skip-memory", action="store_true", help="leave out section 5 (peak memory)")
    parser.add_argument("--skip-compile", action="store_true", help="accepted for gpu_check.sh (nothing compiles)")
    parser.add_argument("--vs-straight", action="store_true", help="only: the extract CLI vs a straight loop")
    parser.add_argument("--seconds", type=float, default=60.0, help="--vs-straight: seconds of each video (60)")
    parser.add_argument("--many", type=int, default=3, help="--vs-straight: videos of the second comparison (3)")
    parser.add_argument("--backbones", type=lambda s: s.split(","), default=["resnet50"],
                        help="--vs-straight: comma-separated backbones, e.g. resnet50,timm:resnet18 (resnet50)")
    parser.add_argument("--precisions", type=lambda s: s.split(","), default=None,
                        help="--vs-straight: fp32,bf16 (default: both where the CPU has native bf16, else fp32)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"epicfeat extract benchmark: {machine_line()}; PyAV {av.__version__}; load {os.getloadavg()[0]:.1f}",
          flush=True)
    report: dict = {"machine": machine_line(), "load_average_start": os.getloadavg()}
    if args.gpu:
        report["gpu"] = gpu_section(args, args.workdir)
    elif args.vs_straight:
        report["vs_straight"] = vs_straight(args, args.workdir)
    else:
        cpu_sections(args, args.workdir, report)
    report["seconds"] = time.perf_counter() - started
    print(f"\nfinished in {report['seconds']:.0f} s (load average now {os.getloadavg()[0]:.1f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
