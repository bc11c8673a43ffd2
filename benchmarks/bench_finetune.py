"""Fine-tuning speed benchmark: clips/s of `epicfeat finetune`, and how much of an epoch waits on decoding.

Builds a synthetic EPIC-layout dataset (``epicfeat.data.synthetic``), extracts its feature set with a seeded
random ResNet50 (finetune decodes clips at the stored rows' times), and a stage-two checkpoint on that feature
set (no stage-two training: a fresh seed-recipe BiLSTM is all a speed measurement needs), then runs the real
``finetune`` function and reads its metrics rows:

  CPU (default): decode-only clips/s (DataLoader + PyAV, no model), then training clips/s with small settings
  (T=8, 112 px crops, batch 8; two epochs, the second timed: the first steps of a process are several times
  slower), and the share of the epoch spent waiting for decoded clips.

  --gpu (needs CUDA; sized for about a minute on a 16-core GPU machine): 4 train videos of 12 segments at 640x360 (about 20 s
  each, generated in parallel), their features extracted on the GPU, then T=16 and T=32 at 224 px crops (resize
  256), bf16, global batch 32, four epochs each, the last three timed (the first pays for cuDNN's autotuning and
  the first iterations): clips/s, peak GPU memory, share of time the GPU waited on decoding, and the time of a full
  EPIC-100 epoch (67,217 clips) projected from those, side by side with the seed's figures on an A100 (10 min per
  epoch, 28-32 GB). Each stage prints a line as it ends. ``--gpu-device cpu`` is a dry run of that code. The
  synthetic videos are 640x360: decoding 1080p originals costs several times more per frame (see FIELD_NOTES), so
  use downscaled copies for real runs.

    python benchmarks/bench_finetune.py                    # CPU, about 1-2 minutes on 2 cores
    python benchmarks/bench_finetune.py --gpu --skip-cpu   # the GPU section only
    python benchmarks/bench_finetune.py --skip-cpu --long-segment   # decoding a 60 s segment's clip, 2 ways
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

# First: importing common puts the checkout on sys.path, before any epicfeat import.
from common import (add_gpu, add_workdir, gpu_device, machine_line, new_parser, synthetic_dataset, synthetic_video,
                    work_folder)

import numpy as np
import torch

from epicfeat.clips import SEEK_GAP_SECONDS, decode_clip, load_clip_data
from epicfeat.configs import ExtractConfig, FinetuneConfig
from epicfeat.data.annotations import EpicAnnotations
from epicfeat.data.synthetic import SyntheticSpec
from epicfeat.extract import extract_features
from epicfeat.finetune import finetune, load_start
from epicfeat.frames import Preprocess
from epicfeat.store import FeatureStore
from epicfeat.temporal.checkpoint import ModelCard, save_checkpoint
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model

EPIC100_TRAIN_CLIPS = 67_217
SEED_A100 = "seed on an A100: 10 min/epoch, 28-32 GB"  # what the seed reported, to read the numbers against


def parse_args(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--videos-per-split", type=int, default=2, help="synthetic train videos (default: %(default)s)")
    parser.add_argument("--segments-per-video", type=int, default=6, help="segments per video (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=8, help="CPU: T frames per clip (default: %(default)s)")
    parser.add_argument("--crop", type=int, default=112,
                        help="CPU: crop side; resize is crop * 8 / 7 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="CPU: clips per optimiser step (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="CPU: decode processes (default: %(default)s)")
    add_gpu(parser, "add the GPU section (needs CUDA)")
    parser.add_argument("--gpu-videos", type=int, default=4, help="GPU: synthetic train videos (default: %(default)s)")
    parser.add_argument("--gpu-segments", type=int, default=12,
                        help="GPU: segments per synthetic video (default: %(default)s, about 20 s of video)")
    parser.add_argument("--gpu-epochs", type=int, default=4,
                        help="GPU: epochs per T, all but the first timed (default: %(default)s)")
    parser.add_argument("--gpu-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="GPU: decode processes (default: cores - 2 = %(default)s)")
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU section")
    parser.add_argument("--long-segment", action="store_true",
                        help="add: T=16 frames of one 60 s segment (640x360), one seek per bin vs one front-to-back pass")
    add_workdir(parser, "the datasets")
    parser.add_argument("--out", type=Path, default=None, help="also save the GPU section's numbers as JSON here")
    return parser.parse_args(argv)


def dataset_spec(*, videos: int, segments: int, width: int, height: int) -> SyntheticSpec:
    return SyntheticSpec(seen_participants=1, train_videos_per_participant=videos, validation_videos_per_participant=1,
                         test_videos_per_participant=1, unseen_videos=1, segments_per_video=(segments, segments),
                         segment_seconds=(0.8, 2.4), width=width, height=height)


def make_checkpoint(path: Path, dataset, cache: Path, *, resize: int, crop: int, device: str) -> Path:
    """Extract the dataset's features with a seeded random ResNet50, and a stage-two checkpoint on that feature set."""
    for split in ("train", "validation"):
        result = extract_features(ExtractConfig(
            split=split, videos=dataset.videos, annotations=dataset.annotations, cache=cache, weights="random",
            resize=resize, crop=crop, precision="fp32", decode_workers=0 if device == "cpu" else -1, device=device,
            progress=False,
        ))
        assert result.ok, result
    identity = FeatureStore.open(result.store).identity
    table = EpicAnnotations(dataset.annotations)
    model = create_temporal_model(TemporalModelArgs(n_verbs=len(table.verbs.keys), n_nouns=len(table.nouns.keys)),
                                  torch.full((2048,), 13.0), torch.full((2048,), 14.0))
    card = ModelCard(config={"frames": 16}, verb_classes=tuple(table.verbs.keys), noun_classes=tuple(table.nouns.keys),
                     feature_set=identity.to_dict(), feature_set_key=identity.key())
    return save_checkpoint(path, model=model, card=card, epoch=0, metrics={}, history=[])


