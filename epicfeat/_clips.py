"""Decoded training clips for ``epicfeat finetune``: which times to decode, the clip dataset, augmentation, CutMix.

Everything here is deterministic given (seed, epoch, segment index): the T times of a clip and its augmentation
parameters come from a seed derived from those three numbers, never from a worker's RNG. So the clips of an epoch
do not depend on the number of DataLoader workers, on the number of DDP processes, or on where a resumed run
restarted: that is what makes ``--resume`` exact and a 2-process run equal to a 1-process run.

    ClipDataset[i]            decode T frames of segment i with PyAV (in a DataLoader worker): uint8 (T, H, W, 3)
    ClipAugment(clip, seed)   the seed's augmentations, with ONE set of parameters for all T frames (on any device)
    sample_clip_cutmix(...)   CutMix with the same box in every frame of a clip, labels mixed by the box's area
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
def sample_clip_times(
    start_sec: float, stop_sec: float, *, fps: float, frames: int, train: bool, generator: torch.Generator | None
) -> np.ndarray:
    """T times (seconds) inside [start_sec, stop_sec), TSN-binned exactly like ``PackedSplit.sample_rows``.

    Stage two's rows of a segment are the feature set's sample times k / fps with start <= k / fps < stop; we
    take the same candidate times and the same bins: T equal bins over the candidates, a uniformly random one per
    bin in training and the bin centre in evaluation. A segment with no candidate (shorter than a row interval)
    uses its midpoint, as stage two uses the row nearest the midpoint.
    """
    first = math.ceil(start_sec * fps - 1e-9)  # first k with k / fps >= start
    last = math.ceil(stop_sec * fps - 1e-9)  # first k with k / fps >= stop (excluded)
    count = last - first
    if count <= 0:
        return np.full(frames, (start_sec + stop_sec) / 2.0)
    bins = np.arange(frames)  # (T,)
    if train:
        uniform = torch.rand(frames, generator=generator, dtype=torch.float64).numpy()  # (T,) in [0, 1)
        offsets = np.minimum(np.floor((bins + uniform) * count / frames).astype(np.int64), count - 1)
    else:
        offsets = ((2 * bins + 1) * count) // (2 * frames)  # integer bin centres, as in sample_rows
    return (first + offsets) / fps  # (T,)


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
        frames: int,
        fps: float,
        decode: Preprocess,
        train: bool,
        seed: int,
    ):
        self.video_paths = video_paths
        self.video_ids = segments["video_id"].astype(str).tolist()
        self.start = segments["start_sec"].to_numpy(np.float64)
        self.stop = segments["stop_sec"].to_numpy(np.float64)
        self.verbs = segments["verb_class"].to_numpy(np.int64)
        self.nouns = segments["noun_class"].to_numpy(np.int64)
        self.frames, self.fps, self.decode, self.train, self.seed = frames, fps, decode, train, seed
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
        times = sample_clip_times(
            self.start[index], self.stop[index], fps=self.fps, frames=self.frames, train=self.train, generator=generator
        )
        error = ""
        try:
            images = decode_frames_at(self.video_paths[self.video_ids[index]], times, self.decode).images  # (T, H, W, 3)
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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self._transform(clip.permute(0, 3, 1, 2))  # (T, 3, crop, crop) uint8, one draw for all T
        return self.preprocess.normalize(out.permute(0, 2, 3, 1))  # (T, H, W, 3) -> (T, 3, H, W) float


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
