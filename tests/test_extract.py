"""Stage one end to end on tiny generated videos: rows, features, resume after SIGKILL, bad input, dask."""
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from epicfeat.backbone import create_backbone
from epicfeat.extract import ExtractConfig, extract_features, preprocess_of
from epicfeat.frames import iter_frames
from epicfeat.store import FeatureStore

SIZE = (96, 54)  # 16:9, tiny


def write_video(path: Path, *, fps: Fraction, seconds: float, seed: int = 0) -> None:
    """A small H.264 file whose frames differ (a moving bright square on noise), so features differ per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        for i in range(round(seconds * fps)):
            image = rng.integers(0, 60, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
            x = (i * 3) % (SIZE[0] - 20)
            image[15:35, x : x + 20] = (250, 40 + seed * 50 % 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "P01" / "P01_01.MP4", fps=Fraction(60000, 1001), seconds=2.0, seed=1)
    write_video(root / "P01" / "P01_02.MP4", fps=Fraction(50), seconds=1.6, seed=2)
    write_video(root / "P02" / "videos" / "P02_01.mp4", fps=Fraction(30), seconds=2.4, seed=3)
    return root


VIDEO_IDS = ("P01_01", "P01_02", "P02_01")


def config(videos: Path, cache: Path, **overrides) -> ExtractConfig:
    base = dict(
        video_ids=VIDEO_IDS, videos=videos, cache=cache, weights="random", seed=0, fps=10.0, resize=64, crop=56,
        precision="bf16", batch_size=8, decode_workers=0, progress=False,
    )
    base.update(overrides)
    return ExtractConfig(**base)


def read_all(store_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    store = FeatureStore.open(store_path)
    out = {}
    for video_id in store.complete_videos():
        video = store.read(video_id)
        out[video_id] = (np.asarray(video.features[:]), video.pts, video.frame_indices)
    return out


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory):
    """One uninterrupted run that the other tests compare against."""
    summary = extract_features(config(videos, tmp_path_factory.mktemp("cache-ref")))
    assert summary.ok
    return summary, read_all(summary.store)


def test_rows_match_the_decoded_stream_and_a_direct_model_call(videos, reference):
    summary, rows = reference
    assert sorted(rows) == sorted(VIDEO_IDS)
    assert [r.video_id for r in summary.done] and summary.rows == sum(len(v[1]) for v in rows.values())
    cfg = config(videos, Path("unused"))
    backbone = create_backbone("random", seed=0).eval()
    for video_id, path in [("P01_01", videos / "P01/P01_01.MP4"), ("P02_01", videos / "P02/videos/P02_01.mp4")]:
        batches = list(iter_frames(path, fps=10.0, preprocess=preprocess_of(cfg), batch_size=1000))
        pts = np.concatenate([b.pts for b in batches])
        images = np.concatenate([b.images for b in batches])
        features, stored_pts, frame_indices = rows[video_id]
        np.testing.assert_array_equal(stored_pts, pts)  # timestamps come from the stream, row for row
        assert features.shape == (len(pts), 2048) and features.dtype == np.float16
        # 10 rows/s: one row per 100 ms of video, the first frame at or after each 0.1 s step
        assert len(pts) == {"P01_01": 20, "P02_01": 24}[video_id]
        fps = {"P01_01": 60000 / 1001, "P02_01": 30.0}[video_id]
        np.testing.assert_allclose(pts, frame_indices / fps, atol=1e-6)
        # the cached row equals the backbone applied to that decoded frame (same padded batch shape)
        pixels = torch.zeros((cfg.batch_size, *images.shape[1:]), dtype=torch.uint8)
        pixels[:3] = torch.from_numpy(images[:3])
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            direct = backbone(preprocess_of(cfg).normalize(pixels).contiguous(memory_format=torch.channels_last))
        np.testing.assert_array_equal(features[:3], direct[:3].float().numpy().astype(np.float16))


def test_rerun_skips_complete_videos(videos, reference, tmp_path):
    summary, _ = reference
    again = extract_features(config(videos, summary.store.parent))
    assert again.ok and not again.done and sorted(again.skipped) == sorted(VIDEO_IDS)


def test_resume_after_sigkill_is_bit_identical(videos, reference, tmp_path):
    """Kill the CLI with SIGKILL once the first video is complete, re-run it, and compare every byte."""
    _, expected = reference
    cache = tmp_path / "cache"
    cfg_file = tmp_path / "extract.yaml"
    from epicfeat.config import save_config

    # the first video is long enough that the kill lands while a later one is half-written
    save_config(config(videos, cache), cfg_file)
    command = [sys.executable, "-m", "epicfeat", "extract", "--config", str(cfg_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if any(cache.glob("*/videos/*/zarr.json")):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_store = next(cache.glob("*/featureset.json")).parent
    assert len(FeatureStore.open(killed_store).complete_videos()) < len(VIDEO_IDS), "the kill came too late"
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    got = read_all(killed_store)
    assert sorted(got) == sorted(expected)
    for video_id, (features, pts, frames) in expected.items():
        np.testing.assert_array_equal(got[video_id][0], features)
        np.testing.assert_array_equal(got[video_id][1], pts)
        np.testing.assert_array_equal(got[video_id][2], frames)
    assert FeatureStore.open(killed_store).partial_videos() == []


def test_bad_inputs_are_recorded_and_the_rest_finishes(videos, tmp_path):
    root = tmp_path / "videos"
    for video_id in VIDEO_IDS[:1]:
        write_video(root / "P01" / f"{video_id}.MP4", fps=Fraction(50), seconds=1.0)
    (root / "P03").mkdir(parents=True)
    (root / "P03" / "P03_01.MP4").write_bytes(b"")  # zero bytes
    (root / "P03" / "P03_02.MP4").write_text("this is not a video\n")  # not a video
    good = (root / "P01" / "P01_01.MP4").read_bytes()
    (root / "P03" / "P03_03.MP4").write_bytes(good[: len(good) // 2])  # truncated
    ids = ("P01_01", "P03_01", "P03_02", "P03_03", "P09_99")  # P09_99 does not exist
    summary = extract_features(config(root, tmp_path / "cache", video_ids=ids))
    assert not summary.ok
    assert [r.video_id for r in summary.done] == ["P01_01"]
    assert summary.missing == ("P09_99",)
    assert sorted(r.video_id for r in summary.failed) == ["P03_01", "P03_02", "P03_03"]
    store = FeatureStore.open(summary.store)
    failures = store.failures()
    assert sorted(failures) == ["P03_01", "P03_02", "P03_03", "P09_99"]
    assert all(f["reason"] for f in failures.values())
    assert store.complete_videos() == ["P01_01"] and store.partial_videos() == []


def test_cli_exits_nonzero_with_summary_on_failures(videos, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "epicfeat", "extract", "--videos", str(videos), "--video-ids",
         "P01_02,P07_07", "--cache", str(tmp_path / "c"), "--weights", "random", "--resize", "64", "--crop", "56",
         "--decode-workers", "0", "--no-progress"],
        capture_output=True, text=True,
    )
    assert result.returncode == 1, result.stderr
    assert "P07_07" in result.stdout and "not found" in result.stdout
    assert "videos extracted" in result.stdout


def test_two_dask_workers_equal_one_process(videos, reference, tmp_path):
    _, expected = reference
    summary = extract_features(config(videos, tmp_path / "cache", scheduler="local", workers=2))
    assert summary.ok and len(summary.done) == len(VIDEO_IDS)
    got = read_all(summary.store)
    for video_id, (features, pts, frames) in expected.items():
        np.testing.assert_array_equal(got[video_id][0], features)
        np.testing.assert_array_equal(got[video_id][1], pts)


def test_video_shorter_than_its_annotations_fails_clearly(videos, tmp_path):
    from epicfeat.devices import resolve_device
    from epicfeat.extract import VideoJob, run_local

    cfg = config(videos, tmp_path / "cache")
    backbone = create_backbone("random", seed=0)
    from epicfeat.extract import feature_set_identity

    store = FeatureStore.create(cfg.cache, feature_set_identity(cfg, backbone))
    job = VideoJob("P01_02", videos / "P01" / "P01_02.MP4", needed_until=9.5)  # the file lasts 1.6 s
    (result,) = run_local([job], store, backbone, cfg, device=resolve_device("cpu"))
    assert not result.ok and "ends at 1.5" in result.reason and "9.50 s" in result.reason
    assert store.complete_videos() == [] and "P01_02" in store.failures()
