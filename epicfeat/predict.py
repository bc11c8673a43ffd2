"""Streaming action recognition: a video file or a camera -> a timeline of top-5 verbs, nouns and actions.

    frames (PyAV, sampled at the feature set's fps) ──► ResNet50 once per frame ──► ring buffer of the last T
    features ──► every ``stride`` frames: temporal head on the window ──► softmax / official action scores

Each sampled frame goes through the backbone exactly once; the window of the last T features slides over a
deque, so a prediction costs ``stride`` backbone passes plus one head call, instead of the seed demo's T backbone
passes per prediction (``benchmarks/bench_predict.py`` measures both).

The backbone and the preprocessing are rebuilt from the checkpoint's feature set (weights hash, fps, resize,
crop, mean, std, precision, stored dtype), so every window looks like the windows the model was trained on.
A window covers the last T sampled frames: at 10 fps, T=16 is 1.6 s of video, the length of a typical EPIC action
(training segments are binned into T rows, so the model saw segments of roughly this span).
"""
from __future__ import annotations

import collections
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from epicfeat.config import atomic_write_text, save_config
from epicfeat.configs import PredictConfig
from epicfeat.errors import EpicfeatError
from epicfeat.frames import FrameBatch, Preprocess, VideoError, iter_frames, resize_and_crop
from epicfeat.metrics import ACTION_VERB_MULTIPLIER, action_scores
from epicfeat.temporal.checkpoint import Checkpoint, load_checkpoint

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PredictError(EpicfeatError):
    """A prediction run that cannot start: bad source, weights that do not match the checkpoint, bad option."""


@dataclass(frozen=True)
class Prediction:
    time: float  # seconds (source clock) of the window's last frame
    window_start: float  # seconds of the window's first frame
    frame_index: int  # source frame index of the window's last frame
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
    latencies: list[float] = field(default_factory=list)  # per prediction, seconds (see _Latency)
    backbone_seconds: float = 0.0
    head_seconds: float = 0.0
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
            "latency_ms_median": round(self.latency_ms(0.5), 2),
            "latency_ms_p95": round(self.latency_ms(0.95), 2),
            "backbone_seconds": round(self.backbone_seconds, 3),
            "head_seconds": round(self.head_seconds, 3),
            "window": self.window,
            "stride": self.stride,
            "fps_sampled": self.fps_sampled,
        }


# ------------------------------------------------------------------------------------------------ model setup
def window_length(checkpoint: Checkpoint) -> int:
    """T: rows per training segment (train-temporal's ``frames``)."""
    frames = checkpoint.config.get("frames")
    if not isinstance(frames, int) or frames < 1:
        raise PredictError(f"checkpoint {checkpoint.path} does not record its window length (config 'frames')")
    return frames


class FrameEncoder:
    """uint8 crops (N, crop, crop, 3) -> features (N, 2048) in the feature set's stored dtype, on the device.

    Features are rounded to the stored dtype (float16) exactly as ``extract`` stores them, so the head sees the
    same numbers it was trained on.
    """

    def __init__(self, backbone: torch.nn.Module, preprocess: Preprocess, device: torch.device, *,
                 precision: str, feature_dtype: str, channels_last: bool, compile: bool):
        model = backbone.to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if compile else model
        self.preprocess, self.device, self.channels_last = preprocess, device, channels_last
        self.autocast = _AUTOCAST_DTYPES.get(precision)
        self.feature_dtype = getattr(torch, feature_dtype)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(images).to(self.device, non_blocking=True)  # (N, H, W, 3) uint8
        pixels = self.preprocess.normalize(pixels)  # (N, 3, H, W) float32, channels_last strides
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        else:
            pixels = pixels.contiguous()
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            features = self.model(pixels)  # (N, 2048)
        return features.float().to(self.feature_dtype)


