"""Stage two's data: the rows a split needs, packed once into one contiguous tensor, and TSN-style sampling.

``pack_split`` reads each video once and keeps the rows some segment covers (shared rows stored once):

    features   (R, 2048) float16   all packed rows
    row_start  (S,)      int64     segment s owns features[row_start[s] : row_start[s] + row_count[s]]
    row_count  (S,)      int64     >= 1

A batch is then one ``index_select`` (``PackedSplit.gather``), on the CPU or on the GPU holding the split.
Segments join rows by the stored timestamps (``start_sec <= pts < stop_sec``), never by counting frames.

With a ``Context`` the pack also holds the rows ``seconds`` before and after each segment (``context_before`` /
``context_after`` of them, packed right before and after its own), and a sampled sequence is K + T + K rows:
K from the context before, the segment's T, K from the context after (``sequence_offsets``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import track

from epicfeat.errors import EpicfeatError

if TYPE_CHECKING:  # the store is only needed for type hints; pack_split duck-types it
    from epicfeat.store import FeatureStore

#: Timestamps within this many seconds of a row's pts count as equal to it. Annotation times have 10 ms (or 1 ms)
#: resolution and rows are >= 1/90 s apart, so this only absorbs float rounding (3 * 0.1 != 0.3).
PTS_TOLERANCE = 1e-6

#: Rows read from the store per request while packing (rounded up to whole Zarr chunks): 16 MiB of float16.
_READ_BLOCK_ROWS = 4096

_REQUIRED_COLUMNS = ("narration_id", "participant_id", "video_id", "start_sec", "stop_sec")


class PackError(EpicfeatError):
    """A split that cannot be packed from a feature set (bad columns, unusable stored timestamps)."""


@dataclass(frozen=True)
class Context:
    """The rows around a segment that a head also sees: ``frames`` (K) rows from the ``seconds`` before the segment
    and K from the ``seconds`` after it, sampled by the segment's rule. ``Context()``: none."""

    seconds: float = 0.0
    frames: int = 0

    def __post_init__(self) -> None:
        if self.seconds < 0 or self.frames < 0 or (self.seconds > 0) != (self.frames > 0):
            raise ValueError(f"context: seconds and frames must both be > 0 or both 0, got {self.seconds}, "
                             f"{self.frames}")

    @classmethod
    def of_config(cls, config: Any) -> Context:
        """A train-temporal config's context (its ``context_seconds``; ``context_frames`` only with seconds > 0)."""
        return cls(config.context_seconds, config.context_frames if config.context_seconds > 0 else 0)

    def sequence_length(self, frames: int) -> int:
        """Rows a head reads per segment of ``frames`` (T) sampled rows: K + T + K."""
        return frames + 2 * self.frames


