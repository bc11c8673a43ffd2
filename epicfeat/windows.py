"""Clip rows for video backbones: a video's frames, decoded once, cut into overlapping windows.

Row k is centred at the first decoded frame at or after k / fps seconds (``frames.Sampling``, as image rows are)
and holds ``clip_len`` frames ``step`` decoded frames apart, ``clip_len // 2`` of them before its centre; at a video's
ends the first or last frame repeats. The video is decoded once, at clip_fps * step (``clip_decoding``). Rows carry the
centre's pts and frame index, and the span (first and last frame times) they saw, so stage two samples them exactly
as it samples image rows. No torch here: decoding's room.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from epicfeat.frames import FrameBatch, Sampling


def clip_decoding(clip_fps: float, fps: float) -> tuple[int, float]:
    """(step, decode fps) of clips of ``clip_fps`` under rows at ``fps``: decoding at clip_fps * step >= fps gives
    each row a centre frame of its own (7.5-fps clips at 10 rows/s: decoded at 15 fps, clips take every second
    frame)."""
    step = max(1, math.ceil(fps / clip_fps - 1e-9))
    return step, clip_fps * step


@dataclass
class ClipBatch:
    frame_indices: np.ndarray  # (n,) int64, the centre frame's position in presentation order
    pts: np.ndarray  # (n,) float64, the centre frame's time (s)
    span: np.ndarray  # (n, 2) float64, times (s) of the first and last frame of each clip
    images: np.ndarray  # (n, clip_len, crop, crop, 3) uint8

    def __len__(self) -> int:
        return len(self.pts)


class ClipWindows:
    """One video's clip rows, ``batch_size`` at a time: ``add`` each decoded batch, then ``end``. Only the frames
    the rows not yet emitted need are kept (about batch_size / fps seconds of frames)."""

    def __init__(self, clip_len: int, step: int, fps: float, batch_size: int):
        self.batch_size = batch_size
        self._offsets = (np.arange(clip_len) - clip_len // 2) * step  # (clip_len,) decoded frames from the centre
        self._before, self._after = -int(self._offsets[0]), int(self._offsets[-1])
        self._sampling = Sampling(fps)
        self._first = 0  # position (in the decoded stream) of _images[0]
        self._images: list[np.ndarray] = []  # (crop, crop, 3) each
        self._pts: list[float] = []
        self._indices: list[int] = []
        self._centres: list[int] = []  # stream positions of the rows not yet emitted

    def add(self, batch: FrameBatch) -> list[ClipBatch]:
        """Take a decoded batch; returns the full batches of rows whose clips are now whole."""
        for image, pts, index in zip(batch.images, batch.pts, batch.frame_indices):
            # The exact time back from the float (stream time bases have denominators far below a million).
            if self._sampling.keep(Fraction(float(pts)).limit_denominator(1_000_000)):
                self._centres.append(self._first + len(self._images))
            self._images.append(image)
            self._pts.append(float(pts))
            self._indices.append(int(index))
        last = self._first + len(self._images) - 1
        whole = sum(1 for c in self._centres if c + self._after <= last)
        return self._emit(whole - whole % self.batch_size)

    def end(self) -> list[ClipBatch]:
        """The video ended: every row left, its clip padded with the last frame."""
        return self._emit(len(self._centres))

    def _emit(self, rows: int) -> list[ClipBatch]:
        batches = []
        last = self._first + len(self._images) - 1
        pts, indices = np.array(self._pts), np.array(self._indices)  # (frames kept,)
        for start in range(0, rows, self.batch_size):
            centres = np.array(self._centres[start : start + self.batch_size])  # (n,)
            positions = np.clip(centres[:, None] + self._offsets, 0, last) - self._first  # (n, clip_len) into _images
            middle = centres - self._first
            batches.append(ClipBatch(
                frame_indices=indices[middle], pts=pts[middle],
                span=np.stack([pts[positions[:, 0]], pts[positions[:, -1]]], axis=1),  # (n, 2)
                images=np.stack([np.stack([self._images[p] for p in clip]) for clip in positions]),
            ))
        del self._centres[:rows]
        # Keep the frames from the first one a pending or future row needs.
        keep_from = (self._centres[0] if self._centres else last + 1) - self._before
        drop = max(0, keep_from - self._first)
        del self._images[:drop], self._pts[:drop], self._indices[:drop]
        self._first += drop
        return batches
