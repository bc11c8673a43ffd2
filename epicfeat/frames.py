"""The decode room: video files to model input (uint8 crops with exact timestamps), for extract, finetune, predict.

It imports no torch, so the decode processes stay light. ``iter_frames`` streams a video once in constant memory;
``decode_frames_at`` fetches the frames shown at given times; ``Preprocess`` is the one preprocessing definition;
``decode_video`` turns a ``VideoJob`` into events and ``DecodePool`` runs it in spawned processes. The official
JPEG frames (frame_files.py) go the same way, their rows sampled by the same ``Sampling`` rule.

Every time in seconds counts from the video stream's first pts (exactly), never from the audio's: an H.264 stream
with B-frames starts a few ticks after its audio, and rows must not move with whether a file has sound.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import math
import multiprocessing
import os
import queue
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fractions import Fraction
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_ready
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Iterator, Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from av.video.stream import VideoStream

from epicfeat.errors import EpicfeatError

if TYPE_CHECKING:  # torch is never imported here: decode processes run without it
    import torch

# swscale's filters, named as timm's pretrained configurations name them; on downscaling each widens to cover every
# source pixel (no aliasing, like the antialiased resizing of the weights' training recipes).
INTERPOLATIONS = ("bilinear", "bicubic")
# The ISO media boxes an MP4/MOV file starts with: such a file that cannot be opened is a damaged MP4.
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
# A video whose last row is this far (s) short of its container's or annotations' end is reported, not cached.
END_TOLERANCE_S = 1.0
#: Batches each decode process may decode ahead of the parent (memory: 4 x batch x crop^2 x 3 bytes per process).
PREFETCH_BATCHES = 4
#: A video whose decode process dies this many times fails (the first death is retried on a fresh process).
DECODE_ATTEMPTS = 2


class VideoError(EpicfeatError):
    """A video file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Preprocess:
    """The one definition of how a frame becomes model input (recorded in every feature set's identity)."""

    resize: int = 256  # the shorter side is resized to this (aspect ratio kept)
    crop: int = 224  # then a centred square of this side is cut out
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet RGB statistics, on the 0..1 scale
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"  # the resize filter (INTERPOLATIONS)

    def __post_init__(self):
        if self.resize < 1 or self.crop < 1 or self.crop > self.resize:
            raise EpicfeatError(
                f"preprocessing resize={self.resize}, crop={self.crop}: need 1 <= crop <= resize (the centre crop is "
                "cut from the resized frame); fix --resize / --crop"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise EpicfeatError(
                f"preprocessing mean={self.mean}, std={self.std}: need three values each (R, G, B) and std > 0"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise EpicfeatError(f"preprocessing interpolation {self.interpolation!r}: the decoder resizes with one of "
                                f"{', '.join(INTERPOLATIONS)}")

    @classmethod
    def from_identity(cls, feature_set: dict) -> Preprocess:
        """The preprocessing a feature set was extracted with (its identity dict), for finetune, predict, export."""
        return cls(resize=int(feature_set["resize"]), crop=int(feature_set["crop"]),
                   mean=tuple(feature_set["mean"]), std=tuple(feature_set["std"]),
                   interpolation=feature_set["interpolation"])

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing the shorter side to ``resize``; the longer side is truncated like
        torchvision's ``Resize(int)`` (640x360 -> 455x256)."""
        if width <= height:
            return self.resize, self.resize * height // width
        return self.resize * width // height, self.resize

    def crop_offsets(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centre crop inside a resized frame of this size (torchvision's CenterCrop rounding)."""
        return int(round((width - self.crop) / 2)), int(round((height - self.crop) / 2))

    def normalize(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 RGB images (N, H, W, 3) -> float32 (N, 3, H, W), ImageNet-normalised, on the images' device.

        The result is a permuted view of the NHWC data, i.e. already in ``torch.channels_last`` memory format (the
        fast layout for convolutions); call ``.contiguous()`` if something needs plain NCHW strides.
        """
        import torch

        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got shape {tuple(images.shape)}")
        # Fold the /255 into the statistics: (x/255 - mean) / std == (x - 255 mean) / (255 std).
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device) * 255
        inv_std = 1.0 / (torch.tensor(self.std, dtype=torch.float32, device=images.device) * 255)
        pixels = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W), channels_last strides
        return (pixels - mean.view(1, 3, 1, 1)) * inv_std.view(1, 3, 1, 1)

    def identity(self) -> dict:
        """Everything that defines this preprocessing, for provenance records (plain JSON types)."""
        return {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()},
            "resize_mode": "shorter_side",
            "crop_mode": "center",
            "interpolation": f"swscale_{self.interpolation}",
            "color": "rgb24",
        }


@dataclass(frozen=True)
class VideoMeta:
    path: Path
    fps: float  # the stream's average frame rate (for VFR video, an average; rows carry their own pts)
    duration: float  # seconds from the video stream's start to its end (0.0 when unknown)
    width: int
    height: int
    codec: str


@dataclass
class FrameBatch:
    frame_indices: np.ndarray  # (n,) int64, 0-based positions in presentation order (-1: unknown, see decode_frames_at)
    pts: np.ndarray  # (n,) float64, seconds from the video stream's start
    images: np.ndarray  # (n, crop, crop, 3) uint8 RGB, resized + centre-cropped, not normalised
    sources: list[np.ndarray] | None = None  # the full-size RGB frames (H, W, 3), only from iter_frames(keep_source=True)

    def __len__(self) -> int:
        return len(self.pts)

    @property
    def span(self) -> np.ndarray:
        """(n, 2) seconds: the first and last frame each row saw, for an image row its own frame."""
        return np.stack([self.pts, self.pts], axis=1)


# ------------------------------------------------------------------------------------------------ preprocessing
class Resizer:
    """Resize + centre crop: scale in the decoder's pixel format, then convert the small frame to RGB (about five
    times faster than one combined call). Keep one per stream: each reformatter caches its swscale context."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess
        self._filter = preprocess.interpolation.upper()  # PyAV's name of swscale's filter
        self._scale = VideoReformatter()
        self._to_rgb = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        width, height = self.preprocess.resized_size(frame.width, frame.height)
        left, top = self.preprocess.crop_offsets(width, height)
        small = self._scale.reformat(frame, width=width, height=height, interpolation=self._filter, threads=1)
        plane = self._to_rgb.reformat(small, format="rgb24", threads=1).planes[0]
        # View the RGB plane in place (rows may be padded to line_size) instead of copying it with to_ndarray:
        # the caller copies just the crop.
        rows = np.frombuffer(plane, np.uint8, count=height * plane.line_size)
        rows = rows.reshape(height, plane.line_size)  # (height, line_size)
        rgb = rows[:, : width * 3].reshape(height, width, 3)  # (height, width, 3)
        crop = self.preprocess.crop
        return rgb[top : top + crop, left : left + crop]  # (crop, crop, 3) view into the frame


# ---------------------------------------------------------------------------------------------- opening files
@contextmanager
def _open_video(path: Path, threads: int = 0) -> Iterator[tuple[av.container.InputContainer, VideoStream]]:
    """Open ``path`` and its first video stream, or raise a VideoError that says what is wrong with the file."""
    if not path.exists():
        raise VideoError(f"{path}: file not found; check --videos and the file name")
    if not path.is_file():
        raise VideoError(f"{path}: not a file (a folder?); point to the video file itself")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty (0 bytes): an interrupted copy or download; copy it again")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as err:
        with open(path, "rb") as f:
            head = f.read(12)
        if head[4:8] in _MP4_BOXES:
            raise VideoError(
                f"{path}: truncated or corrupt MP4: FFmpeg cannot read its index ({err.strerror}); the copy is "
                "probably incomplete: copy or download it again"
            ) from None
        raise VideoError(
            f"{path}: not a video file FFmpeg can read ({err.strerror}); check that this is the right file"
        ) from None
    try:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise VideoError(f"{path}: has no video stream (streams: {kinds}); check that this is the right file")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoError(
                f"{path}: unsupported video codec: this FFmpeg build has no decoder for it; re-encode the file to "
                "H.264 or HEVC (keeping its frame rate)"
            )
        # Threading must be chosen before the codec opens (PyAV opens it on the first decode).
        stream.codec_context.thread_type = "AUTO"
        stream.codec_context.thread_count = threads  # 0: FFmpeg picks from the number of cores
        yield container, stream
    finally:
        container.close()


def _time_origin(stream: VideoStream) -> Fraction:
    """The video stream's start in seconds, exactly (0 when it does not say); audio streams never count."""
    if stream.start_time is None or not stream.time_base:
        return Fraction(0)
    return stream.start_time * stream.time_base


def probe_video(path: str | Path) -> VideoMeta:
    """Read a video's header (no decoding): frame rate, duration, size, codec; VideoError when it is unusable."""
    path = Path(path)
    with _open_video(path) as (container, stream):
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if stream.duration is not None and stream.start_time is not None:
            duration = float((stream.start_time + stream.duration) * stream.time_base - _time_origin(stream))
        elif container.duration is not None:
            duration = container.duration / av.time_base
        elif stream.frames and rate:
            duration = stream.frames / float(rate)
        else:
            duration = 0.0
        return VideoMeta(
            path=path,
            fps=float(rate) if rate else 0.0,
            duration=duration,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
        )


# ------------------------------------------------------------------------------------------------- decoding
def _decoded_frames(
    path: Path, container: av.container.InputContainer, stream: VideoStream, *, from_start: bool
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield (pts in stream ticks, frame) in presentation order, from the current read position to the end.

    Damage becomes a VideoError that says where decoding stopped. A threaded decoder does not report a broken
    packet, so the demuxer is checked too: a packet flagged corrupt, or fewer packets than the index declares.
    A frame without pts (raw H.264/HEVC streams) is placed one frame duration after the previous one.
    """
    origin = _time_origin(stream)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    nominal_ticks = round(1 / (rate * stream.time_base)) if rate and stream.time_base else 0
    previous: tuple[int, int] | None = None  # (pts, duration) of the last frame, in stream ticks
    packets_read = 0
    start_pts = stream.start_time

    def failure(problem: str) -> VideoError:
        where = "before the first frame" if previous is None else (
            f"after t={float(previous[0] * stream.time_base - origin):.2f} s"
        )
        return VideoError(f"{path}: truncated or corrupt: {problem} {where}; copy or download the file again")

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets, None)
            if packet is None:
                break
            if packet.is_corrupt:
                raise failure("a damaged packet (the file is cut off or overwritten)")
            if packet.size:  # the last packet is an empty one that flushes the decoder
                packets_read += 1
            decoded = packet.decode()
        except av.FFmpegError as err:
            raise failure(f"decoding failed ({err.strerror})") from None
        for frame in decoded:
            pts = frame.pts
            if pts is None:
                if previous is None:
                    pts = start_pts or 0
                elif previous[1] > 0:
                    pts = previous[0] + previous[1]
                else:
                    raise VideoError(
                        f"{path}: its frames carry no timestamps and no frame rate; remux it into MP4 "
                        "(ffmpeg -r RATE -i FILE -c copy OUT.mp4) so that frame times are known"
                    )
            previous = (pts, frame.duration or nominal_ticks)
            yield pts, frame
    # The frame count is only comparable when reading began at the first packet (not after a seek).
    if from_start and stream.frames and packets_read < stream.frames:
        raise failure(f"the container lists {stream.frames} frames but only {packets_read} could be read, ending")


class Sampling:
    """Rows at ``fps`` per second (None: every frame): target k takes the first frame at or after k / fps seconds
    (compared exactly, as fractions), and a frame is used at most once (a rate below ``fps`` or a gap in VFR video
    gives one row). The one definition for video pts and for the times of JPEG frames."""

    def __init__(self, fps: float | None):
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be positive or None, got {fps}")
        self.rate = Fraction(fps) if fps is not None else None  # exact value of the float the caller gave
        self.next_target = 0  # k of the next target time k / fps

    def keep(self, time: Fraction) -> bool:
        """Whether the frame shown at ``time`` seconds (frames in presentation order) becomes a row."""
        if self.rate is None:
            return True
        if time * self.rate < self.next_target:  # time < k / fps
            return False
        self.next_target = math.floor(time * self.rate) + 1  # first target strictly after this frame
        return True


def iter_frames(
    path: str | Path, *, fps: float | None, preprocess: Preprocess, batch_size: int = 64, threads: int = 0,
    keep_source: bool = False,
) -> Iterator[FrameBatch]:
    """Stream a video once, front to back, in constant memory, yielding batches of sampled, preprocessed frames.

    Sampling as ``Sampling`` says (``fps=None`` keeps every frame). ``frame_indices`` count frames in presentation
    order; ``threads=0`` lets FFmpeg choose codec threads.
    Raises VideoError naming the file and the reason (missing, empty, not a video, no decoder, truncated, corrupt).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = Path(path)
    sampling, batcher, resizer = Sampling(fps), Batcher(batch_size, preprocess.crop), Resizer(preprocess)
    # keep_source (predict's annotated video): each sampled frame also as full-size RGB, one reused context.
    source_rgb = VideoReformatter() if keep_source else None
    with _open_video(path, threads) as (container, stream):
        origin, time_base = _time_origin(stream), stream.time_base
        for index, (pts, frame) in enumerate(_decoded_frames(path, container, stream, from_start=True)):
            time = pts * time_base - origin  # exact seconds (Fraction)
            if not sampling.keep(time):
                continue
            source = source_rgb.reformat(frame, format="rgb24").to_ndarray() if source_rgb is not None else None
            if (batch := batcher.add(index, float(time), resizer(frame), source)) is not None:
                yield batch
    if (batch := batcher.flush()) is not None:
        yield batch


class Batcher:
    """Sampled rows gathered into FrameBatches of ``batch_size`` rows (a video's last one shorter)."""

    def __init__(self, batch_size: int, crop: int):
        self._shape = (batch_size, crop, crop, 3)
        self._images = np.empty(self._shape, np.uint8)  # the batch being filled
        self._rows: list[tuple[int, float, np.ndarray | None]] = []  # its (index, seconds, full-size source) so far

    def add(self, index: int, seconds: float, image: np.ndarray, source: np.ndarray | None = None
            ) -> FrameBatch | None:
        """Add one row; returns the batch it completes, if it does."""
        self._images[len(self._rows)] = image
        self._rows.append((index, seconds, source))
        return self.flush() if len(self._rows) == self._shape[0] else None

    def flush(self) -> FrameBatch | None:
        """The rows gathered so far as a batch (None when there are none); the next batch starts empty."""
        if not self._rows:
            return None
        indices, seconds, sources = zip(*self._rows)
        batch = FrameBatch(frame_indices=np.array(indices, np.int64), pts=np.array(seconds, np.float64),
                           images=self._images[: len(self._rows)],
                           sources=None if sources[0] is None else list(sources))
        self._images, self._rows = np.empty(self._shape, np.uint8), []
        return batch


def decode_frames_at(path: str | Path, times: Sequence[float], preprocess: Preprocess, *, threads: int = 0
                     ) -> FrameBatch:
    """The frames shown at the given times (seconds from the video stream's start), in the order of ``times``.

    For each time, the first frame at or after it (times past the end get the last frame). Seeks once to the
    keyframe before ``min(times)`` and decodes forward. ``frame_indices`` are -1 after a seek into the video (an
    index is unknown without decoding everything before it), exact when decoding started at the first frame.
    """
    path = Path(path)
    wanted = np.asarray(times, dtype=np.float64).reshape(-1)  # (n,)
    images = np.empty((len(wanted), preprocess.crop, preprocess.crop, 3), np.uint8)  # (n, crop, crop, 3)
    pts = np.zeros(len(wanted), np.float64)
    indices = np.full(len(wanted), -1, np.int64)
    with _open_video(path, threads) as (container, stream):
        if len(wanted) == 0:
            return FrameBatch(frame_indices=indices, pts=pts, images=images)
        resizer = Resizer(preprocess)
        order = np.argsort(wanted, kind="stable")  # requested times, earliest first
        ordered = wanted[order]
        origin = _time_origin(stream)
        frames, index_known = _frames_from(path, container, stream, origin, float(wanted[order[0]]))
        decoded = ((count if index_known else -1, float(frame_pts * stream.time_base - origin), frame)
                   for count, (frame_pts, frame) in enumerate(frames))
        current = next(decoded, None)  # (index, seconds, frame)
        if current is None:
            raise VideoError(f"{path}: no frame could be decoded; the file is probably damaged")
        done = 0  # requested times (in `order`) already given a frame
        while done < len(order):
            following = next(decoded, None)
            # The times at or before this frame, or all that are left when it is the last frame.
            upto = len(order) if following is None else int(np.searchsorted(ordered, current[1], "right"))
            if upto > done:
                slots = order[done:upto]
                images[slots], pts[slots], indices[slots] = resizer(current[2]), current[1], current[0]
                done = upto
            current = following
    return FrameBatch(frame_indices=indices, pts=pts, images=images)


def _frames_from(path: Path, container: av.container.InputContainer, stream: VideoStream, origin: Fraction,
                 earliest: float) -> tuple[Iterator[tuple[int, av.VideoFrame]], bool]:
    """Decoded frames starting at or before ``earliest`` seconds, and whether frame counting starts at frame 0.

    A container may seek by decoding time and land on a keyframe shown after ``earliest`` (B-frames): then it seeks
    again from further back (1 s, doubling), down to the start of the stream.
    """
    first_pts = stream.start_time
    margin = 0.0
    for attempt in range(64):
        target = earliest - margin
        if target <= 0 or first_pts is None:
            if attempt > 0:  # an earlier attempt moved the read position: go back to the first frame
                _seek(path, container, first_pts, stream)
            return _decoded_frames(path, container, stream, from_start=True), True
        _seek(path, container, math.floor((Fraction(target) + origin) / stream.time_base), stream)
        frames = _decoded_frames(path, container, stream, from_start=False)
        first = next(frames, None)
        if first is not None and float(first[0] * stream.time_base - origin) <= earliest:
            return itertools.chain([first], frames), first[0] == first_pts
        margin = max(1.0, 2 * margin)  # landed too late (or past the end): retry from further back
    raise AssertionError("unreachable: the margin doubles past any video length")


def _seek(path: Path, container: av.container.InputContainer, ticks: int, stream: VideoStream):
    """Move to the keyframe at or before ``ticks`` (stream time base); the decoder is flushed by PyAV."""
    try:
        container.seek(ticks, stream=stream, backward=True, any_frame=False)
    except av.FFmpegError as err:
        raise VideoError(f"{path}: cannot seek in this file ({err.strerror}); remux or re-copy it") from None


# ------------------------------------------------------------------------------- whole videos for extract
@dataclass(frozen=True)
class VideoJob:
    """One video to decode, with what the annotations expect of it."""

    video_id: str
    path: Path  # a video file, or a folder / tar of JPEG frames (data.videos.find_sources)
    needed_until: float | None = None  # latest stop time (s) the annotations need from this video
    duration: float | None = None  # expected duration (s), for the progress bar's ETA
    frames_fps: float | None = None  # None: a video file; else JPEG frames, frame k shown at (k - 1) / frames_fps


@dataclass(frozen=True)
class DecodeSettings:
    """How every video of a run is decoded: rows per second, preprocessing, rows per batch, codec threads."""

    fps: float | None
    preprocess: Preprocess
    batch_size: int
    threads: int = 0  # codec threads per decoder (0: FFmpeg's choice)


@dataclass(frozen=True)
class VideoStarted:
    """A video's first event: its header. It comes again when the video's decode process died and it starts over."""

    video_id: str
    meta: VideoMeta


@dataclass
class FramesDecoded:
    video_id: str
    batch: FrameBatch


@dataclass(frozen=True)
class VideoEnded:
    """A video's last event: ``error`` is empty when every frame was decoded, else why the video failed."""

    video_id: str
    error: str = ""


def decode_video(job: VideoJob, settings: DecodeSettings) -> Iterator[VideoStarted | FramesDecoded | VideoEnded]:
    """One video front to back: VideoStarted, FramesDecoded..., VideoEnded (never raises: a failure is its end)."""
    rows, last_pts = 0, -1.0
    try:
        with contextlib.ExitStack() as stack:
            from epicfeat.frame_files import FrameFiles, iter_frame_files, probe_frame_files  # it imports this module

            if job.frames_fps is None:
                meta = probe_video(job.path)
                batches = iter_frames(job.path, fps=settings.fps, preprocess=settings.preprocess,
                                      batch_size=settings.batch_size, threads=settings.threads)
            else:
                files = stack.enter_context(FrameFiles(job.path))
                meta = probe_frame_files(files, job.frames_fps)
                batches = iter_frame_files(files, job.frames_fps, fps=settings.fps,
                                           preprocess=settings.preprocess, batch_size=settings.batch_size)
            yield VideoStarted(job.video_id, meta)
            for batch in batches:
                rows, last_pts = rows + len(batch), float(batch.pts[-1])
                yield FramesDecoded(job.video_id, batch)
    except VideoError as err:
        yield VideoEnded(job.video_id, str(err))
        return
    except OSError as err:  # PermissionError, a stale NFS handle, an I/O error of the disk
        yield VideoEnded(job.video_id, f"{job.path}: cannot be read ({err.strerror or err}); check the file's "
                                       "permissions and the mount")
        return
    except Exception as err:  # anything else is this video's problem, not the run's
        yield VideoEnded(job.video_id, f"{job.path}: decoding failed ({type(err).__name__}: {err})")
        return
    yield VideoEnded(job.video_id, _incomplete(job, meta, rows, last_pts))


def _incomplete(job: VideoJob, meta: VideoMeta, rows: int, last_pts: float) -> str:
    """Why a video decoded to its end is not whole ("" when it is): short of the container's or the annotations' end."""
    if rows == 0:
        return f"{job.path}: no frames could be decoded"
    if meta.duration and last_pts < meta.duration - END_TOLERANCE_S:
        return (f"{job.path}: truncated: decoding stopped at {last_pts:.2f} s but the container says "
                f"{meta.duration:.2f} s; re-download or re-copy the file")
    if job.needed_until is not None and last_pts < job.needed_until - END_TOLERANCE_S:
        return (f"{job.path}: video ends at {last_pts:.2f} s but its annotations run to {job.needed_until:.2f} s; "
                "the file is probably a shortened or wrong copy")
    return ""


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def codec_threads(decoders: int, requested: int = 0) -> int:
    """Codec threads per decoder: ``requested`` when > 0, else the cores shared out among ``decoders`` processes
    (at least one each), so decoders x threads ~ cores. FFmpeg's own choice (0, for one decoder: cores + 1 each)
    would oversubscribe a host running many decoders."""
    if requested > 0:
        return requested
    return max(1, available_cores() // max(1, decoders))


class _SharedSlots:
    """A decode process's ring of shared-memory buffers, one batch of images each, which the parent copies out
    (instead of unpickling them from the pipe). One slot per batch a worker may decode ahead (its semaphore counts
    them), taken in order, so a slot is never written while the parent reads it."""

    def __init__(self, shape: tuple[int, ...], names: list[str] | None = None):
        size = int(np.prod(shape))  # (batch_size, crop, crop, 3) bytes
        if names is None:  # the parent makes the slots; the worker attaches to them by name
            self._blocks = [shared_memory.SharedMemory(create=True, size=size) for _ in range(PREFETCH_BATCHES)]
        else:
            self._blocks = [shared_memory.SharedMemory(name=name) for name in names]
        self.names = [block.name for block in self._blocks]
        self._views = [np.ndarray(shape, np.uint8, buffer=block.buf) for block in self._blocks]
        self._next = 0

    def put(self, images: np.ndarray) -> int:
        """Write a batch's images into the next slot; returns its number."""
        slot, self._next = self._next, (self._next + 1) % len(self._views)
        self._views[slot][: len(images)] = images
        return slot

    def take(self, slot: int, rows: int) -> np.ndarray:
        """A copy of the first ``rows`` images of ``slot`` (the slot is free again afterwards)."""
        return self._views[slot][:rows].copy()  # (rows, crop, crop, 3)

    def close(self, *, unlink: bool) -> None:
        self._views = []
        for block in self._blocks:
            block.close()
            if unlink:
                with contextlib.suppress(FileNotFoundError):
                    block.unlink()


def _decode_process(conn, credits, slot_names: list[str], settings: DecodeSettings) -> None:
    """A decode process: decodes the videos its pipe brings until None, sending their events back (images through
    its slots, at most PREFETCH_BATCHES batches ahead of the parent)."""
    crop = settings.preprocess.crop
    slots = _SharedSlots((settings.batch_size, crop, crop, 3), slot_names)
    try:
        while (job := conn.recv()) is not None:
            for event in decode_video(job, settings):
                if isinstance(event, FramesDecoded):
                    credits.acquire()
                    slot = slots.put(event.batch.images)
                    event = (slot, event.video_id, event.batch.frame_indices, event.batch.pts)
                conn.send(event)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent is gone or stopping us
    finally:
        slots.close(unlink=False)


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    credits: object  # a semaphore: batches the worker may still decode ahead
    slots: _SharedSlots
    assigned: collections.deque  # (job, attempt), the first being decoded, the second queued behind it


class DecodePool:
    """Decode processes fed from one queue of videos: whichever worker is free takes the next video.

    Each worker holds at most two videos (the one it decodes and the next). Workers are spawned, not forked (the
    parent runs zarr's event-loop thread and an OpenMP pool). A worker that dies costs its video one retry on a
    fresh worker (starting over with a new VideoStarted); a second death fails that video, never the run.
    ``workers=0`` decodes in this process instead.
    """

    def __init__(self, workers: int, settings: DecodeSettings):
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._workers = [self._spawn() for _ in range(workers)]
        self._retry: collections.deque = collections.deque()  # (job, attempt) to hand out before new jobs

    @property
    def workers(self) -> int:
        return len(self._workers)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def decode(self, jobs: queue.Queue) -> Iterator[VideoStarted | FramesDecoded | VideoEnded]:
        """The events of every video that arrives on ``jobs`` (None ends them), each video's in order, those of
        different videos interleaved as the workers produce them."""
        if not self._workers:
            while (job := jobs.get()) is not None:
                yield from decode_video(job, self.settings)
            return
        exhausted = False
        while True:
            exhausted = self._hand_out(jobs, exhausted)
            busy = [w for w in self._workers if w.assigned]
            if exhausted and not busy:
                return
            hungry = not exhausted and len(busy) < len(self._workers)  # a worker waits for a job: look again soon
            ready = wait_for_ready([w.conn for w in busy] + [w.process.sentinel for w in busy],
                                   timeout=0.05 if hungry else 1.0)
            for worker in busy:
                if worker.conn in ready:
                    yield from self._receive(worker)
                elif worker.process.sentinel in ready or not worker.process.is_alive():
                    yield from self._replace_dead(worker)

    def close(self) -> None:
        """Stop every worker: idle ones are told to finish, those mid-video (abandoned work) are terminated."""
        for worker in self._workers:
            if worker.assigned:
                worker.process.terminate()
            else:
                with contextlib.suppress(OSError, ValueError):
                    worker.conn.send(None)
        for worker in self._workers:
            self._discard(worker)
        self._workers = []

    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe(duplex=True)
        credits = self._context.Semaphore(PREFETCH_BATCHES)
        crop = self.settings.preprocess.crop
        slots = _SharedSlots((self.settings.batch_size, crop, crop, 3))
        process = self._context.Process(target=_decode_process, args=(child, credits, slots.names, self.settings),
                                        daemon=True, name="epicfeat-decode")
        process.start()
        child.close()
        return _Worker(process, parent, credits, slots, collections.deque())

    def _hand_out(self, jobs: queue.Queue, exhausted: bool) -> bool:
        """Give every worker with room a video (retries first); True once ``jobs`` has ended."""
        for worker in self._workers:
            while len(worker.assigned) < 2:
                if self._retry:
                    task = self._retry.popleft()
                elif exhausted:
                    break
                else:
                    try:
                        job = jobs.get_nowait()
                    except queue.Empty:
                        return False
                    if job is None:
                        exhausted = True
                        break
                    task = (job, 0)
                worker.assigned.append(task)
                try:
                    worker.conn.send(task[0])
                except OSError:  # the worker is dead: its sentinel fires and its videos are handed on
                    break
        return exhausted

    def _receive(self, worker: _Worker) -> Iterator[VideoStarted | FramesDecoded | VideoEnded]:
        try:
            event = worker.conn.recv()
        except Exception:  # the pipe broke, or a message torn by a process killed mid-send: it died
            yield from self._replace_dead(worker)
            return
        if isinstance(event, tuple):  # a batch: its images are in a slot
            slot, video_id, frame_indices, pts = event
            images = worker.slots.take(slot, len(pts))
            worker.credits.release()  # copied out: the worker may decode one more batch ahead
            yield FramesDecoded(video_id, FrameBatch(frame_indices=frame_indices, pts=pts, images=images))
            return
        if isinstance(event, VideoEnded):
            worker.assigned.popleft()
        yield event

    def _replace_dead(self, worker: _Worker) -> Iterator[VideoEnded]:
        self._discard(worker)
        self._workers[self._workers.index(worker)] = self._spawn()
        if not worker.assigned:
            return
        (job, attempt), *waiting = worker.assigned
        self._retry.extendleft(reversed(waiting))  # not started: no attempt used
        if attempt + 1 < DECODE_ATTEMPTS:
            self._retry.appendleft((job, attempt + 1))
            return
        code = worker.process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        yield VideoEnded(job.video_id, f"{job.path}: the decode process died ({how}) on each of {DECODE_ATTEMPTS} "
                                       "attempts; the file may crash FFmpeg: check it with `ffprobe` or re-encode it")

    @staticmethod
    def _discard(worker: _Worker) -> None:
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(timeout=5)
        worker.conn.close()
        worker.slots.close(unlink=True)


def decode_rows_per_second(job: VideoJob, settings: DecodeSettings) -> float:
    """Rows per second the decode room makes of one video in this process (either form), for benchmarks that put
    frames beside videos (bench_extract); VideoError if the video fails."""
    started, rows = perf_counter(), 0
    for event in decode_video(job, settings):
        if isinstance(event, FramesDecoded):
            rows += len(event.batch)
        elif isinstance(event, VideoEnded) and event.error:
            raise VideoError(event.error)
    return rows / (perf_counter() - started)