@dataclass(repr=False, eq=False)
class PackedSplit:
    """One split packed contiguously in memory (or a local memmap); built by ``pack_split`` (or by hand in tests)."""

    features: torch.Tensor  # (R, D) float16, the rows of all segments of the split, contiguous
    row_start: torch.Tensor  # (S,) int64: first row of each segment in `features`
    row_count: torch.Tensor  # (S,) int64: >= 1 rows per segment (after the clamping rules)
    verb_labels: torch.Tensor | None  # (S,) int64; None for the unlabelled test split
    noun_labels: torch.Tensor | None  # (S,) int64; None for the unlabelled test split
    narration_ids: list[str]
    participant_ids: list[str]
    video_ids: list[str]
    summary: dict[str, int] = field(default_factory=dict)
    feature_set: dict = field(default_factory=dict)  # FeatureSetIdentity.to_dict() of the store it came from
    missing_video_ids: tuple[str, ...] = ()  # videos the split needs that the store lacks (run extract for them)
    context: Context = Context()  # what sample_rows reads around each segment
    context_before: torch.Tensor | None = None  # (S,) int64 rows packed right before each segment's (with context)
    context_after: torch.Tensor | None = None  # (S,) int64 rows packed right after each segment's (with context)

    def __post_init__(self) -> None:
        n = len(self.row_start)
        if self.context.frames and (self.context_before is None or self.context_after is None):
            raise ValueError("PackedSplit: sampling with context needs the context_before / context_after counts "
                             "(pack the split with that context)")
        names = ("row_count", "narration_ids", "participant_ids", "video_ids", "verb_labels", "noun_labels",
                 "context_before", "context_after")
        lengths = {name: len(getattr(self, name)) for name in names if getattr(self, name) is not None}
        wrong = {name: length for name, length in lengths.items() if length != n}
        if wrong:
            raise ValueError(f"PackedSplit: row_start has {n} segments but {wrong}")
        if self.features.dim() != 2:
            raise ValueError(f"PackedSplit: features must be (rows, dim), got shape {tuple(self.features.shape)}")

    def __len__(self) -> int:
        return len(self.row_start)

    def __repr__(self) -> str:
        rows, dim = self.features.shape
        return (f"PackedSplit({len(self)} segments, {rows} rows x {dim} {self.features.dtype}, "
                f"device={self.features.device}, labelled={self.verb_labels is not None})")

    @property
    def device(self) -> torch.device:
        return self.features.device

    def segments_shorter_than(self, frames: int) -> int:
        """How many segments have fewer rows than ``frames`` (their rows repeat when sampled)."""
        return int((self.row_count < frames).sum())

    def sample_rows(self, segments: torch.Tensor, frames: int, *, train: bool,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Rows of ``features`` to read for each segment: (B, L) int64, L = K + T + K (``sequence_offsets``)."""
        segments = torch.as_tensor(segments, dtype=torch.int64, device=self.row_count.device)
        starts = self.row_start[segments].unsqueeze(1)  # (B, 1)
        around = {}
        if self.context.frames:
            around = dict(before=self.context_before[segments], after=self.context_after[segments],
                          context_frames=self.context.frames)
        offsets = sequence_offsets(self.row_count[segments], frames, train=train, generator=generator, **around)
        return starts + offsets  # (B, L)

    def gather(self, segments: torch.Tensor, frames: int, **sampling: Any) -> torch.Tensor:
        """Features of the sampled rows of each segment, (B, L, D) float16; ``sampling``: ``sample_rows``'s
        keywords."""
        rows = self.sample_rows(segments, frames, **sampling)  # (B, L)
        picked = self.features.index_select(0, rows.reshape(-1))  # (B * L, D)
        return picked.reshape(rows.shape[0], rows.shape[1], self.features.shape[1])  # (B, L, D)

    def to(self, device: torch.device | str) -> PackedSplit:
        """The same split with its tensors on ``device`` (a GPU can hold a whole packed split)."""
        tensors = ("features", "row_start", "row_count", "verb_labels", "noun_labels", "context_before",
                   "context_after")
        moved = {name: getattr(self, name) for name in tensors if getattr(self, name) is not None}
        return dataclasses.replace(self, **{name: tensor.to(device) for name, tensor in moved.items()})


def pack_split(store: FeatureStore, segments: pd.DataFrame, *, context: Context = Context(),
               progress: bool = True) -> PackedSplit:
    """Pack the rows ``segments`` (an annotation frame, order kept) cover in ``store``, and those of their
    ``context``, into one float16 array.

    Counted in ``summary``, never raised: a segment with no row inside gets the row nearest its midpoint
    (``empty_clamped``), one ending past the video's last row the rows that exist (``past_end_clamped``, see
    ``_rows_of_segments``); a segment whose video is not complete in the store is dropped (``missing_video_*``).
    Rows over half the available memory go to a memmap in the temp folder.
    """
    _check_columns(segments)
    join = join_rows(store, segments, context_seconds=context.seconds)
    row_start, total_rows = _place_videos(join.plans, join.lo, len(segments))
    out, memmapped = _allocate(total_rows, join.feature_dim or store.identity.feature_dim)
    _copy_videos(join.plans, out, progress)
    keep = join.keep
    kept = segments.loc[keep] if not keep.all() else segments
    row_count = (join.hi - join.lo)[keep]
    labelled = "verb_class" in segments.columns and "noun_class" in segments.columns
    summary = {
        "segments": int(keep.sum()), "rows": int(total_rows),
        "segment_rows": int(row_count.sum()),  # > rows when overlapping segments share rows
        "videos": len(join.plans), **join.counters, "missing_video_dropped": int((~keep).sum()),
        "missing_videos": len(join.missing), "packed_bytes": int(out.nbytes), "memmapped": int(memmapped),
    }
    return PackedSplit(
        features=torch.from_numpy(out),  # (R, D) float16, shares memory with `out` (RAM or memmap)
        row_start=torch.from_numpy(row_start[keep]), row_count=torch.from_numpy(row_count),
        verb_labels=torch.tensor(kept["verb_class"].to_numpy(dtype=np.int64)) if labelled else None,
        noun_labels=torch.tensor(kept["noun_class"].to_numpy(dtype=np.int64)) if labelled else None,
        narration_ids=kept["narration_id"].astype(str).tolist(),
        participant_ids=kept["participant_id"].astype(str).tolist(),
        video_ids=kept["video_id"].astype(str).tolist(),
        summary=summary, feature_set=store.identity.to_dict(), missing_video_ids=tuple(join.missing),
        context=context, **({"context_before": torch.from_numpy(join.before[keep]),
                             "context_after": torch.from_numpy(join.after[keep])} if context.frames else {}),
    )


@dataclass(eq=False)
class RowJoin:
    """Pass 1 of ``pack_split``: each segment's row range [lo, hi) in its video, and what to copy per video."""

    lo: np.ndarray  # (S,) int64 first row in the video
    hi: np.ndarray  # (S,) int64 one past the last row in the video
    keep: np.ndarray  # (S,) bool: the segment's video is in the store
    before: np.ndarray  # (S,) int64 context rows [lo - before, lo) (0 without context)
    after: np.ndarray  # (S,) int64 context rows [hi, hi + after) (0 without context)
    plans: list[_VideoPlan] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # videos not (completely) in the store, or without rows
    counters: dict[str, int] = field(default_factory=lambda: {"empty_clamped": 0, "past_end_clamped": 0})
    feature_dim: int | None = None


