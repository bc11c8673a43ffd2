"""A small synthetic dataset in the exact EPIC-KITCHENS-100 layout: real H.264 videos and every annotation CSV.

No EPIC video can be downloaded in CI or on a laptop, so ``epicfeat demo`` and the tests run on this instead.

What it writes under ``out_dir``::

    videos/P01/P01_01.MP4 ...           the downscaled-copy layout (videos_640x360/PXX/PXX_YY.MP4), H.264, yuv420p
    videos/P01/rgb_frames/P01_01/ ...   with ``rgb_frames=True``, the official JPEG frames too (folders and tars)
    annotations/EPIC_100_train.csv       plus validation, test_timestamps, verb/noun classes, video_info,
                                         tail verbs/nouns and unseen participants: the real files' exact schemas
    synthetic_dataset.json               completion marker (spec + seed), written last

The planted signal: each segment shows one coloured shape on the participant's muted, textured "kitchen" background
(the camera shakes a little; gaps show only the background). The **noun** is the shape and colour; the **verbs**
come in pairs that are exact time reversals (grow / shrink, move-right / move-left, fade-in / fade-out), so a model
blind to frame order is at chance within a pair and a temporal model is not. The object and its motion stay inside
the centre square of the 16:9 frame, which a centre crop keeps.

Timing follows EPIC: 'HH:MM:SS.ff' timestamps; a segment covers the frames with start <= t < stop (no frame lies
within 2 ms of a boundary, so any rounding agrees); ``start_frame``/``stop_frame`` are 1-based frame numbers; frame
rates mix 59.94, 50 and 30 fps, and ``EPIC_100_video_info.csv`` holds each file's real fps and duration.

Deterministic from the seed: the same spec and seed give identical CSVs and identical video bytes. Frames are
rendered and encoded one at a time, so memory stays flat whatever the spec.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from epicfeat.data.videos import FRAMES_FOLDER, epic_frames_fps
from epicfeat.errors import EpicfeatError
from epicfeat.files import atomic_write_text

GENERATOR_VERSION = 1  # bump whenever the output for a given spec + seed changes, so old folders are regenerated
MARKER_FILE = "synthetic_dataset.json"
IN_PROGRESS_FILE = ".synthetic_dataset_in_progress"

# The nouns: key (EPIC style "noun:modifier"), category, RGB colour, shape. Saturated colours against muted
# backgrounds, so even random-weight conv features separate them.
NOUN_LOOKS: tuple[tuple[str, str, tuple[int, int, int], str], ...] = (
    ("disc:red", "round", (225, 35, 35), "disc"),
    ("square:green", "angular", (40, 200, 60), "square"),
    ("triangle:blue", "angular", (40, 80, 235), "triangle"),
    ("diamond:yellow", "angular", (240, 220, 40), "diamond"),
    ("ring:magenta", "round", (220, 50, 220), "ring"),
    ("cross:cyan", "angular", (40, 220, 230), "cross"),
    ("disc:orange", "round", (250, 140, 20), "disc"),
    ("square:white", "angular", (245, 245, 245), "square"),
    ("ring:purple", "round", (125, 35, 200), "ring"),
    ("triangle:black", "angular", (15, 15, 15), "triangle"),
)

# The verbs, as pairs (forward, reverse) that differ only by the order of their frames, and the category (the
# object property that changes). The reverse verb plays the forward verb's frames backwards.
VERB_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("grow", "shrink", "size"),
    ("move-right", "move-left", "position"),
    ("fade-in", "fade-out", "visibility"),
)
VERB_PAIR_WEIGHTS = (0.5, 0.32, 0.18)  # how often each pair is drawn; a pair's two verbs share it equally

TAIL_SHARE = 0.2  # tail classes: the rarest classes that together hold at most this share of training segments
_BOUNDARY_CLEARANCE = Fraction(2, 1000)  # seconds between any frame time and a segment boundary


class SyntheticDatasetError(EpicfeatError):
    """A synthetic dataset that cannot be generated: a bad spec, or an output folder that holds other files."""


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and look of a synthetic dataset. The defaults are the demo dataset (about 6 minutes of video).

    Participants P01..P{seen} are "seen": their videos are split between train, validation and test. Two more
    participants are unseen: one appears only in validation, the next only in test (EPIC's unseen-participant
    metrics).
    """

    seen_participants: int = 2
    train_videos_per_participant: int = 5
    validation_videos_per_participant: int = 1  # per seen participant
    test_videos_per_participant: int = 1  # per seen participant
    unseen_videos: int = 2  # videos of the unseen validation participant, and as many of the unseen test one
    segments_per_video: tuple[int, int] = (12, 16)  # inclusive range
    segment_seconds: tuple[float, float] = (0.6, 1.8)  # uniform range of segment durations
    gap_seconds: tuple[float, float] = (0.1, 0.3)  # background-only time before, between and after segments
    width: int = 192
    height: int = 108
    # Frame rates, cycled over the videos in id order: EPIC is mostly 59.94, then 50, a few 30.
    frame_rates: tuple[str, ...] = ("60000/1001", "50", "60000/1001", "30")
    nouns: int = 8  # at most len(NOUN_LOOKS)
    crf: int = 20  # x264 quality (lower = better, bigger files)
    # Also the official RGB frames of every video, made from its MP4 as EPIC's were: rgb_frames/P01_01/ for odd
    # video numbers, rgb_frames/P01_02.tar for even ones, at the rate of the id (60 fps for EPIC-55 ids).
    rgb_frames: bool = False

    def __post_init__(self):
        def fail(message: str):
            raise SyntheticDatasetError(f"invalid SyntheticSpec: {message}")

        for name in ("seen_participants", "train_videos_per_participant", "unseen_videos"):
            if getattr(self, name) < 1:
                fail(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("validation_videos_per_participant", "test_videos_per_participant"):
            if getattr(self, name) < 0:
                fail(f"{name} must be 0 or more, got {getattr(self, name)}.")
        if self.seen_participants + 2 > 99:
            fail("at most 97 seen participants (ids are P01..P99).")
        low, high = self.segments_per_video
        if not 1 <= low <= high:
            fail(f"segments_per_video must be (low, high) with 1 <= low <= high, got {self.segments_per_video}.")
        for name in ("segment_seconds", "gap_seconds"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                fail(f"{name} must be (low, high) with 0 < low <= high, got {getattr(self, name)}.")
        if self.width % 2 or self.height % 2 or self.height < 32 or self.width < self.height:
            fail(f"the frame must be landscape with even sides of at least 32 px (yuv420p), "
                 f"got {self.width}x{self.height}.")
        if not self.frame_rates:
            fail("frame_rates is empty.")
        for rate in self.frame_rates:
            try:
                ok = 1 <= Fraction(rate) <= 120
            except (ValueError, ZeroDivisionError, TypeError):
                ok = False
            if not ok:
                fail(f"frame rate {rate!r} is not a number or fraction like '50' or '60000/1001' in 1..120.")
            _snap_boundary(0.0, Fraction(rate))  # raises for a rate with frames on every centisecond (100 fps)
        slowest = min(Fraction(rate) for rate in self.frame_rates)
        if self.segment_seconds[0] * slowest < 2:  # a motion needs a first and a last frame
            fail(f"the shortest segment ({self.segment_seconds[0]} s) must span at least 2 frames at "
                 f"{float(slowest):g} fps.")
        if not 1 <= self.nouns <= len(NOUN_LOOKS):
            fail(f"nouns must be 1..{len(NOUN_LOOKS)}, got {self.nouns}.")
        if not 0 <= self.crf <= 51:
            fail(f"crf must be 0..51, got {self.crf}.")

    @classmethod
    def tiny(cls) -> SyntheticSpec:
        """Six videos of about 4 s (one per split and participant role, all three frame rates): for tests."""
        return cls(seen_participants=1, train_videos_per_participant=2, validation_videos_per_participant=1,
                   test_videos_per_participant=1, unseen_videos=1, segments_per_video=(3, 4),
                   segment_seconds=(0.5, 1.0), gap_seconds=(0.1, 0.3))


@dataclass(frozen=True)
class SyntheticDataset:
    """Where a generated dataset lies: ``videos`` and ``annotations`` are the folders to pass to the CLI."""

    root: Path
    videos: Path
    annotations: Path


# --------------------------------- the plan: every video, segment, label and motion, decided before any pixel is drawn
@dataclass(frozen=True)
class _ObjectState:
    x: float  # centre, pixels from the frame's left edge
    y: float  # centre, pixels from the top
    radius: float  # half the object's extent, pixels
    opacity: float  # 0..1


@dataclass(frozen=True)
class _Segment:
    narration_id: str
    verb: int
    noun: int
    start_cs: int  # start time in centiseconds (the file's 'HH:MM:SS.ff')
    stop_cs: int
    narration_ms: int  # narration_timestamp in milliseconds ('HH:MM:SS.fff')
    first_frame: int  # 0-based index of the first frame shown at or after start
    last_frame: int  # 0-based index of the last frame shown before stop
    start_state: _ObjectState  # the object at first_frame ...
    end_state: _ObjectState  # ... and at last_frame; linear in between
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class _Video:
    video_id: str
    participant_id: str
    split: str
    fps: Fraction
    frames: int
    segments: tuple[_Segment, ...]
    seed: tuple[int, int]  # seeds this video's background and camera shake

    @property
    def duration(self) -> float:
        return float(self.frames / self.fps)


def _apportion(total: int, weights) -> list[int]:
    """Split ``total`` into integer counts proportional to ``weights`` (largest remainder; exact, deterministic)."""
    weights = np.asarray(weights, dtype=np.float64)
    quotas = total * weights / weights.sum()
    counts = np.floor(quotas).astype(int)
    order = np.argsort(-(quotas - counts), kind="stable")  # largest remainders first, ties by class id
    counts[order[: total - counts.sum()]] += 1
    return counts.tolist()


def _stage_half(spec: SyntheticSpec) -> float:
    """Half the side of the centred square that holds all object motion (inside any centre crop, minus shake)."""
    # A centre crop of `crop` after resizing the short side to `resize` keeps crop/resize (0.875 for both 224/256
    # and 112/128) of the height; keep a little inside that and leave room for the camera shake.
    return 0.85 * spec.height / 2 - _shake_pixels(spec)


def _shake_pixels(spec: SyntheticSpec) -> int:
    return max(1, round(spec.height / 54))  # 2 px at 108 px high


def _object_motion(rng: np.random.Generator, spec: SyntheticSpec, verb: int) -> tuple[_ObjectState, _ObjectState]:
    """Start and end states of the object for ``verb``; a reverse verb gets the forward verb's states swapped."""
    half = _stage_half(spec)
    centre_x, centre_y = spec.width / 2, spec.height / 2
    pair, reverse = divmod(verb, 2)
    kind = VERB_PAIRS[pair][2]
    # Each pair draws from one distribution whatever its direction, so the two verbs' frames look alike one by one.
    if kind == "size":
        small, large = rng.uniform(0.25, 0.35) * half, rng.uniform(0.75, 0.9) * half
        x, y = rng.uniform(-1, 1, size=2) * (half - large)
        start = _ObjectState(centre_x + x, centre_y + y, small, 1.0)
        end = _ObjectState(centre_x + x, centre_y + y, large, 1.0)
    elif kind == "position":
        radius = rng.uniform(0.38, 0.48) * half
        travel = rng.uniform(0.75, 1.0) * (half - radius)
        y = rng.uniform(-0.5, 0.5) * (half - radius)
        start = _ObjectState(centre_x - travel, centre_y + y, radius, 1.0)
        end = _ObjectState(centre_x + travel, centre_y + y, radius, 1.0)
    else:  # visibility
        radius = rng.uniform(0.5, 0.75) * half
        x, y = rng.uniform(-1, 1, size=2) * (half - radius)
        start = _ObjectState(centre_x + x, centre_y + y, radius, 0.1)
        end = _ObjectState(centre_x + x, centre_y + y, radius, 1.0)
    return (end, start) if reverse else (start, end)


def _snap_boundary(seconds: float, fps: Fraction) -> int:
    """The first centisecond at or after ``seconds`` that lies at least 2 ms from every frame time of the video.

    So the frames inside a segment are the same whether a reader compares float pts, exact fractions or rounded
    milliseconds. At EPIC's rates it is at most one step away: two consecutive centiseconds cannot both lie within
    2 ms of a frame when frames are more than 14 ms apart.
    """
    first = math.ceil(round(seconds * 100, 6))
    for centiseconds in range(first, first + 1000):
        time = Fraction(centiseconds, 100)
        nearest_frame = round(time * fps)
        if abs(time - nearest_frame / fps) >= _BOUNDARY_CLEARANCE:
            return centiseconds
    raise SyntheticDatasetError(f"frame rate {fps} fps leaves no centisecond 2 ms away from its frames for segment "
                                f"boundaries; use an EPIC-like rate such as 60000/1001, 50 or 30.")


def _plan_video_timing(rng, spec: SyntheticSpec, fps: Fraction) -> tuple[list[tuple[int, int, int, int]], int]:
    """Segment times of one video: [(start_cs, stop_cs, first_frame, last_frame)], and the video's frame count."""
    count = int(rng.integers(spec.segments_per_video[0], spec.segments_per_video[1] + 1))
    timing = []
    clock = rng.uniform(*spec.gap_seconds)  # the video opens on the background
    for _ in range(count):
        start_cs = _snap_boundary(clock, fps)
        stop_cs = _snap_boundary(start_cs / 100 + rng.uniform(*spec.segment_seconds), fps)
        first_frame = math.ceil(Fraction(start_cs, 100) * fps)  # first frame with t >= start
        last_frame = math.ceil(Fraction(stop_cs, 100) * fps) - 1  # last frame with t < stop
        timing.append((start_cs, stop_cs, first_frame, last_frame))
        clock = stop_cs / 100 + rng.uniform(*spec.gap_seconds)
    frames = math.ceil(clock * fps)  # ends on the background too
    return timing, frames


def _video_table(spec: SyntheticSpec) -> list[tuple[str, str, str]]:
    """(video_id, participant_id, split) of every video, in id order."""
    table = []
    per_split = (("train", spec.train_videos_per_participant),
                 ("validation", spec.validation_videos_per_participant),
                 ("test", spec.test_videos_per_participant))
    for p in range(1, spec.seen_participants + 1):
        splits = [split for split, count in per_split for _ in range(count)]
        table += [(f"P{p:02d}_{v:02d}", f"P{p:02d}", split) for v, split in enumerate(splits, start=1)]
    for offset, split in enumerate(("validation", "test"), start=1):  # the unseen participants
        p = spec.seen_participants + offset
        table += [(f"P{p:02d}_{v:02d}", f"P{p:02d}", split) for v in range(1, spec.unseen_videos + 1)]
    return table


def _plan(spec: SyntheticSpec, seed: int) -> list[_Video]:
    """Decide every video, segment, label and motion from the seed (no pixels yet)."""
    rng = np.random.default_rng([seed, 0])
    table = _video_table(spec)
    rates = [Fraction(spec.frame_rates[i % len(spec.frame_rates)]) for i in range(len(table))]
    timings = [_plan_video_timing(rng, spec, fps) for fps in rates]

    # Exact class counts per split (so tail classes and imbalance do not depend on luck), then shuffled.
    labels: dict[str, list[tuple[int, int]]] = {}
    for split in ("train", "validation", "test"):
        total = sum(len(timing) for (_, _, s), (timing, _) in zip(table, timings) if s == split)
        # Verb ids 2p and 2p + 1 (pair p, forward and reverse) are equally frequent: an order-blind model can only
        # toss a coin within a pair. Noun class k is drawn with weight 1 / (k + 1).
        verb_weights = [weight / 2 for weight in VERB_PAIR_WEIGHTS for _ in range(2)]
        verbs = np.repeat(np.arange(2 * len(VERB_PAIRS)), _apportion(total, verb_weights))
        nouns = np.repeat(np.arange(spec.nouns), _apportion(total, [1 / (k + 1) for k in range(spec.nouns)]))
        labels[split] = list(zip(rng.permutation(verbs).tolist(), rng.permutation(nouns).tolist()))

    videos = []
    for index, ((video_id, participant_id, split), fps, (timing, frames)) in enumerate(zip(table, rates, timings)):
        segments = []
        for number, (start_cs, stop_cs, first_frame, last_frame) in enumerate(timing):
            verb, noun = labels[split].pop()
            start_state, end_state = _object_motion(rng, spec, verb)
            colour = np.clip(np.array(NOUN_LOOKS[noun][2]) + rng.uniform(-8, 8, size=3), 0, 255)
            # EPIC narrations are spoken around the action, sometimes before it starts.
            narration_ms = max(0, round(start_cs * 10 + rng.uniform(-300, 300)))
            segments.append(_Segment(f"{video_id}_{number}", verb, noun, start_cs, stop_cs, narration_ms,
                                     first_frame, last_frame, start_state, end_state,
                                     tuple(float(c) for c in colour)))
        videos.append(_Video(video_id, participant_id, split, fps, frames, tuple(segments), (seed, index + 1)))
    return videos


# -------------------------------------------------------------------------------------------------------------- pixels
def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a coarse (h, w, c) grid to (height, width, c): smooth blotches for textures."""

    def hat_weights(size_out: int, size_in: int) -> np.ndarray:  # (size_out, size_in), rows sum to 1
        positions = np.linspace(0, size_in - 1, size_out)
        return np.maximum(0.0, 1.0 - np.abs(positions[:, None] - np.arange(size_in)[None, :]))

    return np.einsum("Yy,yxc,Xx->YXc", hat_weights(height, grid.shape[0]), grid, hat_weights(width, grid.shape[1]))


def _kitchen(spec: SyntheticSpec, seed: int, participant: int, video_seed: tuple[int, int]) -> np.ndarray:
    """A video's background canvas (H + 2 shake, W + 2 shake, 3) float32: the participant's muted palette
    (shared by all their videos, so an unseen participant is a new kitchen) with this video's own texture."""
    palette_rng = np.random.default_rng([seed, 1000 + participant])
    grey = palette_rng.uniform(85, 150)
    tint = palette_rng.normal(0, 1, size=3)
    tint = 18 * tint / np.linalg.norm(tint)  # muted: a small colour cast, far from the objects' saturation
    rng = np.random.default_rng(video_seed)
    shake = _shake_pixels(spec)
    height, width = spec.height + 2 * shake, spec.width + 2 * shake
    canvas = grey + tint + rng.uniform(-8, 8)  # (3,): this video's lighting
    canvas = canvas + 22 * _upsample(rng.normal(0, 1, size=(4, 6, 3)), height, width)  # colour blotches
    canvas = canvas + 14 * _upsample(rng.normal(0, 1, size=(14, 24, 1)), height, width)  # surface texture
    canvas = canvas + rng.normal(0, 5, size=(height, width, 1))  # fine grain
    return canvas.astype(np.float32)


def _object_coverage(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Fraction (0..1) of each pixel covered by ``shape`` of half-extent ``radius`` at offsets (dx, dy) from its
    centre. From an approximate signed distance in pixels, so edges are anti-aliased and sizes change smoothly."""
    r = radius
    if shape == "disc":
        distance = np.hypot(dx, dy) - r
    elif shape == "square":
        distance = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    elif shape == "diamond":
        distance = (np.abs(dx) + np.abs(dy) - r) / math.sqrt(2)
    elif shape == "ring":
        d = np.hypot(dx, dy)
        distance = np.maximum(d - r, 0.55 * r - d)
    elif shape == "cross":
        arm_h = np.maximum(np.abs(dx) - r, np.abs(dy) - 0.32 * r)
        arm_v = np.maximum(np.abs(dy) - r, np.abs(dx) - 0.32 * r)
        distance = np.minimum(arm_h, arm_v)
    elif shape == "triangle":  # apex up, base at 0.7 r below the centre
        slope = 1.8
        sides = (slope * np.abs(dx) - dy - r) / math.hypot(slope, 1)
        distance = np.maximum(dy - 0.7 * r, sides)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - distance, 0.0, 1.0)


def _draw_object(frame: np.ndarray, shape: str, colour: np.ndarray, state: _ObjectState,
                 shift: tuple[int, int]) -> None:
    """Blend the object into ``frame`` (H, W, 3) float32 in place; ``shift`` is the camera shake (dx, dy)."""
    height, width = frame.shape[:2]
    x, y = state.x + shift[0], state.y + shift[1]
    # Only the object's bounding box is computed (plus a pixel for the anti-aliased edge).
    x0, x1 = max(0, int(x - state.radius) - 1), min(width, int(math.ceil(x + state.radius)) + 2)
    y0, y1 = max(0, int(y - state.radius) - 1), min(height, int(math.ceil(y + state.radius)) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)  # (h, w) each: pixel centres
    coverage = _object_coverage(shape, dx - x, dy - y, state.radius) * state.opacity
    box = frame[y0:y1, x0:x1]  # (h, w, 3) view
    box += coverage[..., None] * (colour - box)


def _lerp(a: _ObjectState, b: _ObjectState, u: float) -> _ObjectState:
    return _ObjectState(a.x + (b.x - a.x) * u, a.y + (b.y - a.y) * u, a.radius + (b.radius - a.radius) * u,
                        a.opacity + (b.opacity - a.opacity) * u)


def _object_at(segment: _Segment, frame_index: int) -> _ObjectState:
    """The object's state at a frame of the segment: progress u = 0 on its first frame, 1 on its last.

    Progress counts frames, not seconds, so a segment's reverse-verb twin shows exactly its frames backwards.
    """
    span = segment.last_frame - segment.first_frame
    u = (frame_index - segment.first_frame) / span if span > 0 else 0.5
    return _lerp(segment.start_state, segment.end_state, u)


def _render_frames(video: _Video, spec: SyntheticSpec, seed: int):
    """Yield the video's frames one at a time as (H, W, 3) uint8 arrays (never the whole video in memory)."""
    shake = _shake_pixels(spec)
    participant = int(video.participant_id[1:])
    canvas = _kitchen(spec, seed, participant, video.seed)
    rng = np.random.default_rng([*video.seed, 1])
    offset = np.zeros(2)
    segments = iter(video.segments)
    segment = next(segments, None)
    for index in range(video.frames):
        # Camera shake: a slow random walk, kept within +-shake pixels.
        offset = np.clip(0.8 * offset + rng.normal(0, 0.6, size=2), -shake, shake)
        dx, dy = (int(v) for v in np.rint(offset))
        frame = canvas[shake + dy: shake + dy + spec.height, shake + dx: shake + dx + spec.width].copy()  # (H, W, 3)
        while segment is not None and index > segment.last_frame:
            segment = next(segments, None)
        if segment is not None and index >= segment.first_frame:
            shape = NOUN_LOOKS[segment.noun][3]
            _draw_object(frame, shape, np.asarray(segment.colour, np.float32), _object_at(segment, index),
                         (dx, dy))
        yield np.clip(frame + 0.5, 0, 255).astype(np.uint8)


def _encode_video(path: Path, video: _Video, spec: SyntheticSpec, seed: int) -> None:
    """Write the video as H.264 yuv420p MP4, frame by frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=video.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.codec_context.gop_size = round(video.fps)  # a keyframe a second, like camera footage
        # Deterministic output: one encoder thread (x264's output would otherwise depend on the core count), and no
        # macroblock-tree rate control, which at these small frame sizes gave different bytes from run to run.
        stream.codec_context.thread_count = 1
        stream.options = {"preset": "veryfast", "crf": str(spec.crf),
                          "x264-params": "threads=1:lookahead-threads=1:mbtree=0"}
        for index, image in enumerate(_render_frames(video, spec, seed)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index  # in 1/fps units (the codec's time base)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush delayed (B-)frames


# -------------------------------------------------------------------------------------------- CSVs in the EPIC schemas
def _clock(ticks: int, digits: int = 2) -> str:
    """'HH:MM:SS.ff' from centiseconds (start/stop), or with ``digits=3`` 'HH:MM:SS.fff' from milliseconds."""
    seconds, fraction = divmod(ticks, 10**digits)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.{fraction:0{digits}d}"


def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # EPIC's files: LF, quotes only where needed
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _tail_classes(counts: list[int]) -> list[int]:
    """The rarest classes that together hold at most TAIL_SHARE of the instances (EPIC: the "few-shot" tail)."""
    total, tail, held = sum(counts), [], 0
    for cls in sorted(range(len(counts)), key=lambda c: (counts[c], -c)):  # rarest first
        if held + counts[cls] > TAIL_SHARE * total:
            break
        tail.append(cls)
        held += counts[cls]
    return sorted(tail)


def _annotation_files(videos: list[_Video], spec: SyntheticSpec) -> dict[str, str]:
    """Every EPIC_100_*.csv as {file name: text}."""
    verb_keys = [verb for forward, reverse, _ in VERB_PAIRS for verb in (forward, reverse)]
    noun_keys = [NOUN_LOOKS[n][0] for n in range(spec.nouns)]
    segment_header = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
                      "stop_timestamp", "start_frame", "stop_frame"]
    label_header = ["narration", "verb", "verb_class", "noun", "noun_class", "all_nouns", "all_noun_classes"]
    rows: dict[str, list[list]] = {"train": [], "validation": [], "test": []}
    for video in videos:
        for s in video.segments:
            row = [s.narration_id, video.participant_id, video.video_id, _clock(s.narration_ms, 3),
                   _clock(s.start_cs), _clock(s.stop_cs), s.first_frame + 1, s.last_frame + 1]
            if video.split != "test":
                verb, noun = verb_keys[s.verb], noun_keys[s.noun]
                noun_words = " ".join(reversed(noun.split(":")))  # "disc:red" is narrated "red disc"
                row += [f"{verb} {noun_words}", verb, s.verb, noun, s.noun, str([noun]), str([s.noun])]
            rows[video.split].append(row)
    for split_rows in rows.values():
        split_rows.sort(key=lambda row: row[0])  # EPIC's files are sorted by narration_id as text

    train_verbs = [sum(row[10] == v for row in rows["train"]) for v in range(len(verb_keys))]
    train_nouns = [sum(row[12] == n for row in rows["train"]) for n in range(len(noun_keys))]
    verb_categories = [category for _, _, category in VERB_PAIRS for _ in range(2)]
    files = {
        "EPIC_100_train.csv": _csv_text(segment_header + label_header, rows["train"]),
        "EPIC_100_validation.csv": _csv_text(segment_header + label_header, rows["validation"]),
        "EPIC_100_test_timestamps.csv": _csv_text(segment_header, rows["test"]),
        "EPIC_100_verb_classes.csv": _csv_text(
            ["id", "key", "instances", "category"],
            [[i, key, str([key]), verb_categories[i]] for i, key in enumerate(verb_keys)]),
        "EPIC_100_noun_classes.csv": _csv_text(
            ["id", "key", "instances", "category"],
            [[i, key, str([key, " ".join(reversed(key.split(":")))]), NOUN_LOOKS[i][1]]
             for i, key in enumerate(noun_keys)]),
        "EPIC_100_video_info.csv": _csv_text(
            ["video_id", "duration", "fps", "resolution"],
            [[v.video_id, repr(round(v.duration, 6)), repr(float(v.fps)), f"{spec.width}x{spec.height}"]
             for v in videos]),
        "EPIC_100_tail_verbs.csv": _csv_text(["verb"], [[c] for c in _tail_classes(train_verbs)]),
        "EPIC_100_tail_nouns.csv": _csv_text(["noun"], [[c] for c in _tail_classes(train_nouns)]),
    }
    for split in ("validation", "test"):
        train_participants = {v.participant_id for v in videos if v.split == "train"}
        unseen = sorted({v.participant_id for v in videos if v.split == split} - train_participants)
        files[f"EPIC_100_unseen_participant_ids_{split}.csv"] = _csv_text(["participant_id"], [[p] for p in unseen])
    return files


# ------------------------- the folder: reuse a complete dataset, regenerate one we wrote, never touch a foreign folder
def _complete_dataset(root: Path, identity: dict) -> bool:
    """True when ``root`` holds a finished dataset of exactly this spec and seed with all its files present."""
    try:
        marker = json.loads((root / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("identity") != identity:
        return False
    return all((root / name).is_file() for name in marker.get("files", [None]))


def _clear_folder(root: Path) -> None:
    """Make ``root`` ready for a fresh dataset: remove an older or half-written one; refuse a foreign folder."""
    if not root.exists():
        root.mkdir(parents=True)
        return
    if not root.is_dir():
        raise SyntheticDatasetError(f"{root}: exists and is not a folder. Choose another output folder.")
    ours = (root / MARKER_FILE).exists() or (root / IN_PROGRESS_FILE).exists()
    if not ours:
        entries = sorted(p.name for p in root.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise SyntheticDatasetError(
                f"{root}: folder is not empty ({shown}) and holds no synthetic dataset (no {MARKER_FILE}). "
                f"Choose an empty or new folder; the generator only ever deletes a dataset it wrote.")
        return
    for name in ("videos", "annotations"):
        shutil.rmtree(root / name, ignore_errors=True)
    (root / MARKER_FILE).unlink(missing_ok=True)


def generate_synthetic_dataset(out_dir: str | Path, *, seed: int = 0,
                               spec: SyntheticSpec = SyntheticSpec()) -> SyntheticDataset:
    """Write a synthetic EPIC-KITCHENS-100 dataset under ``out_dir``, or reuse the complete one of this spec and seed
    there. Another spec's or a half-written dataset is replaced; a folder holding anything else raises
    ``SyntheticDatasetError``.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SyntheticDatasetError(f"seed must be a non-negative integer, got {seed!r}.")
    seed = int(seed)
    root = Path(out_dir)
    dataset = SyntheticDataset(root=root, videos=root / "videos", annotations=root / "annotations")
    spec_fields = json.loads(json.dumps(dataclasses.asdict(spec)))  # tuples become lists, as read back
    identity = {"generator": "epicfeat.data.synthetic", "version": GENERATOR_VERSION, "seed": seed, "spec": spec_fields}
    if _complete_dataset(root, identity):
        return dataset

    _clear_folder(root)
    (root / IN_PROGRESS_FILE).write_text(json.dumps(identity) + "\n")  # claims the folder before any other file
    videos = _plan(spec, seed)
    files = []
    for name, text in _annotation_files(videos, spec).items():
        dataset.annotations.mkdir(exist_ok=True)
        (dataset.annotations / name).write_text(text)
        files.append(f"annotations/{name}")
    paths = [dataset.videos / video.participant_id / f"{video.video_id}.MP4" for video in videos]
    for path, video in zip(paths, videos):
        _encode_video(path, video, spec, seed)
        if spec.rgb_frames:
            files.append(_official_frames(path, video).relative_to(root).as_posix())
    files += [path.relative_to(root).as_posix() for path in paths]

    splits = ("train", "validation", "test")
    summary = {
        "videos": len(videos),
        "minutes": round(sum(v.duration for v in videos) / 60, 3),
        "segments": {s: sum(len(v.segments) for v in videos if v.split == s) for s in splits},
        "videos_per_split": {s: [v.video_id for v in videos if v.split == s] for s in splits},
    }
    marker = {"identity": identity, "summary": summary, "files": files}
    atomic_write_text(root / MARKER_FILE, json.dumps(marker, indent=2) + "\n")  # last: the dataset is complete
    (root / IN_PROGRESS_FILE).unlink()
    return dataset


def _official_frames(video_path: Path, video: _Video) -> Path:
    """Write ``video``'s official frames beside its MP4 (a folder or a tar, see SyntheticSpec.rgb_frames); returns the
    file whose presence means they are complete (the tar, or the folder's last frame)."""
    folder = video_path.parent / FRAMES_FOLDER
    as_tar = int(video.video_id.split("_")[1]) % 2 == 0
    written = video_as_frames(video_path, folder / (f"{video.video_id}.tar" if as_tar else video.video_id),
                              rate=epic_frames_fps(video.video_id))
    return written if as_tar else max(written.iterdir())


def write_synthetic_video(path: str | Path, *, seconds: float, width: int = 640, height: int = 360,
                          fps: str = "60000/1001", seed: int = 0, crf: int = 20) -> Path:
    """One H.264 video in the dataset's look, ``round(seconds * fps)`` frames long, without annotations, for
    benchmarks and tests. The same arguments give the same bytes; a killed run never leaves half a video at ``path``.
    """
    if not seconds > 0:
        raise SyntheticDatasetError(f"write_synthetic_video: seconds must be > 0, got {seconds!r}.")
    path = Path(path)
    count = math.ceil(seconds / 1.1)  # a segment and the gap after it last at least 1.1 s: the segments fill it
    spec = SyntheticSpec(seen_participants=1, train_videos_per_participant=1, validation_videos_per_participant=0,
                         test_videos_per_participant=0, unseen_videos=1, segments_per_video=(count, count),
                         segment_seconds=(1.0, 2.0), width=width, height=height, frame_rates=(fps,), crf=crf)
    planned = _plan(spec, seed)[0]  # P01_01, the train video; its segments may run past the cut below
    video = dataclasses.replace(planned, frames=round(seconds * Fraction(fps)))
    partial = path.with_name(f".{path.name}.partial")
    _encode_video(partial, video, spec, seed)
    os.replace(partial, path)
    return path


# ------------------------------------------------------------------------------------- the official rgb_frames form
def write_jpeg_frames(images: Iterable[np.ndarray], path: str | Path, *, quality: int = 2) -> Path:
    """Write (H, W, 3) uint8 RGB images as the official RGB frames: ``frame_%010d.jpg`` from 1, in the folder
    ``path``, or in the tar ``path`` when it ends in .tar (members in frame order, as the download's). ``quality``
    is FFmpeg's JPEG quantiser (2: best, 31: worst). A killed run never leaves half a tar at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = None
    as_tar = path.suffix.lower() == ".tar"
    partial = path.with_name(f".{path.name}.partial")
    tar = tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) if as_tar else None
    if not as_tar:
        path.mkdir(exist_ok=True)
    try:
        for number, image in enumerate(images, start=1):
            if codec is None:
                codec = av.CodecContext.create("mjpeg", "w")
                codec.height, codec.width = image.shape[:2]
                codec.pix_fmt, codec.time_base = "yuvj420p", Fraction(1, 60)
                codec.options = {"qmin": str(quality), "qmax": str(quality)}
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(format="yuvj420p")
            frame.pts = number
            data = b"".join(bytes(packet) for packet in codec.encode(frame))
            name = f"frame_{number:010d}.jpg"
            if tar is None:
                (path / name).write_bytes(data)
            else:
                member = tarfile.TarInfo(f"./{name}")
                member.size, member.mtime, member.mode = len(data), 0, 0o644
                tar.addfile(member, io.BytesIO(data))
    finally:
        if tar is not None:
            tar.close()
    if as_tar:
        os.replace(partial, path)
    return path


def resampled(images: Iterable[np.ndarray], native: Fraction, rate: Fraction) -> Iterator[np.ndarray]:
    """A ``native``-fps frame sequence at ``rate`` fps: output frame j (shown at j / rate s) is the input frame shown
    then, as the official frames were resampled from the camera's rate."""
    j = 0
    for i, image in enumerate(images):
        while j / rate < (i + 1) / native:  # frame i is shown until (i + 1) / native
            yield image
            j += 1


def video_as_frames(video: str | Path, path: str | Path, *, rate: float | None = None,
                    size: tuple[int, int] | None = None, quality: int = 2) -> Path:
    """The official-frames form of a video file (a folder, or a tar when ``path`` ends in .tar): every decoded
    frame, resampled to ``rate`` fps (None: the stream's own rate) and scaled to ``size`` (width, height; the
    official frames are 456x256), for tests and benchmarks."""
    width, height = size or (None, None)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        native = stream.average_rate
        images = (frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BICUBIC")
                  for frame in container.decode(stream))
        return write_jpeg_frames(resampled(images, native, Fraction(rate) if rate else native), path,
                                 quality=quality)
