"""EPIC-100's other forms: the official JPEG frames (folders and tars), their time base, bad frames and tars, and HEVC.

Frames are painted with their own number (R and G encode the high and low 4 bits, as in test_frames), so a test can
check that a row holds the frame its time claims.
"""
import io
import queue
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from epicfeat.data.annotations import read_segments
from epicfeat.data.synthetic import video_as_frames, write_jpeg_frames, write_synthetic_video
from epicfeat.data.videos import EPIC55_FRAMES_FPS, EXTENSION_FRAMES_FPS, epic_frames_fps
from epicfeat.frame_files import FrameFiles, iter_frame_files
from epicfeat.frames import (
    DecodePool,
    DecodeSettings,
    FramesDecoded,
    Preprocess,
    VideoEnded,
    VideoJob,
    VideoStarted,
    decode_video,
    iter_frames,
)
from test_frames import _frame_image, _frame_number

SMALL = Preprocess(resize=32, crop=32)


def _numbered_frames(path: Path, count: int) -> Path:
    """Frames 1..count painted with their 0-based position (a folder, or a tar when path ends in .tar)."""
    return write_jpeg_frames((_frame_image(i) for i in range(count)), path)


def _rows(path: Path, frames_fps: float, fps: float | None, batch_size: int = 4):
    with FrameFiles(path) as files:
        batches = list(iter_frame_files(files, frames_fps, fps=fps, preprocess=SMALL, batch_size=batch_size))
    indices = np.concatenate([b.frame_indices for b in batches])
    pts = np.concatenate([b.pts for b in batches])
    shown = [_frame_number(image) for b in batches for image in b.images]
    return [len(b) for b in batches], indices, pts, shown


@pytest.mark.parametrize("form", ["folder", "tar"])
@pytest.mark.parametrize("frames_fps", [EPIC55_FRAMES_FPS, EXTENSION_FRAMES_FPS])
def test_time_base_and_sampling(tmp_path, form, frames_fps):
    path = _numbered_frames(tmp_path / ("P01_01.tar" if form == "tar" else "P01_01"), 130)
    # Frame k (1-based) is at (k - 1) / frames_fps; at 10 rows/s target j takes the first frame at or after j / 10.
    sizes, indices, pts, shown = _rows(path, frames_fps, fps=10)
    step = round(frames_fps / 10)
    expected = np.arange(0, 130, step)
    assert sizes[:-1] == [4] * (len(sizes) - 1) and sum(sizes) == len(expected)
    assert indices.tolist() == expected.tolist() and shown == expected.tolist()
    assert pts.tolist() == [float(Fraction(int(i)) / Fraction(frames_fps)) for i in expected]
    # Every frame: times (k - 1) / frames_fps, all of them decoded in order.
    _, indices, pts, shown = _rows(path, frames_fps, fps=None, batch_size=64)
    assert indices.tolist() == shown == list(range(130))
    assert np.allclose(pts * frames_fps, np.arange(130), atol=1e-9)


def test_frames_of_a_video_give_its_rows(tmp_path):
    """The same rows (times) from a 60-fps video and from its own JPEG frames, the images within JPEG loss."""
    video = write_synthetic_video(tmp_path / "P01_01.MP4", seconds=2, width=320, height=180, fps="60")
    preprocess = Preprocess(resize=128, crop=112)
    from_video = list(iter_frames(video, fps=10, preprocess=preprocess, batch_size=8))
    for frames in (video_as_frames(video, tmp_path / "P01_01"), video_as_frames(video, tmp_path / "P01_01.tar")):
        with FrameFiles(frames) as files:
            from_frames = list(iter_frame_files(files, 60.0, fps=10, preprocess=preprocess, batch_size=8))
        for a, b in zip(from_video, from_frames, strict=True):
            assert a.pts.tolist() == b.pts.tolist() and a.frame_indices.tolist() == b.frame_indices.tolist()
            difference = np.abs(a.images.astype(int) - b.images.astype(int))
            assert difference.mean() < 3 and difference.max() < 40  # JPEG loss (measured: mean 1.5, max 14)