def join_rows(store: FeatureStore, segments: pd.DataFrame, *, context_seconds: float = 0.0) -> RowJoin:
    """Pass 1: per video, which rows each segment owns and which rows of its ``context_seconds`` before and after it
    (timestamps only; feature rows are read in pass 2). Also finetune's join (``epicfeat.clips.segment_rows``), so
    its clips are the frames stage two's rows came from."""
    complete = set(store.complete_videos())
    video_ids = segments["video_id"].astype(str).to_numpy()
    start_sec = segments["start_sec"].to_numpy(dtype=np.float64)
    stop_sec = segments["stop_sec"].to_numpy(dtype=np.float64)
    n = len(segments)
    join = RowJoin(lo=np.zeros(n, dtype=np.int64), hi=np.zeros(n, dtype=np.int64), keep=np.zeros(n, dtype=bool),
                   before=np.zeros(n, dtype=np.int64), after=np.zeros(n, dtype=np.int64))
    for video_id, positions in pd.Series(np.arange(n)).groupby(video_ids, sort=True):
        positions = positions.to_numpy()
        video = store.read(video_id) if video_id in complete else None
        pts = np.asarray(video.pts, dtype=np.float64) if video is not None else np.empty(0)
        if len(pts) == 0:
            join.missing.append(str(video_id))
            continue
        _check_video(store, video_id, pts, int(video.features.shape[1]), join.feature_dim)
        join.feature_dim = int(video.features.shape[1])
        lo, hi, n_empty, n_past = _rows_of_segments(pts, start_sec[positions], stop_sec[positions])
        before, after = _context_rows(pts, lo, hi, start_sec[positions] - context_seconds,
                                      stop_sec[positions] + context_seconds)
        join.counters["empty_clamped"] += n_empty
        join.counters["past_end_clamped"] += n_past
        join.lo[positions], join.hi[positions], join.keep[positions] = lo, hi, True
        join.before[positions], join.after[positions] = before, after
        needed = _needed_rows(len(pts), lo - before, hi + after)
        join.plans.append(_VideoPlan(video_id=str(video_id), video=video, needed=needed, positions=positions))
    return join


