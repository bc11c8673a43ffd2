"""The synthetic EPIC-format dataset: schemas, decodable videos that match video_info, the planted signal,
determinism, and the folder's reuse / regeneration rules."""
import dataclasses
import json
import math
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from epicfeat.data import synthetic as S
from epicfeat.data.annotations import EpicAnnotations
from epicfeat.data.synthetic import (NOUN_LOOKS, SyntheticDatasetError, SyntheticSpec,
                                     generate_synthetic_dataset)
from epicfeat.data.videos import find_videos

TINY = SyntheticSpec.tiny()
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def annotations(synthetic_dataset) -> EpicAnnotations:
    return EpicAnnotations(synthetic_dataset.annotations)


@pytest.fixture(scope="module")
def plan():
    """What the conftest dataset (tiny spec, seed 0) was generated from."""
    return S._plan(TINY, 0)


def _decode(path: Path):
    """(times as exact Fractions, RGB frames (n, H, W, 3) uint8, stream facts) of a whole (tiny) video."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        facts = {"codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                 "rate": stream.average_rate, "duration": stream.duration * stream.time_base,
                 "size": (stream.codec_context.width, stream.codec_context.height)}
        times, images = [], []
        for frame in container.decode(stream):
            times.append(frame.pts * stream.time_base)
            images.append(frame.to_ndarray(format="rgb24"))
    return times, np.stack(images), facts


# --- annotations ----------------------------------------------------------------------------------------------


def test_annotation_layer_reads_back_every_file(annotations, plan):
    for split in SPLITS:
        planned = [s.narration_id for v in plan if v.split == split for s in v.segments]
        segments = annotations.segments(split)
        assert len(segments) == len(planned) > 0
        assert sorted(segments["narration_id"]) == sorted(planned)
    assert len(annotations.verbs) == 6 and annotations.verbs.keys[:2] == ("grow", "shrink")
    assert len(annotations.nouns) == TINY.nouns == 8
    assert list(annotations.video_info.index) == [v.video_id for v in plan] == annotations.video_ids("all")
    # Tiny spec: P01 seen (train, validation, test), P02 only in validation, P03 only in test.
    assert annotations.unseen_participants("validation") == {"P02"}
    assert annotations.unseen_participants("test") == {"P03"}
    assert set(annotations.segments("train")["participant_id"]) == {"P01"}
    assert "verb_class" not in annotations.segments("test").columns
    train = annotations.segments("train")
    labelled = annotations.segments("train+validation")
    spoken_nouns = labelled["noun"].str.split(":").str[::-1].str.join(" ")  # "disc:red" -> "red disc"
    assert (labelled["narration"] == labelled["verb"] + " " + spoken_nouns).all()
    assert (labelled["all_noun_classes"] == "[" + labelled["noun_class"].astype(str) + "]").all()
    # Tail classes: the rarest training classes, holding at most 20% of training segments together.
    for name, tail in (("verb_class", annotations.tail_verbs), ("noun_class", annotations.tail_nouns)):
        counts = train[name].value_counts()
        assert tail and counts.reindex(list(tail), fill_value=0).sum() <= 0.2 * len(train)
        assert counts.reindex(list(tail), fill_value=0).max() <= counts.drop(list(tail), errors="ignore").min()


def test_csv_text_follows_epic_conventions(synthetic_dataset):
    train = (synthetic_dataset.annotations / "EPIC_100_train.csv").read_text()
    assert "\r" not in train
    rows = [line.split(",") for line in train.splitlines()[1:]]
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", row[3]) for row in rows)  # narration_timestamp
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d", t) for row in rows for t in row[4:6])  # start/stop
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)  # sorted by narration_id as text
    nouns = (synthetic_dataset.annotations / "EPIC_100_noun_classes.csv").read_text().splitlines()
    assert nouns[:2] == ["id,key,instances,category", "0,disc:red,\"['disc:red', 'red disc']\",round"]
    info = (synthetic_dataset.annotations / "EPIC_100_video_info.csv").read_text().splitlines()
    first_video = S._plan(TINY, 0)[0]  # 59.94 fps: duration = frames * 1001 / 60000, to the microsecond
    assert info[1] == f"P01_01,{round(first_video.frames * 1001 / 60000, 6)},59.94005994005994,192x108"


def test_headers_match_the_real_epic_files(synthetic_dataset, shared_annotations):
    real_names = {"EPIC_100_train.csv": "EPIC_100_uda_source_train.csv"}  # same schema as the full train file
    ours = sorted(synthetic_dataset.annotations.glob("EPIC_100_*.csv"))
    assert len(ours) == 10
    for path in ours:
        real = shared_annotations / real_names.get(path.name, path.name)
        with real.open() as f:
            assert path.read_text().splitlines()[0] == f.readline().rstrip("\n"), path.name


# --- videos -----------------------------------------------------------------------------------------------------


def test_videos_decode_and_match_video_info(synthetic_dataset, annotations, plan):
    lookup = find_videos(synthetic_dataset.videos, annotations.video_ids("all"))
    assert lookup.missing == () and len(lookup.found) == 6
    assert lookup.found["P02_01"] == synthetic_dataset.videos / "P02" / "P02_01.MP4"
    rates = set()
    for video in plan:
        info = annotations.video_info.loc[video.video_id]
        times, images, facts = _decode(lookup.found[video.video_id])
        assert facts["codec"] == "h264" and facts["pix_fmt"] == "yuv420p" and facts["size"] == (192, 108)
        assert images.shape == (video.frames, 108, 192, 3)
        assert float(facts["rate"]) == info["fps"]
        assert len(times) == round(info["duration"] * info["fps"])
        assert abs(float(facts["duration"]) - info["duration"]) < 1 / info["fps"]
        assert times == [Fraction(i) / facts["rate"] for i in range(len(times))]  # exact, from 0
        rates.add(facts["rate"])
    assert rates == {Fraction(60000, 1001), Fraction(50), Fraction(30)}


def test_segment_frames_match_timestamps(annotations):
    """start/stop_frame (1-based) are the first/last frame with start <= t < stop; no frame sits on a boundary."""
    segments = pd.concat([annotations.segments("train+validation"), annotations.segments("test")])
    for video_id, rows in segments.groupby("video_id"):
        fps, duration = annotations.video_info.loc[video_id, ["fps", "duration"]]
        times = np.arange(round(duration * fps)) / fps
        previous_stop = 0.0
        for row in rows.sort_values("start_sec").itertuples():
            inside = np.flatnonzero((times >= row.start_sec) & (times < row.stop_sec))
            assert inside.tolist() == list(range(row.start_frame - 1, row.stop_frame)), row.narration_id
            assert len(inside) >= 2
            assert np.abs(times[:, None] - [row.start_sec, row.stop_sec]).min() >= 0.002 - 1e-9
            assert row.start_sec > previous_stop  # background gaps between segments
            previous_stop = row.stop_sec
        assert previous_stop < duration


# --- the planted signal -----------------------------------------------------------------------------------------


def test_paired_verbs_are_exact_time_reversals():
    """A reverse verb draws the same object motion as its forward verb, swapped: its frames are the forward
    verb's frames backwards (so frame-by-frame, the two verbs are indistinguishable)."""
    background = np.full((TINY.height, TINY.width, 3), 120, np.float32)
    for pair in range(len(S.VERB_PAIRS)):
        forward = S._object_motion(np.random.default_rng(7), TINY, 2 * pair)
        reverse = S._object_motion(np.random.default_rng(7), TINY, 2 * pair + 1)
        assert reverse == forward[::-1]
        frames = {}
        for verb, (start, end) in ((2 * pair, forward), (2 * pair + 1, reverse)):
            segment = S._Segment("P01_01_0", verb, 3, 0, 100, 0, 10, 40, start, end, (240.0, 220.0, 40.0))
            frames[verb] = []
            for index in range(segment.first_frame, segment.last_frame + 1):
                frame = background.copy()
                S._draw_object(frame, "diamond", np.float32(segment.colour), S._object_at(segment, index), (0, 0))
                frames[verb].append(frame)
        assert np.array_equal(np.stack(frames[2 * pair + 1]), np.stack(frames[2 * pair][::-1]))
        assert not np.array_equal(frames[2 * pair][0], frames[2 * pair][-1])  # it does change over time


