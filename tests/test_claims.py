"""Claims and the claim queue: one writer per video, across real processes; a killed or paused holder's video is
taken over after the lease (at once when its process on this host is gone); a failed video is not retried."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from epicfeat.claims import ClaimQueue
from epicfeat.store import FeatureSetIdentity, FeatureStore

DIM = 8
LEASE_S = 1.0  # short, so that waiting out a lease takes a second
SPAWN = multiprocessing.get_context("spawn")


def identity() -> FeatureSetIdentity:
    return FeatureSetIdentity(weights="random-seed0", weights_sha="0123456789abcdef", fps=10.0, resize=128, crop=112,
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), feature_dim=DIM,
                              decoder="pyav-18.1.0", device="cpu", tf32=False, batch_size=8, channels_last=False,
                              compile=False, fold_bn=True)


@pytest.fixture
def store(tmp_path):
    return FeatureStore.create(tmp_path / "cache", identity())


def write(store: FeatureStore, claim, rows: int = 20, *, commit: bool = True):
    """Rows of one video written under ``claim``; the open writer when ``commit`` is False."""
    attrs = dict(source_path=f"{claim.video_id}.MP4", source_fps=50.0, duration=rows / 10, width=64, height=64)
    writer = store.writer(claim.video_id, attrs=attrs, claim=claim)
    writer.append(np.full((rows, DIM), len(claim.video_id), np.float16), np.arange(rows) / 10, np.arange(rows) * 5)
    if commit:
        writer.commit()
    return writer


# ------------------------------------------------------------------------------------ in one process
def test_a_claim_is_exclusive_renews_itself_and_is_free_once_released(store):
    claim = store.claim("P01_01", lease_s=LEASE_S)
    assert claim is not None and claim.held()
    time.sleep(1.5 * LEASE_S)  # its own thread kept it fresh past the lease
    assert claim.held() and store.claim("P01_01", lease_s=LEASE_S) is None
    assert store.claim_owner("P01_01", lease_s=LEASE_S) == claim.token
    claim.release()
    assert not claim.held() and store.claim_owner("P01_01", lease_s=LEASE_S) is None
    with store.claim("P01_01", lease_s=LEASE_S) as again:
        assert again.token != claim.token and again.held()
    assert list((store.path / ".claims").iterdir()) == []


def test_a_stale_claim_is_taken_over_and_its_holder_knows(store, tmp_path):
    """A claim file not touched for a lease (its writer on another host stopped renewing) is broken and replaced;
    the old holder's claim is lost for good, so it can neither renew it nor commit under it."""
    held = store.claim("P01_01", lease_s=30)
    path = store.path / ".claims" / "P01_01.claim"
    path.write_text(json.dumps({"token": "elsewhere", "host": "another-host", "pid": 1}))  # as another writer's
    old = time.time() - 31
    os.utime(path, (old, old))
    assert not held.held() and not held.renew()
    assert store.claim_owner("P01_01", lease_s=30) is None
    taker = store.claim("P01_01", lease_s=30)
    assert taker is not None and taker.held() and json.loads(path.read_text())["token"] == taker.token
    assert sorted(p.name for p in (store.path / ".claims").iterdir()) == ["P01_01.claim"]  # none kept aside
    held.release()  # not ours any more: the taker's claim stays
    assert taker.held()
    taker.release()