def _check_video(store: FeatureStore, video_id: str, pts: np.ndarray, dim: int, feature_dim: int | None) -> None:
    """Refuse a video whose rows cannot be joined (pts going backwards) or packed (another feature width)."""
    backwards = np.flatnonzero(np.diff(pts) < 0)
    if len(backwards):
        raise PackError(f"feature set {getattr(store, 'path', store)}: video {video_id} has stored row "
                        f"timestamps (pts) that go backwards at row {backwards[0] + 1}, so segments cannot be "
                        f"joined to its rows. Extract it again into a new cache folder "
                        f"(epicfeat extract --video-ids {video_id}).")
    if feature_dim is not None and dim != feature_dim:
        raise PackError(f"feature set {getattr(store, 'path', store)}: video {video_id} has {dim}-d rows but "
                        f"earlier videos have {feature_dim}-d rows. Re-extract it into one feature set.")


def _copy_videos(plans: list[_VideoPlan], out: np.ndarray, progress: bool) -> None:
    """Pass 2: copy the needed rows into ``out``; videos fill disjoint slices, so a few threads read at once."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        copies = as_completed([pool.submit(_copy_needed_rows, plan, out) for plan in plans])
        if progress:
            copies = track(copies, description="Packing features", total=len(plans), console=Console(stderr=True),
                           transient=True)
        for copy in copies:
            copy.result()  # re-raises a failed read here


def _place_videos(plans: list[_VideoPlan], local_lo: np.ndarray, n_segments: int) -> tuple[np.ndarray, int]:
    """Where each video's needed rows land in the packed array: (row_start (S,), total rows); sets plan.offset."""
    offset = 0
    row_start = np.zeros(n_segments, dtype=np.int64)
    for plan in plans:
        packed_position = np.cumsum(plan.needed) - 1  # (rows_in_video,) index among the video's needed rows
        row_start[plan.positions] = offset + packed_position[local_lo[plan.positions]]
        plan.offset = offset
        offset += int(plan.needed.sum())
    return row_start, offset


#: Bump when the layout of a cached pack changes: older caches are then rebuilt, never misread.
PACK_CACHE_VERSION = 2
_PACK_LABEL_COLUMNS = ("verb_class", "noun_class")


def cached_pack_split(store: FeatureStore, segments: pd.DataFrame, name: str, *, context: Context = Context(),
                      progress: bool = True) -> PackedSplit:
    """``pack_split``, kept on disk in ``<cache>/.packed/<feature set key>/<name>-<digest>/``: ``features.npy``
    (memory-mapped on load) and ``index.pt``. The digest covers the segments, the context's seconds and the stored
    attributes of every video they need, so any change gives a fresh pack; written by rename."""
    store_path = Path(store.path)
    target = store_path.parent / ".packed" / store_path.name / f"{name}-{_pack_digest(store, segments, context)}"
    if (target / "index.pt").is_file():
        try:
            # The rows packed depend on the context's seconds (in the digest); K is how they are sampled.
            return dataclasses.replace(_load_pack(target), context=context)
        except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError):
            shutil.rmtree(target, ignore_errors=True)  # unreadable (disk trouble, a foreign file): pack again
    split = pack_split(store, segments, context=context, progress=progress)
    try:
        _save_pack(split, target)
    except OSError:
        pass  # a read-only or full disk costs the next run a re-pack, never this run
    return split


