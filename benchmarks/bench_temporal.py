"""Stage-two speed benchmark: is an epoch on cached features bounded by the model, and how much faster is it?

The real training loop (section "real loop", first, in every run): ``epicfeat.temporal.train.train_one_epoch``
itself (time-span CutMix, gradient accumulation, the per-step learning rate) and ``evaluate`` (validation with
the official metrics), on the real TemporalModel (2048 -> 2 x 512 BiLSTM -> 97 / 300), in each precision, printed
side by side with the model alone: one optimiser step on a fixed batch (same micro-batches), run the epoch's
number of times back to back.
Their ratio is the share of the epoch the model itself takes (target on the CPU: >= 0.95).

Then, on a synthetic feature set shaped like EPIC-100 (the real segment timings of
``EPIC_100_uda_source_train.csv``, every video's real duration and fps, random float16 rows at 10 rows/s, written
through ``FeatureStore``), packed with ``pack_split``, on the CPU in one run:

  - pack time;
  - loader segments/s alone (sample_rows + gather + standardise, T frames, batch 100);
  - model training segments/s alone (BiLSTM forward + backward + AdamW step on one batch);
  - the share of epoch time spent waiting for data in a combined loop (target: < 10 %);
  - the per-epoch speed-up over end-to-end training, which decodes T frames per segment from a 640x360 video and
    runs ResNet50 forward + backward before the BiLSTM; measured on a few segments, extrapolated per segment
    (target: >= 50x).

``--gpu`` runs the real loop on CUDA at EPIC-100's real size, built on the device without Zarr: every video's rows
at 10 rows/s over its real duration (3.6 M rows x 2048 float16, 14.7 GB), the train segments of
``EPIC_100_train.csv`` (67,217; where only the 16,115-segment UDA subset is present it is repeated to 67,217) and
the 9,668 validation segments at their real rows, T=32, batch 100, bf16, with the step as train-temporal runs it
there (each epoch's full steps replay one captured CUDA graph). It prints epoch seconds (and the eager epoch beside
it), validation seconds, train + validate, the model's share, launches per step, peak memory and the time of
``epic_metrics`` alone at validation size (goal on one H200: an epoch <= 2 s, train + validate <= 3 s), all saved
with ``--out``. ``--gpu-device cpu``: a dry run of the same code at 300 / 100 segments.

    python benchmarks/bench_temporal.py                 # full 16,115 segments, about 2-3 minutes on 2 cores
    python benchmarks/bench_temporal.py --segments 3000 # quicker
    python benchmarks/bench_temporal.py --only-loop     # the real loop only (about a minute on 2 cores)
    python benchmarks/bench_temporal.py --only-loop --loop-segments 0 --gpu   # the GPU section only
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

# First: importing common puts the checkout on sys.path, before any epicfeat import.
from common import (SHARED_ANNOTATIONS, add_gpu, add_seed, add_workdir, gpu_device, machine_line, new_parser, row,
                    synchronize, synthetic_video, verdict, work_folder)

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from epicfeat.backbone import create_backbone
from epicfeat.data.annotations import EpicAnnotations
from epicfeat.devices import PRECISION_DTYPES
from epicfeat.frames import Preprocess, decode_frames_at
from epicfeat.extract import ExtractConfig, feature_set_identity
from epicfeat.metrics import epic_metrics
from epicfeat.store import FeatureStore
from epicfeat.temporal.compare import time_heads
from epicfeat.temporal.data import PackedSplit, feature_stats, pack_split
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model
from epicfeat.temporal.precision import grad_scaler, supported_precision
from epicfeat.temporal.train import StepSettings, evaluate, train_one_epoch
from epicfeat.training import EarlyStopping, LRSchedule, TrainingState

TRAIN_FILE = "EPIC_100_uda_source_train.csv"
ROWS_PER_SECOND = 10
EPIC100_TRAIN_SEGMENTS = 67_217
EPIC100_VALIDATION_SEGMENTS = 9_668
FEATURE_DIM = 2048
E2E_VIDEO_SECONDS = 8.0  # the end-to-end estimate's 640x360 59.94 fps test video ...
E2E_LONGEST_SEGMENT = 7.0  # ... and its longest segment, leaving room to start segments at different places


def parse_args(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--annotations", type=Path, default=SHARED_ANNOTATIONS,
                        help=f"EPIC-100 annotation folder holding {TRAIN_FILE} (default: %(default)s)")
    parser.add_argument("--segments", type=int, default=None,
                        help="use only the first N training segments (file order, so fewer videos to write)")
    parser.add_argument("--frames", type=int, default=32, help="T, rows sampled per segment (default: 32)")
    parser.add_argument("--batch-size", type=int, default=100, help="segments per batch (default: 100)")
    parser.add_argument("--model-batches", type=int, default=3, help="timed batches for the model alone")
    parser.add_argument("--combined-batches", type=int, default=3, help="timed batches of the combined loop")
    parser.add_argument("--e2e-segments", type=int, default=2, help="segments decoded for the end-to-end estimate")
    parser.add_argument("--e2e-batch", type=int, default=8, help="frames per ResNet50 forward+backward timing")
    add_workdir(parser, "the synthetic feature set")
    add_gpu(parser, "also time the real loop on CUDA at EPIC-100's size (needs a GPU)")
    parser.add_argument("--gpu-precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="precision of the real-loop GPU epoch (default: %(default)s)")
    parser.add_argument("--skip-cpu-model", action="store_true",
                        help="skip the CPU model, combined and end-to-end timings (e.g. with --gpu)")
    parser.add_argument("--loop-segments", type=int, default=300,
                        help="train segments of the CPU real-loop section (0 skips it; default: %(default)s)")
    parser.add_argument("--loop-micro-batch", type=int, default=50,
                        help="micro-batch of the real loop: batch / micro-batch accumulated steps (default: 50)")
    parser.add_argument("--loop-precisions", default="fp32,bf16",
                        help="precisions of the CPU real loop, comma-separated (default: %(default)s)")
    parser.add_argument("--loop-repeats", type=int, default=2,
                        help="real loop: epochs (and rounds of model-alone steps) timed, fastest kept (default: 2)")
    parser.add_argument("--only-loop", action="store_true",
                        help="run only the real-loop section(s): no Zarr feature set, no loader / e2e timings")
    parser.add_argument("--out", type=Path, default=None, help="also save the real-loop numbers as JSON to this file")
    parser.add_argument("--heads", default="",
                        help="GPU section: also time these heads side by side, comma-separated (e.g. "
                             "lstm,transformer,attentive,mean; default: none)")
    parser.add_argument("--heads-segments", type=int, default=10_000,
                        help="--heads: train segments of each head's epoch (default: %(default)s)")
    add_seed(parser)
    return parser.parse_args(argv)


# --- the synthetic feature set ----------------------------------------------------------------------------------


def build_feature_set(store: FeatureStore, video_info, video_ids: list[str], seed: int) -> tuple[int, float]:
    """Write every video in ``video_ids`` at 10 rows/s over its real duration; returns (rows written, seconds)."""
    generator = torch.Generator().manual_seed(seed)
    rows_written, started = 0, time.perf_counter()
    for video_id in video_ids:
        if store.is_complete(video_id):
            continue  # a kept --workdir from an earlier run
        fps, duration = float(video_info.at[video_id, "fps"]), float(video_info.at[video_id, "duration"])
        # Row k takes the first frame at or after k / 10 s, as stage one samples; pts are that frame's time.
        targets = np.arange(math.ceil(duration * ROWS_PER_SECOND)) / ROWS_PER_SECOND
        frame_indices = np.ceil(targets * fps - 1e-9).astype(np.int64)
        pts = frame_indices / fps
        keep = pts < duration
        frame_indices, pts = frame_indices[keep], pts[keep]
        attrs = {"source_path": f"synthetic:{video_id}", "source_fps": fps, "duration": duration,
                 "width": int(video_info.at[video_id, "width"]), "height": int(video_info.at[video_id, "height"])}
        with store.writer(video_id, attrs=attrs) as writer:
            for begin in range(0, len(pts), 8192):  # bounded memory: 8192 rows = 32 MiB of float16
                end = min(begin + 8192, len(pts))
                writer.append(random_features(end - begin, generator).numpy(), pts[begin:end],
                              frame_indices[begin:end])
            writer.commit()
        rows_written += len(pts)
    return rows_written, time.perf_counter() - started


def random_features(rows: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """(rows, 2048) float16 shaped like random-weight ResNet50 features (mean ~13, std ~14), so they fit float16
    the same way."""
    features = torch.empty((rows, FEATURE_DIM), dtype=torch.float16, device=device)
    return features.normal_(13.0, 14.0, generator=generator)


# --- the model alone and the combined loop (CPU) -----------------------------------------------------------------


def make_train_step(model: nn.Module):
    """One optimiser step on a batch: forward, verb + noun cross-entropy, backward, AdamW (the recipe's settings)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()

    def step(features: torch.Tensor, verbs: torch.Tensor, nouns: torch.Tensor) -> torch.Tensor:
        verb_logits, noun_logits = model(features)  # (B, Cv), (B, Cn)
        loss = criterion(verb_logits.float(), verbs) + criterion(noun_logits.float(), nouns)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_loader(split: PackedSplit, mean, std, frames: int, batch_size: int, seed: int) -> tuple[float, int]:
    """One pass over the split: sample_rows + gather + standardise per batch; returns (seconds, segments)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=generator)
    started = time.perf_counter()
    for begin in range(0, len(split), batch_size):
        batch = split.gather(order[begin:begin + batch_size], frames, train=True, generator=generator)  # (B, T, D)
        standardised = (batch.float() - mean) / std  # (B, T, D) float32, what the model's first step does
    del standardised
    return time.perf_counter() - started, len(split)


def time_model(model: nn.Module, split: PackedSplit, frames: int, batch_size: int, batches: int, seed: int) -> float:
    """Seconds per training step on one fixed batch (no data loading inside the timing), after one warm-up."""
    generator = torch.Generator().manual_seed(seed)
    segments = torch.randperm(len(split), generator=generator)[:batch_size]
    features = split.gather(segments, frames, train=True, generator=generator)  # (B, T, D)
    verbs, nouns = split.verb_labels[segments], split.noun_labels[segments]
    step = make_train_step(model)
    step(features, verbs, nouns)  # warm-up: allocator, oneDNN kernel choice
    started = time.perf_counter()
    for _ in range(batches):
        step(features, verbs, nouns)
    return (time.perf_counter() - started) / batches


def time_combined(model: nn.Module, split: PackedSplit, frames: int, batch_size: int, batches: int,
                  seed: int) -> tuple[float, float, int]:
    """A training loop reading its batches from the packed split; returns (data seconds, total seconds, segments)."""
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(split), generator=generator)
    step = make_train_step(model)
    data_seconds, segments = 0.0, 0
    started = time.perf_counter()
    for index in range(batches):
        batch_started = time.perf_counter()
        chosen = order[index * batch_size:(index + 1) * batch_size]
        features = split.gather(chosen, frames, train=True, generator=generator)  # (B, T, D)
        verbs, nouns = split.verb_labels[chosen], split.noun_labels[chosen]
        data_seconds += time.perf_counter() - batch_started
        step(features, verbs, nouns)
        segments += len(chosen)
    return data_seconds, time.perf_counter() - started, segments


# --- end-to-end estimate ----------------------------------------------------------------------------------------


def _tsn_centre_times(start: float, stop: float, frames: int) -> list[float]:
    return [start + (k + 0.5) * (stop - start) / frames for k in range(frames)]


def _seconds_per_frame_fwd_bwd(backbone: nn.Module, images: torch.Tensor, autocast_dtype, repeats: int = 2) -> float:
    """ResNet50 forward + backward on a batch of frames (after one warm-up), per frame."""

    def forward_backward() -> None:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            features = backbone(images)  # (n, 2048)
        features.float().pow(2).mean().backward()  # a scalar standing in for the BiLSTM's loss
        backbone.zero_grad(set_to_none=True)

    forward_backward()
    started = time.perf_counter()
    for _ in range(repeats):
        forward_backward()
    return (time.perf_counter() - started) / (repeats * len(images))


def time_decoding(video: Path, segment_durations: np.ndarray, frames: int) -> tuple[list[float], torch.Tensor]:
    """Seconds to decode and preprocess T frames of each segment; and the last segment's frames (T, 3, 224, 224)."""
    preprocess = Preprocess()
    decode_seconds = []
    for index, duration in enumerate(segment_durations):
        duration = float(min(duration, E2E_LONGEST_SEGMENT))
        start = min(0.2 + 0.4 * index, E2E_VIDEO_SECONDS - 0.1 - duration)  # at different places in the GOP
        started = time.perf_counter()
        batch = decode_frames_at(video, _tsn_centre_times(start, start + duration, frames), preprocess)
        pixels = preprocess.normalize(batch.images)  # (T, 224, 224, 3) uint8 -> (T, 3, 224, 224) float
        decode_seconds.append(time.perf_counter() - started)
    return decode_seconds, pixels


def time_end_to_end(workdir: Path, segment_durations: np.ndarray, frames: int, frame_batch: int,
                    lstm_seconds_per_segment: float) -> dict:
    """Seconds per segment of end-to-end training: decode T frames + ResNet50 fwd+bwd on T frames + BiLSTM step.

    The ResNet50 is timed in fp32 (as the feature path runs on the CPU) and with bf16 autocast (the faster, so
    more conservative, end-to-end baseline).
    """
    video = synthetic_video(workdir / "e2e_640x360.mp4", seconds=E2E_VIDEO_SECONDS)  # 640x360, 59.94 fps
    decode_seconds, pixels = time_decoding(video, segment_durations, frames)
    backbone = create_backbone("random")
    backbone.train()  # end-to-end training updates the backbone
    backbone = backbone.to(memory_format=torch.channels_last)
    images = pixels[:frame_batch]  # (n, 3, 224, 224)
    if len(images) < frame_batch:
        images = images.repeat(math.ceil(frame_batch / len(images)), 1, 1, 1)[:frame_batch]
    images = images.contiguous(memory_format=torch.channels_last)
    resnet_fp32 = _seconds_per_frame_fwd_bwd(backbone, images, None) * frames
    resnet_bf16 = _seconds_per_frame_fwd_bwd(backbone, images, torch.bfloat16) * frames
    decode = float(np.mean(decode_seconds))
    return {
        "decoder": "epicfeat.frames",
        "backbone": "epicfeat ResNet50Features",
        "decode": decode,
        "resnet_fp32": resnet_fp32,
        "resnet_bf16": resnet_bf16,
        "lstm": lstm_seconds_per_segment,
        "total_fp32": decode + resnet_fp32 + lstm_seconds_per_segment,
        "total_bf16": decode + resnet_bf16 + lstm_seconds_per_segment,
        "decoded_segments": len(decode_seconds),
        "mean_duration": float(np.mean(np.minimum(segment_durations, E2E_LONGEST_SEGMENT))),
    }


# --- splits for the real loop, without Zarr -----------------------------------------------------------------------


def epic_row_layout(segments, video_info) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every video's rows at 10 rows/s over its real duration, laid end to end, and each segment's rows there.

    Returns (row_start (S,), row_count (S,), total rows): a segment owns the rows of [start_sec, stop_sec), at
    least one. For all 700 EPIC-100 videos the rows total 3.6 M, the size of a real feature set.
    """
    rows_per_video = np.ceil(video_info["duration"].to_numpy() * ROWS_PER_SECOND).astype(np.int64)  # (V,)
    offsets = dict(zip(video_info.index, np.cumsum(rows_per_video) - rows_per_video))
    video_rows = dict(zip(video_info.index, rows_per_video))
    first = np.floor(segments["start_sec"].to_numpy() * ROWS_PER_SECOND).astype(np.int64)  # (S,)
    last = np.ceil(segments["stop_sec"].to_numpy() * ROWS_PER_SECOND).astype(np.int64)
    limit = np.array([video_rows[v] for v in segments["video_id"]])
    first = np.minimum(first, limit - 1)
    count = np.maximum(1, np.minimum(last, limit) - first)
    start = np.array([offsets[v] for v in segments["video_id"]]) + first
    return torch.from_numpy(start), torch.from_numpy(count), int(rows_per_video.sum())


def split_over(features: torch.Tensor, segments, row_start: torch.Tensor, row_count: torch.Tensor) -> PackedSplit:
    """A PackedSplit of ``segments`` (an annotation table) whose segment s owns ``features[row_start[s]:][:count]``,
    on the features' device."""
    device = features.device

    def labels(column: str) -> torch.Tensor:
        return torch.tensor(segments[column].to_numpy(), dtype=torch.int64, device=device)  # (S,)

    return PackedSplit(
        features=features, row_start=row_start.to(device), row_count=row_count.to(device),
        verb_labels=labels("verb_class"), noun_labels=labels("noun_class"),
        narration_ids=[str(i) for i in range(len(segments))],
        participant_ids=list(segments["participant_id"].astype(str)), video_ids=list(segments["video_id"].astype(str)),
    )


def layout_split(features: torch.Tensor, segments, video_info) -> PackedSplit:
    """A PackedSplit of ``segments`` over ``features`` laid out by ``epic_row_layout`` (on features' device)."""
    start, count, _ = epic_row_layout(segments, video_info)
    return split_over(features, segments, start, count)


def compact_split(segments, generator: torch.Generator, device) -> PackedSplit:
    """``segments`` with their real row counts (10 rows/s) but only their own rows, random float16 (small)."""
    count = np.maximum(1, np.round((segments["stop_sec"] - segments["start_sec"]).to_numpy() * ROWS_PER_SECOND))
    count = torch.from_numpy(count.astype(np.int64))  # (S,)
    features = random_features(int(count.sum()), generator, device)  # (R, D)
    return split_over(features, segments, torch.cumsum(count, 0) - count, count)


def first_segments(split: PackedSplit, count: int) -> PackedSplit:
    """The split's first ``count`` segments (same features)."""
    return replace(split, row_start=split.row_start[:count], row_count=split.row_count[:count],
                   verb_labels=split.verb_labels[:count], noun_labels=split.noun_labels[:count],
                   narration_ids=split.narration_ids[:count], participant_ids=split.participant_ids[:count],
                   video_ids=split.video_ids[:count])


# --- the real loop: train_one_epoch and evaluate ----------------------------------------------------------------


def time_real_loop(train: PackedSplit, validation: PackedSplit, *, n_verbs: int, n_nouns: int, precision: str,
                   device: torch.device, frames: int, batch_size: int, micro_batch_size: int, seed: int,
                   warmup_segments: int, repeats: int = 2, launch_steps: tuple[int, int] = (4, 12)) -> dict:
    """One real epoch (train_one_epoch) and one validation (evaluate), against the model alone, in ``precision``,
    with the step as train-temporal runs it there (a CUDA graph on a GPU without fp16's scaler); on a GPU also the
    eager epoch beside it. Then the step's launches (``count_launches``)."""
    asked = precision
    precision, notes = supported_precision(precision, device)  # what train-temporal would run
    for note in notes:
        print(f"  note: {note}")
    torch.manual_seed(seed)
    model = create_temporal_model(TemporalModelArgs(n_verbs=n_verbs, n_nouns=n_nouns), *feature_stats(train))
    model = model.to(device)
    model.compute_dtype = PRECISION_DTYPES[precision]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=1e-4, fused=True)
    scaler = grad_scaler(precision, device) if precision == "fp16" else None
    steps = math.ceil(len(train) / batch_size)
    generator = torch.Generator(device=train.device).manual_seed(seed)
    schedule = LRSchedule(peak=1.5e-4, warmup_steps=3 * steps, total_steps=50 * steps)
    state = TrainingState(optimizer, schedule, EarlyStopping(patience=0, validated=False), generator, scaler)
    graphs = device.type == "cuda" and scaler is None  # as train-temporal decides
    settings = StepSettings(frames=frames, batch_size=batch_size, micro_batch_size=micro_batch_size,
                            label_smoothing=0.1, cutmix_alpha=1.0, graphs=graphs)

    def epoch(model: nn.Module, state: TrainingState, split: PackedSplit, settings=settings) -> dict[str, float]:
        state.step = 0  # every timed epoch is the run's first: the same learning rates
        return train_one_epoch(model, split, state, settings)

    def validate() -> dict[str, float]:
        return evaluate(model, validation, frames=frames, batch_size=500, device=device, label_smoothing=0.1)

    # Warm-up (cuDNN / oneDNN choose their kernels, the allocator fills): a few steps of the same loop.
    epoch(model, state, first_segments(train, warmup_segments))
    evaluate(model, first_segments(validation, warmup_segments), frames=frames, batch_size=500, device=device)
    model_step = model_only_step(model, optimizer, train, frames, batch_size, micro_batch_size, generator, scaler)
    model_step()  # untimed: a new batch shape for the allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Each timing is the fastest of `repeats`, alternating the model alone and the real loop: on a shared machine
    # the minimum is the estimate least disturbed by other processes, and alternation exposes both to the same load.
    # The model alone runs the epoch's number of steps back to back (eager), so both sides are one block of `steps`
    # steps (the fastest single step x steps would undercount the ordinary spread between steps).
    block_times, epoch_times, validate_times = [], [], []
    for _ in range(repeats):
        block_times.append(timed(device, _repeat, model_step, steps)[0])
        seconds, stats = timed(device, epoch, model, state, train)
        epoch_times.append(seconds)
        seconds, metrics = timed(device, validate)
        validate_times.append(seconds)
        print(f"    {precision}: epoch {epoch_times[-1]:.2f} s, validation {validate_times[-1]:.2f} s, model alone "
              f"{block_times[-1]:.2f} s", flush=True)
    step_seconds, epoch_seconds, validate_seconds = min(block_times) / steps, min(epoch_times), min(validate_times)
    result = {"precision": precision if precision == asked else f"{precision} (asked {asked})",
              "segments": len(train), "val_segments": len(validation), "steps": steps, "epoch": epoch_seconds,
              "validate": validate_seconds, "model_step": step_seconds,
              "model_share": step_seconds * steps / epoch_seconds, "graphs": graphs,
              "train_loss": stats["train_loss"], "val_action": metrics["all_action_accuracy_at_1"]}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        # The same epoch without the graph, once: what the capture saves.
        result["eager_epoch"] = timed(device, epoch, model, state, train, replace(settings, graphs=False))[0]
    # The loop's own work (order, rows, CutMix, gathers, lr, loss sums) is train_one_epoch itself around a model
    # that computes next to nothing: what the epoch costs beyond the model, from the same code (once).
    null_model = _NearlyEmptyModel(n_verbs, n_nouns).to(device)
    null_state = TrainingState(torch.optim.AdamW(null_model.parameters(), lr=1.5e-4, fused=True),
                               schedule, EarlyStopping(patience=0, validated=False), generator, scaler)
    epoch(null_model, null_state, first_segments(train, warmup_segments))
    result["loop_own_work"] = timed(device, epoch, null_model, null_state, train)[0]
    few, many = launch_steps[0], min(launch_steps[1], len(train) // batch_size)
    if many > few:  # the split holds enough full steps to tell a step's launches from the epoch's own
        result.update(count_launches(lambda n: epoch(model, state, first_segments(train, n * batch_size)),
                                     (few, many)))
    return result


def count_launches(epoch_of, steps: tuple[int, int]) -> dict:
    """Launches of the step, from two epochs of ``steps`` (few, many) full steps (``epoch_of(n)`` runs one):
    per step the difference over the extra steps, per epoch the rest (its plan, warm-up steps, the read-back).

    Counted: aten ops called from Python or autograd (top-level: each launches one kernel or a few on a GPU; a
    CUDA graph's replay launches all of its step at once and is counted as one), and Python-level torch calls."""
    from torch.overrides import TorchFunctionMode
    from torch.profiler import ProfilerActivity, profile

    import epicfeat.temporal.train as train_module

    class TorchCalls(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            TorchCalls.calls += 1
            return func(*args, **(kwargs or {}))

    replays = []
    replay = train_module.StepGraph.__call__

    def counted_replay(graph, *args, **kwargs):
        replays.append(graph.graph is not None)  # elsewhere than CUDA its step's ops run (and are counted) eagerly
        return replay(graph, *args, **kwargs)

    counts = []
    train_module.StepGraph.__call__ = counted_replay
    try:
        for n in steps:
            replays.clear()
            TorchCalls.calls = 0
            with TorchCalls(), profile(activities=[ProfilerActivity.CPU]) as profiler:  # CPU only: no CUPTI
                epoch_of(n)
            aten = [e for e in profiler.events() if e.name.startswith("aten::") and not _inside_aten(e)]
            counts.append((len(aten) + sum(replays), TorchCalls.calls))
    finally:
        train_module.StepGraph.__call__ = replay
    (few_ops, few_calls), (many_ops, many_calls) = counts
    extra = steps[1] - steps[0]
    per_step_ops, per_step_calls = (many_ops - few_ops) / extra, (many_calls - few_calls) / extra
    return {"launches_per_step": per_step_ops, "torch_calls_per_step": per_step_calls,
            "launches_per_epoch_start": few_ops - steps[0] * per_step_ops}


def _inside_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def time_metrics(n_verbs: int, n_nouns: int, segments: int, seed: int) -> float:
    """Seconds of ``epic_metrics`` (on the host, as every validation runs it) for ``segments`` random logits."""
    generator = torch.Generator().manual_seed(seed)
    verb_logits, noun_logits = torch.randn(segments, n_verbs, generator=generator), torch.randn(
        segments, n_nouns, generator=generator)
    verbs = torch.randint(0, n_verbs, (segments,), generator=generator)
    nouns = torch.randint(0, n_nouns, (segments,), generator=generator)
    subsets = dict(tail_verbs=set(range(0, n_verbs, 3)), tail_nouns=set(range(0, n_nouns, 3)),
                   unseen=(torch.arange(segments) % 7 == 0).numpy())
    arrays = (verb_logits.numpy(), noun_logits.numpy(), verbs.numpy(), nouns.numpy())
    epic_metrics(*arrays, **subsets)  # warm-up
    return min(timed(torch.device("cpu"), epic_metrics, *arrays, **subsets)[0] for _ in range(3))


class _NearlyEmptyModel(nn.Module):
    """Takes what TemporalModel takes ((b, T, D) features) and gives its outputs from one feature of one row."""

    def __init__(self, n_verbs: int, n_nouns: int):
        super().__init__()
        self.verb, self.noun = nn.Linear(1, n_verbs), nn.Linear(1, n_nouns)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = features[:, 0, :1].float()  # (b, 1)
        return self.verb(first), self.noun(first)  # (b, Cv), (b, Cn)


def _repeat(fn, times: int) -> None:
    for _ in range(times):
        fn()


def model_only_step(model, optimizer, split: PackedSplit, frames: int, batch_size: int, micro_batch_size: int,
                    generator, scaler):
    """The model's share of one optimiser step: forward + backward of each micro-batch of a fixed, pre-gathered
    batch, then AdamW; no sampling, gathering, CutMix or learning-rate setting."""
    segments = torch.arange(min(batch_size, len(split)), device=split.device)  # (B,)
    micro = [(split.gather(part, frames, train=True, generator=generator), split.verb_labels[part],
              split.noun_labels[part]) for part in segments.split(micro_batch_size)]  # (b, T, D), (b,), (b,)

    def step() -> None:
        model.train()  # evaluate leaves the model in eval mode, and cuDNN runs an RNN's backward in training mode only
        optimizer.zero_grad(set_to_none=True)
        for features, verbs, nouns in micro:
            verb_logits, noun_logits = model(features)  # (b, Cv), (b, Cn)
            loss = (F.cross_entropy(verb_logits, verbs, label_smoothing=0.1)
                    + F.cross_entropy(noun_logits, nouns, label_smoothing=0.1)) * (len(verbs) / len(segments))
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    return step


def timed(device: torch.device, work, /, *args, **kwargs):
    """(wall seconds, result) of ``work(*args, **kwargs)``, including the work it queued on ``device``."""
    synchronize(device)
    started = time.perf_counter()
    result = work(*args, **kwargs)
    synchronize(device)
    return time.perf_counter() - started, result


def run_cpu_real_loop(annotations, args) -> list[dict]:
    train_segments = annotations.segments("train").iloc[:args.loop_segments].reset_index(drop=True)
    val_segments = annotations.segments("validation").iloc[:max(1, args.loop_segments // 3)].reset_index(drop=True)
    generator = torch.Generator().manual_seed(args.seed)
    train, validation = compact_split(train_segments, generator, "cpu"), compact_split(val_segments, generator, "cpu")
    results = [time_real_loop(train, validation, n_verbs=len(annotations.verbs), n_nouns=len(annotations.nouns),
                              precision=precision, device=torch.device("cpu"), frames=args.frames,
                              batch_size=args.batch_size, micro_batch_size=args.loop_micro_batch, seed=args.seed,
                              warmup_segments=50, repeats=args.loop_repeats, launch_steps=(1, 3))
               for precision in args.loop_precisions.split(",")]
    metrics_seconds = time_metrics(len(annotations.verbs), len(annotations.nouns), EPIC100_VALIDATION_SEGMENTS,
                                   args.seed)
    return [{**r, "metrics_s": metrics_seconds} for r in results]


def epic_size_splits(annotations: EpicAnnotations, device: torch.device, seed: int,
                     train_segments: int = EPIC100_TRAIN_SEGMENTS) -> tuple[PackedSplit, PackedSplit]:
    """Every video's rows at 10 rows/s (random float16, built on ``device``: 3.6 M rows for EPIC-100) and the train
    and validation splits at their real rows; the train segments repeated to ``train_segments`` where the table
    has fewer (the 16,115-segment UDA subset)."""
    video_info = annotations.video_info
    train = annotations.segments("train")
    if len(train) < train_segments:
        train = train.iloc[np.arange(train_segments) % len(train)].reset_index(drop=True)
    validation = annotations.segments("validation")
    _, _, total_rows = epic_row_layout(validation, video_info)
    generator = torch.Generator(device=device).manual_seed(seed)
    features = random_features(total_rows, generator, device)  # (R, 2048): every row of every video
    return layout_split(features, train, video_info), layout_split(features, validation, video_info)


def run_gpu_real_loop(args, device: torch.device) -> tuple[list[dict], PackedSplit]:
    """EPIC-100's real size on the GPU: 3.6 M rows built on the device, 67,217 / 9,668 segments at their real rows.
    On a CPU (``--gpu-device cpu``) a dry run of the same code: 600 train / 200 validation segments, own rows only."""
    train_file = "EPIC_100_train.csv" if (args.annotations / "EPIC_100_train.csv").is_file() else TRAIN_FILE
    annotations = EpicAnnotations(args.annotations, train_file=train_file)
    if device.type == "cuda":
        train, validation = epic_size_splits(annotations, device, args.seed)
        where = torch.cuda.get_device_name(device)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        train = compact_split(annotations.segments("train").iloc[:300].reset_index(drop=True), generator, device)
        validation = compact_split(annotations.segments("validation").iloc[:100].reset_index(drop=True), generator,
                                   device)
        where = "cpu (dry run)"
    # Validation's official metrics run on the host: timed alone at EPIC-100's validation size on this host's CPU.
    metrics_seconds = time_metrics(len(annotations.verbs), len(annotations.nouns), EPIC100_VALIDATION_SEGMENTS,
                                   args.seed)
    rows = len(train.features)
    print(f"GPU: {where}; {rows:,} rows ({rows * FEATURE_DIM * 2 / 1e9:.1f} GB) on the "
          f"device; train {len(train):,} segments from {train_file}"
          + (" (repeated to 67,217)" if train_file == TRAIN_FILE and device.type == "cuda" else "")
          + f"; validation {len(validation):,}", flush=True)
    cuda = device.type == "cuda"
    result = time_real_loop(train, validation, n_verbs=len(annotations.verbs), n_nouns=len(annotations.nouns),
                            precision=args.gpu_precision, device=device, frames=args.frames,
                            batch_size=args.batch_size, micro_batch_size=args.batch_size, seed=args.seed,
                            warmup_segments=2000 if cuda else 100, repeats=args.loop_repeats,
                            launch_steps=(4, 12) if cuda else (1, 3))
    return [{**result, "metrics_s": metrics_seconds}], train


def time_gpu_heads(args, train: PackedSplit, device: torch.device) -> list[dict]:
    """``--heads``: each head's epoch (train_one_epoch, eager) and the model alone on the first --heads-segments
    segments of the real loop's train split, side by side."""
    subset = first_segments(train, min(args.heads_segments, len(train)))
    heads = time_heads(subset, heads=args.heads.split(","), frames=args.frames, batch_size=args.batch_size,
                       device=device, precision=args.gpu_precision)
    print(f"\nHeads side by side ({len(subset):,} segments, T={args.frames}, batch {args.batch_size}, "
          f"{args.gpu_precision}, eager steps)")
    for r in heads:
        row(f"  {r['head']}", f"{r['epoch_s']:.2f} s per epoch",
            f"model alone {r['model_s']:.2f} s (share {r['model_share']:.2f}); {r['parameters']:,} parameters")
    return heads


# --- printing -----------------------------------------------------------------------------------------------------


def print_real_loop(results: list[dict], where: str) -> None:
    print()
    print(f"Real loop ({where}): train_one_epoch (CutMix, accumulation, per-step lr) + evaluate, TemporalModel "
          "2048 -> 2x512 BiLSTM")
    for r in results:
        print(f"  {r['precision']}: {r['segments']:,} train / {r['val_segments']:,} val segments, {r['steps']} steps")
        row("    model alone: the epoch's steps back to back", f"{r['model_step'] * r['steps']:.2f} s",
            f"{r['model_step']:.3f} s per step; {r['segments'] / (r['model_step'] * r['steps']):,.0f} seg/s")
        row("    measured epoch (train_one_epoch, fastest)", f"{r['epoch']:.2f} s",
            f"{r['segments'] / r['epoch']:,.0f} seg/s; train loss {r['train_loss']:.3f}")
        row("    model share of the epoch", f"{r['model_share']:.3f}",
            f"target >= 0.95 on the CPU ({verdict(r['model_share'], 0.95)})" if where == "CPU" else
            "the model alone runs eager, the epoch a CUDA graph: above 1 when the graph saves more than the loop "
            "costs" if r["graphs"] else "")
        row("    the loop alone (near-empty model)", f"{r['loop_own_work']:.3f} s",
            f"{r['loop_own_work'] / r['epoch']:.1%} of the epoch (1 - share: {1 - r['model_share']:.1%})")
        if "eager_epoch" in r:
            row("    the same epoch without the CUDA graph", f"{r['eager_epoch']:.2f} s",
                f"the graph: {r['eager_epoch'] / r['epoch']:.2f}x faster")
        if "launches_per_step" in r:
            row("    launches per step (aten ops; a graph = 1)", f"{r['launches_per_step']:.0f}",
                f"{r['torch_calls_per_step']:.0f} Python-level torch calls; "
                f"{r['launches_per_epoch_start']:.0f} per epoch besides; graphs: {'on' if r['graphs'] else 'off'}")
        row("    validation (evaluate, official metrics)", f"{r['validate']:.2f} s",
            f"{r['val_segments'] / r['validate']:,.0f} seg/s")
        if "metrics_s" in r:
            row("    epic_metrics alone, 9,668 segments", f"{r['metrics_s'] * 1000:.0f} ms",
                "97 / 300 classes, tail and unseen subsets, on this host's CPU (part of every validation)")
        if "peak_gib" in r:
            row("    peak GPU memory", f"{r['peak_gib']:.1f} GiB")
            row("    train + validate", f"{r['epoch'] + r['validate']:.2f} s",
                "goal on one H200: epoch <= 2 s, train + validate <= 3 s")
    for r in results[1:]:
        base = results[0]
        row(f"  {r['precision']} vs {base['precision']}: epoch speed-up", f"{base['epoch'] / r['epoch']:.2f}x")


def print_packing(split: PackedSplit, segments, pack_seconds: float, stats_seconds: float, frames: int) -> None:
    summary = split.summary
    print()
    print("Packing")
    row("segments packed", f"{summary['segments']:,}", f"of {len(segments):,}")
    row("rows packed (float16, contiguous)", f"{summary['rows']:,}",
        f"{summary['packed_bytes'] / 2**30:.2f} GiB; segments cover {summary['segment_rows']:,} rows "
        "(overlaps stored once)")
    row("clamped: empty / past end / dropped",
        f"{summary['empty_clamped']} / {summary['past_end_clamped']} / {summary['missing_video_dropped']}",
        f"segments with < {frames} rows (rows repeat): {split.segments_shorter_than(frames):,}")
    row("pack time", f"{pack_seconds:.1f} s", f"{summary['rows'] / pack_seconds:,.0f} rows/s from Zarr")
    row("feature_stats time", f"{stats_seconds:.1f} s")


def print_loader(loader_seconds: float, loader_segments: int) -> None:
    print()
    print("CPU, one run")
    row("loader alone (sample+gather+standardise)", f"{loader_segments / loader_seconds:,.0f} seg/s",
        f"one pass over {loader_segments:,} segments in {loader_seconds:.1f} s")


def print_cpu_model(cpu: dict, loader_rate: float, n_segments: int, args) -> None:
    e2e = cpu["e2e"]
    feature_seconds_per_segment = cpu["total_seconds"] / cpu["combined_segments"]
    wait_share = cpu["data_seconds"] / cpu["total_seconds"]
    speedup = e2e["total_fp32"] / feature_seconds_per_segment
    speedup_bf16 = e2e["total_bf16"] / feature_seconds_per_segment
    row("model training alone", f"{cpu['model_rate']:,.1f} seg/s",
        f"epicfeat TemporalModel, fwd+bwd+AdamW fp32, {args.model_batches} batches")
    row("loader / model throughput", f"{loader_rate / cpu['model_rate']:,.0f}x")
    row("combined loop: time waiting for data", f"{100 * wait_share:.2f} %",
        f"target < 10 % ({verdict(wait_share, 0.10, at_least=False)}); {args.combined_batches} batches")
    row("feature-based epoch, per segment", f"{1000 * feature_seconds_per_segment:.1f} ms",
        f"-> {feature_seconds_per_segment * n_segments / 60:.1f} min per epoch of {n_segments:,}")
    row("end-to-end: decode T frames", f"{1000 * e2e['decode']:.0f} ms",
        f"{e2e['decoder']}, synthetic 640x360 H.264 59.94 fps, {e2e['decoded_segments']} segments of mean "
        f"{e2e['mean_duration']:.1f} s")
    row("end-to-end: ResNet50 fwd+bwd, T frames, fp32", f"{1000 * e2e['resnet_fp32']:.0f} ms",
        f"{e2e['backbone']}, batch {args.e2e_batch}, extrapolated x{args.frames / args.e2e_batch:g}")
    row("end-to-end: same with bf16 autocast", f"{1000 * e2e['resnet_bf16']:.0f} ms")
    row("end-to-end: BiLSTM step", f"{1000 * e2e['lstm']:.0f} ms", "per segment, from the model timing")
    row("end-to-end epoch, per segment (fp32)", f"{1000 * e2e['total_fp32']:.0f} ms",
        f"-> {e2e['total_fp32'] * n_segments / 3600:.1f} h per epoch of {n_segments:,}")
    row("per-epoch speed-up of cached features", f"{speedup:,.0f}x", f"target >= 50x ({verdict(speedup, 50)})")
    # bf16 autocast speeds the backbone up on GPUs and AMX CPUs but slows it down on CPUs without native bf16:
    # the smaller of the two speed-ups is the one to hold against the target.
    lower = min(speedup, speedup_bf16)
    row("  with a bf16 backbone, fp32 BiLSTM", f"{speedup_bf16:,.0f}x",
        f"lower bound {lower:,.0f}x: target >= 50x ({verdict(lower, 50)})")


# --- main ---------------------------------------------------------------------------------------------------------


def feature_set_sections(annotations, segments, workdir: Path, args) -> None:
    """Pack a synthetic Zarr feature set; time the loader, the model alone, the combined loop, the e2e estimate."""
    identity = feature_set_identity(ExtractConfig(weights="random", fps=float(ROWS_PER_SECOND)),
                                    create_backbone("random"))
    store = FeatureStore.create(workdir / "cache", identity)
    video_ids = sorted(segments["video_id"].unique())
    print(f"epicfeat stage-two benchmark: {len(segments):,} segments over {len(video_ids)} videos "
          f"({TRAIN_FILE}), T={args.frames}, batch {args.batch_size}")
    rows_written, build_seconds = build_feature_set(store, annotations.video_info, video_ids, args.seed)
    if rows_written:
        print(f"synthetic feature set: {rows_written:,} rows written in {build_seconds:.1f} s -> {store.path}",
              flush=True)
    else:
        print(f"synthetic feature set: reused {store.path}", flush=True)
    started = time.perf_counter()
    split = pack_split(store, segments, progress=True)
    pack_seconds = time.perf_counter() - started
    started = time.perf_counter()
    mean, std = feature_stats(split)
    stats_seconds = time.perf_counter() - started
    loader_seconds, loader_segments = time_loader(split, mean, std, args.frames, args.batch_size, args.seed)
    cpu = {} if args.skip_cpu_model else time_model_sections(split, mean, std, annotations, segments, workdir, args)
    print_packing(split, segments, pack_seconds, stats_seconds, args.frames)
    print_loader(loader_seconds, loader_segments)
    if cpu:
        print_cpu_model(cpu, loader_segments / loader_seconds, len(split), args)


def time_model_sections(split: PackedSplit, mean, std, annotations, segments, workdir: Path, args) -> dict:
    """The model alone, the combined loop and the end-to-end estimate on the CPU."""
    model = create_temporal_model(TemporalModelArgs(n_verbs=len(annotations.verbs), n_nouns=len(annotations.nouns)),
                                  feature_mean=mean, feature_std=std)
    step_seconds = time_model(model, split, args.frames, args.batch_size, args.model_batches, args.seed)
    model_rate = args.batch_size / step_seconds
    data_seconds, total_seconds, combined_segments = time_combined(
        model, split, args.frames, args.batch_size, args.combined_batches, args.seed)
    durations = (segments["stop_sec"] - segments["start_sec"]).to_numpy()
    sample = np.random.default_rng(args.seed).choice(durations, size=args.e2e_segments, replace=False)
    e2e = time_end_to_end(workdir, sample, args.frames, args.e2e_batch, 1 / model_rate)
    return dict(model_rate=model_rate, data_seconds=data_seconds, total_seconds=total_seconds,
                combined_segments=combined_segments, e2e=e2e)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    annotations = EpicAnnotations(args.annotations, train_file=TRAIN_FILE)
    print(machine_line(), flush=True)
    if args.loop_segments > 0:
        print_real_loop(run_cpu_real_loop(annotations, args), "CPU")
    if not args.only_loop:
        segments = annotations.segments("train")
        if args.segments is not None:
            segments = segments.iloc[:args.segments].reset_index(drop=True)
        with work_folder(args.workdir, "epicfeat-bench-") as workdir:
            feature_set_sections(annotations, segments, workdir, args)
    if args.gpu:
        print()
        device = gpu_device(args.gpu_device)
        if device is not None:
            results, train = run_gpu_real_loop(args, device)
            print_real_loop(results, "GPU")
            report = {"machine": machine_line(), "device": str(device), "real_loop": results}
            if args.out:  # saved before the heads, so that a failure there keeps the real loop's numbers
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2))
            if args.heads:
                report["heads"] = time_gpu_heads(args, train, device)
                if args.out:
                    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
