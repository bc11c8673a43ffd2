"""Video discovery: both EPIC layouts and a flat folder, any case of .mp4, missing videos, one listing per folder."""
import os
from pathlib import Path

import pytest

from epicfeat.data import videos as videos_module
from epicfeat.data.videos import (VideoLookup, VideoRootError, VideoSource, epic_frames_fps, find_sources, find_videos,
                                  source_identity)
from epicfeat.errors import EpicfeatError


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not really a video")
    return path


@pytest.fixture()
def video_root(tmp_path) -> Path:
    root = tmp_path / "videos"
    _touch(root / "P01" / "P01_01.MP4")             # videos_640x360 layout
    _touch(root / "P01" / "P01_02.mp4")
    _touch(root / "P02" / "videos" / "P02_01.Mp4")  # official layout
    _touch(root / "P02" / "videos" / "P02_02.MP4")
    _touch(root / "P03_01.mp4")                     # flat
    # Things that are not videos of the requested ids:
    _touch(root / "P01" / "P01_03.avi")
    _touch(root / "P01" / "P01_04.MP4.part")
    (root / "P01" / "P01_05.MP4").mkdir()
    return root


def test_both_layouts_flat_and_mixed_case(video_root):
    ids = ["P02_02", "P01_01", "P03_01", "P02_01", "P01_02"]
    lookup = find_videos(video_root, ids)
    assert isinstance(lookup, VideoLookup)
    assert lookup.found == {
        "P02_02": video_root / "P02" / "videos" / "P02_02.MP4",
        "P01_01": video_root / "P01" / "P01_01.MP4",
        "P03_01": video_root / "P03_01.mp4",
        "P02_01": video_root / "P02" / "videos" / "P02_01.Mp4",
        "P01_02": video_root / "P01" / "P01_02.mp4",
    }
    assert list(lookup.found) == ids  # input order
    assert lookup.missing == ()


def test_missing_videos_in_input_order(video_root):
    ids = ["P01_05", "P01_01", "P09_01", "P01_03", "P01_04", "P02_01", "P01_05"]
    lookup = find_videos(video_root, ids)
    assert list(lookup.found) == ["P01_01", "P02_01"]
    # a folder named like a video, another extension, a partial download, an unknown participant; repeats once
    assert lookup.missing == ("P01_05", "P09_01", "P01_03", "P01_04")


def test_participant_folder_preferred_over_videos_subfolder(tmp_path):
    direct = _touch(tmp_path / "P01" / "P01_01.MP4")
    _touch(tmp_path / "P01" / "videos" / "P01_01.MP4")
    _touch(tmp_path / "P01" / "videos" / "P01_02.MP4")
    _touch(tmp_path / "P01_02.MP4")
    lookup = find_videos(str(tmp_path), ["P01_01", "P01_02"])
    assert lookup.found == {"P01_01": direct, "P01_02": tmp_path / "P01" / "videos" / "P01_02.MP4"}


def test_one_listing_per_folder(video_root, monkeypatch):
    listed = []
    real_scandir = os.scandir

    def counting_scandir(path):
        listed.append(Path(path))
        return real_scandir(path)

    monkeypatch.setattr(videos_module.os, "scandir", counting_scandir)
    ids = [f"P01_{i:02d}" for i in range(1, 40)] + [f"P02_{i:02d}" for i in range(1, 40)]
    lookup = find_videos(video_root, ids)
    assert len(lookup.found) == 4 and len(lookup.missing) == 74
    # root once, then each participant folder and its videos/ subfolder once
    assert sorted(listed) == sorted([video_root, video_root / "P01", video_root / "P01" / "videos",
                                     video_root / "P02", video_root / "P02" / "videos"])


def test_missing_root_is_a_user_error(tmp_path):
    with pytest.raises(VideoRootError) as info:
        find_videos(tmp_path / "no-such-folder", ["P01_01"])
    assert isinstance(info.value, EpicfeatError)
    assert "no-such-folder" in str(info.value) and "--videos" in str(info.value)


