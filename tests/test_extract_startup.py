"""Stage one's start-up: what runs before the first decoded frame, and what the decode processes load."""
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from test_extract import write_video

from epicfeat.configs import ExtractConfig
from epicfeat.extract import DecodePool, FramesDecoded, VideoJob, preprocess_of
from epicfeat.frames import iter_frames

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps (Linux)")


def _mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_decode_processes_hand_over_frames_without_torch(tmp_path):
    # Before: each decode process imported torch to send batches as shared tensors (2 s of a core and ~200 MB,
    # at start-up, on the cores the model loads on). Now images travel through plain shared-memory slots.
    path = tmp_path / "P01" / "P01_01.MP4"
    write_video(path, fps=Fraction(30), seconds=2.0)  # 60 frames -> 20 rows at fps 10: 5 batches of 4
    config = ExtractConfig(fps=10.0, resize=64, crop=56, batch_size=4)
    preprocess = preprocess_of(config)
    pool = DecodePool(1, config.fps, preprocess, config.batch_size, config.decode_threads)
    slot_names = list(pool._workers[0].slots.names)
    jobs = [VideoJob("P01_01", path)]
    got, maps = [], ""
    try:
        for item in pool.events(lambda: jobs.pop() if jobs else None):
            if isinstance(item, FramesDecoded):
                got.append(item.batch)
                maps = maps or _mapped_libraries(pool._workers[0].process.pid)
    finally:
        pool.close()
    assert "libtorch" not in maps and "libav" in maps  # the worker decodes (FFmpeg loaded) without torch
    expected = list(iter_frames(path, fps=config.fps, preprocess=preprocess, batch_size=config.batch_size))
    assert [len(b) for b in got] == [4, 4, 4, 4, 4] == [len(b) for b in expected]
    for batch, reference in zip(got, expected):  # the same pixels, pts and frame numbers as decoding here
        np.testing.assert_array_equal(batch.images, reference.images)
        np.testing.assert_array_equal(batch.pts, reference.pts)
        np.testing.assert_array_equal(batch.frame_indices, reference.frame_indices)
    assert not any(np.shares_memory(a.images, b.images) for a, b in zip(got, got[1:]))  # copies, not slot views
    assert not [name for name in slot_names if os.path.exists(f"/dev/shm/{name}")]  # slots removed on close


def test_importing_extract_loads_neither_torch_nor_zarr_nor_pyav():
    code = ("import sys, epicfeat.extract, epicfeat.cli.extract; "
            "print(sorted(m for m in ('torch', 'torchvision', 'zarr', 'av') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _two_videos(tmp_path):
    paths = {}
    for video_id in ("P01_01", "P01_02"):
        paths[video_id] = tmp_path / "P01" / f"{video_id}.MP4"
        write_video(paths[video_id], fps=Fraction(30), seconds=2.0)  # 20 rows at fps 10: 5 batches of 4
    config = ExtractConfig(fps=10.0, resize=64, crop=56, batch_size=4)
    pool = DecodePool(1, config.fps, preprocess_of(config), config.batch_size, config.decode_threads)
    return paths, config, pool


def _decoded_rows(pool, jobs) -> dict[str, int]:
    rows: dict[str, int] = {}
    for item in pool.events(lambda: jobs.pop(0) if jobs else None):
        if isinstance(item, FramesDecoded):
            rows[item.video_id] = rows.get(item.video_id, 0) + len(item.batch)
    return rows


def test_the_first_video_decodes_before_it_is_claimed_and_is_kept_when_claimed(tmp_path):
    # Before: decoding began only once the first video was claimed, which needs the feature set, which needs the
    # model's weights hash: the first frame waited for torch and the model (5 s on 2 cores).
    paths, config, pool = _two_videos(tmp_path)
    try:
        pool.start_early(VideoJob("P01_01", paths["P01_01"]))
        worker = pool._workers[0]
        assert worker.conn.poll(timeout=30)  # frames arrive with no events() (no claim) yet
        pid = worker.process.pid
        rows = _decoded_rows(pool, [VideoJob("P01_01", paths["P01_01"]), VideoJob("P01_02", paths["P01_02"])])
        assert rows == {"P01_01": 20, "P01_02": 20}  # each video once, whole: the early work was kept
        assert pool._workers[0].process.pid == pid
    finally:
        pool.close()


def test_an_early_video_another_writer_took_is_dropped_and_never_reported(tmp_path):
    paths, config, pool = _two_videos(tmp_path)
    try:
        pool.start_early(VideoJob("P01_01", paths["P01_01"]))
        assert pool._workers[0].conn.poll(timeout=30)
        pid = pool._workers[0].process.pid
        rows = _decoded_rows(pool, [VideoJob("P01_02", paths["P01_02"])])  # P01_01: complete, or another's
        assert rows == {"P01_02": 20}
        assert pool._workers[0].process.pid != pid  # the worker holding it was restarted
    finally:
        pool.close()


def test_closing_a_pool_whose_early_video_was_never_claimed_is_quick(tmp_path):
    import time

    paths, config, pool = _two_videos(tmp_path)
    pool.start_early(VideoJob("P01_01", paths["P01_01"]))
    assert pool._workers[0].conn.poll(timeout=30)  # the worker now waits, mid-video, for the parent to take batches
    started = time.perf_counter()
    pool.close()
    assert time.perf_counter() - started < 4  # not the 5 s join timeout of a worker that never reads its pipe
