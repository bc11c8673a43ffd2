"""The decode room: exact pts and frame indices, sampling, batching, bad files, preprocessing geometry, and the
decode processes (frames through shared memory, without torch; a dead one costs one retry).

Every video is generated here with PyAV. Each frame is painted with its own number (R and G encode the high and
low 4 bits), so a test can check that a row really holds the frame its index claims.
"""
import multiprocessing
import os
import queue
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

from epicfeat.frames import (
    DecodePool,
    DecodeSettings,
    FrameBatch,
    FramesDecoded,
    Preprocess,
    Resizer,
    VideoEnded,
    VideoError,
    VideoJob,
    VideoStarted,
    codec_threads,
    decode_frames_at,
    decode_video,
    iter_frames,
    probe_video,
)

SMALL = Preprocess(resize=32, crop=32)  # 64x48 frames -> 42x32 -> centre 32x32


def _frame_image(number: int, width: int = 64, height: int = 48) -> np.ndarray:
    image = np.empty((height, width, 3), np.uint8)
    image[...] = (16 * (number // 16) + 8, 16 * (number % 16) + 8, 128)  # solid colour encoding `number`
    return image


def _frame_number(image: np.ndarray) -> int:
    red, green = image[..., 0].mean(), image[..., 1].mean()
    return int(red // 16) * 16 + int(green // 16)


def _write_video(
    path: Path, pts: list[int], time_base: Fraction, rate: Fraction, *, gop: int = 250, options=None
) -> Path:
    with av.open(str(path), "w", container_options=options or {}) as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = time_base
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "veryfast"}  # keeps B-frames: decode order != presentation order
        for number, frame_pts in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(_frame_image(number), format="rgb24")
            frame.pts, frame.time_base = frame_pts, time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def _raw_pts(path: Path) -> tuple[list[int], Fraction]:
    """pts as stored in the file, read by bare PyAV (an independent check of what the fixture wrote)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.pts for frame in container.decode(stream)], stream.time_base


def _collect(batches) -> FrameBatch:
    batches = list(batches)
    return FrameBatch(
        frame_indices=np.concatenate([b.frame_indices for b in batches]),
        pts=np.concatenate([b.pts for b in batches]),
        images=np.concatenate([b.images for b in batches]),
    )


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    ntsc = Fraction(60000, 1001)
    return {
        # 3 s of 59.94 fps: time base 1/60000, pts step 1001
        "59.94": _write_video(root / "ntsc.mp4", [1001 * i for i in range(180)], Fraction(1, 60000), ntsc),
        # 2 s of 50 fps, a keyframe every 10 frames (for seeking)
        "50": _write_video(root / "pal.mp4", [i for i in range(100)], Fraction(1, 50), Fraction(50), gop=10),
        # variable frame rate: irregular gaps, in milliseconds
        "vfr": _write_video(
            root / "vfr.mp4", [0, 1000, 1500, 4000, 4100, 9000, 9010, 12000], Fraction(1, 1000), Fraction(30)
        ),
        # first pts is not 0
        "offset": _write_video(root / "offset.mp4", [5005 + 1001 * i for i in range(12)], Fraction(1, 60000), ntsc),
    }


# ------------------------------------------------------------------------------------------- timestamps
def test_59_94_every_frame_has_exact_pts(videos):
    raw, time_base = _raw_pts(videos["59.94"])
    assert time_base == Fraction(1, 60000) and raw == [1001 * i for i in range(180)]

    rows = _collect(iter_frames(videos["59.94"], fps=None, preprocess=SMALL))

    assert rows.frame_indices.tolist() == list(range(180))
    assert rows.pts.tolist() == [float(Fraction(1001 * i, 60000)) for i in range(180)]
    assert rows.pts[-1] == 179 * 1001 / 60000  # 2.98648..., not 179/60 as counting at "60 fps" would say
    assert [_frame_number(image) for image in rows.images] == list(range(180))


def test_59_94_at_10_fps_takes_the_first_frame_at_or_after_each_tenth(videos):
    # Target k/10 s falls at frame position 6000k/1001 = 6k - 6k/1001: just below 6k for 0 < k < 167, so the
    # first frame at or after it is frame 6k. 3 s hold targets k = 0..29 (3.0 s is past the last frame, 2.986 s).
    rows = _collect(iter_frames(videos["59.94"], fps=10, preprocess=SMALL))

    assert rows.frame_indices.tolist() == [6 * k for k in range(30)]
    assert rows.pts.tolist() == [float(Fraction(6 * k * 1001, 60000)) for k in range(30)]
    assert [_frame_number(image) for image in rows.images] == [6 * k for k in range(30)]


def test_50_fps_at_10_fps_takes_frames_exactly_on_the_targets(videos):
    # Frame 5k is shown at exactly k/10 s. Float arithmetic (3 * 0.1 = 0.30000000000000004) would skip to 5k+1.
    rows = _collect(iter_frames(videos["50"], fps=10, preprocess=SMALL))

    assert rows.frame_indices.tolist() == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95]
    assert rows.pts.tolist() == [k / 10 for k in range(20)]


def test_variable_frame_rate_pts_and_sampling(videos):
    raw, time_base = _raw_pts(videos["vfr"])
    assert [float(p * time_base) for p in raw] == [0.0, 1.0, 1.5, 4.0, 4.1, 9.0, 9.01, 12.0]

    every = _collect(iter_frames(videos["vfr"], fps=None, preprocess=SMALL))
    assert every.pts.tolist() == [0.0, 1.0, 1.5, 4.0, 4.1, 9.0, 9.01, 12.0]
    assert every.frame_indices.tolist() == list(range(8))

    # fps=10: 0.0 -> frame 0; 0.1..1.0 all land on frame 1 (one row); next target 1.1 -> frame 2 (1.5); 1.6 -> 4.0;
    # 4.1 -> frame 4 exactly on it; 4.2 -> 9.0; 9.1 -> 12.0, so frame 6 (9.01) is never a first frame >= a target.
    sampled = _collect(iter_frames(videos["vfr"], fps=10, preprocess=SMALL))
    assert sampled.frame_indices.tolist() == [0, 1, 2, 3, 4, 5, 7]
    assert sampled.pts.tolist() == [0.0, 1.0, 1.5, 4.0, 4.1, 9.0, 12.0]
    assert [_frame_number(image) for image in sampled.images] == [0, 1, 2, 3, 4, 5, 7]


def test_times_are_relative_to_the_container_start_when_the_first_pts_is_not_zero(videos):
    raw, time_base = _raw_pts(videos["offset"])
    assert raw[0] > 0  # the case under test really happens

    rows = _collect(iter_frames(videos["offset"], fps=None, preprocess=SMALL))

    assert rows.pts.tolist() == [float((p - raw[0]) * time_base) for p in raw]
    assert rows.pts[0] == 0.0 and rows.pts[1] == 1001 / 60000
    assert probe_video(videos["offset"]).duration == pytest.approx(12 * 1001 / 60000)


def test_frames_without_pts_are_placed_one_frame_duration_apart(videos, tmp_path):
    # A raw H.264 stream has no timestamps at all; the decoder reports each frame's duration (1/50 s).
    raw_path = tmp_path / "pal.h264"
    with av.open(str(videos["50"])) as source, av.open(str(raw_path), "w", format="h264") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.size:
                packet.stream = stream
                out.mux(packet)
    assert _raw_pts(raw_path)[0][:3] == [None, None, None]

    rows = _collect(iter_frames(raw_path, fps=None, preprocess=SMALL))

    assert rows.frame_indices.tolist() == list(range(100))
    assert rows.pts.tolist() == [float(Fraction(i, 50)) for i in range(100)]


# ------------------------------------------------------------------------------------- batching and probing
@pytest.mark.parametrize("fps", [None, 10.0])
def test_batch_size_does_not_change_the_rows(videos, fps):
    reference = _collect(iter_frames(videos["59.94"], fps=fps, preprocess=SMALL, batch_size=1000))
    for batch_size in (1, 7, 64):
        batches = list(iter_frames(videos["59.94"], fps=fps, preprocess=SMALL, batch_size=batch_size))
        assert all(len(b) == batch_size for b in batches[:-1]) and 1 <= len(batches[-1]) <= batch_size
        rows = _collect(batches)
        np.testing.assert_array_equal(rows.frame_indices, reference.frame_indices)
        np.testing.assert_array_equal(rows.pts, reference.pts)
        np.testing.assert_array_equal(rows.images, reference.images)
    assert reference.images.shape == (len(reference), 32, 32, 3) and reference.images.dtype == np.uint8
    assert reference.frame_indices.dtype == np.int64 and reference.pts.dtype == np.float64


def test_keep_source_gives_each_row_its_full_size_frame(videos):
    """predict's annotated video: every row also as the full-size RGB frame, in every batch, the last one included."""
    batches = list(iter_frames(videos["50"], fps=10, preprocess=SMALL, batch_size=3, keep_source=True))
    assert [len(b) for b in batches] == [3] * 6 + [2]
    for batch in batches:
        assert len(batch.sources) == len(batch) and all(s.shape == (48, 64, 3) for s in batch.sources)
        assert [_frame_number(s) for s in batch.sources] == batch.frame_indices.tolist()
    assert list(iter_frames(videos["50"], fps=10, preprocess=SMALL, batch_size=3))[0].sources is None


def test_probe_video(videos):
    meta = probe_video(videos["59.94"])
    assert meta.fps == pytest.approx(60000 / 1001)
    assert (meta.width, meta.height, meta.codec) == (64, 48, "h264")
    assert meta.duration == pytest.approx(180 * 1001 / 60000)
    assert meta.path == videos["59.94"]


# --------------------------------------------------------------------------------------------- bad files
def _bad_file(tmp_path: Path, videos, kind: str) -> Path:
    path = tmp_path / f"{kind}.MP4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("narration_id,start_timestamp\nP01_01_0,00:00:01.00\n")
    elif kind == "truncated":  # moov index at the end: cut in half, it is gone
        data = videos["59.94"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "unsupported":  # an unknown codec tag instead of avc1
        path.write_bytes(videos["59.94"].read_bytes().replace(b"avc1", b"zzzz"))
    elif kind == "audio_only":
        with av.open(str(path), "w", format="mp4") as out:
            stream = out.add_stream("aac", rate=8000)
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            samples.sample_rate = 8000
            out.mux(stream.encode(samples))
            out.mux(stream.encode())
    return path


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", "file not found"),
        ("empty", "empty (0 bytes)"),
        ("text", "not a video file"),
        ("truncated", "truncated or corrupt MP4"),
        ("unsupported", "unsupported video codec"),
        ("audio_only", "no video stream"),
    ],
)
def test_bad_files_raise_video_error_naming_file_and_reason(tmp_path, videos, kind, reason):
    path = _bad_file(tmp_path, videos, kind)
    for attempt in (
        lambda: probe_video(path),
        lambda: list(iter_frames(path, fps=10, preprocess=SMALL)),
        lambda: decode_frames_at(path, [0.5], SMALL),
    ):
        with pytest.raises(VideoError) as caught:
            attempt()
        assert str(path) in str(caught.value) and reason in str(caught.value)


def test_truncated_mid_stream_says_where_decoding_stopped(tmp_path, videos):
    # With the index at the front (faststart), a half file opens fine and breaks part-way through the frames.
    whole = _write_video(
        tmp_path / "faststart.mp4", list(range(100)), Fraction(1, 50), Fraction(50), options={"movflags": "faststart"}
    )
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 3 // 4])

    with pytest.raises(VideoError) as caught:
        list(iter_frames(cut, fps=None, preprocess=SMALL))

    message = str(caught.value)
    assert str(cut) in message and "truncated or corrupt" in message
    stopped = float(message.split("after t=")[1].split(" s")[0])
    assert 0.5 < stopped < 1.98  # somewhere inside the 2 s video, not at its end


# ------------------------------------------------------------------------------------ decoding at times
def test_decode_frames_at_takes_first_frame_at_or_after_each_time(videos):
    times = [1.33, 0.5, 5.0, 1.0, 1.33]  # unsorted, repeated, and one past the end
    # 50 fps: 1.33 s -> frame 67 (1.34; frame 66 is at 1.32), 0.5 -> frame 25, 5.0 -> last frame 99, 1.0 -> 50
    expected = [67, 25, 99, 50, 67]

    got = decode_frames_at(videos["50"], times, SMALL)

    assert got.pts.tolist() == [n / 50 for n in expected]
    assert [_frame_number(image) for image in got.images] == expected
    assert got.frame_indices.tolist() == [-1] * 5  # after a seek into the video the index is unknown, not guessed
    every = _collect(iter_frames(videos["50"], fps=None, preprocess=SMALL))
    np.testing.assert_array_equal(got.images, every.images[expected])  # the very same pixels as extraction


def test_decode_frames_at_from_the_start_knows_indices(videos):
    got = decode_frames_at(videos["59.94"], [0.0, 0.1], SMALL)

    assert got.frame_indices.tolist() == [0, 6]  # 0.1 s -> frame 6 at 0.1001 s
    assert got.pts.tolist() == [0.0, 6 * 1001 / 60000]
    assert got.images.shape == (2, SMALL.crop, SMALL.crop, 3)
    assert [_frame_number(image) for image in got.images] == [0, 6]


# ------------------------------------------------------------------------------------------ preprocessing
def test_resize_keeps_aspect_and_centre_crop_keeps_the_middle():
    preprocess = Preprocess(resize=32, crop=32)
    assert preprocess.resized_size(640, 360) == (56, 32)  # 32 * 640 / 360 = 56.9, truncated like torchvision
    assert Preprocess().resized_size(640, 360) == (455, 256)
    assert Preprocess().resized_size(360, 640) == (256, 455)
    assert Preprocess().crop_offsets(455, 256) == (116, 16)

    # 192x64 frame in thirds: red | green | blue. Resized to 96x32, the centre 32x32 crop is columns 32..63: green.
    image = np.zeros((64, 192, 3), np.uint8)
    image[:, :64, 0] = image[:, 64:128, 1] = image[:, 128:, 2] = 255
    crop = Resizer(preprocess)(av.VideoFrame.from_ndarray(image, format="rgb24"))

    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    inner = crop[:, 2:-2].astype(int)  # the filter may blend one column at each colour edge
    assert (inner[..., 1] == 255).all() and (inner[..., 0] == 0).all() and (inner[..., 2] == 0).all()

    # Portrait: the crop is taken from the vertical middle.
    tall = np.zeros((192, 64, 3), np.uint8)
    tall[:64, :, 0] = tall[64:128, :, 1] = tall[128:, :, 2] = 255
    crop = Resizer(preprocess)(av.VideoFrame.from_ndarray(tall, format="rgb24")).astype(int)
    assert (crop[2:-2, :, 1] == 255).all() and (crop[2:-2, :, [0, 2]] == 0).all()


def test_normalize_is_imagenet_normalisation_in_nchw():
    preprocess = Preprocess()
    images = np.zeros((2, 4, 5, 3), np.uint8)
    images[..., 0], images[..., 1], images[..., 2] = 255, 0, 51
    images[1, 0, 0] = (0, 255, 102)

    pixels = preprocess.normalize(torch.from_numpy(images))

    assert pixels.shape == (2, 3, 4, 5) and pixels.dtype == torch.float32
    expected_red = (1.0 - 0.485) / 0.229  # (255/255 - mean) / std
    assert pixels[0, 0].sub(expected_red).abs().max() < 1e-5
    assert pixels[0, 1].sub(-0.456 / 0.224).abs().max() < 1e-5
    assert pixels[0, 2].sub((0.2 - 0.406) / 0.225).abs().max() < 1e-5
    assert abs(pixels[1, 1, 0, 0].item() - (1.0 - 0.456) / 0.224) < 1e-5
    torch.testing.assert_close(pixels, preprocess.normalize(images))  # numpy input is accepted too


def test_preprocess_identity_and_validation():
    identity = Preprocess(resize=128, crop=112).identity()
    assert identity["resize"] == 128 and identity["crop"] == 112
    assert identity["mean"] == [0.485, 0.456, 0.406] and identity["interpolation"] == "swscale_bilinear"
    with pytest.raises(Exception, match="crop <= resize"):
        Preprocess(resize=100, crop=112)
    assert Preprocess(interpolation="bicubic").identity()["interpolation"] == "swscale_bicubic"
    with pytest.raises(Exception, match="interpolation 'lanczos'.*bilinear, bicubic"):
        Preprocess(interpolation="lanczos")


def test_bicubic_resizing_is_swscale_s_bicubic_filter():
    """The Resizer scales with the preprocessing's filter: bicubic equals swscale's BICUBIC and differs from the
    bilinear result on a detailed frame."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    bicubic = Resizer(Preprocess(resize=40, crop=40, interpolation="bicubic"))(frame)
    bilinear = Resizer(Preprocess(resize=40, crop=40))(frame)
    reference = frame.reformat(width=53, height=40, interpolation="BICUBIC").to_ndarray(format="rgb24")
    assert np.array_equal(bicubic, reference[:, 6:46])  # (53 - 40) / 2 = 6.5 -> 6 (torchvision's rounding)
    assert not np.array_equal(bicubic, bilinear)


def _write_bframe_video(path: Path, *, audio: bool) -> None:
    """30 frames at 30 fps, H.264 with B-frames, no edit list (so the video's first pts is 2 frames, not 0), with
    or without a silent AAC track that starts at 0."""
    with av.open(str(path), "w", options={"use_editlist": "0"}) as container:
        video = container.add_stream("libx264", rate=Fraction(30), options={"bf": "2", "g": "12"})
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = container.add_stream("aac", rate=48000) if audio else None
        for number in range(30):
            frame = av.VideoFrame.from_ndarray(_frame_image(number), format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            for k in range(48):  # 1.02 s of silence
                samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                samples.sample_rate, samples.pts = 48000, k * 1024
                for packet in sound.encode(samples):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)


def test_row_times_come_from_the_video_stream_with_or_without_audio(tmp_path):
    silent, with_audio = tmp_path / "silent.mp4", tmp_path / "audio.mp4"
    _write_bframe_video(silent, audio=False)
    _write_bframe_video(with_audio, audio=True)
    with av.open(str(with_audio)) as container:  # the case under test: audio at 0, video 2 frames later
        assert container.streams.audio[0].start_time == 0 and container.streams.video[0].start_time > 0
    rows = {name: _collect(iter_frames(path, fps=10, preprocess=SMALL)) for name, path in
            (("silent", silent), ("audio", with_audio))}
    for batch in rows.values():
        assert batch.pts.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], abs=1e-9)
        assert batch.frame_indices.tolist() == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
        assert [_frame_number(image) for image in batch.images] == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    np.testing.assert_array_equal(rows["silent"].pts, rows["audio"].pts)
    assert probe_video(with_audio).duration == pytest.approx(probe_video(silent).duration) == pytest.approx(1.0)
    at = decode_frames_at(with_audio, [0.0, 0.5], SMALL)
    assert at.pts.tolist() == [0.0, 0.5]


# ------------------------------------------------------------------------------------------ whole videos
SETTINGS = DecodeSettings(fps=10.0, preprocess=SMALL, batch_size=4)  # 3 s of 59.94 fps -> 30 rows: 8 batches


def _jobs(*jobs: VideoJob) -> queue.Queue:
    jobs_queue = queue.Queue()
    for job in (*jobs, None):
        jobs_queue.put(job)
    return jobs_queue


def test_a_video_decodes_to_its_start_its_batches_and_an_end_and_never_raises(videos, tmp_path):
    events = list(decode_video(VideoJob("ntsc", videos["59.94"]), SETTINGS))
    assert isinstance(events[0], VideoStarted) and events[0].meta == probe_video(videos["59.94"])
    assert [len(e.batch) for e in events[1:-1]] == [4] * 7 + [2] and events[-1] == VideoEnded("ntsc")
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert list(decode_video(VideoJob("empty", tmp_path / "empty.mp4"), SETTINGS)) == \
        [VideoEnded("empty", f"{tmp_path / 'empty.mp4'}: file is empty (0 bytes): an interrupted copy or download; "
                             "copy it again")]


def test_a_video_shorter_than_its_annotations_ends_with_why(videos):
    # The file lasts 2.99 s; the annotations ask for rows until 9.5 s: a shortened or wrong copy, not a complete one.
    *_, end = decode_video(VideoJob("ntsc", videos["59.94"], needed_until=9.5), SETTINGS)
    assert "video ends at 2.90 s but its annotations run to 9.50 s" in end.error


def _mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps (Linux)")
def test_decode_processes_hand_over_the_frames_of_iter_frames_without_torch(videos):
    # The images travel through shared-memory slots, not pickled through the pipe, so a decode process never imports
    # torch (2 s of a core and ~200 MB each); its slots are removed when the pool closes.
    pool = DecodePool(1, SETTINGS)
    slot_names = list(pool._workers[0].slots.names)
    got, maps = [], ""
    with pool:
        for event in pool.decode(_jobs(VideoJob("ntsc", videos["59.94"]), VideoJob("pal", videos["50"]))):
            if isinstance(event, FramesDecoded):
                got.append(event)
                maps = maps or _mapped_libraries(pool._workers[0].process.pid)
    assert "libtorch" not in maps and "libav" in maps  # the worker decodes (FFmpeg loaded) without torch
    for name, path in (("ntsc", videos["59.94"]), ("pal", videos["50"])):
        batches = [e.batch for e in got if e.video_id == name]
        expected = list(iter_frames(path, fps=10.0, preprocess=SMALL, batch_size=4))
        assert [len(b) for b in batches] == [len(b) for b in expected]
        for batch, reference in zip(batches, expected):  # the same pixels, pts and frame numbers as decoding here
            np.testing.assert_array_equal(batch.images, reference.images)
            np.testing.assert_array_equal(batch.pts, reference.pts)
            np.testing.assert_array_equal(batch.frame_indices, reference.frame_indices)
    assert not any(np.shares_memory(a.batch.images, b.batch.images) for a, b in zip(got, got[1:]))  # copies
    assert not [name for name in slot_names if os.path.exists(f"/dev/shm/{name}")]


@pytest.mark.parametrize("kills", [1, 2])
def test_a_dead_decode_process_costs_its_video_one_retry(videos, kills):
    """SIGKILL the decode process at the video's first batch: it starts over on a fresh process (a second
    VideoStarted) and ends whole; killed on both attempts, it ends with why, and the next video is decoded."""
    events, killed = [], []
    with DecodePool(1, SETTINGS) as pool:
        for event in pool.decode(_jobs(VideoJob("ntsc", videos["59.94"]), VideoJob("pal", videos["50"]))):
            events.append(event)
            if isinstance(event, FramesDecoded) and event.video_id == "ntsc" and len(killed) < kills:
                (process,) = [p for p in multiprocessing.active_children() if p.name == "epicfeat-decode"]
                if process.pid not in killed:
                    killed.append(process.pid)
                    os.kill(process.pid, signal.SIGKILL)
    starts = [e.video_id for e in events if isinstance(e, VideoStarted)]
    ends = [e for e in events if isinstance(e, VideoEnded)]
    if kills == 1:
        assert starts == ["ntsc", "ntsc", "pal"] and ends == [VideoEnded("ntsc"), VideoEnded("pal")]
        restarted = [i for i, e in enumerate(events) if isinstance(e, VideoStarted)][1]
        assert sum(len(e.batch) for e in events[restarted:]
                   if isinstance(e, FramesDecoded) and e.video_id == "ntsc") == 30  # the whole video, from its start
    else:
        assert starts == ["ntsc", "ntsc", "pal"] and ends[-1] == VideoEnded("pal")
        assert "the decode process died (signal 9) on each of 2 attempts" in ends[0].error


def test_closing_a_pool_mid_video_is_quick(videos):
    pool = DecodePool(1, SETTINGS)
    events = pool.decode(_jobs(VideoJob("ntsc", videos["59.94"])))
    next(events)  # the worker now waits, mid-video, for the parent to take its batches
    time.sleep(0.5)
    started = time.perf_counter()
    pool.close()
    assert time.perf_counter() - started < 2  # not the join timeout of a worker that never reads its pipe again


def test_importing_the_decode_room_and_the_extract_command_loads_no_torch():
    # Decode processes import the decode room; `epicfeat --help` imports the command. Neither pays for torch.
    code = ("import sys, epicfeat.frames, epicfeat.cli.extract; "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_codec_threads_share_the_cores_among_the_decoders(monkeypatch):
    monkeypatch.setattr("epicfeat.frames.available_cores", lambda: 16)
    assert [codec_threads(n) for n in (1, 2, 7, 15, 16, 40)] == [16, 8, 2, 1, 1, 1]
    assert codec_threads(15, requested=3) == 3
