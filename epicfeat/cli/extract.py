"""``epicfeat extract``: stage one, videos → ResNet50 features in a Zarr feature set."""
from typing import Annotated, Optional

import typer

from epicfeat.cli import _options as opt
from epicfeat.config import resolve_config


def extract(
    split: Annotated[Optional[str], typer.Option(help="Which split's videos: train | validation | test | all.", show_default=False)] = None,
    video_ids: Annotated[Optional[str], typer.Option("--video-ids", help="Comma-separated video ids instead of a split, e.g. P01_01,P01_02.", show_default=False)] = None,
    videos: opt.Videos = None,
    annotations: opt.Annotations = None,
    cache: opt.Cache = None,
    config: opt.ConfigFile = None,
    weights: Annotated[Optional[str], typer.Option(help="imagenet | imagenet1k_v1 | random | PATH to a state dict or epicfeat checkpoint.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for --weights random.", show_default=False)] = None,
    fps: Annotated[Optional[float], typer.Option(help="Feature rows per second of video [default 10].", show_default=False)] = None,
    resize: Annotated[Optional[int], typer.Option(help="Shorter side before the centre crop [256].", show_default=False)] = None,
    crop: Annotated[Optional[int], typer.Option(help="Centre crop size [224].", show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option(help="Backbone compute precision: auto (bf16 on a GPU, fp32 on a CPU) | fp32 | bf16 | fp16 (default: auto).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Frames per model batch [64].", show_default=False)] = None,
    decode_workers: Annotated[Optional[int], typer.Option(help="Decoding processes (-1: one per spare core).", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N.", show_default=False)] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the backbone.", show_default=False)] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="dask scheduler address to share the job, or 'local' for a LocalCluster.", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(help="LocalCluster workers with --scheduler local.", show_default=False)] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", show_default=False)] = None,
) -> None:
    """Stream videos through ResNet50 and cache per-frame 2048-d features (resumable: re-run to continue)."""
    from epicfeat.extract import ExtractConfig, extract_features, print_summary

    overrides = dict(
        split=split, videos=videos, annotations=annotations, cache=cache, weights=weights, seed=seed, fps=fps,
        resize=resize, crop=crop, precision=precision, batch_size=batch_size, decode_workers=decode_workers,
        device=device, compile=compile, scheduler=scheduler, workers=workers, progress=progress,
        video_ids=[v.strip() for v in video_ids.split(",") if v.strip()] if video_ids else None,
    )
    cfg = resolve_config(ExtractConfig, defaults="extract", config_file=config, overrides=overrides)
    summary = extract_features(cfg)
    print_summary(summary)
    if not summary.ok:
        raise typer.Exit(1)