def decode_only(config: FinetuneConfig, workers: int) -> float:
    """Clips/s of the training DataLoader alone (PyAV decode + resize in worker processes, no model)."""
    start = load_start(config)  # finetune's own clip dataset, so the decoding timed is finetune's
    data = load_clip_data(dataclasses.replace(config, frames=config.frames or 16), start.checkpoint.card, start.store,
                          start.preprocess)
    loader = torch.utils.data.DataLoader(data.train, batch_size=config.batch_size, num_workers=workers, shuffle=True)
    started, clips = time.perf_counter(), 0
    for batch in loader:
        clips += len(batch["valid"])
    return clips / (time.perf_counter() - started)


def run(config: FinetuneConfig) -> dict:
    """Clips/s over the run's epochs after the first (which pays for the first iterations and cuDNN's autotuning)."""
    shutil.rmtree(config.out, ignore_errors=True)  # a fresh run, not a resume of an earlier benchmark's
    result = finetune(config)
    clips = result.pack_summary["train"]["segments"]  # per epoch
    timed = result.history[1:] or result.history
    seconds = sum(clips / row["train_segments_per_s"] for row in timed)  # training alone, no statistics pass
    rate = clips * len(timed) / seconds
    return {
        "clips_per_s": rate,
        "frames_per_s": rate * config.frames,
        "data_wait_share": sum(row["data_wait_seconds"] for row in timed) / seconds,
        "peak_gpu_memory_gb": max(row.get("peak_gpu_memory_gb", float("nan")) for row in timed),
        "clips": clips * len(timed),
        "steps": sum(-(-clips // config.batch_size) for _ in timed),
        "epoch_seconds": seconds / len(timed),
    }


def cpu_section(args, workdir: Path) -> None:
    spec = dataset_spec(videos=args.videos_per_split, segments=args.segments_per_video, width=192, height=108)
    dataset, seconds = synthetic_dataset(workdir / "cpu_data", spec)
    resize = args.crop * 8 // 7
    checkpoint = make_checkpoint(workdir / "cpu_start.pt", dataset, workdir / "cpu_cache", resize=resize,
                                 crop=args.crop, device="cpu")
    config = FinetuneConfig(
        checkpoint=checkpoint, videos=dataset.videos, annotations=dataset.annotations, out=workdir / "cpu_run",
        cache=workdir / "cpu_cache", train_splits="train+validation", frames=args.frames, epochs=2,
        batch_size=args.batch_size, micro_batch_size=args.batch_size, num_workers=args.workers, device="cpu",
        progress=False,
    )
    decode = decode_only(config, args.workers)
    print(f"\nCPU, synthetic 192x108 videos (generated in {seconds:.0f} s), T={args.frames}, "
          f"{args.crop}px crops, batch {args.batch_size}, trainable stages 2, {args.workers} decode worker(s)")
    print(f"  decode only:  {decode:8.1f} clips/s  ({decode * args.frames:.0f} frames/s)")
    stats = run(config)
    print(f"  training:     {stats['clips_per_s']:8.2f} clips/s  ({stats['frames_per_s']:.1f} frames/s, "
          f"{stats['clips']} clips in {stats['epoch_seconds']:.1f} s, second epoch)")
    print(f"  waiting on decoding: {100 * stats['data_wait_share']:.1f} % of the epoch")


def long_segment_section(workdir: Path, seconds: float = 60.0, frames: int = 16) -> None:
    """Decode time of one clip of a long segment: times cut into runs (a seek each) vs one pass through it all."""
    video = synthetic_video(workdir / "long_640x360.mp4", seconds=seconds + 0.4)  # 640x360 at 59.94 fps
    times = (np.arange(frames) + 0.5) * (seconds - 1.0) / frames  # bin centres over the segment
    decode = Preprocess(resize=256, crop=224)
    timings = {}
    for name, gap in (("one pass", 1e9), (f"seek per run (gap > {SEEK_GAP_SECONDS:g} s)", SEEK_GAP_SECONDS)):
        decode_clip(video, times, decode, seek_gap=gap, threads=1)  # warm the page cache
        started = time.perf_counter()
        for _ in range(3):
            images = decode_clip(video, times, decode, seek_gap=gap, threads=1)
        timings[name] = (time.perf_counter() - started) / 3
    print(f"\nlong segment: T={frames} frames of a {seconds:.0f} s segment, 640x360 59.94 fps, 1 codec thread")
    base = timings["one pass"]
    for name, value in timings.items():
        print(f"  {name:<32} {value * 1000:8.1f} ms per clip  ({base / value:.1f}x)")
    assert images.shape == (frames, 224, 224, 3)


def gpu_section(args, workdir: Path) -> dict:
    """T=16 and T=32 clips/s on the GPU; each stage prints a line as it ends, and ``args.out`` is rewritten after
    each T, so a section cut short by its time limit still leaves what it measured."""
    device = gpu_device(args.gpu_device)
    if device is None:
        return {}
    dry = device.type == "cpu"  # a dry run of this section's code on a CPU: tiny settings
    width, height = (192, 108) if dry else (640, 360)
    spec = dataset_spec(videos=2 if dry else args.gpu_videos, segments=4 if dry else args.gpu_segments, width=width,
                        height=height)
    dataset, seconds = synthetic_dataset(workdir / "gpu_data", spec)
    print(f"\nGPU section: synthetic {width}x{height} dataset generated in {seconds:.0f} s", flush=True)
    resize, crop = (72, 64) if dry else (256, 224)
    batch, workers, epochs = (4, 0, 2) if dry else (32, args.gpu_workers, args.gpu_epochs)
    started = time.perf_counter()
    checkpoint = make_checkpoint(workdir / "gpu_start.pt", dataset, workdir / "gpu_cache", resize=resize, crop=crop,
                                 device=str(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    print(f"  features extracted on {name} in {time.perf_counter() - started:.0f} s; finetune at {resize}/{crop}, bf16, "
          f"global batch {batch}, trainable stages 2, {workers} decode workers, {epochs} epochs per T "
          "(the first untimed)", flush=True)
    results = {"device": name, "video": f"{width}x{height}", "crop": crop, "batch": batch, "workers": workers}
    for frames in (16, 32):
        config = FinetuneConfig(
            checkpoint=checkpoint, videos=dataset.videos, annotations=dataset.annotations, cache=workdir / "gpu_cache",
            out=workdir / f"gpu_run_T{frames}", train_splits="train+validation", frames=frames,
            epochs=epochs, batch_size=batch, micro_batch_size=batch, num_workers=workers, device=str(device),
            precision="bf16", progress=False,
        )
        started = time.perf_counter()
        stats = run(config)
        epoch_minutes = EPIC100_TRAIN_CLIPS / stats["clips_per_s"] / 60
        print(f"  T={frames}: {stats['clips_per_s']:8.1f} clips/s over {stats['clips']} clips ({stats['steps']} steps), "
              f"peak GPU memory {stats['peak_gpu_memory_gb']:.1f} GiB, waiting on decoding "
              f"{100 * stats['data_wait_share']:.0f} % of the time; a full EPIC-100 epoch ({EPIC100_TRAIN_CLIPS:,} "
              f"clips) projected at {epoch_minutes:.1f} min  [{SEED_A100}]; run took "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        results[f"T{frames}"] = {**stats, "epic_epoch_minutes": epoch_minutes}
        save_json(args.out, results)
    return results


def save_json(path: Path | None, results: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": machine_line(), **results}, indent=2))


def main(argv=None) -> None:
    args = parse_args(argv)
    print(machine_line())
    with work_folder(args.workdir, "bench_finetune_") as workdir:
        if not args.skip_cpu:
            cpu_section(args, workdir)
        if args.long_segment:
            long_segment_section(workdir)
        if args.gpu:
            gpu_section(args, workdir)


if __name__ == "__main__":
    main()
