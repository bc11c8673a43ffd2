"""``epicfeat finetune``: ResNet50 + BiLSTM fine-tuned end to end on decoded clips, from a train-temporal checkpoint.

One GPU:   epicfeat finetune --checkpoint runs/temporal/best.pt --videos V --annotations A --out runs/finetune
Many GPUs: torchrun --nproc-per-node 4 -m epicfeat finetune ...   (see pipelines/slurm_finetune.sbatch)
"""
from pathlib import Path
from typing import Annotated, Optional

import typer

from epicfeat.cli import _options as opt
from epicfeat.config import resolve_config


def finetune(
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="best.pt / last.pt of a train-temporal run to start from.", show_default=False)] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Backbone weights its feature set was extracted with (imagenet | random | PATH; default: from the feature set). Checked against the feature set's hash.", show_default=False)] = None,
    videos: opt.Videos = None,
    annotations: opt.Annotations = None,
    config: opt.ConfigFile = None,
    out: opt.Out = None,
    frames: Annotated[Optional[int], typer.Option(help="T frames per clip (default: the checkpoint's).", show_default=False)] = None,
    trainable_stages: Annotated[Optional[int], typer.Option("--trainable-stages", help="Last ResNet stages that train, 0-4 (5 adds the stem) (default: 2).", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs (default: 10).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak lr of the temporal model and heads (default: 1.5e-4).", show_default=False)] = None,
    backbone_lr: Annotated[Optional[float], typer.Option("--backbone-lr", help="Peak lr of the backbone (default: 1.5e-5).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Global clips per optimiser step (default: 32).", show_default=False)] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option("--micro-batch-size", help="Clips per forward/backward per process (default: 8).", show_default=False)] = None,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="Decode processes per training process (default: 8).", show_default=False)] = None,
    activation_checkpointing: Annotated[Optional[bool], typer.Option("--activation-checkpointing/--no-activation-checkpointing", help="Recompute trainable stages in backward (less memory).", show_default=False)] = None,
    train_splits: Annotated[Optional[str], typer.Option("--train-splits", help="train (validate, early stop) | train+validation.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of clip sampling, augmentation, CutMix and dropout (default: 0).", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.pt.")] = False,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N.", show_default=False)] = None,
    deterministic: Annotated[Optional[bool], typer.Option("--deterministic/--no-deterministic", help="Deterministic kernels (exact CPU resume).", show_default=False)] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", show_default=False)] = None,
) -> None:
    """Fine-tune the backbone and the temporal model end to end on decoded clips (resumable; torchrun for DDP)."""
    from epicfeat.finetune import FinetuneConfig
    from epicfeat.finetune import finetune as run_finetune

    overrides = dict(
        checkpoint=checkpoint, weights=weights, videos=videos, annotations=annotations, out=out, frames=frames,
        trainable_stages=trainable_stages, epochs=epochs, lr=lr, backbone_lr=backbone_lr, batch_size=batch_size,
        micro_batch_size=micro_batch_size, num_workers=num_workers, activation_checkpointing=activation_checkpointing,
        train_splits=train_splits, seed=seed, resume=resume or None, device=device, deterministic=deterministic,
        progress=progress,
    )
    cfg = resolve_config(FinetuneConfig, defaults="finetune", config_file=config, overrides=overrides)
    run_finetune(cfg)
