"""Claims: the one way writers sharing a feature set agree on who writes which video.

A claim is a file ``<folder>/<video_id>.claim`` created with O_EXCL (exactly one creator wins, on NFS and Lustre too,
where flock may be missing) and holding its owner's token, host and pid. Its owner renews it (touches the file)
while it holds it; a claim not renewed for ``lease_s`` seconds is stale, and so is one whose process on this host
no longer exists (a rerun after a kill need not wait out the lease). Another writer may break a stale claim and
take the video over. Staleness compares the file's mtime with this host's clock, so clocks must agree to well
within the lease (NTP does). ``ClaimQueue`` is the job source built on it.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from epicfeat.store import FeatureStore

#: Seconds after its last renewal at which a claim is stale (its writer dead or cut off) and may be taken over.
DEFAULT_LEASE_S = 60.0


class Claim:
    """The right to write one video, held from ``take`` until ``release`` (or until its process ends); a daemon
    thread renews it every ``lease_s / 4`` seconds. A writer publishes only while ``held()``."""

    def __init__(self, path: Path, video_id: str, token: str, lease_s: float):
        self.path, self.video_id, self.token, self.lease_s = path, video_id, token, lease_s
        self._ended = threading.Event()  # released, or found to be someone else's: renewing stops for good
        threading.Thread(target=self._keep_renewing, name=f"epicfeat-claim-{video_id}", daemon=True).start()

    @classmethod
    def take(cls, folder: Path, video_id: str, *, lease_s: float = DEFAULT_LEASE_S) -> Claim | None:
        """Claim ``video_id`` in ``folder``; None when another writer holds a fresh claim on it (a stale one is
        broken and taken over)."""
        folder.mkdir(exist_ok=True)
        path = folder / f"{video_id}.claim"
        token = unique_token()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not _break_if_stale(path, lease_s):
                    return None
                continue
            try:
                owner = {"token": token, "video_id": video_id, "time": utc_now(), "host": socket.gethostname(),
                         "pid": os.getpid()}
                os.write(fd, json.dumps(owner).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return cls(path, video_id, token, lease_s)
        return None

    def held(self) -> bool:
        """Still ours and fresh: not released, the file holds our token, and it was renewed within the lease."""
        if not self._ours():
            return False
        try:
            return time.time() - self.path.stat().st_mtime < self.lease_s
        except OSError:
            self._ended.set()  # removed between the two looks: broken by another writer
            return False

    def renew(self) -> bool:
        """Touch the claim file; False (and renewing stops) once it is released or no longer ours."""
        if not self._ours():
            return False
        try:
            os.utime(self.path)
        except OSError:  # broken meanwhile, or a passing NFS error: the next renewal tells which
            return False
        return True

    def release(self) -> None:
        """Stop renewing and remove the claim file if it is still ours (after a commit or a recorded failure)."""
        self._ended.set()
        if _read_token(self.path) == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _ours(self) -> bool:
        """Not released, and the file still holds our token; once that fails, it stays so (renewing stops)."""
        if not self._ended.is_set() and _read_token(self.path) == self.token:
            return True
        self._ended.set()
        return False

    def _keep_renewing(self) -> None:
        while not self._ended.wait(self.lease_s / 4):
            self.renew()


def claim_owner(folder: Path, video_id: str, *, lease_s: float = DEFAULT_LEASE_S) -> str | None:
    """The token of the fresh claim on ``video_id`` in ``folder`` (None when nobody holds one, or it is stale)."""
    path = folder / f"{video_id}.claim"
    return None if _is_stale(path, lease_s) else _read_token(path)


class ClaimQueue:
    """This writer's share of ``video_ids``: iterating yields a held ``Claim`` for each video it should write.

    In order, it claims every video that is not complete and not held by a live writer, then polls the videos other
    writers hold until each is complete, failed by another writer (``others_completed``, ``others_failed``: video id
    -> failure record), or free again (then claimed and yielded). A failure recorded before the queue was made is
    retried. The consumer releases each yielded claim once the video is committed or its failure recorded.
    """

    def __init__(self, store: FeatureStore, video_ids: Iterable[str], *, lease_s: float = DEFAULT_LEASE_S):
        self.store, self.lease_s = store, lease_s
        self.poll_s = min(max(lease_s / 8, 0.05), 2.0)
        self.others_completed: list[str] = []
        self.others_failed: dict[str, dict] = {}
        self._started_at = time.time()
        self._todo = [v for v in dict.fromkeys(video_ids) if not store.is_complete(v)]
        self._holders: dict[str, set[str]] = {}  # video id -> tokens of the other writers seen holding it
        self._waiting: list[str] = []  # videos other writers hold, in list order

    def __iter__(self) -> Iterator[Claim]:
        for video_id in self._todo:
            claim = self._take(video_id)
            if claim is not None:
                yield claim
        while self._waiting:
            time.sleep(self.poll_s)
            for video_id in list(self._waiting):
                claim = self._take(video_id)
                if claim is not None:
                    yield claim

    def _take(self, video_id: str) -> Claim | None:
        """Our claim on the video, or None: decided by another writer (counted) or held by one (kept waiting)."""
        claim = self.store.claim(video_id, lease_s=self.lease_s)
        if claim is None:
            holder = self.store.claim_owner(video_id, lease_s=self.lease_s)
            if holder is not None:
                self._holders.setdefault(video_id, set()).add(holder)
        decided = self._decided_elsewhere(video_id)
        if claim is not None and decided:  # completed or failed by another writer just before we claimed it
            claim.release()
            claim = None
        if video_id in self._waiting:
            self._waiting.remove(video_id)
        if claim is None and not decided:
            self._waiting.append(video_id)
        return claim

    def _decided_elsewhere(self, video_id: str) -> bool:
        if self.store.is_complete(video_id):
            self.others_completed.append(video_id)
            return True
        record = self.store.failure_recorded_since(video_id, self._started_at)
        if record is None:  # the holder's clock may lag ours: its token says it was that writer's failure
            latest = self.store.failure_recorded_since(video_id, 0.0)
            if latest is not None and latest.get("claim") in self._holders.get(video_id, ()):
                record = latest
        if record is not None:
            self.others_failed[video_id] = record
            return True
        return False


def unique_token() -> str:
    """``<host>-<pid>-<random>``: unique across processes and hosts; no dots, so names split at the last one."""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _break_if_stale(path: Path, lease_s: float) -> bool:
    """Remove the claim at ``path`` if it is stale; True when the caller may try to create it again."""
    if not _is_stale(path, lease_s):
        return False  # a live writer holds it
    # Rename, then delete: of several breakers one rename wins. An owner that renewed it meanwhile finds its claim
    # gone and discards its copy at commit: never two publishers, at worst a video done twice.
    aside = path.with_name(f"{path.name}.stale.{unique_token()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # another writer broke it first
    aside.unlink(missing_ok=True)
    return True


def _is_stale(path: Path, lease_s: float) -> bool:
    """Not renewed within the lease, or its owner was a process on this host that no longer exists. A missing
    claim counts as stale."""
    try:
        if time.time() - path.stat().st_mtime >= lease_s:
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


def _read_token(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None


def utc_now() -> str:
    """Now in UTC, ISO 8601 to the millisecond (the time stamps in claims and feature sets)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
