"""Feature sets on disk: per-video Zarr v3 arrays of feature rows, completed atomically, checkable, exportable.

This module is the only code that knows the layout. A feature set is one folder per ``FeatureSetIdentity`` (all
that changes the numbers: backbone, weights, preprocessing, precision, run settings), named by its key::

    <cache>/<identity.key()>/             a Zarr v3 group (zarr.json)
        featureset.json                   the identity and epicfeat version: written once, atomically
        failures/<video>.<time>.<token>.json   one file per failure record
        .claims/P01_02.claim              the claim of the one writer allowed to write P01_02 (see claims.py)
        videos/                           a Zarr v3 group; holds COMPLETE videos only
            P01_01/                       a group; attrs: source_fps, duration, source_path, width, height,
                features  (rows, dim)     float16, chunks of ~1 MiB along time          rows, provenance,
                pts       (rows,)         float64 seconds, from the stream               checksums, complete
                frame_index (rows,)       int64, 0-based position in presentation order
                span      (rows, 2)       float64 seconds: the first and last frame a row saw (a video
                                          backbone's clip; an image row's span is its pts twice)
        .partial/P01_02.<host>-<pid>-<random>/        a video being written (or left by a crash)
        .trash/                           old copies moved aside by an overwrite, deleted right after

A video is complete iff it is in ``videos/`` with ``complete: true``; partial iff a ``.partial/`` folder exists for
it and it is not complete; failed iff it has a failure record and is not complete (recording a failure removes the
video's abandoned partial folders, so the three states never overlap).

A writer holds the video's claim (claims.py), builds the video in its own ``.partial/`` folder and commits by renaming
it into ``videos/`` (atomic on POSIX: a kill leaves at most a partial folder), only while the claim is still its own
and every chunk it wrote is on disk. Missing chunks read back as the fill value, so NaN / -1 fill values make a lost
chunk visible to ``verify``, which also recomputes the sha256 of every chunk stored at commit.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from epicfeat import __version__
from epicfeat.claims import DEFAULT_LEASE_S, Claim, claim_owner, unique_token, utc_now
from epicfeat.errors import EpicfeatError
from epicfeat.files import atomic_write_text

#: Bytes per chunk of ``features`` at most: about 1 MiB is the documented sweet spot for Zarr chunks.
FEATURE_CHUNK_BYTES = 1 << 20
#: Chunks buffered before a write (4 MiB): one Zarr write (and one resize of three arrays) per 4 chunks, not per batch.
FLUSH_CHUNKS = 4
#: Rows per chunk of ``pts`` and ``frame_index`` (8 bytes a row: 128 KiB chunks, a few per hour of video).
INDEX_CHUNK_ROWS = 16384
#: Attributes the extractor gives every video (checked by ``verify``); the store adds rows, provenance, complete.
SOURCE_ATTRS = ("source_path", "source_fps", "duration", "width", "height")
STORE_ATTRS = ("rows", "provenance", "complete")

_MARKER = "featureset.json"
_VIDEOS = "videos"
_PARTIAL = ".partial"
_TRASH = ".trash"
_CLAIMS = ".claims"
_FAILURE_RECORDS = "failures"
_LAYOUT_VERSION = 1
_VIDEO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a folder name: no '/', no leading dot


class StoreError(EpicfeatError):
    """A feature set that is missing, mismatched or inconsistent; the message names the folder and the video."""


class ClaimLostError(StoreError):
    """The writer's claim on its video expired or was taken over: its copy is discarded, never published."""


class CompletedElsewhereError(StoreError):
    """Another writer completed the video first: this copy is discarded and the video is complete."""


