"""Video discovery: both EPIC layouts and a flat folder, any case of .mp4, missing videos, one listing per folder."""
import os
from pathlib import Path

import pytest

from epicfeat.data import videos as videos_module
from epicfeat.data.videos import VideoLookup, VideoRootError, find_videos
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
