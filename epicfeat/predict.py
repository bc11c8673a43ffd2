"""Streaming action recognition: a video file or a camera -> a timeline of top-5 verbs, nouns and actions.

    frames (PyAV, sampled at the feature set's fps) ──► the frame encoder once per frame ──► rows of the last
    ``window_seconds`` ──► every ``stride`` frames: T rows sampled as evaluate samples a segment ──► temporal head

A prediction's scores are what ``evaluate`` gives the segment [window_start, window_end) (``SegmentWindow``, with
evaluate's own sampling code); a head trained with context also reads the rows of the context's seconds before
and after that segment, so its window ends that many seconds before the newest row. Each prediction is one
flushed timeline line; an error after the first frame ends the run with the outputs kept and
``PredictResult.error`` saying what happened.
"""
from __future__ import annotations

import collections
import csv
import functools
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from epicfeat.configs import PredictConfig
from epicfeat.devices import PRECISION_DTYPES, resolve_device
from epicfeat.encoder import FrameEncoder, create_encoder
from epicfeat.errors import EpicfeatError
from epicfeat.frames import FrameBatch, Preprocess, Resizer, VideoError, iter_frames
from epicfeat.metrics import ACTION_VERB_MULTIPLIER, action_scores
from epicfeat.recipes import save_config
from epicfeat.temporal.checkpoint import Checkpoint, load_checkpoint
from epicfeat.temporal.data import PTS_TOLERANCE, Context, sequence_offsets
from epicfeat.temporal.precision import recorded_precision
from epicfeat.windows import ClipBatch, ClipWindows, clip_decoding

TIMELINE_SUFFIXES = (".csv", ".jsonl")


class PredictError(EpicfeatError):
    """A prediction run that cannot start: bad source, weights that do not match the checkpoint, bad option."""


@dataclass(frozen=True)
class Prediction:
    time: float  # seconds (source clock) of the newest row in the window
    window_start: float  # the window is the segment [window_start, window_end) in seconds, as evaluate cuts one
    window_end: float
    rows: int  # rows inside the window (the T bins are spread over them; context rows not counted)
    frame_index: int  # source frame index of the newest row
    verbs: tuple[tuple[str, float], ...]  # (class, probability), best first
    nouns: tuple[tuple[str, float], ...]
    actions: tuple[tuple[str, str, float], ...]  # (verb, noun, score), official action ranking


@dataclass
class PredictResult:
    predictions: list[Prediction]
    frames: int  # sampled frames run through the backbone
    seconds: float  # wall time of the whole stream, decoding and writing included
    window: int  # T
    stride: int
    fps_sampled: float | None  # frames per second of source the backbone sees
    window_seconds: float = 0.0
    live: bool = False  # a capture device (latency from capture; frames may be dropped)
    frames_dropped: int = 0  # live only: sampled frames thrown away because the model was behind
    latencies: list[float] = field(default_factory=list)  # per prediction, seconds from capture (live) or decode
    backbone_seconds: float = 0.0
    head_seconds: float = 0.0
    error: str | None = None  # what ended the run early (outputs cover what was done before it)
    notes: list[str] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def predictions_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        return float(np.quantile(self.latencies, q) * 1000) if self.latencies else float("nan")

    def summary(self) -> dict:
        return {
            "frames": self.frames,
            "predictions": len(self.predictions),
            "seconds": round(self.seconds, 3),
            "frames_per_second": round(self.frames_per_second, 2),
            "predictions_per_second": round(self.predictions_per_second, 2),
            "latency_from": "capture" if self.live else "decode",
            "latency_ms_median": round(self.latency_ms(0.5), 2),
            "latency_ms_p95": round(self.latency_ms(0.95), 2),
            "frames_dropped": self.frames_dropped,
            "backbone_seconds": round(self.backbone_seconds, 3),
            "head_seconds": round(self.head_seconds, 3),
            "window": self.window,
            "window_seconds": self.window_seconds,
            "stride": self.stride,
            "fps_sampled": self.fps_sampled,
            "error": self.error,
        }


