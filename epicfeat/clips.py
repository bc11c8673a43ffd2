"""Finetune's clips: the frames to decode for a segment, the clip dataset, augmentation, CutMix, and a run's data.

A clip's times and augmentation come from seeds derived from (seed, epoch, segment index), and CutMix from
(seed, global step), never from a worker's RNG: so ``--resume`` is exact and N DDP processes equal one.

    load_clip_data(...)       annotations -> ClipData: train / validation / statistics datasets, what was dropped
      segment_rows(...)       the stored rows' times of every segment (stage two's join of segments to rows)
    ClipDataset[i]            T frames of segment i decoded at its rows' times: uint8 (T, H, W, 3) (K + T + K
                              with the stage-two model's context)
    ClipAugment(clip, seed)   the seed's augmentations, ONE set of parameters for all T frames
    sample_step_cutmix(...)   one CutMix box for every frame of a step's global batch, the same in every process
"""
from __future__ import annotations


import functools
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision.transforms import v2

from epicfeat.configs import FinetuneConfig
from epicfeat.data.annotations import EpicAnnotations
from epicfeat.data.videos import find_videos
from epicfeat.errors import EpicfeatError
from epicfeat.frames import Preprocess, codec_threads, decode_frames_at
from epicfeat.temporal.checkpoint import ModelCard
from epicfeat.temporal.data import Context, join_rows, sequence_offsets


class ClipError(EpicfeatError):
    """A run's clips cannot be loaded as asked (no videos, other class tables, nothing decodable)."""