def _object_mask(frame: np.ndarray, background: np.ndarray) -> np.ndarray:
    return np.abs(frame.astype(np.int16) - background.astype(np.int16)).max(axis=2) > 40  # (H, W)


def test_decoded_segments_show_their_labels(synthetic_dataset, annotations):
    """In the real files: each labelled segment's object changes the way its verb says, in its noun's colour."""
    segments = annotations.segments("train+validation")
    lookup = find_videos(synthetic_dataset.videos, annotations.video_ids("all"))
    crop_half = 0.875 * 108 / 2  # a 112/128 (or 224/256) centre crop keeps the middle 0.875 of the height
    checked = 0
    for video_id, rows in segments.groupby("video_id"):
        _, images, _ = _decode(lookup.found[video_id])
        for row in rows.itertuples():
            first, last = row.start_frame - 1, row.stop_frame - 1
            background = images[first - 1]  # the gap before every segment shows only the background
            masks = [_object_mask(images[i], background) for i in (first, last)]
            area = [int(m.sum()) for m in masks]
            if row.verb in ("grow", "fade-in"):
                assert area[1] > 2 * area[0] + 20, row.narration_id
            elif row.verb in ("shrink", "fade-out"):
                assert area[0] > 2 * area[1] + 20, row.narration_id
            else:
                x = [np.nonzero(m)[1].mean() for m in masks]
                assert (x[1] - x[0]) * (1 if row.verb == "move-right" else -1) > 15, row.narration_id
            biggest = int(np.argmax(area))
            frame, mask = images[(first, last)[biggest]], masks[biggest]
            colour = np.median(frame[mask], axis=0)  # (3,)
            palette = np.array([look[2] for look in NOUN_LOOKS[:TINY.nouns]])
            assert np.argmin(np.abs(palette - colour).sum(axis=1)) == row.noun_class, row.narration_id
            ys, xs = np.nonzero(mask)  # inside the centre square that a centre crop keeps (bar codec noise)
            outside = (np.abs(xs + 0.5 - 96) > crop_half) | (np.abs(ys + 0.5 - 54) > crop_half)
            assert outside.mean() < 0.01, row.narration_id
            checked += 1
    assert checked == len(segments)