def test_empty_request(video_root):
    assert find_videos(video_root, []) == VideoLookup(found={}, missing=())


# --------------------------------------------------------------------------------- every form: find_sources
def _frames_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "frame_0000000001.jpg").write_bytes(b"")
    return path


@pytest.fixture()
def forms_root(tmp_path) -> Path:
    root = tmp_path / "epic"
    _touch(root / "P01" / "videos" / "P01_01.MP4")              # video only
    _touch(root / "P01" / "P01_02.MP4")                         # video and frames
    _frames_folder(root / "P01" / "rgb_frames" / "P01_02")
    _frames_folder(root / "P01" / "rgb_frames" / "P01_03")      # untarred frames, the tar beside them too
    _touch(root / "P01" / "rgb_frames" / "P01_03.tar")
    _touch(root / "P02" / "rgb_frames" / "P02_101.tar")         # an extension video, as downloaded
    return root


def test_find_sources_every_form_and_the_auto_rule(forms_root):
    ids = ["P01_01", "P01_02", "P01_03", "P02_101", "P09_01"]
    lookup = find_sources(forms_root, ids)  # 2 as video files, 3 as frames: frames win
    assert lookup.found == {
        "P01_02": VideoSource(forms_root / "P01" / "rgb_frames" / "P01_02", 60.0),
        "P01_03": VideoSource(forms_root / "P01" / "rgb_frames" / "P01_03", 60.0),  # the folder beats its tar
        "P02_101": VideoSource(forms_root / "P02" / "rgb_frames" / "P02_101.tar", 50.0),  # extension: 50 fps
    }
    assert lookup.missing == ("P01_01", "P09_01")
    assert lookup.form == "frames" and source_identity(lookup.form, None) == "frames-epic"
    # A tie goes to the video files (a cache of videos stays that cache when frames appear beside them).
    tie = find_sources(forms_root, ["P01_01", "P01_02", "P01_03"])
    assert {i: s.form for i, s in tie.found.items()} == {"P01_01": "video", "P01_02": "video"}
    assert tie.form == "video" and tie.missing == ("P01_03",)


def test_find_sources_forced_form_and_frames_fps(forms_root):
    video = find_sources(forms_root, ["P01_02", "P02_101"], source="video")
    assert video.found == {"P01_02": VideoSource(forms_root / "P01" / "P01_02.MP4")}
    assert video.form == "video" and video.missing == ("P02_101",)
    frames = find_sources(forms_root, ["P01_01", "P02_101"], source="frames", frames_fps=30)
    assert frames.found == {"P02_101": VideoSource(forms_root / "P02" / "rgb_frames" / "P02_101.tar", 30.0)}
    assert source_identity(frames.form, 30) == "frames-30fps" and source_identity("video", 30) == "video"


def test_find_sources_template(forms_root):
    lookup = find_sources(forms_root, ["P01_02", "P01_03", "P02_101"], source="frames",
                          template="{root}/{participant}/rgb_frames/{video}.tar")
    assert lookup.found == {"P01_03": VideoSource(forms_root / "P01" / "rgb_frames" / "P01_03.tar", 60.0),
                            "P02_101": VideoSource(forms_root / "P02" / "rgb_frames" / "P02_101.tar", 50.0)}
    videos = find_sources(forms_root, ["P01_01", "P01_02"], template="{root}/{participant}/{video}.MP4")
    assert videos.found == {"P01_02": VideoSource(forms_root / "P01" / "P01_02.MP4")}
    with pytest.raises(VideoRootError, match="--video-path.*{root}, {participant} and {video}"):
        find_sources(forms_root, ["P01_01"], template="{root}/{camera}/{video}.MP4")


def test_frames_rate_by_id():
    assert (epic_frames_fps("P01_01"), epic_frames_fps("P01_99"), epic_frames_fps("P37_103")) == (60.0, 60.0, 50.0)
    with pytest.raises(VideoRootError, match="--frames-fps"):
        epic_frames_fps("kitchen_cam")