def derive_seed(*numbers: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------- clip times
@dataclass(frozen=True)
class SegmentRows:
    """The stored rows' times of every segment, packed like ``PackedSplit``: segment s owns
    ``times[start[s] : start[s] + count[s]]`` (seconds, the feature set's pts, count >= 1), and with a context the
    ``before[s]`` rows right before them and the ``after[s]`` right after them. Stored times, never a nominal
    k / fps grid: at 59.94 fps that grid puts other rows into some segments."""

    times: np.ndarray  # (R,) float64 seconds
    start: np.ndarray  # (S,) int64
    count: np.ndarray  # (S,) int64, >= 1
    context: Context = Context()
    before: np.ndarray | None = None  # (S,) int64, with a context
    after: np.ndarray | None = None  # (S,) int64, with a context

    def clip_times(self, segment: int, frames: int, *, train: bool, generator: torch.Generator | None) -> np.ndarray:
        """(L,) seconds: the rows stage two would sample for this segment and its context (same bins, same draws)."""
        around = {}
        if self.context.frames:
            around = dict(before=torch.tensor([int(self.before[segment])]),
                          after=torch.tensor([int(self.after[segment])]), context_frames=self.context.frames)
        offsets = sequence_offsets(torch.tensor([int(self.count[segment])]), frames, train=train, generator=generator,
                                   **around)  # (1, L)
        return self.times[int(self.start[segment]) + offsets[0].numpy()]  # (L,)


#: Sampled times further apart than this are reached by a seek of their own, not by decoding every frame between.
SEEK_GAP_SECONDS = 2.0


def decode_clip(path: Path, times: np.ndarray, decode: Preprocess, *, seek_gap: float = SEEK_GAP_SECONDS,
                threads: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3) frames at ``times``; times more than ``seek_gap`` apart are reached by a seek of their own."""
    order = np.argsort(times, kind="stable")  # (T,)
    ordered = times[order]
    breaks = np.flatnonzero(np.diff(ordered) > seek_gap) + 1  # where a new run starts
    images = np.empty((len(times), decode.crop, decode.crop, 3), np.uint8)  # (T, H, W, 3)
    for run in np.split(np.arange(len(times)), breaks):
        images[order[run]] = decode_frames_at(path, ordered[run], decode, threads=threads).images  # (n, H, W, 3)
    return images


# ------------------------------------------------------------------------------------------------ dataset
class ClipDataset(torch.utils.data.Dataset):
    """Segment i -> its L decoded frames (uint8, resized by ``decode``), labels, and the seed of its augmentation.

    A video that cannot be read gives ``valid=False`` and a black clip, never an exception: the training loop
    skips and counts it, and every batch keeps its shape (DDP processes never disagree about a step).
    """

    def __init__(self, segments: pd.DataFrame, video_paths: dict[str, Path], *, rows: SegmentRows, frames: int,
                 decode: Preprocess, train: bool, seed: int, decode_threads: int = 0):
        if len(rows.start) != len(segments):
            raise ValueError(f"ClipDataset: {len(segments)} segments but row times for {len(rows.start)}")
        self.video_paths = video_paths
        self.video_ids = segments["video_id"].astype(str).tolist()
        self.participants = segments["participant_id"].astype(str).tolist()  # unseen-participant metrics
        self.rows = rows
        self.verbs = segments["verb_class"].to_numpy(np.int64)
        self.nouns = segments["noun_class"].to_numpy(np.int64)
        self.frames, self.decode, self.train, self.seed = frames, decode, train, seed
        self.decode_threads = decode_threads  # codec threads per decode (0: FFmpeg's choice, all cores)
        self.epoch = 0  # set before each epoch; workers are re-created per epoch, so they see it

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, index: int) -> dict:
        # One seed for the times, another for the augmentation: both depend only on (seed, epoch, index).
        time_seed = derive_seed(self.seed, self.epoch, index, 0)
        aug_seed = derive_seed(self.seed, self.epoch, index, 1)
        generator = torch.Generator().manual_seed(time_seed)
        times = self.rows.clip_times(index, self.frames, train=self.train, generator=generator)  # (L,)
        error = ""
        try:
            images = decode_clip(self.video_paths[self.video_ids[index]], times, self.decode,
                                 threads=self.decode_threads)  # (T, H, W, 3)
        except Exception as err:  # any damage in any file: skip this clip, never end the epoch
            error = f"{self.video_ids[index]}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            images = np.zeros((len(times), self.decode.crop, self.decode.crop, 3), np.uint8)
        return {
            "clip": torch.from_numpy(images),  # (L, H, W, 3) uint8
            "verb": int(self.verbs[index]),
            "noun": int(self.nouns[index]),
            "index": index,
            "aug_seed": aug_seed,
            "valid": not error,
            "error": error,
        }


# ------------------------------------------------------------------------------------------- a run's data
@dataclass
class ClipData:
    """A run's clip datasets (segments whose videos exist and are in the feature set) and what was dropped."""

    train: ClipDataset
    validation: ClipDataset | None
    stats: torch.utils.data.Subset  # the train segments the features' drift is measured on (restandardize)
    summary: dict[str, dict[str, int]]
    notes: list[str]  # segments dropped, and why
    tail_verbs: frozenset[int] | None
    tail_nouns: frozenset[int] | None
    unseen_participants: frozenset[str] | None


def load_clip_data(config: FinetuneConfig, card: ModelCard, store, preprocess: Preprocess, *,
                   context: Context = Context()) -> ClipData:
    """Annotations -> clip datasets of the segments whose videos exist and are complete in ``store`` (the others are
    dropped and counted). ``card``: the start's (same class tables); ``preprocess``: the feature set's (training
    decodes a resize x resize square for RandomResizedCrop, evaluation extract's resize + centre crop); ``context``:
    the start model's (its frames are decoded too)."""
    if config.annotations is None or config.videos is None:
        raise ClipError("pass --annotations DIR (EPIC_100_*.csv) and --videos DIR (the folder holding P01/, ...)")
    annotations = EpicAnnotations(config.annotations, train_file=config.train_file)
    if tuple(annotations.verbs.keys) != tuple(card.verb_classes) or \
            tuple(annotations.nouns.keys) != tuple(card.noun_classes):
        raise ClipError(f"the class tables in {config.annotations} differ from those {config.checkpoint} was "
                        "trained with; use the annotations of the stage-two run")
    decodes = {"train": replace(preprocess, crop=preprocess.resize), "validation": preprocess}
    splits = {"train": config.train_splits}
    if config.train_splits == "train":
        splits["validation"] = "validation"
    threads = decode_threads(config)
    datasets, summary, notes = {}, {}, []
    for name, split in splits.items():
        segments = annotations.segments(split)
        lookup = find_videos(config.videos, segments["video_id"].unique())
        found = segments["video_id"].isin(list(lookup.found))
        if not found.all():
            notes.append(f"{int((~found).sum())} {name} segments dropped: {len(lookup.missing)} videos not under "
                         f"{config.videos} ({', '.join(lookup.missing[:5])}{'...' if len(lookup.missing) > 5 else ''})")
        segments, rows, not_stored = segment_rows(store, segments[found].reset_index(drop=True), context)
        if not_stored:
            notes.append(f"{not_stored} {name} segments dropped: their videos are not (completely) in feature set "
                         f"{store.identity.key()} (extract them, or stage two never saw them either)")
        if len(segments) == 0:
            raise ClipError(f"no {name} segment has its video under {config.videos} and in the feature set "
                            f"{store.identity.key()}; check --videos and --cache")
        paths = {k: Path(v) for k, v in lookup.found.items()}
        clip_dataset = functools.partial(ClipDataset, segments, paths, rows=rows, frames=config.frames,
                                         seed=config.seed, decode_threads=threads)
        datasets[name] = clip_dataset(decode=decodes[name], train=name == "train")
        if name == "train":
            # The frames the drift of the features is measured on: evaluation's (bin centres, centre crop).
            chosen = np.unique(np.linspace(0, len(segments) - 1, min(len(segments), config.stats_segments)).round())
            stats = torch.utils.data.Subset(clip_dataset(decode=preprocess, train=False),
                                            chosen.astype(np.int64).tolist())
        summary[name] = {"segments": len(segments), "missing_video_dropped": int((~found).sum()),
                         "missing_videos": len(lookup.missing), "not_in_feature_set_dropped": not_stored}
    return ClipData(
        train=datasets["train"], validation=datasets.get("validation"), stats=stats, summary=summary, notes=notes,
        tail_verbs=annotations.tail_verbs, tail_nouns=annotations.tail_nouns,
        unseen_participants=annotations.unseen_participants("validation") if "validation" in datasets else None,
    )


def segment_rows(store, segments: pd.DataFrame,
                 context: Context = Context()) -> tuple[pd.DataFrame, SegmentRows, int]:
    """Segments whose video the feature set holds, their stored rows' times and their ``context``'s (``join_rows``),
    how many were dropped."""
    join = join_rows(store, segments, context_seconds=context.seconds)
    pts = {plan.video_id: np.asarray(plan.video.pts, np.float64) for plan in join.plans}
    keep = join.keep
    video_ids = segments["video_id"].astype(str).to_numpy()[keep]
    first, end = (join.lo - join.before)[keep], (join.hi + join.after)[keep]  # (S',) each: context included
    times = [pts[video][lo:hi] for video, lo, hi in zip(video_ids, first, end)]
    packed = np.concatenate(times) if times else np.zeros(0, np.float64)  # (R,) seconds
    offset = np.cumsum(end - first) - (end - first)  # (S',) where each segment's rows begin in `packed`
    around = dict(context=context, before=join.before[keep], after=join.after[keep]) if context.frames else {}
    rows = SegmentRows(times=packed, start=offset + join.before[keep], count=(join.hi - join.lo)[keep], **around)
    return segments[keep].reset_index(drop=True), rows, int((~keep).sum())


def decode_threads(config: FinetuneConfig) -> int:
    """Codec threads per decoding process: ``--decode-threads``, else the cores shared out among this node's
    decoders (each torchrun process's ``num_workers``, or the process itself)."""
    decoders = max(1, config.num_workers) * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return codec_threads(decoders, config.decode_threads)


def worker_init(_: int) -> None:
    """A DataLoader decode process needs no intra-op threads of its own (FFmpeg has its threads)."""
    torch.set_num_threads(1)


class SkippedVideos(dict):
    """Video id -> why its clips were skipped (the first decoding error), filled as batches pass ``watch``."""

    def watch(self, batches: Iterable[dict]) -> Iterator[dict]:
        for batch in batches:
            for error in batch["error"]:
                if error:
                    self.setdefault(error.split(":", 1)[0], error)  # errors read "<video id>: <reason>"
            yield batch


# ------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class ClipAugment:
    """RandomResizedCrop to ``crop``, horizontal flip, ColorJitter, RandomGrayscale: uint8 pixels in and out.
    transforms.v2 draws one set of parameters per call for a whole (T, 3, H, W) clip, from the CPU RNG seeded with
    the clip's seed, so it is reproducible wherever the pixels are."""

    crop: int  # the feature set's crop size (its resize is used for decoding)
    scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.2, 0.1)  # brightness, contrast, saturation, hue
    grayscale: float = 0.1

    def __post_init__(self):
        transform = v2.Compose([
            v2.RandomResizedCrop(self.crop, scale=self.scale, antialias=True),
            v2.RandomHorizontalFlip(self.hflip),
            v2.ColorJitter(*self.color_jitter),
            v2.RandomGrayscale(self.grayscale),
        ])
        object.__setattr__(self, "_transform", transform)

    def __call__(self, clip: torch.Tensor, seed: int) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> uint8 (T, 3, crop, crop): one draw of the seed's parameters for all T frames."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._transform(clip.permute(0, 3, 1, 2))  # (T, 3, crop, crop) uint8