def test_default_spec_is_the_demo_dataset():
    """Planned only (no pixels): about 6 minutes, ~140/55/55 segments, imbalanced nouns, all three frame rates."""
    videos = S._plan(SyntheticSpec(), 0)
    assert len(videos) == 18
    assert 4.5 < sum(v.duration for v in videos) / 60 < 7
    counts = {split: sum(len(v.segments) for v in videos if v.split == split) for split in SPLITS}
    assert counts["train"] >= 120 and counts["validation"] >= 45 and counts["test"] >= 45
    assert {v.fps for v in videos} == {Fraction(60000, 1001), Fraction(50), Fraction(30)}
    train = [s for v in videos if v.split == "train" for s in v.segments]
    verbs = np.bincount([s.verb for s in train], minlength=6)
    nouns = np.bincount([s.noun for s in train], minlength=8)
    assert np.abs(verbs[0::2] - verbs[1::2]).max() <= 1  # a pair's verbs are equally common
    assert (np.diff(nouns) <= 0).all() and nouns[0] >= 5 * nouns[-1] > 0
    durations = [(s.stop_cs - s.start_cs) / 100 for s in train]
    assert 0.6 <= min(durations) and max(durations) <= 1.82
    # The object and all its motion (plus camera shake and the anti-aliased edge) stay inside the centre square
    # that a 112/128 or 224/256 centre crop keeps of a 16:9 frame.
    crop_half = 0.875 * 108 / 2
    for segment in (s for v in videos for s in v.segments):
        for state in (segment.start_state, segment.end_state):
            reach = max(abs(state.x - 96), abs(state.y - 54)) + state.radius + S._shake_pixels(SyntheticSpec()) + 0.5
            assert reach <= crop_half, segment.narration_id