def test_decode_video_from_frames(tmp_path):
    path = _numbered_frames(tmp_path / "P01_101.tar", 100)  # 2 s at 50 fps
    events = list(decode_video(VideoJob("P01_101", path, needed_until=1.5, frames_fps=50.0),
                               DecodeSettings(10, SMALL, 8)))
    started, *decoded, ended = events
    assert isinstance(started, VideoStarted) and ended == VideoEnded("P01_101")
    assert (started.meta.fps, started.meta.duration, started.meta.width, started.meta.height,
            started.meta.codec) == (50.0, 2.0, 64, 48, "mjpeg")
    assert [round(t, 6) for e in decoded for t in e.batch.pts] == [i / 10 for i in range(20)]
    # Frames that stop before the annotations' end: not whole, as for a short video.
    *_, short = decode_video(VideoJob("P01_101", path, needed_until=9.0, frames_fps=50.0), DecodeSettings(10, SMALL, 8))
    assert "annotations run to 9.00 s" in short.error


# ---------------------------------------------------------------------------------------------------- bad input
def _tar_with(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpegs(tmp_path: Path, count: int) -> list[bytes]:
    folder = _numbered_frames(tmp_path / "source_frames", count)
    return [(folder / f"frame_{k:010d}.jpg").read_bytes() for k in range(1, count + 1)]


def _error(path: Path, fps: float | None = None) -> str:
    *_, ended = decode_video(VideoJob("P01_01", path, frames_fps=60.0), DecodeSettings(fps, SMALL, 4))
    assert isinstance(ended, VideoEnded)
    return ended.error


def test_gap_in_folder_and_tar_names_the_missing_frame(tmp_path):
    folder = _numbered_frames(tmp_path / "P01_01", 12)
    (folder / "frame_0000000007.jpg").unlink()
    assert _error(folder) == (f"{folder}: frame_0000000007.jpg is missing (the frames run to frame_0000000012.jpg); "
                              "re-extract or re-download this video's frames")
    jpegs = _jpegs(tmp_path, 12)
    tar = _tar_with(tmp_path / "P01_02.tar", [(f"./frame_{k:010d}.jpg", jpegs[k - 1]) for k in (1, 2, 4, 5)])
    assert "frame_0000000003.jpg is missing" in _error(tar)


def test_truncated_and_empty_jpegs_name_the_frame(tmp_path):
    folder = _numbered_frames(tmp_path / "P01_01", 12)
    jpeg = folder / "frame_0000000004.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    assert "frame_0000000004.jpg is truncated or not a JPEG" in _error(folder)  # every frame is a row
    assert _error(folder, fps=10) == ""  # 10 rows/s of 60-fps frames read frames 1 and 7 only: 4 is never read
    jpegs = _jpegs(tmp_path, 6)
    jpegs[3] = b""
    tar = _tar_with(tmp_path / "P01_02.tar", [(f"./frame_{k:010d}.jpg", jpegs[k - 1]) for k in range(1, 7)])
    assert f"{tar}: frame_0000000004.jpg is truncated or not a JPEG (0 bytes)" in _error(tar)


def test_foreign_members_and_corrupt_tars(tmp_path):
    jpegs = _jpegs(tmp_path, 4)
    members = [(f"./frame_{k:010d}.jpg", jpegs[k - 1]) for k in range(1, 5)]
    foreign = _tar_with(tmp_path / "foreign.tar", members[:2] + [("./notes.txt", b"hello")] + members[2:])
    assert "holds './notes.txt', which is not a frame" in _error(foreign)
    good = _tar_with(tmp_path / "good.tar", members)
    assert _error(good) == ""
    data = bytearray(good.read_bytes())
    header = data.index(b"./frame_0000000003.jpg") // 512 * 512  # the third member's header block
    data[header + 148: header + 156] = b"garbage!"  # its checksum
    (tmp_path / "corrupt.tar").write_bytes(bytes(data))
    assert _error(tmp_path / "corrupt.tar") == (f"{tmp_path / 'corrupt.tar'}: corrupt tar (a damaged header after "
                                                "./frame_0000000002.jpg); download this tar again")
    (tmp_path / "cut.tar").write_bytes(good.read_bytes()[: header + 512 + 100])  # cut inside the third frame
    assert "truncated inside ./frame_0000000003.jpg" in _error(tmp_path / "cut.tar")
    (tmp_path / "cut2.tar").write_bytes(good.read_bytes()[:header])  # cut between two members
    assert "cut-off tar (it ends after ./frame_0000000002.jpg without the end-of-archive blocks)" in _error(
        tmp_path / "cut2.tar")
    (tmp_path / "empty").mkdir()
    assert "no frames" in _error(tmp_path / "empty")


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tars_of_any_format_long_names_and_folders(tmp_path, tar_format):
    """GNU long names and pax path records (a 120-character folder in front of each frame), folder members."""
    jpegs = _jpegs(tmp_path, 3)
    deep = "./" + "P01_01_rgb_frames_" * 6 + "/"
    path = tmp_path / "P01_01.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        tar.addfile(_folder_member(deep))
        for k, data in enumerate(jpegs, start=1):
            info = tarfile.TarInfo(f"{deep}frame_{k:010d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sizes, indices, pts, shown = _rows(path, 60.0, fps=None)
    assert indices.tolist() == shown == [0, 1, 2]


def _folder_member(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_a_bad_video_fails_alone_in_the_pool(tmp_path):
    good = _numbered_frames(tmp_path / "good.tar", 30)
    bad = _numbered_frames(tmp_path / "bad", 30)
    (bad / "frame_0000000010.jpg").unlink()
    jobs = queue.Queue()
    for job in (VideoJob("bad", bad, frames_fps=60.0), VideoJob("good", good, frames_fps=60.0), None):
        jobs.put(job)
    with DecodePool(1, DecodeSettings(None, SMALL, 8)) as pool:
        events = list(pool.decode(jobs))
    ends = {e.video_id: e.error for e in events if isinstance(e, VideoEnded)}
    assert ends["good"] == "" and "frame_0000000010.jpg is missing" in ends["bad"]
    assert sum(len(e.batch) for e in events if isinstance(e, FramesDecoded) and e.video_id == "good") == 30


# --------------------------------------------------------------------------------------------------------- HEVC
def test_hevc_decodes_through_the_same_path_with_exact_pts(tmp_path):
    if "libx265" not in av.codecs_available:
        pytest.skip("this PyAV's FFmpeg has no HEVC encoder")
    path = tmp_path / "P01_101.MP4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx265", rate=50)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"x265-params": "log-level=error:bframes=3"}
        for i in range(75):
            frame = av.VideoFrame.from_ndarray(_frame_image(i), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    batches = list(iter_frames(path, fps=10, preprocess=SMALL, batch_size=4))
    pts = np.concatenate([b.pts for b in batches])
    assert [b.frame_indices.tolist() for b in batches][0] == [0, 5, 10, 15]
    assert pts.tolist() == [i / 10 for i in range(15)]  # exact: frame 5 i shown at i / 10 s
    assert [_frame_number(image) for b in batches for image in b.images] == list(range(0, 75, 5))
    *_, ended = decode_video(VideoJob("P01_101", path), DecodeSettings(10, SMALL, 4))
    assert ended == VideoEnded("P01_101")


# ------------------------------------------------------------------------------------ the annotations' time base
def test_annotation_frames_agree_with_the_frames_time_base(shared_annotations):
    """The official CSVs' start/stop frames index the RGB frames at 60 fps (EPIC-55 ids) and 50 fps (extension ids):
    each frame number is floor(timestamp x fps) (timestamps are rounded to 10 ms), so under the time base
    (k - 1) / fps frame k lies 1 to 2 frame durations before the timestamp it was computed from."""
    for name, labelled in (("EPIC_100_validation.csv", True), ("EPIC_100_test_timestamps.csv", False)):
        segments = read_segments(shared_annotations / name, labelled=labelled)
        fps = segments["video_id"].map(epic_frames_fps).to_numpy()
        assert set(fps) == ({EPIC55_FRAMES_FPS} if labelled else {EXTENSION_FRAMES_FPS})  # validation 55, test ext.
        for column in ("start", "stop"):
            seconds = segments[f"{column}_sec"].to_numpy()
            frames = segments[f"{column}_frame"].to_numpy()
            # floor(t x fps) in float64, as the annotations computed it, at least frame 1
            assert np.mean(frames == np.maximum(np.floor(seconds * fps), 1)) > 0.99
            lag = (seconds - (frames - 1) / fps) * fps  # frame durations between the timestamp and frame k's time
            assert lag.min() >= -1e-6 and lag.max() <= 2 + 1e-6
            assert 1.3 <= np.median(lag) <= 1.6
        moving = segments["stop_sec"] > 10
        ratio = (segments["stop_frame"] / segments["stop_sec"])[moving]
        assert abs(ratio.median() - (60 if labelled else 50)) < 0.01


# ----------------------------------------------------------------------------------------------------- extract


@pytest.mark.usefixtures("one_torch_thread")
def test_extract_from_frames_is_its_own_feature_set_close_to_the_video(tmp_path):
    from epicfeat.configs import ExtractConfig
    from epicfeat.extract import extract_features
    from epicfeat.store import FeatureStore

    video = write_synthetic_video(tmp_path / "P01" / "P01_01.MP4", seconds=3, width=320, height=180, fps="60")
    video_as_frames(video, tmp_path / "P01" / "rgb_frames" / "P01_01.tar")
    rows = {}
    for source in ("video", "frames"):
        summary = extract_features(ExtractConfig(
            video_ids=("P01_01",), videos=tmp_path, cache=tmp_path / "cache", weights="random", fps=10, resize=128,
            crop=112, source=source, decode_workers=0, device="cpu", precision="fp32", progress=False))
        assert summary.ok and summary.source == {"video": "video", "frames": "frames-epic"}[source]
        store = FeatureStore.open(summary.store)
        assert store.identity.source == summary.source
        stored = store.read("P01_01")
        rows[source] = (np.asarray(stored.features[:], np.float32), stored.pts)
    assert len(list((tmp_path / "cache").glob("resnet50_*"))) == 2  # one feature set per form
    (a, pts_a), (b, pts_b) = rows["video"], rows["frames"]
    assert pts_a.tolist() == pts_b.tolist() == [i / 10 for i in range(30)]
    # JPEG loss only (measured: relative L2 at most 2.6 %, cosine >= 0.99996)
    assert (np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)).max() < 0.1


def test_extract_cli_a_bad_tar_fails_alone(tmp_path):
    import subprocess

    _numbered_frames(tmp_path / "P01" / "rgb_frames" / "P01_01.tar", 60)
    bad = _numbered_frames(tmp_path / "P01" / "rgb_frames" / "P01_02", 60)
    (bad / "frame_0000000031.jpg").unlink()
    run = subprocess.run(
        ["epicfeat", "extract", "--video-ids", "P01_01,P01_02,P01_03", "--videos", str(tmp_path), "--cache",
         str(tmp_path / "cache"), "--weights", "random", "--fps", "10", "--resize", "32", "--crop", "32",
         "--decode-workers", "1", "--device", "cpu", "--precision", "fp32", "--no-progress"],
        capture_output=True, text=True, env={**__import__("os").environ, "COLUMNS": "400"})
    assert run.returncode == 1, run.stderr
    assert "frames-epic" in run.stdout and "frame_0000000031.jpg is missing" in run.stdout
    assert "not found under --videos as frames-epic" in run.stdout  # P01_03
    from epicfeat.store import FeatureStore

    (folder,) = (tmp_path / "cache").glob("resnet50_*")
    store = FeatureStore.open(folder)
    assert store.complete_videos() == ["P01_01"] and len(store.read("P01_01").pts) == 10
    assert "frame_0000000031.jpg is missing" in store.failures()["P01_02"]["reason"]