# ------------------------------------------------------------------------------------------------- CutMix
def global_positions(local: int, rank: int, world: int) -> torch.Tensor:
    """(local,) positions in the step's global batch of this process's clips: DistributedSampler deals indices
    round robin, so clip j of process r is clip j * world + r of the batch one process would take."""
    return torch.arange(local) * world + rank  # (local,)


@dataclass(frozen=True)
class StepCutMix:
    """One step's CutMix over the global batch: clip g gets the box [y0:y1, x0:x1] of clip ``partner[g]`` in every
    frame; ``fraction`` (the box's share of the frame) weighs the partner's labels, as stage two's TimeCutMix."""

    partner: torch.Tensor  # (B,) int64 global positions; an undecodable clip is its own partner (weight 0 anyway)
    box: tuple[int, int, int, int]  # y0, y1, x0, x1
    fraction: float


def sample_step_cutmix(valid: torch.Tensor, height: int, width: int, alpha: float, seed: int) -> StepCutMix | None:
    """CutMix of a whole global batch (``valid`` (B,) bool) from ``seed``, so every process draws the same:
    lam ~ Beta(alpha, alpha), a box of (1 - lam) of the area at a uniform centre, clipped to the frame, and
    partners among the valid clips. None without CutMix (alpha 0, fewer than 2 valid clips, an empty box)."""
    keep = valid.nonzero().squeeze(1)  # (v,) global positions of decodable clips
    if alpha <= 0 or len(keep) < 2:
        return None
    generator = torch.Generator().manual_seed(seed)
    lam = np.random.default_rng(seed).beta(alpha, alpha)
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(torch.randint(0, height, (1,), generator=generator)), int(torch.randint(0, width, (1,), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    fraction = (y1 - y0) * (x1 - x0) / (height * width)  # the actual area after clipping
    if fraction == 0:
        return None
    partner = torch.arange(len(valid))  # (B,)
    partner[keep] = keep[torch.randperm(len(keep), generator=generator)]
    return StepCutMix(partner=partner, box=(y0, y1, x0, x1), fraction=fraction)
