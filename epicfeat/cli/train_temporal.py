"""``epicfeat train-temporal``: stage two, cached features → a BiLSTM verb/noun model."""
from typing import Annotated, Optional

import typer

from epicfeat.cli import _options as opt
from epicfeat.config import resolve_config


def train_temporal(
    frames: Annotated[Optional[int], typer.Option(help="Rows per segment, TSN bins: 16 or 32 (default: 16).", show_default=False)] = None,
    config: opt.ConfigFile = None,
    annotations: opt.Annotations = None,
    cache: opt.Cache = None,
    feature_set: Annotated[Optional[str], typer.Option("--feature-set", help="Feature set key under --cache, or its path (default: the only one there).", show_default=False)] = None,
    out: opt.Out = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs; the LR schedule spans them (default: 50).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate (default: 1.5e-4).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Effective batch: segments per optimiser step (default: 100).", show_default=False)] = None,
    pooling: Annotated[Optional[str], typer.Option(help="Temporal pooling: mean | max | last | attention (default: mean).", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of init, dropout, shuffling, sampling and CutMix (default: 0).", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.pt.")] = False,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N.", show_default=False)] = None,
    train_splits: Annotated[Optional[str], typer.Option("--train-splits", help="train (validate, early stop) | train+validation (final model for the test submission).", show_default=False)] = None,
    deterministic: Annotated[Optional[bool], typer.Option("--deterministic/--no-deterministic", help="Deterministic kernels (exact CPU resume).", show_default=False)] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", show_default=False)] = None,
) -> None:
    """Train the BiLSTM verb/noun model on a cached feature set (resumable with --resume)."""
    from epicfeat.temporal.train import TrainTemporalConfig
    from epicfeat.temporal.train import train_temporal as run_training

    overrides = dict(
        frames=frames, annotations=annotations, cache=cache, feature_set=feature_set, out=out, epochs=epochs,
        lr=lr, batch_size=batch_size, pooling=pooling, seed=seed, resume=resume or None, device=device,
        train_splits=train_splits, deterministic=deterministic, progress=progress,
    )
    cfg = resolve_config(TrainTemporalConfig, defaults="train_temporal", config_file=config, overrides=overrides)
    run_training(cfg)
