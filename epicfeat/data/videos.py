"""Find EPIC-KITCHENS-100 videos on disk, in every form it is distributed in.

Video files, looked up in this order of preference for video ``P01_01`` under ``root``:

1. ``<root>/P01/P01_01.MP4``          the downscaled copies (``videos_640x360/``, LaViLa's ``video_ht256px/``)
2. ``<root>/P01/videos/P01_01.MP4``   the official download layout
3. ``<root>/P01_01.MP4``              a flat folder of videos

The official RGB frames (``frame_%010d.jpg`` numbered from 1, 60 fps for EPIC-55 ids, 50 fps for extension ids):

4. ``<root>/P01/rgb_frames/P01_01/``      untarred
5. ``<root>/P01/rgb_frames/P01_01.tar``   as downloaded, read in place

``--video-path TEMPLATE`` (``{root}``, ``{participant}``, ``{video}``) replaces the lookup for any other layout; what
it names is a video file, a frames folder, or a ``.tar`` of frames.

One run reads one form (a feature set holds one form): ``--source video`` or ``--source frames`` forces it;
``auto`` takes the form that finds more of the requested videos, videos on a tie (so a cache of videos stays the
same cache when frames appear beside them).

The extension matches in any case (.MP4, .mp4, .Mp4). Each folder is listed once (``os.scandir``), never globbed
per video: on a network filesystem 700 globs take minutes, a few dozen listings take seconds.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from epicfeat.errors import EpicfeatError

VIDEO_EXTENSION = ".mp4"  # compared case-insensitively
FRAMES_FOLDER = "rgb_frames"
#: The official RGB frames' rates: EPIC-55 videos (Pxx_yy, yy < 100) resampled to 60 fps, the extension to 50.
EPIC55_FRAMES_FPS, EXTENSION_FRAMES_FPS = 60.0, 50.0
SourceChoice = Literal["auto", "video", "frames"]


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


# --------------------------------------------------------------------------------------------- every form
@dataclass(frozen=True)
class VideoSource:
    """Where one video's frames come from: a video file, or a folder / tar of JPEG frames with their rate."""

    path: Path
    frames_fps: float | None = None  # None: a video file (times from its pts); else frame k is at (k - 1) / frames_fps

    @property
    def form(self) -> str:
        return "video" if self.frames_fps is None else "frames"


@dataclass(frozen=True)
class SourceLookup:
    """The requested videos in the run's one form (``form``: "video" or "frames"): ``found`` video_id -> source,
    ``missing`` the others (input order)."""

    found: dict[str, VideoSource]
    missing: tuple[str, ...]
    form: str


def source_identity(form: str, frames_fps: float | None) -> str:
    """A form and its time base as a feature set's identity records them: "video", "frames-epic" (the official
    frames' 60 / 50 fps by id) or "frames-30fps" (``--frames-fps 30``)."""
    if form == "video":
        return "video"
    return "frames-epic" if frames_fps is None else f"frames-{frames_fps:g}fps"


def epic_frames_fps(video_id: str) -> float:
    """The rate of the official RGB frames of ``video_id``: 60 for EPIC-55 ids (P01_01), 50 for extension ids
    (P01_101); VideoRootError when the id does not say (pass --frames-fps)."""
    match = re.fullmatch(r"P\d+_(\d+)", video_id)
    if match is None:
        raise VideoRootError(f"{video_id}: not an EPIC video id (Pxx_yy), so the rate of its frames is unknown; "
                             "pass --frames-fps")
    return EXTENSION_FRAMES_FPS if int(match.group(1)) >= 100 else EPIC55_FRAMES_FPS


def _list_frames(folder: Path) -> dict[str, Path]:
    """Map video id -> frames folder or tar directly inside ``folder`` (a participant's rgb_frames/)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as error:
        raise VideoRootError(f"{folder}: cannot list this frames folder ({error.strerror or error}). "
                             f"Check that it is readable.") from None
    frames: dict[str, Path] = {}
    for entry in reversed(entries):  # P01_01 (a folder) sorts before P01_01.tar: the untarred folder wins
        stem, extension = os.path.splitext(entry.name)
        if entry.is_dir() and not extension:
            frames[entry.name] = folder / entry.name
        elif extension.lower() == ".tar" and entry.is_file():
            frames[stem] = folder / entry.name
    return frames


def _from_template(template: str, root: Path, video_ids: list[str]) -> tuple[dict[str, Path], dict[str, Path]]:
    """(videos, frames) found at ``template`` filled in per video: a folder or a .tar is frames, a file a video."""
    videos: dict[str, Path] = {}
    frames: dict[str, Path] = {}
    for video_id in video_ids:
        try:
            path = Path(template.format(root=root, participant=video_id.split("_")[0], video=video_id))
        except (KeyError, IndexError, ValueError) as error:
            raise VideoRootError(f"--video-path {template!r}: cannot fill it in ({type(error).__name__}: {error}); "
                                 "use the fields {root}, {participant} and {video}") from None
        if path.is_dir() or (path.suffix.lower() == ".tar" and path.is_file()):
            frames[video_id] = path
        elif path.is_file():
            videos[video_id] = path
    return videos, frames


def find_sources(root: str | Path, video_ids: Iterable[str], *, source: SourceChoice = "auto",
                 template: str | None = None, frames_fps: float | None = None) -> SourceLookup:
    """Locate ``video_ids`` under ``root`` in every form (module docstring) and choose the run's one form.

    ``frames_fps`` overrides the official frames' rates by id (``epic_frames_fps``).
    """
    root = Path(root)
    if not root.is_dir():
        raise VideoRootError(f"{root}: video folder not found. Pass the folder holding the participant folders "
                             "(P01/P01_01.MP4, P01/videos/P01_01.MP4 or P01/rgb_frames/P01_01.tar) with --videos.")
    if frames_fps is not None and frames_fps <= 0:
        raise VideoRootError(f"--frames-fps {frames_fps}: must be positive (frames per second of the JPEGs)")
    wanted = list(dict.fromkeys(video_ids))
    if template is not None:
        videos, frames = _from_template(template, root, wanted)
    else:
        videos = dict(find_videos(root, wanted).found)
        frames = {}
        listed: dict[str, dict[str, Path]] = {}
        for video_id in wanted:
            participant = video_id.split("_")[0]
            if participant not in listed:
                listed[participant] = _list_frames(root / participant / FRAMES_FOLDER)
            if video_id in listed[participant]:
                frames[video_id] = listed[participant][video_id]
    form = source if source != "auto" else "frames" if len(frames) > len(videos) else "video"
    if form == "frames":
        found = {video_id: VideoSource(path, frames_fps or epic_frames_fps(video_id))
                 for video_id, path in frames.items()}
    else:
        found = {video_id: VideoSource(path) for video_id, path in videos.items()}
    found = {video_id: found[video_id] for video_id in wanted if video_id in found}  # input order
    missing = tuple(video_id for video_id in wanted if video_id not in found)
    return SourceLookup(found=found, missing=missing, form=form)