# ------------------------------------------------------------------------------------------------ models
def top_predictions(verb_logits: np.ndarray, noun_logits: np.ndarray, verb_classes, noun_classes, k: int):
    """Top-k (name, probability) verbs and nouns (softmax over all classes) and (verb, noun, score) actions (the
    official ranking, ``metrics.action_scores``) of one segment's logits (1, Cv), (1, Cn)."""
    verb_probs = torch.softmax(torch.from_numpy(verb_logits[0]).double(), dim=0).numpy()  # (Cv,)
    noun_probs = torch.softmax(torch.from_numpy(noun_logits[0]).double(), dim=0).numpy()  # (Cn,)
    action_ids, action_probs = action_scores(verb_logits, noun_logits, top_n=100)  # (1, K) each, best first
    # Descending by probability; ties: higher class index first, as metrics ranks them.
    verbs = np.argsort(verb_probs, kind="stable")[::-1][:k]
    nouns = np.argsort(noun_probs, kind="stable")[::-1][:k]
    return (tuple((verb_classes[v], float(verb_probs[v])) for v in verbs),
            tuple((noun_classes[n], float(noun_probs[n])) for n in nouns),
            tuple((verb_classes[a // ACTION_VERB_MULTIPLIER], noun_classes[a % ACTION_VERB_MULTIPLIER], float(s))
                  for a, s in zip(action_ids[0, :k], action_probs[0, :k])))


# ------------------------------------------------------------------------------------------------ the window
@functools.lru_cache(maxsize=256)
def evaluation_offsets(rows: int, frames: int, before: int = 0, after: int = 0,
                       context: Context = Context()) -> tuple[int, ...]:
    """Positions (relative to the segment's first row) of the rows ``evaluate`` reads from a segment of ``rows``
    rows with ``before`` / ``after`` rows of context around it (stage two's ``sequence_offsets``): bin centres."""
    offsets = sequence_offsets(torch.tensor([rows]), frames, train=False, before=torch.tensor([before]),
                               after=torch.tensor([after]), context_frames=context.frames)  # (1, K + T + K)
    return tuple(int(o) for o in offsets[0])


@dataclass(frozen=True)
class _Row:
    features: torch.Tensor  # (2048,) stored dtype
    pts: float  # seconds
    frame_index: int
    arrival: float  # perf_counter when the frame was captured (live) or decoded (file)


class SegmentWindow:
    """The rows of the last ``seconds`` of stream, read the way ``evaluate`` reads a segment of that length.

    The window is [end - seconds, end), where end is the end of the newest row's sampling slot: (k + 1) / fps for
    the row of target k / fps, or the newest time + the gap to the previous row when every frame is kept. So at
    10 fps a 1.6 s window holds exactly 16 rows. It is ``ready`` once the stream covers the whole window. With a
    ``context`` of S seconds the window ends S seconds earlier, and the S seconds before and after it are its
    context (at the stream's start, what there is of it: as at a video's start).
    """

    def __init__(self, seconds: float, frames: int, fps: float | None, context: Context = Context()):
        self.seconds, self.frames, self.fps, self.context = seconds, frames, fps, context
        self.rows: collections.deque[_Row] = collections.deque()
        self.first_pts: float | None = None
        self.gap = 0.0  # fps None: seconds between the two newest rows

    def add(self, row: _Row) -> None:
        if self.rows:
            self.gap = row.pts - self.rows[-1].pts
        self.first_pts = row.pts if self.first_pts is None else self.first_pts
        self.rows.append(row)
        # the newest row always stays (start - S <= its pts)
        while self.rows[0].pts < self.start - self.context.seconds - PTS_TOLERANCE:
            self.rows.popleft()

    @property
    def end(self) -> float:
        newest = self.rows[-1].pts
        if self.fps is None:
            return newest + self.gap
        return (math.floor(newest * self.fps + PTS_TOLERANCE) + 1) / self.fps  # end of the newest row's slot

    @property
    def stop(self) -> float:
        """Where the segment read ends: the stream's end, or S seconds before it with a context."""
        return self.end - self.context.seconds

    @property
    def start(self) -> float:
        return self.stop - self.seconds

    @property
    def ready(self) -> bool:
        return bool(self.rows) and self.end > self.rows[-1].pts and self.start >= self.first_pts - PTS_TOLERANCE

    def segment_rows(self) -> tuple[int, int]:
        """(first, end) positions in ``rows`` of the segment's rows: evaluate's join, start <= pts < stop."""
        pts = np.array([row.pts for row in self.rows])  # (n,) seconds, ascending
        first, end = np.searchsorted(pts, [self.start - PTS_TOLERANCE, self.stop - PTS_TOLERANCE], side="left")
        return int(first), int(end)

    def sample(self) -> torch.Tensor:
        """The sampled rows' features, oldest first: (1, K + T + K, D); the rows before ``start`` and from ``stop``
        on are the context (the window keeps no row older than start - S, and the newest ends the context)."""
        first, end = self.segment_rows()
        offsets = evaluation_offsets(end - first, self.frames, first, len(self.rows) - end, self.context)
        return torch.stack([self.rows[first + i].features for i in offsets])[None]  # (1, L, D)


# ------------------------------------------------------------------------------------------------ sources
@dataclass
class SourceBatch:
    frames: FrameBatch | ClipBatch  # sampled, resized and cropped frames (or clips) with their indices and times
    arrivals: np.ndarray  # (n,) perf_counter seconds when each frame was captured (live) or decoded (file)
    sources: list[np.ndarray] | None = None  # full-size RGB frames (H, W, 3), for the annotated video only


def _camera_device(source: str, camera_format: str | None) -> tuple[str, str] | None:
    """(device, PyAV format) when ``source`` names a camera, else None (a file)."""
    if source.isdigit():
        if sys.platform == "darwin":
            return source, camera_format or "avfoundation"
        if sys.platform.startswith("linux"):
            return f"/dev/video{source}", camera_format or "v4l2"
        raise PredictError(
            f"camera {source}: camera indices work on Linux (v4l2) and macOS (avfoundation); on this system pass "
            "--camera-format and the device name FFmpeg uses, e.g. dshow 'video=NAME'"
        )
    if source.startswith("/dev/video"):
        return source, camera_format or "v4l2"
    if camera_format:
        return source, camera_format
    return None


def _clip_rows(batches: Iterator[SourceBatch], windows: ClipWindows) -> Iterator[SourceBatch]:
    """A video backbone's rows, as extract makes them: the frames gathered into clips (``windows``). A row arrives
    with the last frame of its clip."""
    for batch in batches:
        for clips in windows.add(batch.frames):
            yield SourceBatch(clips, np.full(len(clips), batch.arrivals[-1]))
    for clips in windows.end():
        yield SourceBatch(clips, np.full(len(clips), time.perf_counter()))


def _file_batches(path: str, fps: float | None, preprocess: Preprocess, batch_size: int, *,
                  keep_source: bool) -> Iterator[SourceBatch]:
    for batch in iter_frames(path, fps=fps, preprocess=preprocess, batch_size=batch_size, keep_source=keep_source):
        yield SourceBatch(batch, np.full(len(batch), time.perf_counter()), batch.sources)


class LiveCapture:
    """A capture device read by a thread: frames arrive in real time whether or not the model keeps up.

    The thread samples frames at ``fps`` by their timestamps (``iter_frames``'s rule) and keeps at most
    ``capacity`` waiting; when the queue is full the oldest is dropped (``dropped`` counts them), so predictions
    skip ahead to the present instead of falling behind. ``batches`` resizes what is waiting (a dropped frame costs
    no conversion) and ends with a PredictError after the captured frames when the capture failed.
    """

    def __init__(self, device: str, fmt: str, fps: float | None, preprocess: Preprocess, capacity: int, *,
                 max_seconds: float | None = None, keep_source: bool = False):
        try:
            self._container = av.open(device, format=fmt)
            stream = self._container.streams.video[0]
        except (av.FFmpegError, OSError, IndexError) as err:
            raise PredictError(
                f"camera {device} ({fmt}): cannot open it ({err}); check the index, the format and permissions"
            ) from None
        self.name = f"{device} ({fmt})"
        self._stream = stream
        self._rate = Fraction(fps) if fps is not None else None  # exact value of the float given
        self._waiting: collections.deque = collections.deque()  # (index, seconds, av.VideoFrame, arrival)
        self._capacity = max(1, capacity)
        self._resizer = Resizer(preprocess)
        self._source_rgb = VideoReformatter() if keep_source else None  # full-size RGB for the annotated video
        self._max_seconds = max_seconds  # capture stops at this source time (frames after it are not counted)
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._finished = False
        self.error: BaseException | None = None
        self.dropped = 0
        self._thread = threading.Thread(target=self._capture, name="epicfeat-capture", daemon=True)
        self._thread.start()

    def _frames(self):
        """Decoded frames of the device (tests replace it to unplug a camera)."""
        return self._container.decode(self._stream)

    def _capture(self) -> None:
        start, next_target, index = None, 0, 0
        try:
            for frame in self._frames():
                arrival = time.perf_counter()
                if self._stop.is_set():
                    break
                # Exact seconds (a Fraction) when the frame carries a pts, as iter_frames compares them.
                seconds = frame.pts * frame.time_base if frame.pts is not None else Fraction(arrival)
                start = seconds if start is None else start
                seconds -= start
                if self._max_seconds is not None and seconds >= self._max_seconds:
                    break
                index += 1
                if self._rate is not None:
                    if seconds * self._rate < next_target:  # before target k / fps
                        continue
                    next_target = math.floor(seconds * self._rate) + 1  # first target strictly after this frame
                with self._ready:
                    if len(self._waiting) == self._capacity:
                        self._waiting.popleft()  # the model is behind: drop the oldest, keep the present
                        self.dropped += 1
                    self._waiting.append((index - 1, float(seconds), frame, arrival))
                    self._ready.notify()
        except BaseException as err:  # noqa: BLE001 - handed to the reading side, which reports it
            self.error = err
        finally:
            with self._ready:
                self._finished = True
                self._ready.notify()
            self._container.close()

    def batches(self, batch_size: int) -> Iterator[SourceBatch]:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._waiting or self._finished)
                if not self._waiting:
                    break
                taken = [self._waiting.popleft() for _ in range(min(batch_size, len(self._waiting)))]
            indices, seconds, decoded, arrivals = zip(*taken)
            images = np.stack([self._resizer(frame) for frame in decoded])  # (n, crop, crop, 3)
            sources = None
            if self._source_rgb is not None:
                sources = [self._source_rgb.reformat(frame, format="rgb24").to_ndarray() for frame in decoded]
            frames = FrameBatch(np.array(indices, np.int64), np.array(seconds, np.float64), images)
            yield SourceBatch(frames, np.array(arrivals), sources)
        if self.error is not None:
            raise PredictError(f"camera {self.name}: capture stopped ({type(self.error).__name__}: {self.error})")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ------------------------------------------------------------------------------------------------ outputs
class CsvTimeline:
    """One CSV row per prediction (ranked columns), each row flushed as soon as it is written."""

    def __init__(self, path: Path, ranks: tuple[int, int, int]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        self.writer = csv.writer(self.file)
        header = ["time", "window_start", "window_end", "rows", "frame_index"]
        for kind, k in zip(("verb", "noun", "action"), ranks):
            for rank in range(1, k + 1):
                header += [f"{kind}{rank}", f"{kind}{rank}_score"]
        self._line(header)

    def _line(self, row: list) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def write(self, p: Prediction) -> None:
        row = [f"{p.time:.6f}", f"{p.window_start:.6f}", f"{p.window_end:.6f}", p.rows, p.frame_index]
        for name, score in (*p.verbs, *p.nouns):
            row += [name, f"{score:.6g}"]
        for verb, noun, score in p.actions:
            row += [f"{verb} {noun}", f"{score:.6g}"]
        self._line(row)

    def close(self, summary: dict) -> None:  # the summary is printed and returned; a CSV has no place for it
        self.file.close()


class JsonlTimeline:
    """JSON Lines: a "run" record (source, checkpoint, window), one "prediction" record each, a closing "summary"
    record; each line flushed at once."""

    def __init__(self, path: Path, meta: dict):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        self._line({"type": "run", **meta})

    def _line(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def write(self, p: Prediction) -> None:
        self._line({
            "type": "prediction", "time": p.time, "window_start": p.window_start, "window_end": p.window_end,
            "rows": p.rows, "frame_index": p.frame_index,
            "verbs": [{"class": c, "score": s} for c, s in p.verbs],
            "nouns": [{"class": c, "score": s} for c, s in p.nouns],
            "actions": [{"verb": v, "noun": n, "score": s} for v, n, s in p.actions],
        })

    def close(self, summary: dict) -> None:
        self._line({"type": "summary", **summary})
        self.file.close()


def _timeline_ranks(top_k: int, n_verbs: int, n_nouns: int) -> tuple[int, int, int]:
    """Ranked columns per kind: top_k capped by the class counts; actions also by the official top-100 pairs."""
    actions = min(100, min(100, n_verbs) * min(100, n_nouns))
    return min(top_k, n_verbs), min(top_k, n_nouns), min(top_k, actions)


class _AnnotatedVideo:
    """H.264 MP4 of the sampled source frames at their own size and rate: the model's crop outlined, the latest
    prediction and the live FPS drawn at the top left (Pillow)."""

    LINES = 4

    def __init__(self, path: Path, width: int, height: int, preprocess: Preprocess, fps: float | None):
        from PIL import ImageFont  # Pillow: checked by _require_pillow, so a missing one is a clear error

        path.parent.mkdir(parents=True, exist_ok=True)
        # yuv420p needs even sides: one column / row of black on odd-sized sources.
        self.width, self.height = width + width % 2, height + height % 2
        self.font = ImageFont.load_default(size=max(10, height // 24))
        self.line_height = int(self.font.size * 1.25)
        self.crop_box = _crop_box(width, height, preprocess)
        self.outline = max(2, height // 180)  # 2 px at least: yuv420p halves colour resolution
        rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(30)
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, "yuv420p"
        self.stream.options = {"crf": "23", "preset": "veryfast"}

    def write(self, image: np.ndarray, lines: list[str]) -> None:
        from PIL import Image, ImageDraw

        canvas = Image.new("RGB", (self.width, self.height))
        canvas.paste(Image.fromarray(image), (0, 0))
        draw = ImageDraw.Draw(canvas)
        draw.rectangle(self.crop_box, outline=(255, 200, 0), width=self.outline)  # what the model sees
        lines = lines[: self.LINES]
        text_width = max(draw.textlength(line, font=self.font) for line in lines)
        draw.rectangle((0, 0, int(text_width) + 8, len(lines) * self.line_height + 6), fill=(0, 0, 0))
        for i, line in enumerate(lines):
            draw.text((4, 3 + i * self.line_height), line, fill=(255, 255, 255), font=self.font)
        frame = av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():  # flush the encoder
            self.container.mux(packet)
        self.container.close()


def _crop_box(width: int, height: int, preprocess: Preprocess) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), inclusive, of the model's centre crop in source pixels."""
    resized_width, resized_height = preprocess.resized_size(width, height)
    left, top = preprocess.crop_offsets(resized_width, resized_height)
    scale_x, scale_y = width / resized_width, height / resized_height
    right, bottom = left + preprocess.crop, top + preprocess.crop
    return (round(left * scale_x), round(top * scale_y), round(right * scale_x) - 1, round(bottom * scale_y) - 1)


def _require_pillow() -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise PredictError("--video-out draws with Pillow, which epicfeat depends on but this environment lacks: "
                           "pip install Pillow") from None


def _overlay_lines(prediction: Prediction | None, window: SegmentWindow, live_fps: float) -> list[str]:
    if prediction is None:
        covered, needed = window.end - window.first_pts, window.seconds + window.context.seconds
        return [f"warming up: {covered:.1f}/{needed:g} s of window", "", "",
                f"{live_fps:.1f} FPS"]
    (verb, verb_p), (noun, noun_p) = prediction.verbs[0], prediction.nouns[0]
    action_verb, action_noun, action_p = prediction.actions[0]
    return [f"verb: {verb} {verb_p:.2f}", f"noun: {noun} {noun_p:.2f}",
            f"action: {action_verb} {action_noun} {action_p:.2f}",
            f"{live_fps:.1f} FPS  t={prediction.time:.1f}s"]


# ------------------------------------------------------------------------------------------------ the run
def _check(config: PredictConfig) -> None:
    if not config.source:
        raise PredictError("no source: give a video file or a camera index")
    if config.checkpoint is None:
        raise PredictError("--checkpoint is required (the best.pt of a train-temporal run)")
    for name in ("stride", "top_k", "batch_size"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise PredictError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.skip_frames < 0:
        raise PredictError(f"--skip-frames must be >= 0, got {config.skip_frames}")
    if not config.window_seconds > 0:
        raise PredictError(f"--window-seconds must be > 0, got {config.window_seconds}")
    if config.precision not in (None, *PRECISION_DTYPES):
        raise PredictError(f"--precision must be one of {', '.join(PRECISION_DTYPES)}, got {config.precision!r}")
    if config.timeline is not None and Path(config.timeline).suffix.lower() not in TIMELINE_SUFFIXES:
        hint = " (.json: use .jsonl, JSON Lines, which stays valid while it grows)" if (
            Path(config.timeline).suffix.lower() == ".json") else ""
        raise PredictError(f"--timeline {config.timeline}: the file name must end in .csv or .jsonl{hint}")
    if config.video_out is not None:
        _require_pillow()


class _Outputs:
    """Timeline and annotated video, opened at the first frame (a source that fails to start leaves no file)."""

    def __init__(self, config: PredictConfig, checkpoint: Checkpoint, meta: dict, preprocess: Preprocess,
                 fps: float | None):
        self.config, self.checkpoint, self.meta, self.preprocess, self.fps = config, checkpoint, meta, preprocess, fps
        self.timeline: CsvTimeline | JsonlTimeline | None = None
        self.video: _AnnotatedVideo | None = None
        self.opened = False
        self.recent: collections.deque[float] = collections.deque(maxlen=30)  # wall times, for the live FPS

    def open(self, first_source: np.ndarray | None) -> None:
        self.opened = True
        config = self.config
        if config.timeline is not None:
            path = Path(config.timeline)
            # the resolved config beside the timeline: `epicfeat predict --config` redoes this run
            save_config(config, path.with_suffix(".config.yaml"))
            if path.suffix.lower() == ".csv":
                self.timeline = CsvTimeline(path, _timeline_ranks(
                    config.top_k, len(self.checkpoint.verb_classes), len(self.checkpoint.noun_classes)))
            else:
                self.timeline = JsonlTimeline(path, self.meta)
        if config.video_out is not None and first_source is not None:
            height, width = first_source.shape[:2]
            self.video = _AnnotatedVideo(Path(config.video_out), width, height, self.preprocess, self.fps)

    def prediction(self, prediction: Prediction) -> None:
        if self.timeline is not None:
            self.timeline.write(prediction)

    def frame(self, source: np.ndarray, current: Prediction | None, window: SegmentWindow) -> None:
        if self.video is None:
            return
        self.recent.append(time.perf_counter())
        live_fps = (len(self.recent) - 1) / (self.recent[-1] - self.recent[0]) if self.recent[-1] > self.recent[0] else 0.0
        self.video.write(source, _overlay_lines(current, window, live_fps))

    def close(self, summary: dict) -> None:
        if self.video is not None:
            self.video.close()
        if self.timeline is not None:
            self.timeline.close(summary)


def predict(config: PredictConfig) -> PredictResult:
    """Stream ``config.source`` through backbone and head; write the timeline / annotated video; return all."""
    _check(config)
    checkpoint = load_checkpoint(config.checkpoint)
    device = resolve_device(config.device)
    fps = _sampled_fps(config, checkpoint.feature_set)
    clip_len = int(checkpoint.feature_set["clip_len"])
    if clip_len > 1 and config.video_out is not None:
        raise PredictError(f"--video-out: the annotated video is drawn for image backbones only; these features come "
                           f"from the video backbone {checkpoint.feature_set['backbone']}: write --timeline instead")
    if clip_len > 1:  # decoded as extract decoded them (at the feature set's rate, whatever --skip-frames)
        feature_set = checkpoint.feature_set
        step, decode_fps = clip_decoding(float(feature_set["clip_fps"]), float(feature_set["fps"]))
    else:
        decode_fps = fps
    camera = _camera_device(str(config.source), config.camera_format)
    if camera is None and not Path(config.source).exists():
        raise VideoError(f"{config.source}: file not found; give a video file or a camera index")
    batch_size = _batch_size(config, checkpoint.feature_set, live=camera is not None)
    # A file's short last batch is padded, as extract pads it; a camera's batches are whatever is waiting, run
    # as they are (padding would cost a full batch of compute for every frame when the model keeps up).
    models = create_models(config, checkpoint, device, pad_to=None if camera is not None else batch_size)
    notes = _departures(config, checkpoint.feature_set, models.pad_to)
    # Before the camera opens: its frames would otherwise pile up (and be dropped) during the one-off costs.
    _warm_up(models, batch_size)
    keep_source = config.video_out is not None
    capture = None
    if camera is None:
        batches = _file_batches(config.source, decode_fps, models.preprocess, batch_size, keep_source=keep_source)
    else:
        capture = LiveCapture(*camera, decode_fps, models.preprocess, capacity=batch_size,
                              max_seconds=config.max_seconds, keep_source=keep_source)
        batches = capture.batches(batch_size)
    if clip_len > 1:
        batches = _clip_rows(batches, ClipWindows(clip_len, step, fps, batch_size))

    result = PredictResult(predictions=[], frames=0, seconds=0.0, window=checkpoint.window, stride=config.stride,
                           fps_sampled=fps, window_seconds=config.window_seconds, live=capture is not None,
                           notes=notes)
    meta = {"source": str(config.source), "checkpoint": str(config.checkpoint),
            "feature_set": checkpoint.feature_set_key, "window": checkpoint.window,
            "window_seconds": config.window_seconds, "stride": config.stride, "fps_sampled": fps}
    outputs = _Outputs(config, checkpoint, meta, models.preprocess, fps)
    window = SegmentWindow(config.window_seconds, checkpoint.window, fps, checkpoint.model_args.context)
    started = time.perf_counter()
    try:
        _stream(config, batches, models, window, outputs, result, started)
    except KeyboardInterrupt:  # a live camera stops with Ctrl-C: keep what was predicted
        notes.append("interrupted: outputs cover the frames processed so far")
    except Exception as err:  # after the first frame, nothing done may be lost
        if result.frames == 0:
            raise
        result.error = _stopped_message(result, window, err)
    finally:
        if capture is not None:
            capture.close()
            result.frames_dropped = capture.dropped
        result.seconds = time.perf_counter() - started
        if config.progress:
            print(file=sys.stderr)
        outputs.close(result.summary())
    if not result.predictions and result.error is None:
        notes.append(f"no prediction: the stream ({result.frames} frames at {fps or 'every'} fps) is shorter than "
                     f"the {config.window_seconds:g} s window")
    return result


@dataclass
class Models:
    """The feature set's frame encoder and the checkpoint's head, run as extract and evaluate ran them."""

    checkpoint: Checkpoint
    encoder: FrameEncoder
    head: torch.nn.Module
    preprocess: Preprocess  # the feature set's resize and crop (the encoder normalises)
    device: torch.device
    pad_to: int | None  # a short batch is padded to this many rows, as extract padded its last batch (None: not)

    def features(self, images: np.ndarray) -> torch.Tensor:
        """uint8 crops (n, [clip_len,] crop, crop, 3) -> (n, D) in the feature set's stored dtype, as extract stored
        them."""
        pixels = torch.from_numpy(images).movedim(-1, -3)  # (n, [clip_len,] 3, crop, crop), a view
        stored = getattr(torch, self.checkpoint.feature_set["dtype"])
        features = self.encoder.encode(pixels, pad_to=self.pad_to, dtype=stored)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the time is the backbone's, not the next call's
        return features

    @torch.inference_mode()
    def predict(self, window: SegmentWindow, top_k: int) -> Prediction:
        verb_logits, noun_logits = self.head(window.sample())  # (1, T, D) -> (1, Cv), (1, Cn)
        verbs, nouns, actions = top_predictions(
            verb_logits.float().cpu().numpy(), noun_logits.float().cpu().numpy(),
            self.checkpoint.verb_classes, self.checkpoint.noun_classes, top_k,
        )
        newest = window.rows[-1]
        first, end = window.segment_rows()
        return Prediction(time=newest.pts, window_start=window.start, window_end=window.stop, rows=end - first,
                          frame_index=newest.frame_index, verbs=verbs, nouns=nouns, actions=actions)


def create_models(config: PredictConfig, checkpoint: Checkpoint, device: torch.device, *,
                  pad_to: int | None) -> Models:
    """The encoder of the checkpoint's feature set (in the run's precision, layout and compilation) and the head."""
    feature_set = checkpoint.feature_set
    settings = {**feature_set, "precision": config.precision or feature_set["precision"],
                "channels_last": config.channels_last, "compile": config.compile}
    encoder = create_encoder(settings, device, weights=checkpoint_weights(checkpoint, config.weights),
                             seed=config.seed)
    # The head runs in the precision its training validated in, as evaluate runs it, so the scores equal evaluate's.
    head = checkpoint.create_model(device)
    head.compute_dtype = PRECISION_DTYPES[recorded_precision(checkpoint)]
    return Models(checkpoint, encoder, head, Preprocess.from_identity(feature_set), device, pad_to)


def checkpoint_weights(checkpoint: Checkpoint, weights: str | None) -> str | None:
    """``weights`` as given; else a finetune checkpoint's own file (it carries its backbone); else None (derived)."""
    if weights is None and "backbone" in checkpoint.extra:
        return str(checkpoint.path)
    return weights


def _sampled_fps(config: PredictConfig, feature_set: dict) -> float | None:
    """Frames per second the head sees: the feature set's rate, lowered by --skip-frames (None: every frame)."""
    fps = feature_set["fps"]
    fps = None if fps is None else float(fps) / (config.skip_frames + 1)
    if fps is not None and config.window_seconds * fps < 1 - PTS_TOLERANCE:
        raise PredictError(f"--window-seconds {config.window_seconds} holds no frame at {fps:g} sampled frames/s: "
                           f"give at least {1 / fps:g} s")
    return fps


def _batch_size(config: PredictConfig, feature_set: dict, *, live: bool) -> int:
    """--batch-size, else 1 for a camera and the feature set's extract batch size (up to 64) for a file."""
    if config.batch_size is not None:
        return config.batch_size
    if live:
        return 1
    return feature_set["batch_size"] if 1 <= feature_set["batch_size"] <= 64 else 32


def _departures(config: PredictConfig, feature_set: dict, pad_to: int | None) -> list[str]:
    """Notes on where this run computes differently from the feature set, for the summary."""
    notes = []
    if config.precision not in (None, feature_set["precision"]):
        notes.append(f"backbone precision {config.precision} differs from the feature set's "
                     f"{feature_set['precision']}: features differ slightly from the training features")
    if config.skip_frames and feature_set["fps"] is None:
        notes.append("--skip-frames ignored: the feature set keeps every frame (fps: null), so no rate to lower")
    if pad_to is not None and pad_to != feature_set["batch_size"]:
        notes.append(f"batch size {pad_to} differs from the feature set's {feature_set['batch_size']}: features may "
                     f"differ from the stored ones by a float16 step (--batch-size {feature_set['batch_size']} gives "
                     "them bit for bit)")
    return notes


def _stopped_message(result: PredictResult, window: SegmentWindow, err: Exception) -> str:
    """Why and where a stream stopped after its first frame (the outputs keep everything before)."""
    where = f"t={window.rows[-1].pts:.2f} s" if window.rows else "the start"
    reason = str(err) if isinstance(err, EpicfeatError) else f"{type(err).__name__}: {err}"
    return (f"stopped after {result.frames} frames (at {where}); outputs cover them and "
            f"{len(result.predictions)} predictions: {reason}")


def _stream(config: PredictConfig, batches: Iterator[SourceBatch], models: Models, window: SegmentWindow,
            outputs: _Outputs, result: PredictResult, started: float) -> None:
    """The loop: backbone per batch, then per frame the window, a prediction every ``stride`` ready frames."""
    ready_frames = 0  # frames since the window first covered window_seconds of stream
    for batch in batches:
        rows = batch.frames
        if not outputs.opened:
            outputs.open(batch.sources[0] if batch.sources else None)
        if config.max_seconds is not None and rows.pts[0] >= config.max_seconds:
            return
        backbone_start = time.perf_counter()
        features = models.features(rows.images)  # (n, D), stored dtype
        result.backbone_seconds += time.perf_counter() - backbone_start
        for row in range(len(rows)):
            if config.max_seconds is not None and rows.pts[row] >= config.max_seconds:
                return
            window.add(_Row(features[row], float(rows.pts[row]), int(rows.frame_indices[row]),
                            float(batch.arrivals[row])))
            result.frames += 1
            if window.ready:
                if ready_frames % config.stride == 0:
                    head_start = time.perf_counter()
                    prediction = models.predict(window, config.top_k)
                    now = time.perf_counter()
                    result.head_seconds += now - head_start
                    result.latencies.append(now - window.rows[-1].arrival)
                    result.predictions.append(prediction)
                    outputs.prediction(prediction)
                ready_frames += 1
            if batch.sources:
                outputs.frame(batch.sources[row], result.predictions[-1] if result.predictions else None, window)
        if config.progress:
            print(f"\r{result.frames} frames, {len(result.predictions)} predictions, "
                  f"{result.frames / (time.perf_counter() - started):.1f} frames/s", end="", file=sys.stderr)


@torch.inference_mode()
def _warm_up(models: Models, batch_size: int) -> None:
    """One untimed pass of each model: the one-off costs (kernel selection, autotuning, compiling) stay untimed."""
    crop, clip_len = models.preprocess.crop, int(models.checkpoint.feature_set["clip_len"])
    clip = (clip_len,) if clip_len > 1 else ()
    features = models.features(np.zeros((batch_size, *clip, crop, crop, 3), np.uint8))  # (B, D)
    models.head(features[:1].expand(models.checkpoint.sequence_length, -1)[None])  # (1, L, D)


def print_summary(result: PredictResult) -> None:
    s = result.summary()
    print(f"{s['frames']} frames through the backbone in {s['seconds']:.1f} s: {s['frames_per_second']:.1f} "
          f"frames/s sustained; {s['predictions']} predictions (T={s['window']} rows sampled over "
          f"{s['window_seconds']:g} s as evaluate samples a segment, every {s['stride']} frames), "
          f"{s['predictions_per_second']:.2f}/s; latency per prediction from {s['latency_from']} "
          f"{s['latency_ms_median']:.1f} ms median, {s['latency_ms_p95']:.1f} ms p95")
    if result.live:
        print(f"frames dropped while the model was behind the camera: {s['frames_dropped']}")
    if result.predictions:
        last = result.predictions[-1]
        verb, noun, score = last.actions[0]
        print(f"last prediction (t={last.time:.2f} s): {verb} {noun} ({score:.2f})")
    for note in result.notes:
        print(f"note: {note}")
    if result.error:
        print(f"error: {result.error}")
