"""``epicfeat predict``: a video file or camera → a timeline of top-5 verbs, nouns and actions (and an annotated MP4)."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from epicfeat.cli import _options as opt
from epicfeat.config import resolve_config


def predict(
    source: Annotated[str, typer.Argument(help="Video file, or a camera: index N (Linux: /dev/videoN via v4l2; macOS: avfoundation) or /dev/videoN.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="best.pt / last.pt of a train-temporal run.", show_default=False)] = None,
    config: opt.ConfigFile = None,
    weights: Annotated[Optional[str], typer.Option(help="Backbone weights (must match the checkpoint's feature set); default: derived from it.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for --weights random.", show_default=False)] = None,
    stride: Annotated[Optional[int], typer.Option(help="Sampled frames between predictions [4].", show_default=False)] = None,
    skip_frames: Annotated[Optional[int], typer.Option("--skip-frames", help="Sampled frames dropped after each kept one: the backbone runs at fps/(N+1) [0].", show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Classes listed per prediction [5].", show_default=False)] = None,
    timeline: Annotated[Optional[Path], typer.Option(help="Timeline file: .csv or .json.", show_default=False)] = None,
    video_out: Annotated[Optional[Path], typer.Option("--video-out", help="Annotated MP4 of the frames the model saw.", show_default=False)] = None,
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", help="Stop after this many seconds of source (cameras: else Ctrl-C).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Frames per backbone call [4]; 1 for the lowest camera latency.", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N.", show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option(help="Backbone autocast: fp32 | bf16 | fp16 [the feature set's].", show_default=False)] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", show_default=False)] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the backbone.", show_default=False)] = None,
    camera_format: Annotated[Optional[str], typer.Option("--camera-format", help="PyAV capture format (v4l2, avfoundation, dshow).", show_default=False)] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", show_default=False)] = None,
) -> None:
    """Recognise actions in a video or camera stream with a trained temporal checkpoint."""
    from epicfeat.predict import PredictConfig, print_summary
    from epicfeat.predict import predict as run_predict

    overrides = dict(
        source=source, checkpoint=checkpoint, weights=weights, seed=seed, stride=stride, skip_frames=skip_frames,
        top_k=top_k, timeline=timeline, video_out=video_out, max_seconds=max_seconds, batch_size=batch_size,
        device=device, precision=precision, channels_last=channels_last, compile=compile,
        camera_format=camera_format, progress=progress,
    )
    cfg = resolve_config(PredictConfig, defaults="predict", config_file=config, overrides=overrides)
    print_summary(run_predict(cfg))