def top_predictions(verb_logits: np.ndarray, noun_logits: np.ndarray, verb_classes, noun_classes, k: int):
    """Top-k (name, probability) verbs and nouns and (verb, noun, score) actions, for each row of logits.

    Verb and noun probabilities are a softmax over all classes; actions use the official EPIC ranking (softmax
    over each top-100, outer product) from ``metrics.action_scores``.
    """
    verb_probs = torch.softmax(torch.from_numpy(verb_logits).double(), dim=1).numpy()  # (N, Cv)
    noun_probs = torch.softmax(torch.from_numpy(noun_logits).double(), dim=1).numpy()  # (N, Cn)
    action_ids, action_probs = action_scores(verb_logits, noun_logits, top_n=100)  # (N, K) each, best first
    rows = []
    for i in range(len(verb_logits)):
        # Descending by probability; ties: higher class index first, as metrics ranks them.
        verbs = np.argsort(verb_probs[i], kind="stable")[::-1][:k]
        nouns = np.argsort(noun_probs[i], kind="stable")[::-1][:k]
        rows.append((
            tuple((verb_classes[v], float(verb_probs[i, v])) for v in verbs),
            tuple((noun_classes[n], float(noun_probs[i, n])) for n in nouns),
            tuple(
                (verb_classes[a // ACTION_VERB_MULTIPLIER], noun_classes[a % ACTION_VERB_MULTIPLIER], float(s))
                for a, s in zip(action_ids[i, :k], action_probs[i, :k])
            ),
        ))
    return rows


# ------------------------------------------------------------------------------------------------ sources
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


def _camera_batches(device: str, fmt: str, fps: float | None, preprocess: Preprocess,
                    batch_size: int) -> Iterator[FrameBatch]:
    """Live frames from a capture device, sampled at ``fps`` by their timestamps, in batches of ``batch_size``.

    Same sampling rule as ``iter_frames``: each target k/fps takes the first frame at or after it. Frame times
    are measured from the first captured frame. Not covered by the tests (no camera in CI).
    """
    import av

    try:
        container = av.open(device, format=fmt)
    except (av.FFmpegError, OSError) as err:
        raise PredictError(
            f"camera {device} ({fmt}): cannot open it ({err}); check the index and permissions"
        ) from None
    try:
        stream = container.streams.video[0]
        start, next_target, index = None, 0, 0
        images, indices, times = [], [], []
        for frame in container.decode(stream):
            seconds = frame.time if frame.time is not None else time.perf_counter()
            start = seconds if start is None else start
            seconds -= start
            keep = fps is None or seconds * fps >= next_target
            if keep:
                if fps is not None:
                    next_target = math.floor(seconds * fps) + 1  # first target strictly after this frame
                images.append(resize_and_crop(frame, preprocess))
                indices.append(index)
                times.append(seconds)
                if len(images) == batch_size:
                    yield FrameBatch(np.array(indices), np.array(times), np.stack(images))  # (B, crop, crop, 3)
                    images, indices, times = [], [], []
            index += 1
    finally:
        container.close()


# ------------------------------------------------------------------------------------------------ outputs
class _AnnotatedVideo:
    """H.264 MP4 of the frames the model saw (the centre crop), with a text panel below each frame.

    The panel shows the latest prediction (top verb, noun, action and scores) and the live FPS (over the last 30
    frames processed). One output frame per sampled frame, at the sampled frame rate.
    """

    LINES = 4

    def __init__(self, path: Path, crop: int, fps: float | None):
        import av
        from PIL import ImageFont

        path.parent.mkdir(parents=True, exist_ok=True)
        self.font = ImageFont.load_default(size=max(8, crop // 20))
        self.line_height = self.font.size + 3
        # yuv420p needs even sides.
        self.width = crop + crop % 2
        self.panel = self.LINES * self.line_height + 4
        self.height = crop + self.panel + (crop + self.panel) % 2
        self.crop = crop
        rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(30)
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, "yuv420p"
        self.stream.options = {"crf": "23", "preset": "veryfast"}
        self.frames = 0

    def write(self, image: np.ndarray, lines: list[str]) -> None:
        import av
        from PIL import Image, ImageDraw

        canvas = Image.new("RGB", (self.width, self.height))
        canvas.paste(Image.fromarray(image), (0, 0))
        draw = ImageDraw.Draw(canvas)
        for i, line in enumerate(lines[: self.LINES]):
            draw.text((2, self.crop + 2 + i * self.line_height), line, fill=(255, 255, 255), font=self.font)
        frame = av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():  # flush the encoder
            self.container.mux(packet)
        self.container.close()


def _overlay_lines(prediction: Prediction | None, filled: int, window: int, live_fps: float) -> list[str]:
    if prediction is None:
        return [f"warming up: {filled}/{window} frames", "", "", f"{live_fps:.1f} FPS"]
    (verb, verb_p), (noun, noun_p) = prediction.verbs[0], prediction.nouns[0]
    action_verb, action_noun, action_p = prediction.actions[0]
    return [f"verb: {verb} {verb_p:.2f}", f"noun: {noun} {noun_p:.2f}",
            f"action: {action_verb} {action_noun} {action_p:.2f}",
            f"{live_fps:.1f} FPS  t={prediction.time:.1f}s"]


def write_timeline(path: Path, result: PredictResult, meta: dict) -> None:
    """CSV (one row per prediction, ranked columns) or JSON (predictions, run metadata, summary) by suffix."""
    if path.suffix.lower() == ".json":
        document = {
            **meta,
            "summary": result.summary(),
            "predictions": [
                {
                    "time": p.time, "window_start": p.window_start, "frame_index": p.frame_index,
                    "verbs": [{"class": c, "score": s} for c, s in p.verbs],
                    "nouns": [{"class": c, "score": s} for c, s in p.nouns],
                    "actions": [{"verb": v, "noun": n, "score": s} for v, n, s in p.actions],
                }
                for p in result.predictions
            ],
        }
        atomic_write_text(path, json.dumps(document, indent=1) + "\n")
        return
    k = max((len(p.verbs) for p in result.predictions), default=0)
    header = ["time", "window_start", "frame_index"]
    for kind in ("verb", "noun", "action"):
        for rank in range(1, k + 1):
            header += [f"{kind}{rank}", f"{kind}{rank}_score"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for p in result.predictions:
        row = [f"{p.time:.6f}", f"{p.window_start:.6f}", p.frame_index]
        for name, score in p.verbs:
            row += [name, f"{score:.6g}"]
        for name, score in p.nouns:
            row += [name, f"{score:.6g}"]
        for verb, noun, score in p.actions:
            row += [f"{verb} {noun}", f"{score:.6g}"]
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------ the run
def _check(config: PredictConfig) -> None:
    if not config.source:
        raise PredictError("no source: give a video file or a camera index")
    if config.checkpoint is None:
        raise PredictError("--checkpoint is required (the best.pt of a train-temporal run)")
    for name in ("stride", "top_k", "batch_size"):
        if getattr(config, name) < 1:
            raise PredictError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.skip_frames < 0:
        raise PredictError(f"--skip-frames must be >= 0, got {config.skip_frames}")
    if config.precision not in (None, "fp32", "bf16", "fp16"):
        raise PredictError(f"--precision must be fp32, bf16 or fp16, got {config.precision!r}")
    if config.timeline is not None and Path(config.timeline).suffix.lower() not in (".csv", ".json"):
        raise PredictError(f"--timeline {config.timeline}: the file name must end in .csv or .json")


def predict(config: PredictConfig) -> PredictResult:
    """Stream ``config.source`` through backbone and head; write the timeline / annotated video; return all."""
    from epicfeat.devices import resolve_device

    _check(config)
    checkpoint = load_checkpoint(config.checkpoint)
    feature_set = checkpoint.feature_set
    window = window_length(checkpoint)
    device = resolve_device(config.device)
    notes: list[str] = []
    precision = config.precision or feature_set.get("precision", "fp32")
    if precision != feature_set.get("precision", "fp32"):
        notes.append(f"backbone precision {precision} differs from the feature set's "
                     f"{feature_set.get('precision')}: features differ slightly from the training features")
    encoder = FrameEncoder(
        checkpoint.create_backbone(config.weights, seed=config.seed), Preprocess.from_identity(feature_set), device,
        precision=precision, feature_dtype=feature_set.get("dtype", "float16"),
        channels_last=config.channels_last, compile=config.compile,
    )
    # The head runs in fp32: one small LSTM call per `stride` backbone frames is a small share of the work, and
    # fp32 keeps the timeline's scores equal to a direct model call.
    head = checkpoint.create_model(device)
    fps = feature_set.get("fps")
    fps = None if fps is None else float(fps) / (config.skip_frames + 1)
    if config.skip_frames and fps is None:
        notes.append("--skip-frames ignored: the feature set keeps every frame (fps: null), so no rate to lower")

    camera = _camera_device(str(config.source), config.camera_format)
    if camera is None:
        if not Path(config.source).exists():
            raise VideoError(f"{config.source}: file not found; give a video file or a camera index")
        batches = iter_frames(config.source, fps=fps, preprocess=encoder.preprocess, batch_size=config.batch_size)
    else:
        batches = _camera_batches(*camera, fps, encoder.preprocess, config.batch_size)

    ring: collections.deque[tuple[torch.Tensor, float, int]] = collections.deque(maxlen=window)
    result = PredictResult(predictions=[], frames=0, seconds=0.0, window=window, stride=config.stride,
                           fps_sampled=fps, notes=notes)
    writer = _AnnotatedVideo(Path(config.video_out), encoder.preprocess.crop, fps) if config.video_out else None
    recent = collections.deque(maxlen=30)  # wall times of the last 30 frames, for the live FPS overlay
    _warm_up(encoder, head, config.batch_size, window)
    started = time.perf_counter()
    try:
        for batch in batches:
            if config.max_seconds is not None and batch.pts[0] >= config.max_seconds:
                break
            ready = time.perf_counter()  # the batch is decoded: latency of its predictions counts from here
            features = encoder(batch.images)  # (n, 2048), stored dtype
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.backbone_seconds += time.perf_counter() - ready
            for row in range(len(batch)):
                if config.max_seconds is not None and batch.pts[row] >= config.max_seconds:
                    break
                ring.append((features[row], float(batch.pts[row]), int(batch.frame_indices[row])))
                result.frames += 1
                if len(ring) == window and (result.frames - window) % config.stride == 0:
                    head_start = time.perf_counter()
                    result.predictions.append(_predict_window(head, ring, checkpoint, config.top_k))
                    now = time.perf_counter()
                    result.head_seconds += now - head_start
                    result.latencies.append(now - ready)
                if writer is not None:
                    recent.append(time.perf_counter())
                    live_fps = (len(recent) - 1) / (recent[-1] - recent[0]) if recent[-1] > recent[0] else 0.0
                    current = result.predictions[-1] if result.predictions else None
                    writer.write(batch.images[row], _overlay_lines(current, len(ring), window, live_fps))
            if config.progress:
                print(f"\r{result.frames} frames, {len(result.predictions)} predictions, "
                      f"{result.frames / (time.perf_counter() - started):.1f} frames/s", end="", file=sys.stderr)
    except KeyboardInterrupt:  # a live camera stops with Ctrl-C: keep what was predicted
        notes.append("interrupted: outputs cover the frames processed so far")
    finally:
        if writer is not None:
            writer.close()
        if config.progress:
            print(file=sys.stderr)
    result.seconds = time.perf_counter() - started
    if not result.predictions:
        notes.append(f"no prediction: fewer than T={window} frames were sampled "
                     f"({result.frames} at {fps or 'every'} fps)")
    if config.timeline is not None:
        meta = {"source": str(config.source), "checkpoint": str(config.checkpoint),
                "feature_set": checkpoint.feature_set_key, "window": window, "stride": config.stride,
                "fps_sampled": fps}
        write_timeline(Path(config.timeline), result, meta)
        # the resolved config beside the timeline: `epicfeat predict --config` redoes this run
        save_config(config, Path(config.timeline).with_suffix(".config.yaml"))
    return result


@torch.inference_mode()
def _warm_up(encoder: FrameEncoder, head: torch.nn.Module, batch_size: int, window: int) -> None:
    """One untimed pass of each model: the first call pays one-off costs (oneDNN kernel selection, cuDNN autotune,
    torch.compile), which would otherwise show up as a multi-second first latency and a lower sustained FPS."""
    crop = encoder.preprocess.crop
    features = encoder(np.zeros((batch_size, crop, crop, 3), np.uint8))  # (B, 2048)
    head(features[:1].expand(window, -1)[None])  # (1, T, 2048)


@torch.inference_mode()
def _predict_window(head: torch.nn.Module, ring, checkpoint: Checkpoint, top_k: int) -> Prediction:
    window = torch.stack([features for features, _, _ in ring])[None]  # (1, T, 2048)
    verb_logits, noun_logits = head(window)  # (1, Cv), (1, Cn)
    (verbs, nouns, actions), = top_predictions(
        verb_logits.float().cpu().numpy(), noun_logits.float().cpu().numpy(),
        checkpoint.verb_classes, checkpoint.noun_classes, top_k,
    )
    return Prediction(time=ring[-1][1], window_start=ring[0][1], frame_index=ring[-1][2],
                      verbs=verbs, nouns=nouns, actions=actions)


def print_summary(result: PredictResult) -> None:
    s = result.summary()
    print(f"{s['frames']} frames through the backbone in {s['seconds']:.1f} s: {s['frames_per_second']:.1f} "
          f"frames/s sustained; {s['predictions']} predictions (T={s['window']}, every {s['stride']} frames), "
          f"{s['predictions_per_second']:.2f}/s; latency per prediction {s['latency_ms_median']:.1f} ms median, "
          f"{s['latency_ms_p95']:.1f} ms p95")
    if result.predictions:
        last = result.predictions[-1]
        verb, noun, score = last.actions[0]
        print(f"last prediction (t={last.time:.2f} s): {verb} {noun} ({score:.2f})")
    for note in result.notes:
        print(f"note: {note}")
