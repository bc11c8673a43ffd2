"""Decoded training clips for ``epicfeat finetune``: which times to decode, the clip dataset, augmentation, CutMix.

Everything here is deterministic given (seed, epoch, segment index): the T times of a clip and its augmentation
parameters come from a seed derived from those three numbers, never from a worker's RNG. So the clips of an epoch
do not depend on the number of DataLoader workers, on the number of DDP processes, or on where a resumed run
restarted: that is what makes ``--resume`` exact and a 2-process run equal to a 1-process run. CutMix is drawn
from a seed derived from the global step, over the global batch (``sample_step_cutmix``), for the same reason.

    SegmentRows               the stored rows' times of every segment (stage two's join of segments to rows)
    ClipDataset[i]            decode T frames of segment i at its rows' times (in a DataLoader worker): uint8 (T, H, W, 3)
    decode_clip(...)          those frames; times far apart are reached by a seek each (long segments)
    ClipAugment(clip, seed)   the seed's augmentations, with ONE set of parameters for all T frames (on any device)
    sample_clip_cutmix(...)   CutMix with the same box in every frame of a clip, labels mixed by the box's area
    sample_step_cutmix(...)   the same over a step's global batch, identical in every DDP process
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from epicfeat.frames import Preprocess, decode_frames_at


def derive_seed(*numbers: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------- clip times
def sample_row_offsets(count: int, frames: int, *, train: bool, generator: torch.Generator | None) -> np.ndarray:
    """T positions in a segment's ``count`` stored rows, TSN-binned exactly like ``PackedSplit.sample_rows``.

    One segment through stage two's own rule (``epicfeat.temporal.data.bin_offsets``): the same bins, and in
    training the same draws from ``generator``. A test holds the two equal.
    """
    from epicfeat.temporal.data import bin_offsets

    return bin_offsets(torch.tensor([count]), frames, train=train, generator=generator)[0].numpy()  # (1, T) -> (T,)


@dataclass(frozen=True)
class SegmentRows:
    """The stored rows' times of every segment, packed like ``PackedSplit``: segment s owns
    ``times[start[s] : start[s] + count[s]]`` (seconds, the feature set's pts, count >= 1).

    Built by ``finetune`` from the feature set with stage two's join (``epicfeat.temporal.data.rows_of_segments``),
    so a clip is decoded at the very frames whose features stage two read: at 59.94 fps a row's pts falls up to
    16.7 ms after the nominal k / fps, and a grid of nominal times puts other rows into about 8 % of segments.
    """

    times: np.ndarray  # (R,) float64 seconds
    start: np.ndarray  # (S,) int64
    count: np.ndarray  # (S,) int64, >= 1

    def clip_times(self, segment: int, frames: int, *, train: bool, generator: torch.Generator | None) -> np.ndarray:
        """(T,) seconds: the rows stage two would sample for this segment (same bins, same draws)."""
        first, count = int(self.start[segment]), int(self.count[segment])
        return self.times[first + sample_row_offsets(count, frames, train=train, generator=generator)]  # (T,)


#: Sampled times further apart than this are decoded after a seek of their own, not by decoding every frame in
#: between: at 59.94 fps, 2 s is 120 frames, more than reaching a frame from its keyframe costs in EPIC's videos.
SEEK_GAP_SECONDS = 2.0


def decode_clip(path: Path, times: np.ndarray, decode: Preprocess, *, seek_gap: float = SEEK_GAP_SECONDS,
                threads: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3) frames at ``times``; runs of times more than ``seek_gap`` apart are decoded separately.

    ``decode_frames_at`` seeks once and decodes forward through the whole span, so 16 frames of a 147 s segment
    would cost 147 s of decoding; cut into runs, each bin costs one seek plus the frames from its keyframe.
    """
    order = np.argsort(times, kind="stable")  # (T,)
    ordered = times[order]
    breaks = np.flatnonzero(np.diff(ordered) > seek_gap) + 1  # where a new run starts
    images = np.empty((len(times), decode.crop, decode.crop, 3), np.uint8)  # (T, H, W, 3)
    for run in np.split(np.arange(len(times)), breaks):
        images[order[run]] = decode_frames_at(path, ordered[run], decode, threads=threads).images  # (n, H, W, 3)
    return images


# ------------------------------------------------------------------------------------------------ dataset
class ClipDataset(torch.utils.data.Dataset):
    """Segment i -> its T decoded frames (uint8, resized by ``decode``), labels, and the seed of its augmentation.

    A video that cannot be read (missing, truncated, corrupt) gives ``valid=False`` and a black clip of the right
    shape instead of an exception: the training loop skips and counts it, and every batch keeps its shape (so
    DDP processes never disagree about whether a step happened).
    """

    def __init__(
        self,
        segments: pd.DataFrame,
        video_paths: dict[str, Path],
        *,
        rows: SegmentRows,
        frames: int,
        decode: Preprocess,
        train: bool,
        seed: int,
        decode_threads: int = 0,
    ):
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
        times = self.rows.clip_times(index, self.frames, train=self.train, generator=generator)  # (T,)
        error = ""
        try:
            images = decode_clip(self.video_paths[self.video_ids[index]], times, self.decode,
                                 threads=self.decode_threads)  # (T, H, W, 3)
        except Exception as err:  # any damage in any file: skip this clip, never end the epoch
            error = f"{self.video_ids[index]}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            images = np.zeros((self.frames, self.decode.crop, self.decode.crop, 3), np.uint8)
        return {
            "clip": torch.from_numpy(images),  # (T, H, W, 3) uint8
            "verb": int(self.verbs[index]),
            "noun": int(self.nouns[index]),
            "index": index,
            "aug_seed": aug_seed,
            "valid": not error,
            "error": error,
        }


# ------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class ClipAugment:
    """RandomResizedCrop, horizontal flip, ColorJitter, RandomGrayscale, then the feature set's normalisation.

    torchvision.transforms.v2 draws one set of parameters per call and applies it to every leading index of a
    (T, 3, H, W) tensor, so all frames of a clip get the same crop, flip, colour change and grayscale decision
    (tests check it). Parameters are drawn from the CPU RNG inside ``fork_rng`` seeded with the clip's seed, so
    they are reproducible wherever the pixels are (CPU worker or GPU).
    """

    preprocess: Preprocess  # crop size, mean and std of the feature set (its resize is used for decoding)
    scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.2, 0.1)  # brightness, contrast, saturation, hue
    grayscale: float = 0.1

    def __post_init__(self):
        from torchvision.transforms import v2

        transform = v2.Compose([
            v2.RandomResizedCrop(self.preprocess.crop, scale=self.scale, antialias=True),
            v2.RandomHorizontalFlip(self.hflip),
            v2.ColorJitter(*self.color_jitter),
            v2.RandomGrayscale(self.grayscale),
        ])
        object.__setattr__(self, "_transform", transform)

    def __call__(self, clip: torch.Tensor, seed: int) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> float32 (T, 3, crop, crop), normalised (channels_last strides)."""
        out = self.pixels(clip, seed)  # (T, 3, crop, crop) uint8
        return self.preprocess.normalize(out.permute(0, 2, 3, 1))  # (T, H, W, 3) -> (T, 3, H, W) float

    def pixels(self, clip: torch.Tensor, seed: int) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> uint8 (T, 3, crop, crop): the augmentation before normalisation."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._transform(clip.permute(0, 3, 1, 2))  # (T, 3, crop, crop) uint8, one draw for all T


def normalize_clips(clips: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Evaluation: uint8 (B, T, H, W, 3), already resized and centre-cropped like extract -> float (B, T, 3, H, W)."""
    b, t = clips.shape[:2]
    flat = preprocess.normalize(clips.reshape(b * t, *clips.shape[2:]))  # (B * T, 3, H, W)
    return flat.reshape(b, t, *flat.shape[1:])  # (B, T, 3, H, W)


