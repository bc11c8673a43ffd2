"""Find EPIC-KITCHENS-100 video files on disk, in either of the common layouts.

Looked up, in this order of preference, for video ``P01_01`` under ``root``:

1. ``<root>/P01/P01_01.MP4``          the downscaled ``videos_640x360`` copies
2. ``<root>/P01/videos/P01_01.MP4``   the official download layout
3. ``<root>/P01_01.MP4``              a flat folder of videos

The extension matches in any case (.MP4, .mp4, .Mp4). Each folder is listed once (``os.scandir``), never globbed
per video: on a network filesystem 700 globs take minutes, a few dozen listings take seconds.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from epicfeat.errors import EpicfeatError

VIDEO_EXTENSION = ".mp4"  # compared case-insensitively


class VideoRootError(EpicfeatError):
    """The video root folder does not exist or cannot be listed."""


@dataclass(frozen=True)
class VideoLookup:
    """Where each requested video is: ``found`` maps video_id -> path; ``missing`` lists the rest (input order)."""

    found: dict[str, Path]
    missing: tuple[str, ...]


def _list_videos(folder: Path) -> dict[str, Path]:
    """Map video stem -> path for the .mp4 files (any case) directly inside ``folder``; {} if it is no folder."""
    try:
        # sorted: a stable choice when both P01_01.MP4 and P01_01.mp4 exist (case-sensitive filesystems)
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as error:  # permission denied, stale network mount, ...
        raise VideoRootError(f"{folder}: cannot list this video folder ({error.strerror or error}). "
                             f"Check that it is readable.") from None
    videos: dict[str, Path] = {}
    for entry in entries:
        stem, extension = os.path.splitext(entry.name)
        if extension.lower() == VIDEO_EXTENSION and stem not in videos and entry.is_file():
            videos[stem] = folder / entry.name
    return videos


def find_videos(root: str | Path, video_ids: Iterable[str]) -> VideoLookup:
    """Locate ``video_ids`` under ``root`` (layouts in the module docstring).

    Returns the found paths and the missing ids, both in input order (repeated ids count once). Raises
    ``VideoRootError`` when ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise VideoRootError(f"{root}: video folder not found. Pass the folder holding the participant folders "
                             f"(P01/P01_01.MP4 or P01/videos/P01_01.MP4) with --videos.")
    flat_videos = _list_videos(root)

    wanted = list(dict.fromkeys(video_ids))  # de-duplicated, input order kept
    by_participant: dict[str, dict[str, Path]] = {}  # participant -> {video_id: path}, listed lazily once each
    found: dict[str, Path] = {}
    missing: list[str] = []
    for video_id in wanted:
        participant = video_id.split("_")[0]  # EPIC ids are <participant>_<number>: P01_01 -> P01
        if participant not in by_participant:
            participant_dir = root / participant
            # Later layouts first, so the earlier (preferred) ones overwrite them.
            by_participant[participant] = {**_list_videos(participant_dir / "videos"), **_list_videos(participant_dir)}
        path = by_participant[participant].get(video_id) or flat_videos.get(video_id)
        if path is None:
            missing.append(video_id)
        else:
            found[video_id] = path
    return VideoLookup(found=found, missing=tuple(missing))