def packed_split(store: FeatureStore, segments: pd.DataFrame, name: str, *, cache: bool, progress: bool,
                 context: Context = Context()) -> PackedSplit:
    """The split ``name`` packed with ``context``, through the on-disk cache when ``cache``: train-temporal's and
    evaluate's reader."""
    if cache:
        return cached_pack_split(store, segments, name, context=context, progress=progress)
    return pack_split(store, segments, context=context, progress=progress)


def _pack_digest(store: Any, segments: pd.DataFrame, context: Context) -> str:
    columns = [c for c in (*_REQUIRED_COLUMNS, *_PACK_LABEL_COLUMNS) if c in segments.columns]
    table = segments[columns].to_csv(index=False).encode()
    complete = set(store.complete_videos())
    needed = sorted({str(v) for v in segments["video_id"]})
    attrs = {v: (store.video_attrs(v) if v in complete else None) for v in needed}
    content = json.dumps({"version": PACK_CACHE_VERSION, "identity": store.identity.to_dict(), "videos": attrs,
                          "context_seconds": context.seconds}, sort_keys=True, default=str).encode()
    return hashlib.sha256(table + b"\0" + content).hexdigest()[:16]


#: What index.pt holds besides the feature set (saved as JSON text: weights_only loads no arbitrary values).
_INDEX_FIELDS = ("row_start", "row_count", "verb_labels", "noun_labels", "narration_ids", "participant_ids",
                 "video_ids", "summary", "missing_video_ids", "context_before", "context_after")


def _save_pack(split: PackedSplit, target: Path) -> None:
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    try:
        np.save(partial / "features.npy", split.features.numpy())
        index = {name: getattr(split, name) for name in _INDEX_FIELDS}
        torch.save({**index, "feature_set": json.dumps(split.feature_set)}, partial / "index.pt")
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _load_pack(target: Path) -> PackedSplit:
    index = torch.load(target / "index.pt", weights_only=True)
    # Copy-on-write mapping: pages load on demand (a GPU upload streams them), and the tensor is writable.
    features = torch.from_numpy(np.load(target / "features.npy", mmap_mode="c"))  # (R, D) float16
    fields = {name: index[name] for name in _INDEX_FIELDS}
    fields["summary"] = {**fields["summary"], "loaded_from_cache": 1}
    return PackedSplit(features=features, feature_set=json.loads(index["feature_set"]), **fields)