# ------------------------------------------------------------------------------------------------- CutMix
@dataclass(frozen=True)
class ClipCutMix:
    """Clip i gets the box [y0:y1, x0:x1] of clip partner[i] in every frame; labels mix by the box's share.

    Has ``partner`` and ``fraction`` like stage two's TimeCutMix, so ``mixed_cross_entropy`` takes it as is.
    """

    partner: torch.Tensor  # (B,) int64, a permutation
    box: tuple[int, int, int, int]  # y0, y1, x0, x1
    fraction: float  # box area / frame area: the weight of the partner's labels


def sample_clip_cutmix(batch: int, height: int, width: int, alpha: float, seed: int) -> ClipCutMix | None:
    """lam ~ Beta(alpha, alpha); a box of (1 - lam) of the area at a uniform centre, clipped to the frame."""
    if alpha <= 0 or batch < 2:
        return None
    generator = torch.Generator().manual_seed(seed)
    lam = np.random.default_rng(seed).beta(alpha, alpha)
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(torch.randint(0, height, (1,), generator=generator)), int(torch.randint(0, width, (1,), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    partner = torch.randperm(batch, generator=generator)  # (B,)
    fraction = (y1 - y0) * (x1 - x0) / (height * width)  # the actual area after clipping
    if fraction == 0:
        return None
    return ClipCutMix(partner=partner, box=(y0, y1, x0, x1), fraction=fraction)


def apply_clip_cutmix(clips: torch.Tensor, mix: ClipCutMix) -> torch.Tensor:
    """clips (B, T, 3, H, W) -> (B, T, 3, H, W) with the same box pasted from the partner into every frame."""
    y0, y1, x0, x1 = mix.box
    mixed = clips.clone()
    mixed[:, :, :, y0:y1, x0:x1] = clips[mix.partner.to(clips.device), :, :, y0:y1, x0:x1]  # (B, T, 3, h, w)
    return mixed


# --------------------------------------------------------------------------------- CutMix over a global batch
def global_positions(local: int, rank: int, world: int) -> torch.Tensor:
    """(local,) positions in the step's global batch of this process's clips.

    DistributedSampler deals the shuffled indices round robin (process r gets r, r + world, ...), so clip j of
    process r's batch is clip j * world + r of the batch one process would take.
    """
    return torch.arange(local) * world + rank  # (local,)


@dataclass(frozen=True)
class StepCutMix:
    """One optimiser step's CutMix over the global batch: clip g gets the box of clip ``partner[g]``."""

    partner: torch.Tensor  # (B,) int64 global positions; an undecodable clip is its own partner (weight 0 anyway)
    box: tuple[int, int, int, int]  # y0, y1, x0, x1
    fraction: float


def sample_step_cutmix(valid: torch.Tensor, height: int, width: int, alpha: float, seed: int) -> StepCutMix | None:
    """CutMix of a whole global batch from ``seed`` (derived from the global step): every process draws the same.

    ``valid`` (B,) bool over the global batch; partners are drawn among the valid clips only, as before.
    """
    keep = valid.nonzero().squeeze(1)  # (v,) global positions of decodable clips
    mix = sample_clip_cutmix(len(keep), height, width, alpha, seed)
    if mix is None:
        return None
    partner = torch.arange(len(valid))  # (B,)
    partner[keep] = keep[mix.partner]
    return StepCutMix(partner=partner, box=mix.box, fraction=mix.fraction)
