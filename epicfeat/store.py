"""Feature sets on disk: per-video Zarr v3 arrays of 2048-d features, completed atomically, checkable, exportable.

This module is the only code that knows the layout. A feature set is one folder per combination of everything that
changes the numbers (backbone, weights, fps, preprocessing, precision, dtype, decoder version, device, batch
size, memory layout, compile), named by its identity's key::

    <cache>/<identity.key()>/             a Zarr v3 group (zarr.json)
        featureset.json                   the identity and epicfeat version: written once, atomically
        failures/<video>.<time>.<token>.json   one file per failure record (sets made before: failures.jsonl)
        .claims/P01_02.claim              the claim of the one writer allowed to write P01_02 (O_EXCL, lease)
        videos/                           a Zarr v3 group; holds COMPLETE videos only
            P01_01/                       a group; attrs: source_fps, duration, source_path, width, height,
                features  (rows, 2048)    float16, chunks of 256 rows (1 MiB) along time  rows, provenance,
                pts       (rows,)         float64 seconds, from the stream               checksums, complete
                frame_index (rows,)       int64, 0-based position in presentation order
        .partial/P01_02.<host>-<pid>-<random>/        a video being written (or left by a crash)
        .partial/P01_02.<host>-<pid>-<random>.lock    held (flock) by the live writer of that folder
        .trash/                           old copies moved aside by an overwrite, deleted right after

A video is complete iff it is in ``videos/`` with ``complete: true``; partial iff a ``.partial/`` folder exists for
it and it is not complete; failed iff it has a failure record and is not complete (recording
a failure also removes the video's abandoned partial folders, so the three states never overlap).

Why it is crash-safe and safe for many writers:
  - A writer builds its video in its own ``.partial/`` folder and, on commit, writes the attributes (complete:
    true included) and renames the folder into ``videos/``. A directory rename is atomic on a local POSIX file
    system, so a video is either complete or absent; a SIGKILL at any moment leaves at most a partial folder.
  - Processes writing *different* videos never touch the same file: each has its own folder, and the group
    metadata (zarr.json of the set and of ``videos/``) is created once, by ``create``, before any writer exists.
  - Missing chunks read back silently as the fill value in Zarr, so ``features`` and ``pts`` use NaN and
    ``frame_index`` uses -1 as fill value: a lost chunk shows up in ``verify`` as NaN / a bad index, not as zeros.
  - Metadata is never consolidated: there is nothing to keep in step when videos are added.
  - Many writers (extract processes, dask workers, SLURM jobs, on NFS or Lustre too) never rely on flock: a writer
    first claims its video (``claim``: a claim file created with O_EXCL, renewed by its owner, stale after a
    lease), removes other partial folders of that video only while holding the claim, and commits only if the
    claim is still its own and every chunk it wrote is on disk. A writer cut off past its lease never publishes.
  - At commit the sha256 of every 256-row block of features (and of pts and frame_index) is stored in the
    video's attributes; ``verify`` recomputes them, so flipped bits that still decode are caught.
  - Failure records are one file each (temporary name + rename), so records from many NFS clients never
    interleave; the same failure of the same file is recorded once.
  - Writers without a claim (tests, tools) fall back to flock on their ``.lock`` file; where flock is missing,
    such leftovers are kept rather than risk deleting a live writer's folder.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from epicfeat import __version__
from epicfeat.errors import EpicfeatError
from epicfeat.files import atomic_write_text

#: Rows per chunk of ``features``: 256 x 2048 float16 = 1 MiB, the documented sweet spot for Zarr chunks.
FEATURE_CHUNK_ROWS = 256
#: Rows buffered before a write: 4 whole chunks (4 MiB), so Zarr writes them in one call (concurrently) and the
#: per-write overhead (resizing three arrays) is paid once per 1024 rows, not per batch.
FLUSH_ROWS = 4 * FEATURE_CHUNK_ROWS
#: Rows per chunk of ``pts`` and ``frame_index`` (8 bytes a row: 128 KiB chunks, a few per hour of video).
INDEX_CHUNK_ROWS = 16384
#: Attributes the extractor gives every video (checked by ``verify``); the store adds rows, provenance, complete.
SOURCE_ATTRS = ("source_path", "source_fps", "duration", "width", "height")
STORE_ATTRS = ("rows", "provenance", "complete")

_MARKER = "featureset.json"
_FAILURES = "failures.jsonl"
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


#: Seconds after its last renewal at which a claim is stale (its writer dead or cut off) and may be taken over.
DEFAULT_LEASE_S = 60.0


class Claim:
    """The right to write one video: ``.claims/<video_id>.claim``, created with O_EXCL, renewed by its owner.

    Works where flock does not (NFS with ``nolock``/``local_lock``, Lustre with ``localflock``): exclusive creation
    and rename are atomic on the server. The owner renews it (``renew``: touch) well within ``lease_s``; a claim
    whose file was not touched for ``lease_s`` seconds is stale and another writer may take it over. Staleness uses
    the file's mtime against this host's clock, so clocks must agree to well within ``lease_s`` (NTP does). A
    writer commits only while ``held()``, so a writer cut off long enough to lose its claim never publishes.
    """

    def __init__(self, path: Path, video_id: str, token: str, lease_s: float):
        self.path, self.video_id, self.token, self.lease_s = path, video_id, token, lease_s
        self.lost = False

    def __repr__(self) -> str:
        return f"Claim({self.video_id!r}, token={self.token!r})"

    def owner(self) -> str | None:
        """The token written in the claim file now (None when there is none)."""
        return _read_claim_token(self.path)

    def held(self) -> bool:
        """Still ours and fresh: the file holds our token and was renewed within the lease."""
        if self.lost or self.owner() != self.token:
            self.lost = True
            return False
        try:
            age = _now_s() - self.path.stat().st_mtime
        except OSError:
            self.lost = True
            return False
        return age < self.lease_s

    def renew(self) -> bool:
        """Touch the claim file (False, and lost, when it is no longer ours)."""
        if self.owner() != self.token:
            self.lost = True
            return False
        try:
            os.utime(self.path)
        except OSError:
            return False
        return True

    def release(self) -> None:
        """Remove the claim file if it is still ours (after a commit or a recorded failure)."""
        if self.owner() == self.token:
            self.path.unlink(missing_ok=True)
        self.lost = True


# ------------------------------------------------------------------------------------------------- identity
@dataclass(frozen=True)
class FeatureSetIdentity:
    """Everything that changes the cached numbers. Two runs share a feature set only if all of it is equal."""

    weights: str  # backbone.weights_name, e.g. "imagenet1k_v2", "random-seed0", "file:ft.pt"
    weights_sha: str  # backbone.weights_sha (hash of the state dict)
    fps: float | None  # sampling rate of rows (None = every frame)
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    backbone: str = "resnet50"
    dtype: str = "float16"  # stored dtype of features
    feature_dim: int = 2048
    precision: str = "fp32"  # compute precision of the backbone (bf16 autocast changes the numbers)
    # What else changes the numbers, recorded by `extract` (None: not recorded, a feature set made before they were
    # keyed; such a field is left out of the hash, so older sets keep their folder name). See NUMERIC_SETTINGS.
    decoder: str | None = None  # e.g. "pyav-18.1.0-libavcodec-62.28.102": PyAV 17 changed HD colour conversion
    device: str | None = None  # "cpu-AVX512" / "cuda-NVIDIA H200": kernels (and bf16 emulation) differ per ISA/GPU
    tf32: bool | None = None  # CUDA only: "fp32" convolutions in TF32
    batch_size: int | None = None  # rows per model batch: kernels are chosen per batch shape
    channels_last: bool | None = None  # memory layout of the backbone: another convolution path
    compile: bool | None = None  # torch.compile fuses ops: other rounding
    fold_bn: bool | None = None  # batch norms folded into the convolutions: other rounding

    def __post_init__(self):
        # Normalise so that identities read back from JSON compare (and hash) equal to the ones built in code.
        object.__setattr__(self, "fps", None if self.fps is None else float(self.fps))
        object.__setattr__(self, "resize", int(self.resize))
        object.__setattr__(self, "crop", int(self.crop))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "feature_dim", int(self.feature_dim))
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
        return f"{readable}_{self.short_hash()}"

    def short_hash(self) -> str:
        """First 8 hex digits of the sha256 of the canonical JSON of all fields (unrecorded run settings left out)."""
        fields = {k: v for k, v in self.to_dict().items() if not (k in NUMERIC_SETTINGS and v is None)}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:8]

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


#: Identity fields added after the first feature sets were written; None means "not recorded".
NUMERIC_SETTINGS = ("decoder", "device", "tf32", "batch_size", "channels_last", "compile", "fold_bn")


@dataclass
class VideoFeatures:
    """One complete video: ``features`` stays a lazy Zarr array (slice it); the timestamps are in memory."""

    video_id: str
    features: zarr.Array  # (rows, feature_dim) float16, chunked along time
    pts: np.ndarray  # (rows,) float64 seconds, strictly increasing
    frame_indices: np.ndarray  # (rows,) int64, 0-based source frame positions
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

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"

    # ----------------------------------------------------------------------------------------- open / create
    @classmethod
    def create(cls, cache_dir: str | os.PathLike, identity: FeatureSetIdentity) -> "FeatureStore":
        """The feature set for ``identity`` under ``cache_dir``: created if new, else opened and checked.

        The set is built in a temporary folder and renamed into place, so a set folder is never half made and
        several processes may call ``create`` at once: one rename wins and the others open its result.
        """
        cache_dir = Path(cache_dir)
        path = cache_dir / identity.key()
        if not path.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            staging = cache_dir / f".{identity.key()}.{_unique_token()}.tmp"
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
        attrs = self._stored_attrs(video_id)
        return attrs is not None and attrs.get("complete") is True

    def video_attrs(self, video_id: str) -> dict:
        """The stored attributes of a video ({} when it has none): rows, duration, provenance, checksums, ..."""
        return self._stored_attrs(video_id) or {}

    def partial_videos(self) -> list[str]:
        """Sorted ids of videos that were started but are not complete (a crash, an abort, or a live writer)."""
        started = {video_id for video_id, _ in self._partial_folders()}
        return sorted(v for v in started if not self.is_complete(v))

    # ------------------------------------------------------------------------------------------- claims
    def claim(self, video_id: str, *, lease_s: float = DEFAULT_LEASE_S) -> Claim | None:
        """Claim ``video_id`` for writing; None when another writer holds a fresh claim on it.

        The claim file is created with O_EXCL (exactly one creator wins, on NFS too). A stale one (not renewed for
        ``lease_s``) is first renamed aside under a unique name (one renamer wins), checked to be still stale
        there, and deleted; then the exclusive create is tried again.
        """
        _check_video_id(video_id)
        folder = self.path / _CLAIMS
        folder.mkdir(exist_ok=True)
        path = folder / f"{video_id}.claim"
        token = _unique_token()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._break_stale_claim(path, lease_s):
                    return None
                continue
            try:
                owner = {"token": token, "video_id": video_id, "time": _now(), "host": socket.gethostname(),
                         "pid": os.getpid()}
                os.write(fd, json.dumps(owner).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return Claim(path, video_id, token, lease_s)
        return None

    def claim_owner(self, video_id: str, *, lease_s: float = DEFAULT_LEASE_S) -> str | None:
        """The token of the fresh claim on ``video_id`` (None when nobody holds one, or it is stale)."""
        path = self.path / _CLAIMS / f"{video_id}.claim"
        if _claim_is_stale(path, lease_s):
            return None
        return _read_claim_token(path)

    @staticmethod
    def _break_stale_claim(path: Path, lease_s: float) -> bool:
        """Remove ``path`` if it is stale; True when the caller may try to create it again."""
        if not _claim_is_stale(path, lease_s):
            return False  # a live writer holds it
        # Rename, then delete: of several writers breaking it at once, one rename wins and the others see it gone.
        # If its owner renewed it between our look and our rename, that owner finds its claim gone and discards
        # its copy at commit: rare, and safe (never two publishers), at worst a video done twice.
        aside = path.with_name(f"{path.name}.stale.{_unique_token()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True  # another writer broke it first
        aside.unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------------------------------- writing
    def writer(self, video_id: str, *, attrs: dict, overwrite: bool = False, claim: Claim | None = None) -> "VideoWriter":
        """A writer for one video (use it as a context manager); removes the video's abandoned partial folders.

        ``attrs`` should hold ``SOURCE_ATTRS`` (source_path, source_fps, duration, width, height); the store adds
        rows, provenance and complete. A complete video is refused unless ``overwrite=True``.

        With a ``claim`` (what ``extract`` uses) every other partial folder of the video is abandoned by definition
        (no one else may write it) and is removed; the commit refuses unless the claim is still held. Without one,
        a partial folder is removed only when flock says its writer is gone (never where flock is missing).
        """
        _check_video_id(video_id)
        if not overwrite and self.is_complete(video_id):
            raise StoreError(f"video {video_id} is already complete in feature set {self.path}; pass overwrite=True "
                             "to replace it.")
        if claim is not None and not claim.held():
            raise ClaimLostError(f"video {video_id}: the claim {claim.token} is no longer held in {self.path}")
        self._remove_abandoned(video_id, claimed=claim is not None)
        return VideoWriter(self, video_id, attrs=attrs, overwrite=overwrite, claim=claim)

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
        except (KeyError, FileNotFoundError, ValueError) as err:
            raise StoreError(f"video {video_id} in feature set {self.path} is damaged ({err!r}); run "
                             "`epicfeat cache verify` and re-extract it.") from None
        return VideoFeatures(video_id, features, pts, frame_indices, dict(group.attrs))

    # ------------------------------------------------------------------------------------------- failures
    def record_failure(self, video_id: str, reason: str, *, path: str | os.PathLike | None = None,
                       claim: Claim | None = None) -> None:
        """Write one failure record and drop the video's abandoned partial folders (failed, not partial).

        A failure equal to the video's latest record (same reason and path: a rerun met the same broken file) is
        not recorded again. Each record is its own file, ``failures/<video_id>.<time>.<token>.json``, written under a temporary name and
        renamed: records from any number of processes on any number of NFS clients cannot interleave or tear,
        which O_APPEND does not promise over NFS (the client computes the end of file itself). ``claim`` (the
        writer's claim on the video) is recorded, so a process waiting on that claim knows the video failed.
        """
        path = None if path is None else str(path)
        previous = self.failure_recorded_since(video_id, 0.0)
        if previous is not None and (previous.get("reason"), previous.get("path")) == (str(reason), path):
            # The same failure again (a rerun retried the same broken file): it is recorded once.
            if _VIDEO_ID.match(video_id):
                self._remove_abandoned(video_id, claimed=claim is not None)
            return
        now = datetime.now(timezone.utc)
        record = {"video_id": video_id, "reason": str(reason), "path": path,
                  "time": now.isoformat(timespec="microseconds"), "claim": None if claim is None else claim.token}
        folder = self.path / _FAILURE_RECORDS
        folder.mkdir(exist_ok=True)
        safe_id = re.sub(r"[^A-Za-z0-9_.-]+", "-", video_id)[:100] or "unnamed"
        stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
        atomic_write_text(folder / f"{safe_id}.{stamp}.{_unique_token()}.json", json.dumps(record) + "\n")
        if _VIDEO_ID.match(video_id):
            self._remove_abandoned(video_id, claimed=claim is not None)

    def failure_records(self) -> list[dict]:
        """Every failure record, oldest first: the legacy failures.jsonl lines, then the one-file-per-record ones."""
        records: list[dict] = []
        log = self.path / _FAILURES
        if log.is_file():
            for line in log.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:  # a torn last line from a killed process
                    continue
        folder = self.path / _FAILURE_RECORDS
        for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                records.append(json.loads(file.read_text()))
            except (OSError, ValueError):  # removed or unreadable: a record is written whole or not at all
                continue
        records = [r for r in records if isinstance(r, dict) and "video_id" in r]
        return sorted(records, key=lambda r: str(r.get("time", "")))

    def failure_recorded_since(self, video_id: str, since: float) -> dict | None:
        """The latest failure record of ``video_id`` written at or after ``since`` (a Unix time), or None."""
        folder = self.path / _FAILURE_RECORDS
        latest = None
        for file in sorted(folder.glob(f"{video_id}.*.json")) if folder.is_dir() else []:
            try:
                record = json.loads(file.read_text())
                when = datetime.fromisoformat(record["time"]).timestamp()
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if record.get("video_id") == video_id and when >= since:
                latest = record
        return latest

    def failures(self) -> dict[str, dict]:
        """The latest failure record per video, for videos that are not complete now (a later success wins)."""
        latest = {record["video_id"]: record for record in self.failure_records()}
        return {v: r for v, r in sorted(latest.items()) if not self.is_complete(v)}

    # ------------------------------------------------------------------------------------------- checking
    def info(self) -> dict:
        """Counts for `cache info`: videos complete / partial / failed, rows, hours of video, bytes on disk."""
        complete = self.complete_videos()
        rows, seconds = 0, 0.0
        for video_id in complete:
            attrs = self._stored_attrs(video_id) or {}
            rows += int(attrs.get("rows", 0))
            seconds += float(attrs.get("duration") or 0.0)
        return {
            "key": self.path.name,
            "path": str(self.path),
            "identity": self.identity.to_dict(),
            "videos_complete": len(complete),
            "videos_partial": len(self.partial_videos()),
            "videos_failed": len(self.failures()),
            "rows": rows,
            "hours": seconds / 3600,
            "bytes": folder_bytes(self.path),
        }

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
        for name in ("features", "pts", "frame_index"):
            try:
                arrays[name] = group[name]
            except Exception:  # KeyError, or damaged array metadata
                problems.append(f"array '{name}' is missing or its metadata is unreadable")
        if len(arrays) < 3:
            return problems
        features, pts_array, frames_array = arrays["features"], arrays["pts"], arrays["frame_index"]
        dim = self.identity.feature_dim
        if features.ndim != 2 or features.shape[1] != dim:
            return problems + [f"features have shape {features.shape}, expected (rows, {dim})"]
        if features.dtype != np.dtype(self.identity.dtype):
            problems.append(f"features are {features.dtype}, expected {self.identity.dtype}")
        rows = features.shape[0]
        counts = {"features": rows, "pts": pts_array.shape[0], "frame_index": frames_array.shape[0],
                  "attribute rows": attrs.get("rows", rows)}
        if len(set(counts.values())) > 1:
            problems.append("row counts disagree: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                            + " (truncated array?)")
        for name, array in arrays.items():
            if array.nchunks_initialized < array.nchunks:
                problems.append(f"{name}: {array.nchunks - array.nchunks_initialized} of {array.nchunks} chunks "
                                "missing on disk")
        checksums = attrs.get("checksums") or {}
        problems += self._verify_index(pts_array, frames_array, checksums)
        problems += self._verify_features(features, checksums)
        problems += _verify_row_count(rows, attrs, self.identity.fps)
        return problems

    @staticmethod
    def _verify_index(pts_array, frames_array, checksums: dict) -> list[str]:
        problems = []
        try:
            pts = np.asarray(pts_array[:], dtype=np.float64)
            frames = np.asarray(frames_array[:], dtype=np.int64)
        except Exception as err:  # a truncated or garbled chunk fails to decode
            return [f"pts / frame_index chunks cannot be read ({type(err).__name__}: {err})"]
        for name, values in (("pts", pts), ("frame_index", frames)):
            expected = checksums.get(name)
            if expected and hashlib.sha256(values.tobytes()).hexdigest() != expected:
                problems.append(f"{name} do not match the checksum stored at commit (silent corruption)")
        if not np.all(np.isfinite(pts)):
            problems.append(f"pts hold NaN/inf at row {int(np.flatnonzero(~np.isfinite(pts))[0])}")
        elif len(pts) > 1 and np.any(np.diff(pts) <= 0):
            problems.append(f"pts are not strictly increasing at row {int(np.flatnonzero(np.diff(pts) <= 0)[0]) + 1}")
        if len(frames) and (frames.min() < 0 or np.any(np.diff(frames) <= 0)):
            problems.append("frame_index is not a strictly increasing run of frame positions >= 0")
        return problems

    @staticmethod
    def _verify_features(features, checksums: dict) -> list[str]:
        """Read chunk by chunk (constant memory): unreadable chunks, checksum mismatches, NaN/inf rows."""
        problems = []
        sums = checksums.get("features") or []
        step = int(checksums.get("features_chunk_rows") or FEATURE_CHUNK_ROWS)
        bad_rows, first_bad, mismatched, unreadable = 0, None, [], []
        for index, start in enumerate(range(0, features.shape[0], step)):
            try:
                block = np.asarray(features[start : start + step])  # (<=step, 2048)
            except Exception as err:
                unreadable.append(f"chunk {index} (rows {start}-{start + step - 1}) cannot be read "
                                  f"({type(err).__name__}: {err})")
                continue
            if index < len(sums) and hashlib.sha256(np.ascontiguousarray(block).tobytes()).hexdigest() != sums[index]:
                mismatched.append(index)
            bad = ~np.isfinite(block).all(axis=1)  # (<=step,) rows holding NaN or inf
            if bad.any():
                first_bad = start + int(np.flatnonzero(bad)[0]) if first_bad is None else first_bad
                bad_rows += int(bad.sum())
        problems += [f"features {u}; re-extract the video" for u in unreadable]
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
    def _stored_attrs(self, video_id: str) -> dict | None:
        # Read the group's zarr.json directly: listing hundreds of videos must not open hundreds of Zarr groups.
        meta = self.path / _VIDEOS / video_id / "zarr.json"
        try:
            return json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            return None

    def _partial_folders(self) -> list[tuple[str, Path]]:
        partial = self.path / _PARTIAL
        if not partial.is_dir():
            return []
        return [(p.name.rsplit(".", 1)[0], p) for p in sorted(partial.iterdir()) if p.is_dir()]

    def _remove_abandoned(self, video_id: str, *, claimed: bool = False) -> None:
        """Delete the video's partial (and trashed) folders whose writer is gone; a live writer's are kept.

        ``claimed``: the caller holds the video's claim, so every existing partial folder is someone else's
        leftover (a writer whose claim expired has lost the right to commit it). Otherwise flock decides.
        """
        for folder_video, folder in self._partial_folders():
            if folder_video == video_id and (claimed or _writer_is_gone(folder)):
                shutil.rmtree(folder, ignore_errors=True)
                folder.with_name(folder.name + ".lock").unlink(missing_ok=True)
        trash = self.path / _TRASH
        if trash.is_dir():
            for folder in trash.glob(f"{video_id}.*"):
                shutil.rmtree(folder, ignore_errors=True)


class VideoWriter:
    """Writes one video into its own ``.partial/`` folder; ``commit`` makes it complete in one rename.

    Rows are buffered until they fill ``FLUSH_ROWS`` (whole chunks), so every chunk is written once and memory
    stays at a few MiB however long the video. Leaving the ``with`` block without ``commit``
    (an exception, a kill) leaves a partial folder and no complete video.
    """

    def __init__(self, store: FeatureStore, video_id: str, *, attrs: dict, overwrite: bool = False,
                 claim: Claim | None = None):
        self.store, self.video_id, self.overwrite, self.claim = store, video_id, overwrite, claim
        self.attrs = _json_safe(dict(attrs))
        self.rows = 0  # rows written to disk or waiting in the buffer
        self.committed = False
        self._closed = False
        self._dtype = np.dtype(store.identity.dtype)
        self._dim = store.identity.feature_dim
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._written = 0
        # Checksums of what was computed, taken before Zarr encodes it: verify recomputes them from what it reads.
        self._chunk_sums: list[str] = []  # sha256 of each FEATURE_CHUNK_ROWS block of features
        self._pts_sum, self._frames_sum = hashlib.sha256(), hashlib.sha256()

        partial_root = store.path / _PARTIAL
        partial_root.mkdir(exist_ok=True)
        self.folder = partial_root / f"{video_id}.{_unique_token()}"
        # The lock exists (and is held) before the folder does, so no one ever sees our folder without a live lock.
        self._lock_path = self.folder.with_name(self.folder.name + ".lock")
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # a file system without flock: abandoned-folder detection falls back to "any leftover is stale"
        group = zarr.open_group(self.folder, mode="w-", zarr_format=3)
        self._features = group.create_array(
            "features", shape=(0, self._dim), chunks=(FEATURE_CHUNK_ROWS, self._dim), dtype=self._dtype,
            fill_value=np.nan, dimension_names=("row", "feature"),
        )
        self._pts = group.create_array("pts", shape=(0,), chunks=(INDEX_CHUNK_ROWS,), dtype="float64",
                                       fill_value=np.nan, dimension_names=("row",))
        self._frames = group.create_array("frame_index", shape=(0,), chunks=(INDEX_CHUNK_ROWS,), dtype="int64",
                                          fill_value=-1, dimension_names=("row",))
        self._group = group

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def append(self, features, pts, frame_indices) -> None:
        """Add rows: features (n, feature_dim), pts (n,) seconds, frame_indices (n,)."""
        if self._closed:
            raise StoreError(f"writer for video {self.video_id} is closed (committed or abandoned); open a new one")
        features = np.array(features, dtype=self._dtype, copy=True)  # own copy: callers may reuse their buffers
        pts = np.array(pts, dtype=np.float64, copy=True).reshape(-1)
        frame_indices = np.array(frame_indices, dtype=np.int64, copy=True).reshape(-1)
        shape_ok = features.ndim == 2 and features.shape[1] == self._dim
        if not shape_ok or not len(features) == len(pts) == len(frame_indices):
            raise StoreError(f"video {self.video_id}: append needs features (n, {self._dim}), pts (n,), "
                             f"frame_indices (n,); got {features.shape}, {pts.shape}, {frame_indices.shape}")
        self._pending.append((features, pts, frame_indices))
        self._pending_rows += len(pts)
        self.rows += len(pts)
        if self._pending_rows >= FLUSH_ROWS:
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
            "checksums": {"algorithm": "sha256", "features_chunk_rows": FEATURE_CHUNK_ROWS,
                          "features": self._chunk_sums, "pts": self._pts_sum.hexdigest(),
                          "frame_index": self._frames_sum.hexdigest()},
            "provenance": {
                "backbone": identity.backbone,
                "weights": identity.weights,
                "weights_sha": identity.weights_sha,
                "precision": identity.precision,
                "preprocessing": {"fps": identity.fps, "resize": identity.resize, "crop": identity.crop,
                                  "mean": identity.mean, "std": identity.std},
                "epicfeat_version": __version__,
            },
            "completed_at": _now(),
            "complete": True,
        }))
        _fsync_tree(self.folder)  # the rename must never publish data still only in the page cache
        if self.claim is not None and not self.claim.held():
            self.close()
            raise ClaimLostError(f"video {self.video_id}: this writer's claim expired or was taken over before the "
                                 f"commit in {self.store.path}; its copy was not published")
        target = self.store.path / _VIDEOS / self.video_id
        if target.exists() and (self.overwrite or not self.store.is_complete(self.video_id)):
            # Move the old copy (or a damaged, never-complete one) aside: rename cannot replace a non-empty folder.
            trash = self.store.path / _TRASH
            trash.mkdir(exist_ok=True)
            aside = trash / f"{self.video_id}.{_unique_token()}"
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
        for array in (self._features, self._pts, self._frames):
            if array.nchunks_initialized < array.nchunks:
                self.close()
                raise ClaimLostError(f"video {self.video_id}: {array.nchunks - array.nchunks_initialized} of "
                                     f"{array.nchunks} chunks of '{array.basename}' vanished from {self.folder} "
                                     "while writing (another writer removed the folder?); not published")

    def close(self) -> None:
        """Release the writer. Without a commit the partial folder stays, marked abandoned (no live lock)."""
        if self._closed:
            return
        self._closed = True
        self._pending, self._pending_rows = [], 0
        self._lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)  # releases the flock

    def _flush(self, *, final: bool) -> None:
        if not self._pending:
            return
        features = np.concatenate([p[0] for p in self._pending])  # (P, feature_dim)
        pts = np.concatenate([p[1] for p in self._pending])  # (P,)
        frames = np.concatenate([p[2] for p in self._pending])  # (P,)
        # Write whole chunks only (the rest waits), so no chunk is ever read back and rewritten.
        n = len(pts) if final else (len(pts) // FEATURE_CHUNK_ROWS) * FEATURE_CHUNK_ROWS
        start, stop = self._written, self._written + n
        self._features.resize((stop, self._dim))
        self._pts.resize((stop,))
        self._frames.resize((stop,))
        self._features[start:stop] = features[:n]
        self._pts[start:stop] = pts[:n]
        self._frames[start:stop] = frames[:n]
        for chunk in range(0, n, FEATURE_CHUNK_ROWS):  # start is a multiple of the chunk size: blocks = chunks
            block = np.ascontiguousarray(features[chunk : chunk + FEATURE_CHUNK_ROWS])  # (<=256, dim)
            self._chunk_sums.append(hashlib.sha256(block.tobytes()).hexdigest())
        self._pts_sum.update(np.ascontiguousarray(pts[:n]).tobytes())
        self._frames_sum.update(np.ascontiguousarray(frames[:n]).tobytes())
        self._written = stop
        rest = len(pts) - n
        self._pending = [(features[n:], pts[n:], frames[n:])] if rest else []
        self._pending_rows = rest


# ------------------------------------------------------------------------------------------------- export
def open_feature_set(cache: str | os.PathLike, key: str | None = None, *, option: str = "--feature-set") -> FeatureStore:
    """The one feature set a command works on: ``key`` (a key under ``cache`` or a folder), or the only one there.

    ``option`` is the flag that names a set in the calling command, so the error says what to type.
    """
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


def export_hdf5(store: FeatureStore, out_path: str | os.PathLike) -> Path:
    """Copy every complete video into one HDF5 file, chunk by chunk (constant memory); returns its path.

    Layout: ``/videos/<video_id>/{features, pts, frame_index}`` with the same dtypes and chunking along time.
    Attributes: every scalar attribute (str, int, float, bool) as itself, any other (dicts, lists, None) as a JSON
    string, and ``attrs_json`` holding all of them as one JSON object for an exact round trip. The root carries
    the identity the same way (``featureset_json`` for all of it), plus ``key`` and ``epicfeat_version``.
    The file is written under a temporary name and renamed, so ``out_path`` is never half written.
    """
    import h5py

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{_unique_token()}.tmp")
    dim = store.identity.feature_dim
    try:
        with h5py.File(tmp, "w") as h5:
            _h5_write_attrs(h5, store.identity.to_dict(), all_name="featureset_json")
            h5.attrs["key"] = store.path.name
            h5.attrs["epicfeat_version"] = __version__
            videos = h5.create_group("videos")
            for video_id in store.complete_videos():
                video = store.read(video_id)
                group = videos.create_group(video_id)
                _h5_write_attrs(group, video.attrs, all_name="attrs_json")
                rows = video.rows
                features = group.create_dataset("features", shape=(rows, dim), maxshape=(None, dim),
                                                dtype=video.features.dtype, chunks=(FEATURE_CHUNK_ROWS, dim))
                step = FEATURE_CHUNK_ROWS * 8
                for start in range(0, rows, step):
                    try:
                        block = video.features[start : start + step]  # (<=step, dim)
                    except Exception as err:  # a truncated / garbled chunk: name it instead of a traceback
                        raise StoreError(
                            f"cannot export {video_id} of {store.path}: rows {start}-{start + step - 1} cannot be "
                            f"read ({type(err).__name__}: {err}); run `epicfeat cache verify` and re-extract it"
                        ) from None
                    features[start : start + step] = block
                group.create_dataset("pts", data=video.pts)
                group.create_dataset("frame_index", data=video.frame_indices)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def read_hdf5_attrs(obj) -> dict:
    """The exact attribute dict of an exported HDF5 video group (or the identity of the file's root)."""
    name = "featureset_json" if "featureset_json" in obj.attrs else "attrs_json"
    return json.loads(obj.attrs[name])


# ------------------------------------------------------------------------------------------------- helpers
def _build_empty_set(folder: Path, identity: FeatureSetIdentity) -> None:
    root = zarr.open_group(folder, mode="w-", zarr_format=3, attributes={"epicfeat_featureset": identity.to_dict()})
    root.create_group(_VIDEOS)
    (folder / _PARTIAL).mkdir()
    marker = {"format": "epicfeat feature set", "layout_version": _LAYOUT_VERSION, "key": identity.key(),
              "identity": identity.to_dict(), "epicfeat_version": __version__, "created": _now()}
    atomic_write_text(folder / _MARKER, json.dumps(marker, indent=2) + "\n")


def _writer_is_gone(folder: Path) -> bool:
    """True when no live process holds the folder's lock (it crashed, was killed, or gave up)."""
    try:
        fd = os.open(folder.with_name(folder.name + ".lock"), os.O_RDWR)
    except FileNotFoundError:
        return True  # writers delete their lock when they finish; a folder without one is a leftover
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False  # a live writer holds it
    except OSError:
        return False  # no flock on this file system: cannot tell, so keep it (claims decide for `extract`)
    finally:
        os.close(fd)


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


def _claim_is_stale(path: Path, lease_s: float) -> bool:
    """Not renewed within the lease, or its owner was a process on this host that no longer exists (a rerun after
    a kill on one machine need not wait out the lease). A missing claim counts as stale."""
    try:
        if _now_s() - path.stat().st_mtime >= lease_s:
            return True
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False  # being written right now: fresh
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname() or not owner.get("pid"):
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):
        return False  # exists (another user's) or unknowable
    return False


def _read_claim_token(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None


def _now_s() -> float:
    return datetime.now(timezone.utc).timestamp()


def _check_video_id(video_id: str) -> None:
    if not isinstance(video_id, str) or not _VIDEO_ID.match(video_id):
        raise StoreError(f"video id {video_id!r} cannot be stored: use letters, digits, '_', '-' or '.', e.g. P01_01")


def _unique_token() -> str:
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32]  # no dots: ids are split at the last one
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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


def _h5_write_attrs(obj, attrs: dict, *, all_name: str) -> None:
    obj.attrs[all_name] = json.dumps(attrs)
    for key, value in attrs.items():
        native = isinstance(value, (str, int, float, bool)) and not (isinstance(value, float) and math.isnan(value))
        obj.attrs[key] = value if native else json.dumps(value)


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