def feature_stats(split: PackedSplit, *, chunk_rows: int = 8192,
                  min_std: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and population std (clamped to ``min_std``: dead ReLU channels) of the packed rows, each
    row once: two (D,) float32 CPU tensors. float64 sums of shifted rows (no cancellation), by matrix products."""
    features = split.features
    if features.shape[0] == 0:
        raise PackError("cannot compute feature statistics of an empty split (no rows were packed)")
    shift = features[:chunk_rows].to(torch.float64).mean(dim=0)  # (D,)
    sums = torch.zeros(2, features.shape[1], dtype=torch.float64, device=features.device)  # (2, D): x, x**2
    for begin in range(0, features.shape[0], chunk_rows):
        centred = features[begin:begin + chunk_rows].to(torch.float64) - shift  # (n, D)
        ones = centred.new_ones(1, centred.shape[0])  # (1, n)
        sums[0] += (ones @ centred)[0]
        sums[1] += (ones @ centred.square_())[0]
    count = features.shape[0]
    mean_offset = sums[0] / count  # (D,) mean - shift
    variance = (sums[1] / count - mean_offset**2).clamp(min=0)
    std = torch.sqrt(variance).clamp(min=min_std)
    return (shift + mean_offset).float().cpu(), std.float().cpu()


@dataclass(eq=False)
class _VideoPlan:
    video_id: str
    video: Any  # VideoFeatures: .features (rows, D) array-like (zarr or numpy), .pts (rows,)
    needed: np.ndarray  # (rows,) bool: rows some segment owns
    positions: np.ndarray  # indices into the segments frame of this video's segments
    offset: int = 0  # first packed row of this video


def _check_columns(segments: pd.DataFrame) -> None:
    absent = [c for c in _REQUIRED_COLUMNS if c not in segments.columns]
    if absent:
        raise PackError(f"segments table lacks columns {absent} (has {list(segments.columns)}). "
                        "Read it with epicfeat.data.annotations (EpicAnnotations.segments or read_segments).")


def bin_offsets(counts: torch.Tensor, frames: int, *, train: bool,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T) int64 positions in [0, count) of the T rows read from segments of ``counts`` (B,) rows: T equal bins,
    a uniform draw in each when training (from ``generator``, CPU or the counts' device), else each bin's centre.
    The one TSN rule (``sequence_offsets`` applies it to a segment and its context). Fewer rows than bins repeat
    rows."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    device = counts.device
    counts = counts.unsqueeze(1)  # (B, 1)
    bins = torch.arange(frames, device=device).unsqueeze(0)  # (1, T)
    if not train:
        # Centre of bin k is (k + 0.5) * count / T; integer arithmetic makes it exact.
        return ((2 * bins + 1) * counts) // (2 * frames)  # (B, T)
    draw_device = generator.device if generator is not None else device
    uniform = torch.rand((len(counts), frames), generator=generator, device=draw_device).to(device)  # (B, T)
    # Bin k's uniform row floor((k * count + v) / T), v ~ U[0, count), equals floor((k * count + floor(v)) / T):
    # exact integer arithmetic, no float64. The minimum guards float32 rounding of v up to count.
    within = torch.minimum((uniform * counts).long(), counts - 1)  # (B, T) j in [0, count)
    return (bins * counts + within) // frames  # (B, T)


def sequence_offsets(counts: torch.Tensor, frames: int, *, train: bool, generator: torch.Generator | None = None,
                     before: torch.Tensor | None = None, after: torch.Tensor | None = None,
                     context_frames: int = 0) -> torch.Tensor:
    """(B, K + T + K) int64 positions, relative to each segment's first row, of the rows a head reads: K from the
    ``before`` (B,) rows right before the segment, T from its ``counts`` (B,) rows, K from the ``after`` (B,) rows
    right after it, each side by ``bin_offsets`` (drawn in that order: segment, before, after). A side without rows
    repeats the segment's edge row (a segment at the start or end of its video). K = 0: ``bin_offsets`` alone.
    Stage two's, finetune's clips' and predict's windows' one rule."""
    segment = bin_offsets(counts, frames, train=train, generator=generator)  # (B, T) in [0, count)
    if not context_frames:
        return segment
    sampled = functools.partial(bin_offsets, frames=context_frames, train=train, generator=generator)
    rows_before = sampled(before.clamp(min=1)) - before.unsqueeze(1)  # (B, K) in [-before, 0); 0 when none
    rows_after = sampled(after.clamp(min=1)) + (counts - (after == 0).long()).unsqueeze(1)  # (B, K) from count on
    return torch.cat([rows_before, segment, rows_after], dim=1)  # (B, K + T + K)


def _context_rows(pts: np.ndarray, lo: np.ndarray, hi: np.ndarray, context_start: np.ndarray,
                  context_stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) (S,) int64: rows from ``context_start`` up to each segment's first row ``lo``, and from its
    end ``hi`` up to ``context_stop`` (seconds, the segment's times widened by the context; 0 rows without it)."""
    first = np.searchsorted(pts, context_start - PTS_TOLERANCE, side="left")  # first row with pts >= start - S
    end = np.searchsorted(pts, context_stop - PTS_TOLERANCE, side="left")  # first row with pts >= stop + S
    return np.maximum(lo - first, 0).astype(np.int64), np.maximum(end - hi, 0).astype(np.int64)


def _rows_of_segments(pts: np.ndarray, start_sec: np.ndarray,
                      stop_sec: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Row range [lo, hi) of each segment of one video (float64 seconds): rows with start_sec <= pts < stop_sec,
    else the row nearest the midpoint, else (past the end) the last row; and how many were clamped (empty, past)."""
    n = len(pts)
    lo = np.searchsorted(pts, start_sec - PTS_TOLERANCE, side="left")  # first row with pts >= start
    hi = np.searchsorted(pts, stop_sec - PTS_TOLERANCE, side="left")  # first row with pts >= stop
    # The last row stands for one row interval of video; a segment ending later needs rows that do not exist.
    interval = float(np.median(np.diff(pts))) if n > 1 else 0.0
    past_end = stop_sec > pts[-1] + interval + PTS_TOLERANCE
    empty = hi <= lo

    # No row inside and past the end: the last row.
    beyond = empty & past_end
    lo[beyond], hi[beyond] = n - 1, n

    # No row inside otherwise (zero length, or between two rows): the row nearest the midpoint.
    between = empty & ~past_end
    midpoint = (start_sec[between] + stop_sec[between]) / 2
    right = np.clip(np.searchsorted(pts, midpoint), 0, n - 1)
    left = np.clip(right - 1, 0, n - 1)
    nearest = np.where(np.abs(pts[right] - midpoint) < np.abs(midpoint - pts[left]), right, left)
    lo[between], hi[between] = nearest, nearest + 1
    return lo.astype(np.int64), hi.astype(np.int64), int(between.sum()), int(past_end.sum())


def _needed_rows(n_rows: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(n_rows,) bool mask of the rows inside any [lo, hi) range (a difference array, no loop over segments)."""
    delta = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(delta, lo, 1)
    np.add.at(delta, hi, -1)
    return np.cumsum(delta[:-1]) > 0


def _copy_needed_rows(plan: _VideoPlan, out: np.ndarray) -> None:
    """Copy a video's needed rows into ``out`` from ``plan.offset`` on, reading whole chunks once each."""
    features = plan.video.features
    chunk_rows = int(getattr(features, "chunks", (1,))[0] or 1)
    block_rows = -(-max(_READ_BLOCK_ROWS, chunk_rows) // chunk_rows) * chunk_rows  # whole chunks, so none is read twice
    destination = plan.offset
    for block_begin in range(0, len(plan.needed), block_rows):
        mask = plan.needed[block_begin:block_begin + block_rows]
        if not mask.any():
            continue
        first = int(mask.argmax())  # trim the read to the needed rows inside the block
        last = len(mask) - int(mask[::-1].argmax())
        block = np.asarray(features[block_begin + first:block_begin + last])  # (n, D)
        rows = block[mask[first:last]]  # (k, D)
        out[destination:destination + len(rows)] = rows
        destination += len(rows)


def _allocate(rows: int, dim: int) -> tuple[np.ndarray, bool]:
    """A (rows, dim) float16 array in RAM, or in a memmap file when it is larger than the memory budget."""
    budget = _memory_budget()
    if budget is None or rows * dim * 2 <= budget or rows == 0:
        return np.empty((rows, dim), dtype=np.float16), False
    path = Path(tempfile.gettempdir()) / f"epicfeat-packed-{os.getpid()}-{uuid.uuid4().hex[:8]}.f16"
    array = np.memmap(path, dtype=np.float16, mode="w+", shape=(rows, dim))
    if os.name == "posix":
        # The mapping keeps the data; unlinking now means no multi-GB file is left behind by a crash or a kill.
        path.unlink()
    return array, True


def _memory_budget() -> int | None:
    """Half of the memory available now (Linux /proc/meminfo), or None (no limit) where that is unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return None