def test_apportion_and_tail_classes_by_hand():
    assert S._apportion(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert S._apportion(7, [1, 1, 1]) == [3, 2, 2]
    assert S._apportion(5, [0.225, 0.225, 0.16, 0.16, 0.09, 0.09]) == [1, 1, 1, 1, 1, 0]
    # At most 20% of 100 instances, rarest first: 4 + 5 = 9 fits, + 11 = 20 fits too, + 30 does not.
    assert S._tail_classes([50, 30, 11, 5, 4]) == [2, 3, 4]
    assert S._tail_classes([40, 35, 15, 6, 4]) == [3, 4]  # 4 + 6 = 10 fits, + 15 = 25 does not


# --- determinism and the folder ---------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, synthetic_dataset):
    again = generate_synthetic_dataset(tmp_path / "again", seed=0, spec=TINY)
    ours, theirs = _files(synthetic_dataset.root), _files(again.root)
    assert len(ours) == 10 + 6 + 1 and ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == theirs[name], name
    other = generate_synthetic_dataset(tmp_path / "other", seed=1, spec=TINY)
    assert (other.annotations / "EPIC_100_train.csv").read_bytes() != ours["annotations/EPIC_100_train.csv"]


def test_reuse_regenerate_and_recover_from_a_crash(tmp_path, monkeypatch):
    root = tmp_path / "data"
    first = generate_synthetic_dataset(root, seed=0, spec=TINY)
    marker = root / S.MARKER_FILE
    stamp = {p: p.stat().st_mtime_ns for p in (marker, first.videos / "P01" / "P01_01.MP4")}
    assert json.loads(marker.read_text())["identity"]["seed"] == 0
    assert not (root / S.IN_PROGRESS_FILE).exists()

    assert generate_synthetic_dataset(root, seed=0, spec=TINY) == first  # reused: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp

    train_seed0 = (first.annotations / "EPIC_100_train.csv").read_text()
    generate_synthetic_dataset(root, seed=1, spec=TINY)  # another seed: regenerated in place
    assert json.loads(marker.read_text())["identity"]["seed"] == 1
    assert (first.annotations / "EPIC_100_train.csv").read_text() != train_seed0

    (first.videos / "P09").mkdir()  # stray leftovers of ours must not survive a regeneration
    real_encode = S._encode_video

    def crash_on_third_video(path, video, *args):
        if video.video_id == "P01_03":
            raise RuntimeError("killed")
        real_encode(path, video, *args)

    monkeypatch.setattr(S, "_encode_video", crash_on_third_video)
    with pytest.raises(RuntimeError):
        generate_synthetic_dataset(root, seed=0, spec=TINY)
    assert not marker.exists() and (root / S.IN_PROGRESS_FILE).exists()  # half-written: no marker
    monkeypatch.setattr(S, "_encode_video", real_encode)

    generate_synthetic_dataset(root, seed=0, spec=TINY)
    assert sorted(p.name for p in first.videos.iterdir()) == ["P01", "P02", "P03"]
    assert (first.annotations / "EPIC_100_train.csv").read_text() == train_seed0
    assert len(list(first.videos.rglob("*.MP4"))) == 6


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SyntheticDatasetError, match=r"not empty \(notes.txt, videos\)"):
        generate_synthetic_dataset(tmp_path, seed=0, spec=TINY)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "videos").is_dir()


@pytest.mark.parametrize("changes, message", [
    ({"nouns": 11}, "nouns must be 1..10"),
    ({"width": 191}, "even sides"),
    ({"segment_seconds": (0.05, 1.0)}, "at least 2 frames at 30 fps"),
    ({"frame_rates": ("fast",)}, "'fast' is not a number"),
    ({"frame_rates": ("100",)}, "frame rate 100 fps leaves no centisecond"),
])
def test_bad_spec_is_a_clear_error(changes, message):
    with pytest.raises(SyntheticDatasetError, match=re.escape(message)):
        dataclasses.replace(TINY, **changes)


def test_bad_seed_is_a_clear_error(tmp_path):
    with pytest.raises(SyntheticDatasetError, match="seed must be a non-negative integer"):
        generate_synthetic_dataset(tmp_path, seed=-1, spec=TINY)


def test_official_frames_beside_the_videos(tmp_path):
    """rgb_frames=True: every video's frames at 60 fps (EPIC-55 ids), folders for odd numbers and tars for even, each
    frame k the video frame shown at (k - 1) / 60 s; find_sources sees both forms."""
    from epicfeat.data.synthetic import resampled
    from epicfeat.data.videos import find_sources
    from epicfeat.frame_files import FrameFiles

    spec = dataclasses.replace(TINY, rgb_frames=True)
    dataset = generate_synthetic_dataset(tmp_path / "data", seed=0, spec=spec)
    ids = [video.video_id for video in S._plan(spec, 0)]
    lookup = find_sources(dataset.videos, ids, source="frames")
    assert lookup.missing == () and find_sources(dataset.videos, ids).form == "video"  # a tie: the videos
    for video in S._plan(spec, 0):
        source = lookup.found[video.video_id]
        assert source.frames_fps == 60.0
        assert source.path.name == video.video_id + (".tar" if int(video.video_id[-2:]) % 2 == 0 else "")
        times, images, facts = _decode(dataset.videos / video.participant_id / f"{video.video_id}.MP4")
        expected = list(resampled(iter(images), facts["rate"], Fraction(60)))
        with FrameFiles(source.path) as files:
            assert files.count == len(expected) == math.ceil(len(times) * 60 / facts["rate"])
            for k in (1, files.count // 2, files.count):  # JPEG loss only
                decoded = av.CodecContext.create("mjpeg", "r").decode(av.Packet(files.read(k)))[0]
                assert np.abs(decoded.to_ndarray(format="rgb24").astype(int) - expected[k - 1]).mean() < 4
    tar = lookup.found["P01_02"].path
    before = tar.stat().st_mtime_ns
    generate_synthetic_dataset(tmp_path / "data", seed=0, spec=spec)  # complete: reused
    assert tar.stat().st_mtime_ns == before
    tar.unlink()  # a missing frames file: the dataset is regenerated
    generate_synthetic_dataset(tmp_path / "data", seed=0, spec=spec)
    assert tar.is_file()
