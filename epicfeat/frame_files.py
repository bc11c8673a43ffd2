"""EPIC-100's official RGB frames in the decode room: ``frame_%010d.jpg`` (numbered from 1) in a folder, or in a tar
read in place (never untarred), decoded by FFmpeg's JPEG decoder and preprocessed by the same ``Resizer`` as video.

Frame k is shown at (k - 1) / frames_fps seconds (60 fps for EPIC-55 ids, 50 for extension ids: data/videos.py), and
rows are chosen from those times by the same ``Sampling`` rule as from a video's pts; only the frames that become
rows are read and decoded. A missing, truncated or foreign frame, a gap, a damaged or cut-off tar: a VideoError
naming the video and the frame.
"""
from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av

from epicfeat.frames import Batcher, FrameBatch, Preprocess, Resizer, Sampling, VideoError, VideoMeta

_FRAME_NAME = re.compile(r"frame_(\d{10})\.jpg")  # the official frame_%010d.jpg, numbered from 1
_BLOCK = 512  # a tar's header and data blocks


class FrameFiles:
    """The JPEG frames of one video, a folder or a tar of ``frame_%010d.jpg`` numbered 1..n without a gap.

    A tar is read in place: one pass over its headers (seeking past the data) makes an index of (offset, size) per
    frame, then frames are read by offset, front to back for a tar written in order. Anything else in it (other
    files, a gap, a repeated number) is a VideoError naming the video and the frame; sub-folders are ignored.
    """

    def __init__(self, path: Path):
        self.path = path
        self._tar = None
        if not path.exists():
            raise VideoError(f"{path}: frames not found; check --videos and the file name")
        if path.is_dir():
            self._where = {self._number(entry.name): entry.name  # frame number -> file name
                           for entry in os.scandir(path) if not entry.is_dir()}
        else:
            self._tar = open(path, "rb")
            try:
                self._where = self._index_tar()  # frame number -> (data offset, size)
            except VideoError:
                self._tar.close()
                raise
        self.count = len(self._where)
        if self.count == 0 or max(self._where) != self.count:  # unique positive numbers: a larger maximum is a gap
            self.close()
            if self.count == 0:
                raise VideoError(f"{path}: no frames (frame_0000000001.jpg, ...) in it; check that this is a frames "
                                 "folder or tar")
            gap = next(k for k in range(1, self.count + 1) if k not in self._where)
            raise VideoError(f"{path}: frame_{gap:010d}.jpg is missing (the frames run to "
                             f"frame_{max(self._where):010d}.jpg); re-extract or re-download this video's frames")

    def _number(self, name: str) -> int:
        match = _FRAME_NAME.fullmatch(os.path.basename(name))
        if match is None or int(match.group(1)) == 0:
            raise VideoError(f"{self.path}: holds {name!r}, which is not a frame (frame_%010d.jpg, from 1); "
                             "point --videos at the official rgb_frames, or remove the file")
        return int(match.group(1))

    def _index_tar(self) -> dict[int, tuple[int, int]]:
        """Read the tar's headers (ustar, with GNU long names and pax paths), seeking past the data: tarfile's
        own scan costs about 60 times as much a member, a minute for a long video's 100,000 frames."""
        size = os.fstat(self._tar.fileno()).st_size
        where: dict[int, tuple[int, int]] = {}
        last, long_name, offset = "before the first frame", None, 0
        while True:
            self._tar.seek(offset)
            header = self._tar.read(_BLOCK)
            if header == bytes(_BLOCK):
                break  # the end-of-archive blocks
            if len(header) < _BLOCK:
                raise VideoError(f"{self.path}: cut-off tar (it ends {last} without the end-of-archive blocks); "
                                 "download this tar again")
            checksum = header[148:156].split(b"\0")[0].strip()
            if not checksum.isdigit() or int(checksum, 8) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                raise VideoError(f"{self.path}: corrupt tar (a damaged header {last}); download this tar again")
            kind, length = header[156:157], int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
            name = long_name or (header[345:500].split(b"\0")[0] + b"/" * (header[345] != 0)
                                 + header[:100].split(b"\0")[0]).decode("utf-8", "replace")
            data = offset + _BLOCK
            if data + length > size:
                raise VideoError(f"{self.path}: truncated inside {name}; download this tar again")
            offset = data + -(-length // _BLOCK) * _BLOCK  # the data, padded to whole blocks
            if kind in (b"L", b"x"):  # the next member's long name: a GNU name block or a pax "path" record
                self._tar.seek(data)
                text = self._tar.read(length).decode("utf-8", "replace")
                long_name = text.rstrip("\0") if kind == b"L" else next(
                    (r.split("=", 1)[1] for r in text.split("\n") if " path=" in r), long_name)
                continue
            long_name = None
            if kind in (b"5", b"g"):  # a folder, pax global attributes
                continue
            number = self._number(name)
            if kind not in (b"0", b"\0") or number in where:
                raise VideoError(f"{self.path}: holds {name!r} twice or not as a plain file; download this tar "
                                 "again")
            where[number], last = (data, length), f"after {name}"
        return where

    def read(self, number: int) -> bytes:
        """The bytes of frame ``number`` (1-based)."""
        if self._tar is None:
            return (self.path / self._where[number]).read_bytes()
        offset, size = self._where[number]
        self._tar.seek(offset)
        data = self._tar.read(size)
        if len(data) != size:
            raise VideoError(f"{self.path}: truncated inside frame_{number:010d}.jpg; download this tar again")
        return data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> FrameFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _JpegDecoder:
    """FFmpeg's JPEG decoder in this process, one frame per call, for the same Resizer as video frames.

    Not torchvision's decode_jpeg: it was no faster per core on a CPU, and importing torch would cost each decode
    process seconds and hundreds of MB (README, "Reading EPIC-100's forms").
    """

    def __init__(self, files: FrameFiles):
        self.files = files
        self._codec = av.CodecContext.create("mjpeg", "r")
        self._codec.thread_count = 1  # a frame per packet, none held back; the pool's processes are the parallelism

    def __call__(self, number: int) -> av.VideoFrame:
        data = self.files.read(number)
        name = f"{self.files.path}: frame_{number:010d}.jpg"
        # FFmpeg conceals a cut-off JPEG (grey rows) without an error: its end-of-image marker is checked instead.
        if not (data.startswith(b"\xff\xd8") and data.rstrip(b"\0").endswith(b"\xff\xd9")):
            raise VideoError(f"{name} is truncated or not a JPEG ({len(data)} bytes); re-extract or re-download "
                             "this video's frames")
        try:
            frames = self._codec.decode(av.Packet(data))
        except av.FFmpegError as err:
            raise VideoError(f"{name} cannot be decoded ({err.strerror}); re-extract or re-download this video's "
                             "frames") from None
        if len(frames) != 1:
            raise VideoError(f"{name} cannot be decoded (no picture in it); re-extract or re-download this video's "
                             "frames")
        return frames[0]


def probe_frame_files(files: FrameFiles, frames_fps: float) -> VideoMeta:
    """A frames source's header: its rate, duration (frames / rate) and the first frame's size."""
    first = _JpegDecoder(files)(1)
    return VideoMeta(path=files.path, fps=frames_fps, duration=files.count / frames_fps, width=first.width,
                     height=first.height, codec="mjpeg")


def iter_frame_files(files: FrameFiles, frames_fps: float, *, fps: float | None, preprocess: Preprocess,
                     batch_size: int = 64) -> Iterator[FrameBatch]:
    """``iter_frames`` for JPEG frames: frame k is shown at (k - 1) / frames_fps seconds, rows are sampled from
    those times exactly as from a video's pts, and only the frames that become rows are read and decoded."""
    sampling, batcher = Sampling(fps), Batcher(batch_size, preprocess.crop)
    step = 1 / Fraction(frames_fps)  # seconds per frame, exactly
    decode, resizer = _JpegDecoder(files), Resizer(preprocess)
    for index in range(files.count):
        seconds = index * step
        if not sampling.keep(seconds):
            continue
        if (batch := batcher.add(index, float(seconds), resizer(decode(index + 1)))) is not None:
            yield batch
    if (batch := batcher.flush()) is not None:
        yield batch