def test_a_claim_of_a_dead_process_on_this_host_is_stale_at_once(store):
    """A rerun after a kill on the same machine does not wait out the lease: the claim names a pid that is gone."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    claim = store.claim("P01_04", lease_s=600)
    owner = json.loads(claim.path.read_text())
    assert owner["pid"] == os.getpid()
    assert store.claim("P01_04", lease_s=600) is None  # this (live) process holds it
    claim.release()
    claim.path.write_text(json.dumps({**owner, "pid": int(child.stdout)}))  # as if written by the dead process
    assert store.claim_owner("P01_04", lease_s=600) is None
    assert store.claim("P01_04", lease_s=600) is not None


def test_the_queue_skips_complete_videos_and_retries_failures_of_earlier_runs(store):
    with store.claim("P01_01") as claim:
        write(store, claim)
    store.record_failure("P01_02", "truncated at t=3.2s")
    time.sleep(0.01)
    queue = ClaimQueue(store, ["P01_01", "P01_02", "P01_03", "P01_02"], lease_s=LEASE_S)
    yielded = []
    for claim in queue:
        with claim:
            yielded.append(claim.video_id)
    assert yielded == ["P01_02", "P01_03"]
    assert queue.others_completed == [] and queue.others_failed == {}


def test_a_failure_its_holder_recorded_before_the_queue_began_is_not_retried(store):
    """The record's token names the holder the queue saw, whatever the holder's clock says."""
    holder = store.claim("P01_01", lease_s=LEASE_S)
    store.record_failure("P01_01", "not a video", claim=holder)
    time.sleep(0.01)
    queue = ClaimQueue(store, ["P01_01"], lease_s=LEASE_S)
    assert list(queue) == []
    assert queue.others_failed["P01_01"]["claim"] == holder.token
    holder.release()


# ------------------------------------------------------------------------------------ real processes
def _share(store_path, video_ids, barrier, results):
    """One writer: claims and writes videos from the queue until none is left."""
    store = FeatureStore.open(store_path)
    queue = ClaimQueue(store, video_ids, lease_s=LEASE_S)
    barrier.wait()
    done = []
    for claim in queue:
        with claim:
            time.sleep(0.1)  # a video takes a while, so the writers interleave
            write(store, claim)
        done.append(claim.video_id)
    results.put((done, queue.others_completed))


def test_three_processes_share_twelve_videos_and_none_is_done_twice(store):
    video_ids = [f"P{p:02d}_{v:02d}" for p in (1, 2, 3) for v in (1, 2, 3, 4)]
    barrier, results = SPAWN.Barrier(3), SPAWN.Queue()
    writers = [SPAWN.Process(target=_share, args=(str(store.path), video_ids, barrier, results)) for _ in range(3)]
    for writer in writers:
        writer.start()
    shares = [results.get(timeout=120) for _ in writers]
    for writer in writers:
        writer.join(timeout=30)
        assert writer.exitcode == 0
    done = [video_id for own, _ in shares for video_id in own]
    assert sorted(done) == video_ids  # every video once: no video was written twice
    assert sum(1 for own, _ in shares if own) >= 2  # the work was shared
    for own, others in shares:  # each writer saw every video decided: by itself or by another
        assert sorted(own + others) == video_ids
    assert store.complete_videos() == video_ids and store.partial_videos() == [] and store.verify() == []
    assert list((store.path / ".claims").iterdir()) == []


def _hold(store_path, video_id, host, ready, go):
    """Claim the video through a queue, write some rows, then fail it when told (or be killed first)."""
    if host:  # a writer on another machine: its pid means nothing here, only the lease tells it is gone
        import socket

        socket.gethostname = lambda: host
    store = FeatureStore.open(store_path)
    claim = next(iter(ClaimQueue(store, [video_id], lease_s=LEASE_S)))
    write(store, claim, commit=False)
    ready.set()
    go.wait(60)
    store.record_failure(video_id, "corrupt at t=1.5s", claim=claim)
    claim.release()


def _start_holder(store, video_id, host=""):
    ready, go = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold, args=(str(store.path), video_id, host, ready, go))
    holder.start()
    assert ready.wait(60), "the holder did not claim its video"
    return holder, go


@pytest.mark.parametrize("host", ["another-host", ""])
def test_a_killed_holders_video_is_taken_over_after_the_lease(store, host):
    """SIGKILL mid-video: on another host its claim goes stale after the lease; on this host at once (its pid is
    gone). The new holder removes the partial folder and completes the video."""
    holder, _ = _start_holder(store, "P01_01", host)
    claim_file = store.path / ".claims" / "P01_01.claim"
    assert store.claim_owner("P01_01", lease_s=LEASE_S) is not None and store.partial_videos() == ["P01_01"]
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    last_renewal = claim_file.stat().st_mtime
    queue = ClaimQueue(store, ["P01_01"], lease_s=LEASE_S)
    claim = next(iter(queue))
    waited = time.time() - last_renewal
    assert claim.video_id == "P01_01"
    if host:
        assert LEASE_S <= waited < LEASE_S + 1.0
    else:
        assert waited < LEASE_S  # not stale by the lease: its dead pid told
    with claim:
        write(store, claim)
    assert store.complete_videos() == ["P01_01"] and store.partial_videos() == []
    assert queue.others_completed == [] and queue.others_failed == {}


def test_a_paused_holder_loses_its_video_and_never_publishes(store, tmp_path):
    """SIGSTOP (a frozen VM, an NFS hang): after the lease another writer takes the video over; the holder, resumed,
    finds its claim gone and is refused at commit."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_claims import write
from epicfeat.claims import ClaimQueue
from epicfeat.store import ClaimLostError, FeatureStore
store = FeatureStore.open({str(store.path)!r})
claim = next(iter(ClaimQueue(store, ["P01_01"], lease_s={LEASE_S})))
writer = write(store, claim, commit=False)
print("holding", flush=True)
sys.stdin.readline()  # stopped here, then resumed
try:
    writer.commit()
except ClaimLostError as err:
    print("refused:", err, flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.send_signal(signal.SIGSTOP)
        start = time.time()
        with next(iter(ClaimQueue(store, ["P01_01"], lease_s=LEASE_S))) as claim:
            assert time.time() - start > LEASE_S / 2  # waited for the lease: the paused process is alive
            write(store, claim, rows=30)
        holder.send_signal(signal.SIGCONT)
        out, _ = holder.communicate("\n", timeout=30)
    finally:
        holder.kill()
    assert out.startswith("refused:") and "claim expired or was taken over" in out
    assert store.read("P01_01").rows == 30 and store.partial_videos() == []


def test_a_video_its_holder_fails_is_not_retried_by_the_others(store):
    holder, go = _start_holder(store, "P01_01")
    queue = ClaimQueue(store, ["P01_01", "P01_02"], lease_s=LEASE_S)
    videos = iter(queue)
    with next(videos) as claim:  # P01_01 is held: the queue goes on with P01_02
        assert claim.video_id == "P01_02"
        write(store, claim)
    go.set()  # the holder records its failure and releases its claim
    assert list(videos) == []  # waited for P01_01 until its holder failed it: not claimed, not retried
    holder.join(timeout=30)
    assert holder.exitcode == 0
    assert queue.others_failed["P01_01"]["reason"] == "corrupt at t=1.5s"
    assert queue.others_completed == [] and store.failures().keys() == {"P01_01"}
    assert store.partial_videos() == []  # the holder's folder went with its failure