def feature_chunk_rows(feature_dim: int, dtype: str | np.dtype) -> int:
    """Rows per chunk of ``features``: the largest power of two whose chunk fits ``FEATURE_CHUNK_BYTES``
    (2048-d float16: 256 rows, 1 MiB; 768-d float16: 512 rows, 0.75 MiB)."""
    rows = max(1, FEATURE_CHUNK_BYTES // (int(feature_dim) * np.dtype(dtype).itemsize))
    return 1 << (rows.bit_length() - 1)


# ------------------------------------------------------------------------------------------------- identity
@dataclass(frozen=True, kw_only=True)
class FeatureSetIdentity:
    """Everything that changes the cached numbers. Two runs share a feature set only if all of it is equal."""

    weights: str  # backbone.weights_name, e.g. "imagenet1k_v2", "random-seed0", "file:ft.pt"
    weights_sha: str  # backbone.weights_sha (hash of the state dict)
    fps: float | None  # sampling rate of rows (None = every frame)
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # the resize filter (frames.INTERPOLATIONS), the backbone's pretrained recipe's
    backbone: str = "resnet50"
    dtype: str = "float16"  # stored dtype of features
    feature_dim: int = 2048
    precision: str = "fp32"  # compute precision of the backbone (bf16 autocast changes the numbers)
    # The run settings that change the numbers too (NUMERIC_SETTINGS), as `extract` ran them:
    decoder: str  # e.g. "pyav-18.1.0-libavcodec-62.28.102": PyAV 17 changed HD colour conversion
    device: str  # "cpu-AVX512" / "cuda-NVIDIA H200": kernels (and bf16 emulation) differ per ISA/GPU
    tf32: bool  # CUDA only: "fp32" convolutions in TF32
    batch_size: int  # rows per model batch: kernels are chosen per batch shape
    channels_last: bool  # memory layout of the backbone: another convolution path
    compile: bool  # torch.compile fuses ops: other rounding
    fold_bn: bool  # batch norms folded into the convolutions: other rounding
    # What was read, and its time base: "video" (video files, times from their pts), "frames-epic" (the official
    # JPEG frames, 60 / 50 fps by id), "frames-30fps" (--frames-fps 30). Other pixels: another feature set.
    source: str = "video"
    # A video backbone's rows are clips of clip_len frames at clip_fps (image backbones: 1 frame, None)
    clip_len: int = 1
    clip_fps: float | None = None

    def __post_init__(self):
        # Normalise so that identities read back from JSON compare (and hash) equal to the ones built in code.
        object.__setattr__(self, "fps", None if self.fps is None else float(self.fps))
        object.__setattr__(self, "resize", int(self.resize))
        object.__setattr__(self, "crop", int(self.crop))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "feature_dim", int(self.feature_dim))
        object.__setattr__(self, "batch_size", int(self.batch_size))
        object.__setattr__(self, "clip_len", int(self.clip_len))
        object.__setattr__(self, "clip_fps", None if self.clip_fps is None else float(self.clip_fps))
        try:
            is_float = np.dtype(self.dtype).kind == "f"
        except TypeError:
            is_float = False
        if not is_float:
            raise StoreError(f"feature set dtype must be a float type such as float16, got {self.dtype!r}")

    def key(self) -> str:
        """Folder name: readable, plus a short hash of every field so that no two identities share a folder."""
        fps = "all" if self.fps is None else f"{self.fps:g}"
        readable = f"{self.backbone}_{self.weights}_fps{fps}_r{self.resize}c{self.crop}_{self.dtype}"
        readable = re.sub(r"[^A-Za-z0-9._-]+", "-", readable)[:100]
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return f"{readable}_{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"

    def to_dict(self) -> dict:
        """A JSON-safe dict of every field (tuples become lists)."""
        return {f.name: _json_safe(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSetIdentity":
        """Inverse of ``to_dict``; unknown keys are an error (a feature set written by a newer epicfeat)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StoreError(f"feature-set identity has unknown fields {unknown}; was it written by a newer epicfeat? "
                             f"Upgrade epicfeat (this is {__version__}).")
        try:
            return cls(**d)
        except TypeError as err:
            raise StoreError(f"feature-set identity {d} is incomplete: {err}") from None


#: The identity's run settings: how `extract` ran, besides the weights and the preprocessing (`cache info` shows them).
NUMERIC_SETTINGS = ("decoder", "device", "tf32", "batch_size", "channels_last", "compile", "fold_bn")


@dataclass
class VideoFeatures:
    """One complete video: ``features`` stays a lazy Zarr array (slice it); the timestamps are in memory."""

    video_id: str
    features: zarr.Array  # (rows, feature_dim) float16, chunked along time
    pts: np.ndarray  # (rows,) float64 seconds, strictly increasing
    frame_indices: np.ndarray  # (rows,) int64, 0-based source frame positions
    span: zarr.Array  # (rows, 2) float64 seconds: first and last frame each row saw
    attrs: dict = field(default_factory=dict)  # source_fps, duration, source_path, width, height, provenance, ...

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])


# ---------------------------------------------------------------------------------------------------- store
class FeatureStore:
    """One feature set folder. Build it with ``create`` (or ``open`` an existing one), never directly."""

    def __init__(self, path: Path, identity: FeatureSetIdentity):
        self.path = Path(path)
        self.identity = identity

    # ----------------------------------------------------------------------------------------- open / create
    @classmethod
    def create(cls, cache_dir: str | os.PathLike, identity: FeatureSetIdentity) -> "FeatureStore":
        """The feature set for ``identity`` under ``cache_dir``: created if new (built aside and renamed into place,
        so several processes may call it at once), else opened and checked."""
        cache_dir = Path(cache_dir)
        path = cache_dir / identity.key()
        if not path.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            staging = cache_dir / f".{identity.key()}.{unique_token()}.tmp"
            try:
                _build_empty_set(staging, identity)
                os.rename(staging, path)
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # anything but "another process won"
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        store = cls.open(path)
        if store.identity != identity:
            raise StoreError(
                f"feature set {path} holds identity {store.identity.to_dict()} but {identity.to_dict()} was "
                "requested. The folder name no longer matches its contents: move it out of the cache folder."
            )
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> "FeatureStore":
        """Open the feature set folder ``path`` (the one holding featureset.json)."""
        path = Path(path)
        marker = path / _MARKER
        if not marker.is_file():
            inside = [p.parent.name for p in sorted(path.glob(f"*/{_MARKER}"))] if path.is_dir() else []
            hint = (f"it is a cache folder holding the feature sets {', '.join(inside)}; "
                    "pass one of those folders" if inside else "create one with `epicfeat extract`")
            raise StoreError(f"{path} is not a feature set (no {_MARKER}): {hint}.")
        try:
            meta = json.loads(marker.read_text())
            identity = FeatureSetIdentity.from_dict(meta["identity"])
        except (ValueError, KeyError, TypeError) as err:
            raise StoreError(f"{marker} is unreadable ({err}); the feature set is damaged: delete the folder "
                             "and extract again.") from None
        return cls(path, identity)

    @staticmethod
    def list_sets(cache_dir: str | os.PathLike) -> list["FeatureStore"]:
        """Every feature set directly under ``cache_dir``, sorted by key ([] when the folder does not exist)."""
        cache_dir = Path(cache_dir)
        if not cache_dir.is_dir():
            return []
        return [FeatureStore.open(p) for p in sorted(cache_dir.iterdir()) if (p / _MARKER).is_file()]

    # ------------------------------------------------------------------------------------------- listing
    def complete_videos(self) -> list[str]:
        """Sorted ids of the complete videos."""
        videos = self.path / _VIDEOS
        names = sorted(p.name for p in videos.iterdir() if not p.name.startswith(".")) if videos.is_dir() else []
        return [name for name in names if self.is_complete(name)]

    def is_complete(self, video_id: str) -> bool:
        """True iff the video is in ``videos/`` and marked complete (its rename was the last step of a commit)."""
        return self.video_attrs(video_id).get("complete") is True

    def video_attrs(self, video_id: str) -> dict:
        """The stored attributes of a video ({} when it has none): rows, duration, provenance, checksums, ..."""
        # Read the group's zarr.json directly: listing hundreds of videos must not open hundreds of Zarr groups.
        try:
            return json.loads((self.path / _VIDEOS / video_id / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            return {}

    def partial_videos(self) -> list[str]:
        """Sorted ids of videos that were started but are not complete (a crash, an abort, or a live writer)."""
        started = {video_id for video_id, _ in self._partial_folders()}
        return sorted(v for v in started if not self.is_complete(v))

    # ------------------------------------------------------------------------------------------- claims
    def claim(self, video_id: str, *, lease_s: float = DEFAULT_LEASE_S) -> Claim | None:
        """Claim ``video_id`` for writing (held and renewed until released); None when a live writer holds it."""
        _check_video_id(video_id)
        return Claim.take(self.path / _CLAIMS, video_id, lease_s=lease_s)

    def claim_owner(self, video_id: str, *, lease_s: float = DEFAULT_LEASE_S) -> str | None:
        """The token of the fresh claim on ``video_id`` (None when nobody holds one, or it is stale)."""
        return claim_owner(self.path / _CLAIMS, video_id, lease_s=lease_s)

    # ------------------------------------------------------------------------------------------- writing
    def writer(self, video_id: str, *, attrs: dict, claim: Claim | None = None, overwrite: bool = False) -> "VideoWriter":
        """A writer for one video (a context manager); ``attrs`` should hold ``SOURCE_ATTRS``. A complete video is
        refused unless ``overwrite=True``. ``claim``: the caller's claim on the video, which the caller releases;
        without one the writer claims the video itself until closed. Removes the video's abandoned partial folders.
        """
        _check_video_id(video_id)
        if not overwrite and self.is_complete(video_id):
            raise StoreError(f"video {video_id} is already complete in feature set {self.path}; pass overwrite=True "
                             "to replace it.")
        own_claim = claim is None
        if own_claim:
            claim = self.claim(video_id)
            if claim is None:
                raise StoreError(f"video {video_id} is being written by another writer (claim "
                                 f"{self.claim_owner(video_id)}) in {self.path}; wait for it to finish")
        elif claim.video_id != video_id:
            raise StoreError(f"the claim on {claim.video_id} cannot write video {video_id}")
        elif not claim.held():
            raise ClaimLostError(f"video {video_id}: the claim {claim.token} is no longer held in {self.path}")
        self._remove_abandoned(video_id)
        return VideoWriter(self, claim, attrs=attrs, overwrite=overwrite, own_claim=own_claim)

    # ------------------------------------------------------------------------------------------- reading
    def read(self, video_id: str) -> VideoFeatures:
        """The rows of a complete video: features lazily (a Zarr array), pts and frame indices as numpy."""
        if not self.is_complete(video_id):
            state = "only partially written (a crash?)" if video_id in self.partial_videos() else "not in it"
            raise StoreError(f"video {video_id} is {state} in feature set {self.path}; run "
                             f"`epicfeat extract --video-ids {video_id}` to (re)extract it.")
        try:
            group = zarr.open_group(self.path / _VIDEOS / video_id, mode="r")
            features = group["features"]
            pts = np.asarray(group["pts"][:], dtype=np.float64)
            frame_indices = np.asarray(group["frame_index"][:], dtype=np.int64)
            span = group["span"]
        except (KeyError, FileNotFoundError, ValueError) as err:
            raise StoreError(f"video {video_id} in feature set {self.path} is damaged ({err!r}); run "
                             "`epicfeat cache verify` and re-extract it.") from None
        return VideoFeatures(video_id, features, pts, frame_indices, span, dict(group.attrs))

    # ------------------------------------------------------------------------------------------- failures
    def record_failure(self, video_id: str, reason: str, *, path: str | os.PathLike | None = None,
                       claim: Claim | None = None) -> None:
        """Write one failure record (its own file, renamed in: NFS appends can interleave) and drop the video's
        abandoned partial folders. The same failure as the latest record is not recorded again. ``claim`` (the
        writer's) is recorded so that writers waiting on it know the video failed; without one the video is claimed
        for the moment, and a live writer's folder is left alone.
        """
        own = self.claim(video_id) if claim is None and _VIDEO_ID.match(video_id) else None
        holder = claim or own
        try:
            path = None if path is None else str(path)
            previous = self.failure_recorded_since(video_id, 0.0)
            if previous is None or (previous.get("reason"), previous.get("path")) != (str(reason), path):
                now = datetime.now(timezone.utc)
                record = {"video_id": video_id, "reason": str(reason), "path": path,
                          "time": now.isoformat(timespec="microseconds"), "claim": holder and holder.token}
                safe_id = re.sub(r"[^A-Za-z0-9_.-]+", "-", video_id)[:100] or "unnamed"
                name = f"{safe_id}.{now:%Y%m%dT%H%M%S%fZ}.{unique_token()}.json"  # sorts by video, then time
                atomic_write_text(self.path / _FAILURE_RECORDS / name, json.dumps(record) + "\n")
            if holder is not None:
                self._remove_abandoned(video_id)
        finally:
            if own is not None:
                own.release()

    def failure_records(self) -> list[dict]:
        """Every failure record, oldest first."""
        return sorted(self._read_failures("*"), key=lambda r: r["time"])

    def failure_recorded_since(self, video_id: str, since: float) -> dict | None:
        """The latest failure record of ``video_id`` written at or after ``since`` (a Unix time), or None."""
        records = [r for r in self._read_failures(f"{video_id}.*") if r["video_id"] == video_id]
        recent = [r for r in records if datetime.fromisoformat(r["time"]).timestamp() >= since]
        return max(recent, key=lambda r: r["time"], default=None)

    def failures(self) -> dict[str, dict]:
        """The latest failure record per video, for videos that are not complete now (a later success wins)."""
        latest = {record["video_id"]: record for record in self.failure_records()}
        return {v: r for v, r in sorted(latest.items()) if not self.is_complete(v)}

    # ------------------------------------------------------------------------------------------- checking
    def info(self) -> dict:
        """Counts for `cache info`: videos complete / partial / failed, rows, hours of video, bytes on disk."""
        complete = self.complete_videos()
        attrs = [self.video_attrs(video_id) for video_id in complete]
        rows = sum(int(a.get("rows", 0)) for a in attrs)
        seconds = sum(float(a.get("duration") or 0.0) for a in attrs)
        return {"key": self.path.name, "path": str(self.path), "identity": self.identity.to_dict(),
                "videos_complete": len(complete), "videos_partial": len(self.partial_videos()),
                "videos_failed": len(self.failures()), "rows": rows, "hours": seconds / 3600,
                "bytes": folder_bytes(self.path)}

    def verify(self) -> list[str]:
        """Check every complete video (shape, row counts, timestamps, NaN/inf, attributes); [] means all fine."""
        problems = []
        if self.path.name != self.identity.key():
            problems.append(f"feature set folder {self.path.name} does not match its identity's key "
                            f"{self.identity.key()} (renamed by hand?)")
        videos = self.path / _VIDEOS
        for folder in sorted(videos.iterdir()) if videos.is_dir() else []:
            if folder.is_dir() and not self.is_complete(folder.name):
                problems.append(f"{folder.name}: in videos/ but not marked complete (damaged zarr.json?); "
                                f"re-extract it: `epicfeat extract --video-ids {folder.name}`")
        for video_id in self.complete_videos():
            problems += [f"{video_id}: {p}" for p in self._verify_video(video_id)]
        return problems

    def _verify_video(self, video_id: str) -> list[str]:
        """Problems of one complete video; a damaged chunk is reported (with its reason), never raised."""
        try:
            group = zarr.open_group(self.path / _VIDEOS / video_id, mode="r")
            attrs = dict(group.attrs)
        except Exception as err:  # zarr raises ValueError, OSError, JSON errors...: report, check the next video
            return [f"cannot be opened as a Zarr group: {err}"]
        problems = []
        missing_attrs = [k for k in SOURCE_ATTRS + STORE_ATTRS if k not in attrs]
        if missing_attrs:
            problems.append(f"attributes missing: {', '.join(missing_attrs)}")
        sha = (attrs.get("provenance") or {}).get("weights_sha")
        if sha is not None and sha != self.identity.weights_sha:
            problems.append(f"written with weights {sha}, but the feature set is {self.identity.weights_sha}")
        arrays = {}
        for name in ("features", "pts", "frame_index", "span"):
            try:
                arrays[name] = group[name]
            except Exception:  # KeyError, or damaged array metadata
                problems.append(f"array '{name}' is missing or its metadata is unreadable")
        if len(arrays) < 4:
            return problems
        features, pts_array, frames_array = arrays["features"], arrays["pts"], arrays["frame_index"]
        dim = self.identity.feature_dim
        if features.ndim != 2 or features.shape[1] != dim:
            return problems + [f"features have shape {features.shape}, expected (rows, {dim})"]
        if features.dtype != np.dtype(self.identity.dtype):
            problems.append(f"features are {features.dtype}, expected {self.identity.dtype}")
        rows = features.shape[0]
        counts = {"features": rows, "pts": pts_array.shape[0], "frame_index": frames_array.shape[0],
                  "span": arrays["span"].shape[0], "attribute rows": attrs.get("rows", rows)}
        if len(set(counts.values())) > 1:
            problems.append("row counts disagree: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                            + " (truncated array?)")
        for name, array in arrays.items():
            if array.nchunks_initialized < array.nchunks:
                problems.append(f"{name}: {array.nchunks - array.nchunks_initialized} of {array.nchunks} chunks "
                                "missing on disk")
        checksums = attrs.get("checksums") or {}
        problems += self._verify_index(pts_array, frames_array, arrays["span"], checksums)
        problems += self._verify_features(features, checksums)
        problems += _verify_row_count(rows, attrs, self.identity.fps)
        return problems

    @staticmethod
    def _verify_index(pts_array, frames_array, span_array, checksums: dict) -> list[str]:
        problems = []
        try:
            pts = np.asarray(pts_array[:], dtype=np.float64)
            frames = np.asarray(frames_array[:], dtype=np.int64)
            span = np.asarray(span_array[:], dtype=np.float64)
        except Exception as err:  # a truncated or garbled chunk fails to decode
            return [f"pts / frame_index / span chunks cannot be read ({type(err).__name__}: {err})"]
        for name, values in (("pts", pts), ("frame_index", frames), ("span", span)):
            expected = checksums.get(name)
            if expected and hashlib.sha256(values.tobytes()).hexdigest() != expected:
                problems.append(f"{name} do not match the checksum stored at commit (silent corruption)")
        if not np.all(np.isfinite(pts)):
            problems.append(f"pts hold NaN/inf at row {int(np.flatnonzero(~np.isfinite(pts))[0])}")
        elif len(pts) > 1 and np.any(np.diff(pts) <= 0):
            problems.append(f"pts are not strictly increasing at row {int(np.flatnonzero(np.diff(pts) <= 0)[0]) + 1}")
        if len(frames) and (frames.min() < 0 or np.any(np.diff(frames) <= 0)):
            problems.append("frame_index is not a strictly increasing run of frame positions >= 0")
        if len(span) == len(pts) and not np.all((span[:, 0] <= pts) & (pts <= span[:, 1])):
            problems.append("span does not hold its row's pts (first frame <= pts <= last frame)")
        return problems

    @staticmethod
    def _verify_features(features, checksums: dict) -> list[str]:
        """Read chunk by chunk (constant memory): unreadable chunks, checksum mismatches, NaN/inf rows."""
        problems = []
        sums = checksums.get("features") or []
        step = int(checksums.get("features_chunk_rows") or features.chunks[0])
        bad_rows, first_bad, mismatched = 0, None, []
        for index, start in enumerate(range(0, features.shape[0], step)):
            try:
                block = np.asarray(features[start : start + step])  # (<=step, dim)
            except Exception as err:
                problems.append(f"features chunk {index} (rows {start}-{start + step - 1}) cannot be read "
                                f"({type(err).__name__}: {err}); re-extract the video")
                continue
            if index < len(sums) and hashlib.sha256(np.ascontiguousarray(block).tobytes()).hexdigest() != sums[index]:
                mismatched.append(index)
            bad = ~np.isfinite(block).all(axis=1)  # (<=step,) rows holding NaN or inf
            if bad.any():
                first_bad = start + int(np.flatnonzero(bad)[0]) if first_bad is None else first_bad
                bad_rows += int(bad.sum())
        if mismatched:
            shown = ", ".join(str(i) for i in mismatched[:10]) + (" ..." if len(mismatched) > 10 else "")
            problems.append(f"features: {len(mismatched)} chunk(s) do not match the checksum stored at commit "
                            f"(chunks {shown}); re-extract the video")
        if sums and len(sums) != -(-features.shape[0] // step):
            problems.append(f"features: {len(sums)} chunk checksums stored for {features.shape[0]} rows")
        if bad_rows:
            problems.append(f"features hold NaN/inf in {bad_rows} rows (first: row {first_bad})")
        return problems

    # ------------------------------------------------------------------------------------------- internals
    def _read_failures(self, pattern: str) -> list[dict]:
        """The failure records whose file names match ``pattern``; each is written whole (renamed in) or not at all."""
        records = []
        for file in (self.path / _FAILURE_RECORDS).glob(f"{pattern}.json"):
            try:
                records.append(json.loads(file.read_text()))
            except (OSError, ValueError):  # removed meanwhile, or not ours
                continue
        return [r for r in records if isinstance(r, dict) and {"video_id", "time"} <= r.keys()]

    def _partial_folders(self) -> list[tuple[str, Path]]:
        return [(p.name.rsplit(".", 1)[0], p) for p in sorted((self.path / _PARTIAL).glob("*")) if p.is_dir()]

    def _remove_abandoned(self, video_id: str) -> None:
        """Delete the video's partial and trashed folders: the caller holds its claim, so they are leftovers (a
        writer whose claim went stale has lost the right to commit its folder)."""
        for folder_video, folder in self._partial_folders():
            if folder_video == video_id:
                shutil.rmtree(folder, ignore_errors=True)
        trash = self.path / _TRASH
        if trash.is_dir():
            for folder in trash.glob(f"{video_id}.*"):
                shutil.rmtree(folder, ignore_errors=True)


class VideoWriter:
    """Writes one video into its own ``.partial/`` folder; ``commit`` makes it complete in one rename. Rows are
    buffered into whole chunks (each written once). Made by ``FeatureStore.writer``."""

    def __init__(self, store: FeatureStore, claim: Claim, *, attrs: dict, overwrite: bool, own_claim: bool):
        self.store, self.claim, self.video_id, self.overwrite = store, claim, claim.video_id, overwrite
        self.attrs = _json_safe(dict(attrs))
        self.rows = 0  # rows written to disk or waiting in the buffer
        self.committed = False
        self._own_claim = own_claim  # taken by FeatureStore.writer: released when this writer closes
        self._closed = False
        self._dtype = np.dtype(store.identity.dtype)
        self._dim = store.identity.feature_dim
        self.chunk_rows = feature_chunk_rows(self._dim, self._dtype)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._written = 0
        # Checksums of what was computed, taken before Zarr encodes it: verify recomputes them from what it reads.
        self._chunk_sums: list[str] = []  # sha256 of each chunk of features
        self._pts_sum, self._frames_sum, self._span_sum = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()

        self.folder = store.path / _PARTIAL / f"{self.video_id}.{unique_token()}"
        group = zarr.open_group(self.folder, mode="w-", zarr_format=3)
        self._features = group.create_array(
            "features", shape=(0, self._dim), chunks=(self.chunk_rows, self._dim), dtype=self._dtype,
            fill_value=np.nan, dimension_names=("row", "feature"),
        )
        self._pts = group.create_array("pts", shape=(0,), chunks=(INDEX_CHUNK_ROWS,), dtype="float64",
                                       fill_value=np.nan, dimension_names=("row",))
        self._frames = group.create_array("frame_index", shape=(0,), chunks=(INDEX_CHUNK_ROWS,), dtype="int64",
                                          fill_value=-1, dimension_names=("row",))
        self._span = group.create_array("span", shape=(0, 2), chunks=(INDEX_CHUNK_ROWS // 2, 2), dtype="float64",
                                        fill_value=np.nan, dimension_names=("row", "end"))
        self._group = group

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def append(self, features, pts, frame_indices, span=None) -> None:
        """Add rows: features (n, feature_dim), pts (n,) seconds, frame_indices (n,), span (n, 2) seconds (None:
        each row saw the one frame at its pts)."""
        if self._closed:
            raise StoreError(f"writer for video {self.video_id} is closed (committed or abandoned); open a new one")
        features = np.array(features, dtype=self._dtype, copy=True)  # own copy: callers may reuse their buffers
        pts = np.array(pts, dtype=np.float64, copy=True).reshape(-1)
        frame_indices = np.array(frame_indices, dtype=np.int64, copy=True).reshape(-1)
        span = np.stack([pts, pts], axis=1) if span is None else np.array(span, dtype=np.float64, copy=True)
        shape_ok = features.ndim == 2 and features.shape[1] == self._dim and span.shape == (len(pts), 2)
        if not shape_ok or not len(features) == len(pts) == len(frame_indices):
            raise StoreError(f"video {self.video_id}: append needs features (n, {self._dim}), pts (n,), "
                             f"frame_indices (n,), span (n, 2); got {features.shape}, {pts.shape}, "
                             f"{frame_indices.shape}, {span.shape}")
        self._pending.append((features, pts, frame_indices, span))
        self._pending_rows += len(pts)
        self.rows += len(pts)
        if self._pending_rows >= FLUSH_CHUNKS * self.chunk_rows:
            self._flush(final=False)

    def commit(self, **extra_attrs) -> None:
        """Write the remaining rows and the attributes, then rename the folder into ``videos/``: now complete."""
        if self._closed:
            raise StoreError(f"writer for video {self.video_id} is closed (committed or abandoned); open a new one")
        self._flush(final=True)
        self._check_chunks_on_disk()
        identity = self.store.identity
        self._group.attrs.update(_json_safe({
            **self.attrs,
            **extra_attrs,
            "video_id": self.video_id,
            "rows": self.rows,
            "checksums": {"algorithm": "sha256", "features_chunk_rows": self.chunk_rows,
                          "features": self._chunk_sums, "pts": self._pts_sum.hexdigest(),
                          "frame_index": self._frames_sum.hexdigest(), "span": self._span_sum.hexdigest()},
            "provenance": {"backbone": identity.backbone, "weights": identity.weights,
                           "weights_sha": identity.weights_sha, "precision": identity.precision,
                           "preprocessing": {"fps": identity.fps, "resize": identity.resize, "crop": identity.crop,
                                             "mean": identity.mean, "std": identity.std},
                           "epicfeat_version": __version__},
            "completed_at": utc_now(),
            "complete": True,
        }))
        _fsync_tree(self.folder)  # the rename must never publish data still only in the page cache
        if not self.claim.held():
            self.close()
            raise ClaimLostError(f"video {self.video_id}: this writer's claim expired or was taken over before the "
                                 f"commit in {self.store.path}; its copy was not published")
        target = self.store.path / _VIDEOS / self.video_id
        if target.exists() and (self.overwrite or not self.store.is_complete(self.video_id)):
            # Move the old copy (or a damaged, never-complete one) aside: rename cannot replace a non-empty folder.
            trash = self.store.path / _TRASH
            trash.mkdir(exist_ok=True)
            aside = trash / f"{self.video_id}.{unique_token()}"
            os.rename(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(self.folder, target)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another writer completed it first
                shutil.rmtree(self.folder, ignore_errors=True)
                self.close()
                raise CompletedElsewhereError(f"video {self.video_id} was completed by another writer meanwhile in feature set "
                                 f"{self.store.path}; this copy was discarded") from None
            raise
        _fsync_dir(target.parent)
        self.committed = True
        self.close()

    def _check_chunks_on_disk(self) -> None:
        """Refuse to publish a folder that lost chunks (removed under us, e.g. by a writer that took our claim)."""
        for array in (self._features, self._pts, self._frames, self._span):
            if array.nchunks_initialized < array.nchunks:
                self.close()
                raise ClaimLostError(f"video {self.video_id}: {array.nchunks - array.nchunks_initialized} of "
                                     f"{array.nchunks} chunks of '{array.basename}' vanished from {self.folder} "
                                     "while writing (another writer removed the folder?); not published")

    def close(self) -> None:
        """Release the writer (and the claim it took itself); without a commit its partial folder is left over."""
        if self._closed:
            return
        self._closed = True
        self._pending, self._pending_rows = [], 0
        if self._own_claim:
            self.claim.release()

    def _flush(self, *, final: bool) -> None:
        if not self._pending:
            return
        features = np.concatenate([p[0] for p in self._pending])  # (P, feature_dim)
        pts = np.concatenate([p[1] for p in self._pending])  # (P,)
        frames = np.concatenate([p[2] for p in self._pending])  # (P,)
        span = np.concatenate([p[3] for p in self._pending])  # (P, 2)
        # Write whole chunks only (the rest waits), so no chunk is ever read back and rewritten.
        n = len(pts) if final else (len(pts) // self.chunk_rows) * self.chunk_rows
        start, stop = self._written, self._written + n
        self._features.resize((stop, self._dim))
        self._pts.resize((stop,))
        self._frames.resize((stop,))
        self._span.resize((stop, 2))
        self._features[start:stop] = features[:n]
        self._pts[start:stop] = pts[:n]
        self._frames[start:stop] = frames[:n]
        self._span[start:stop] = span[:n]
        for chunk in range(0, n, self.chunk_rows):  # start is a multiple of the chunk size: blocks = chunks
            block = np.ascontiguousarray(features[chunk : chunk + self.chunk_rows])  # (<=chunk_rows, dim)
            self._chunk_sums.append(hashlib.sha256(block.tobytes()).hexdigest())
        self._pts_sum.update(np.ascontiguousarray(pts[:n]).tobytes())
        self._frames_sum.update(np.ascontiguousarray(frames[:n]).tobytes())
        self._span_sum.update(np.ascontiguousarray(span[:n]).tobytes())
        self._written = stop
        rest = len(pts) - n
        self._pending = [(features[n:], pts[n:], frames[n:], span[n:])] if rest else []
        self._pending_rows = rest


# ------------------------------------------------------------------------------------------------- lookup
def open_feature_set(cache: str | os.PathLike, key: str | None = None, *, option: str = "--feature-set") -> FeatureStore:
    """The one feature set a command works on: ``key`` (a key under ``cache`` or a folder), or the only one there.
    ``option``: the calling command's flag for a set, named in the errors."""
    cache = Path(cache)
    if key is not None:
        folder = Path(key) if (Path(key) / _MARKER).is_file() else cache / key
        if not (folder / _MARKER).is_file():
            available = [s.path.name for s in FeatureStore.list_sets(cache)]
            raise StoreError(
                f"feature set '{key}' not found (neither a feature set folder nor a key under {cache}); "
                f"available under {cache}: {', '.join(available) or 'none'}"
            )
        return FeatureStore.open(folder)
    sets = FeatureStore.list_sets(cache)
    if not sets:
        raise StoreError(f"no feature set under {cache}: run `epicfeat extract` first, or pass --cache / {option}")
    if len(sets) > 1:
        # Never mix or guess: features from two sets (other weights, fps or crop) are different inputs.
        raise StoreError(
            f"{cache} holds {len(sets)} feature sets ({', '.join(s.path.name for s in sets)}); "
            f"choose one with {option} KEY"
        )
    return sets[0]


# ------------------------------------------------------------------------------------------------- helpers
def _build_empty_set(folder: Path, identity: FeatureSetIdentity) -> None:
    root = zarr.open_group(folder, mode="w-", zarr_format=3, attributes={"epicfeat_featureset": identity.to_dict()})
    root.create_group(_VIDEOS)
    (folder / _PARTIAL).mkdir()
    marker = {"format": "epicfeat feature set", "layout_version": _LAYOUT_VERSION, "key": identity.key(),
              "identity": identity.to_dict(), "epicfeat_version": __version__, "created": utc_now()}
    atomic_write_text(folder / _MARKER, json.dumps(marker, indent=2) + "\n")


def _verify_row_count(rows: int, attrs: dict, fps: float | None) -> list[str]:
    """Rows against duration x rate: a video cached much shorter than it lasts was cut off somewhere."""
    duration, source_fps = attrs.get("duration"), attrs.get("source_fps")
    if not duration or not source_fps:
        return []
    rate = min(float(fps), float(source_fps)) if fps else float(source_fps)
    expected = float(duration) * rate
    tolerance = rate * 1.0 + 2  # one second of rows (what extract tolerates at a video's end) and rounding
    if abs(rows - expected) > tolerance:
        return [f"{rows} rows, but {float(duration):.2f} s at {rate:g} rows/s makes about {expected:.0f}"]
    return []


def _check_video_id(video_id: str) -> None:
    if not isinstance(video_id, str) or not _VIDEO_ID.match(video_id):
        raise StoreError(f"video id {video_id!r} cannot be stored: use letters, digits, '_', '-' or '.', e.g. P01_01")


def _json_safe(value: Any) -> Any:
    """Plain JSON types (numpy scalars, paths and tuples converted), so attributes survive Zarr and HDF5."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def folder_bytes(path: Path) -> int:
    """Bytes of every file below ``path``, tolerating files that other writers move meanwhile."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # a writer renamed or removed it meanwhile
                pass
    return total


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)
