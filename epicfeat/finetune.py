"""``epicfeat finetune``: end-to-end ResNet50 + BiLSTM training on decoded clips, started from a stage-two model.

Read it top to bottom:

    finetune(config)                          the one function `epicfeat finetune` calls
      load_start(config)                      the train-temporal checkpoint, the backbone its feature set used
                                              (refused when the weights' hash differs) and that feature set
      clip datasets                           segments -> their stored rows' times -> T frames decoded with PyAV
      epoch 0                                 the starting model, scored by evaluate_clips like every epoch:
                                              the baseline, and best.pt until an epoch beats it
      for each epoch:
        train_one_epoch(...)                  augment each clip (one parameter draw for all T frames), CutMix
                                              (one box for all T frames, drawn per global step), backbone +
                                              BiLSTM forward/backward, gradient accumulation, warm-up + cosine
                                              per step, AdamW with a backbone and a head learning rate
        follow_feature_drift(...)             the temporal model's input mean/std follow the backbone
        evaluate_clips(...)                   bin-centre frames, extract's resize + centre crop, official metrics
        best.pt / last.pt, metrics.csv, TensorBoard, early stopping on validation action top-1 (as train-temporal)
      judge(...)                              the summary line: did fine-tuning help, and by how much

The same frames as stage two. A clip's T times are the pts of the rows stage two sampled for that segment
(``segment_rows``: the feature set's stored pts, joined to segments by stage two's rule, binned like
``PackedSplit.sample_rows``), never a nominal k / fps grid: at 59.94 fps a row's pts falls up to 16.7 ms after
k / fps, which put other rows into about 8 % of segments. So epoch 0 reproduces ``epicfeat evaluate``'s numbers
on the starting checkpoint (up to the float16 rounding of stored features).

Never worse than the start. Epoch 0 is evaluated first (``eval_start``), counts as the best epoch, and best.pt is
written from it; an epoch replaces best.pt only when its validation action top-1 beats the best so far. While
best.pt holds the start's backbone its feature set is the start's own, so it pairs with the features already
extracted. The result's ``verdict`` / ``gain`` say whether fine-tuning helped and by how much.

Features and head that move together. The stage-two model standardises its input with the train split's
per-dimension mean/std, measured on the starting backbone. When the backbone trains, its features drift, and
near-constant dimensions (std at its 1e-3 floor: dead ReLU channels, 76 of 2048 on the synthetic demo data)
turn a small drift into inputs many standard deviations out. Measured on the demo's default synthetic data (55
validation segments, random-weight backbone, layer4 training at the default backbone lr 1.5e-5, head lr ~0), one
epoch took validation action top-1 from 65.5 % to 0.0 % with the statistics fixed, and to 60.0 % with them
following the backbone as below. Following limits the damage; best.pt (epoch 0 until beaten) is the guarantee. Choice: after every epoch the mean/std of the backbone's features are measured
again on a fixed set of train clips (``stats_segments`` of them, evaluation's frames), the change since the
start is taken per dimension as affine (f_now = a f_start + b) and applied to the stored statistics, so for an
affine drift the head sees exactly the standardised inputs it was trained on, and an unchanged backbone leaves
the statistics bit for bit. Why not the alternatives: re-estimating from scratch on a subset would replace
stage two's full-split statistics by a noisier estimate even when nothing moved (the model would change with no
training); a learned normalisation lets the drift through until gradients undo it, which is exactly the wreck.
The cost is one forward pass over ``stats_segments`` clips per epoch (512 x T frames: under 1 % of an EPIC
epoch's 67,217 clips forward and backward).
``--no-restandardize`` keeps the stored statistics fixed.

The backbone keeps its BatchNorm statistics (every BN layer stays in eval mode: clips are few per batch and
highly correlated, so batch statistics would be noise) and only the last ``trainable_stages`` ResNet stages train.

Checkpoints are train-temporal checkpoints (``load_checkpoint`` reads the temporal model, classes and config)
plus a ``backbone`` state dict, so ``create_backbone(weights=best.pt)`` / ``epicfeat extract --weights best.pt``
build a new feature set from the fine-tuned backbone. Weights are paired by content: the feature set's weights
are named ``sha-<hash>`` (``epicfeat.backbone.weights_name_of_sha``) for any file holding them, so features
extracted with last.pt, best.pt or a renamed copy holding the same backbone are one feature set, and a model
pairs with exactly the features its backbone gives.

Scale-out: under ``torchrun`` (WORLD_SIZE > 1) each process takes its share of every global batch through a
DistributedSampler, gradients are averaged by DistributedDataParallel, and only rank 0 logs and writes files.
The loss of every step is normalised by the global number of valid clips, and CutMix is drawn per global step
over the global batch (partner boxes all-gathered), so N processes with a global batch B compute the same
update as one process with batch B (up to floating-point summation order; tested with 2 gloo processes).
Decoding: a clip's times further apart than ``SEEK_GAP_SECONDS`` are reached by a seek each (long segments are
not decoded front to back), and codec threads x decode workers stay within the process's cores.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from epicfeat._clips import (
    ClipAugment,
    ClipDataset,
    SegmentRows,
    derive_seed,
    global_positions,
    normalize_clips,
    sample_step_cutmix,
)
from epicfeat.backbone import FEATURE_DIM, ResNet50Features, weights_identity, weights_name_of_sha
from epicfeat.config import config_to_dict, save_config
from epicfeat.configs import FinetuneConfig
from epicfeat.devices import resolve_device
from epicfeat.errors import EpicfeatError
from epicfeat.frames import Preprocess
from epicfeat.temporal.checkpoint import (
    Checkpoint,
    capture_rng_state,
    check_feature_set,
    feature_set_key_of,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from epicfeat.temporal.model import TemporalModel
from epicfeat.temporal.train import (
    LRSchedule,
    TrainResult,
    _console,
    _determinism,
    EarlyStopping,
    _EpochProgress,
    _log_tensorboard,
    _seed_everything,
    _supported_autocast,
    _write_csv,
    open_feature_set,
    print_summary,
)


class FinetuneError(EpicfeatError):
    """A fine-tuning run that cannot start or continue as asked; the message says what to do."""


@dataclass(frozen=True)
class FinetuneResult(TrainResult):
    start_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the starting model, on validation
    gain: float | None = None  # best.pt's validation action top-1 minus the start's (0.0: best.pt is the start)
    verdict: str = ""  # one line: whether fine-tuning helped, and by how much
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # clips that could not be decoded, per split


# ------------------------------------------------------------------------------------------------- the model
class ClipModel(nn.Module):
    """clips (B, T, 3, H, W) -> ResNet50 per frame -> (B, T, 2048) -> the stage-two TemporalModel -> logits."""

    def __init__(self, backbone: ResNet50Features, temporal: TemporalModel, *, trainable_stages: int,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.backbone, self.temporal = backbone, temporal
        self.activation_checkpointing, self.trainable_stages = activation_checkpointing, trainable_stages
        stages = [nn.ModuleList([backbone.conv1, backbone.bn1]), backbone.layer1, backbone.layer2, backbone.layer3,
                  backbone.layer4]
        trainable = stages[len(stages) - trainable_stages:] if trainable_stages else []
        for stage in stages:
            stage.requires_grad_(any(stage is s for s in trainable))

    def train(self, mode: bool = True) -> ClipModel:
        super().train(mode)
        # Frozen BatchNorm statistics: running mean/var are never updated, and batches are normalised with them.
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 2048); trainable stages are recomputed in backward with activation checkpointing."""
        b = self.backbone
        if not (self.activation_checkpointing and self.training and torch.is_grad_enabled()):
            return b(images)
        from torch.utils.checkpoint import checkpoint

        def stem(x: torch.Tensor) -> torch.Tensor:
            return b.maxpool(b.relu(b.bn1(b.conv1(x))))

        # Frozen stages keep no activations anyway (nothing below them needs a gradient); checkpoint the others.
        stages = [(stem, self.trainable_stages == 5)] + [
            (layer, k > 4 - self.trainable_stages)
            for k, layer in enumerate((b.layer1, b.layer2, b.layer3, b.layer4), 1)
        ]
        x = images
        for fn, trains in stages:
            x = checkpoint(fn, x, use_reentrant=False) if trains else fn(x)
        return torch.flatten(b.avgpool(x), 1)  # (N, 2048, 1, 1) -> (N, 2048)

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, frames = clips.shape[:2]
        images = clips.reshape(batch * frames, *clips.shape[2:])  # (B * T, 3, H, W)
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.features(images)  # (B * T, 2048)
        return self.temporal(features.reshape(batch, frames, -1))  # (B, Cv), (B, Cn)


# ------------------------------------------------------------------------------------------------ the start
@dataclass
class Start:
    """What a run starts from: the stage-two checkpoint and the backbone its features came from."""

    checkpoint: Checkpoint
    backbone: ResNet50Features
    preprocess: Preprocess  # the feature set's resize / crop / mean / std (extract's definition)
    store: Any  # the FeatureStore stage two read: its rows' pts are the times clips are decoded at


def load_start(config: FinetuneConfig) -> Start:
    """Load the checkpoint and build the backbone of its feature set; refuse anything that does not match."""
    if config.checkpoint is None:
        raise FinetuneError("no starting checkpoint: pass --checkpoint runs/temporal/best.pt (a train-temporal run)")
    checkpoint = load_checkpoint(config.checkpoint)
    identity = checkpoint.feature_set
    if identity.get("backbone", "resnet50") != "resnet50" or checkpoint.model_args.input_dim != 2048:
        raise FinetuneError(
            f"{config.checkpoint}: trained on {identity.get('backbone')} features of {checkpoint.model_args.input_dim} "
            "dimensions; finetune trains the ResNet50 backbone (2048-d) only"
        )
    backbone = checkpoint.create_backbone(config.weights)  # the feature set's weights, hash checked
    preprocess = Preprocess.from_identity(identity)
    try:
        store = open_feature_set(Path(config.cache), config.feature_set or checkpoint.feature_set_key)
    except EpicfeatError as err:
        raise FinetuneError(
            f"{err}. finetune decodes each clip at the times of the stored rows stage two read, so it needs "
            f"{config.checkpoint}'s feature set: pass --cache (and --feature-set) where `epicfeat extract` wrote it"
        ) from None
    check_feature_set(checkpoint, store.identity)
    return Start(checkpoint=checkpoint, backbone=backbone, preprocess=preprocess, store=store)


# ------------------------------------------------------------------------------------------ entry point
def finetune(config: FinetuneConfig, *, stop_after_epoch: int | None = None) -> FinetuneResult:
    """``epicfeat finetune``: fine-tune backbone + temporal model on decoded clips; writes into ``config.out``.

    ``stop_after_epoch`` ends this call after that epoch as if the job had been killed (tests, time-boxed jobs);
    run again with ``resume=True`` to continue on the same schedule. Under torchrun, every process calls this.
    """
    started = time.perf_counter()
    rank, world, created_group = _init_distributed(config)
    try:
        return _run(config, rank, world, started, stop_after_epoch)
    finally:
        if created_group:
            dist.destroy_process_group()


def _run(config: FinetuneConfig, rank: int, world: int, started: float, stop_after_epoch: int | None) -> FinetuneResult:
    out = Path(config.out)
    best_path, last_path, csv_path = out / "best.pt", out / "last.pt", out / "metrics.csv"
    if config.resume and not last_path.is_file():
        raise FinetuneError(f"--resume: {last_path} does not exist; start the run without --resume (or fix --out)")
    if not config.resume and last_path.is_file():
        raise FinetuneError(
            f"{out} already holds a run ({last_path.name}); pass --resume to continue it, or choose a new --out"
        )
    if config.batch_size % world:
        raise FinetuneError(f"--batch-size {config.batch_size} must be a multiple of the {world} processes")
    is_main = rank == 0
    console = _console(config.progress and is_main)
    notes: list[str] = []
    device = _device(config, world)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" and config.precision == "bf16" else None
    autocast_dtype = _supported_autocast(device, autocast_dtype, notes)

    start = load_start(config)
    frames = config.frames or int(start.checkpoint.config.get("frames", 16))
    config = dataclasses.replace(config, frames=frames)  # the saved config names T
    run_config = config_to_dict(dataclasses.replace(config, resume=False))

    with _determinism(config.deterministic):
        _seed_everything(config.seed)  # dropout draws from torch's global RNG (same seed on every rank)

        # --- model: the stage-two model on top of its own backbone, then the trainable parts
        temporal = start.checkpoint.create_model()
        model = ClipModel(start.backbone, temporal, trainable_stages=config.trainable_stages,
                          activation_checkpointing=config.activation_checkpointing).to(device)
        if device.type == "cuda":
            model.backbone.to(memory_format=torch.channels_last)
        backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
        groups = [{"params": list(model.temporal.parameters()), "name": "head", "lr": config.lr}]
        if backbone_params:
            groups.append({"params": backbone_params, "name": "backbone", "lr": config.backbone_lr})
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)

        # --- data: segments whose video exists; decoded on the fly in worker processes
        data = _load_data(config, start, notes)
        local_batch = config.batch_size // world
        sampler = torch.utils.data.DistributedSampler(
            data.train, num_replicas=world, rank=rank, shuffle=True, seed=config.seed, drop_last=False
        )
        loader = torch.utils.data.DataLoader(
            data.train, batch_size=local_batch, sampler=sampler, num_workers=config.num_workers,
            pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
        )
        steps_per_epoch = len(loader)
        schedule = LRSchedule(peak=config.lr, warmup_steps=round(config.warmup_epochs * steps_per_epoch),
                              total_steps=config.epochs * steps_per_epoch, min_lr=config.min_lr)
        augment = ClipAugment(start.preprocess, scale=config.crop_scale, hflip=config.hflip,
                              color_jitter=config.color_jitter, grayscale=config.grayscale)

        # --- resume: weights, optimiser, step, history, early-stopping state, RNG
        step, history, first_epoch = 0, [], 1
        stopping = EarlyStopping(patience=config.patience, validated=data.validation is not None)
        start_metrics: dict[str, float] = {}
        drift: dict[str, torch.Tensor] | None = None  # restandardize: stored stats + the reference measurement
        rng_generator = torch.Generator()  # capture_rng_state wants one; the data order needs none (seeded per epoch)
        if config.resume:
            saved = load_checkpoint(last_path)
            _check_resume_config(saved.config, run_config, last_path)
            state = saved.training_state
            if state["scheduler"]["total_steps"] != schedule.total_steps:
                raise FinetuneError(
                    f"--resume: {last_path} was trained with {state['scheduler']['total_steps']} optimiser steps "
                    f"in all, this data gives {schedule.total_steps}: the videos or annotations changed. Resume "
                    "with the same data, or start a new run in another --out"
                )
            model.temporal.load_state_dict(saved.model_state)
            model.backbone.load_state_dict(saved.extra["backbone"])
            optimizer.load_state_dict(state["optimizer"])
            step = state["scheduler"]["step"]
            history = [dict(row) for row in saved.history]
            first_epoch = saved.epoch + 1
            stopping.load(state)
            start_metrics = dict(saved.extra.get("finetune", {}).get("start_metrics", {}))
            drift = saved.extra.get("finetune", {}).get("drift")
            restore_rng_state(state["rng"], rng_generator)
            console.print(f"resuming {last_path} after epoch {saved.epoch} (step {step})")
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(dataclasses.replace(config, resume=False), out / "config.yaml")
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")

        ddp_model = model
        if world > 1:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        problems: dict[str, str] = {}  # video id -> why its clips were skipped (the first error seen)
        val_loader = _eval_loader(data.validation, config, rank, world, device) if data.validation is not None else None
        evaluate = lambda: evaluate_clips(  # noqa: E731
            model, val_loader, data.validation, preprocess=start.preprocess, device=device, world=world,
            autocast_dtype=autocast_dtype, label_smoothing=config.label_smoothing, tail_verbs=data.tail_verbs,
            tail_nouns=data.tail_nouns, unseen_participants=data.unseen_participants, problems=problems,
        )
        stats_loader = _eval_loader(data.stats, config, rank, world, device)
        measure = lambda: measure_feature_stats(  # noqa: E731
            model.backbone, stats_loader, preprocess=start.preprocess, device=device, world=world,
            autocast_dtype=autocast_dtype,
        )
        if config.restandardize and backbone_params and drift is None:
            reference_mean, reference_std = measure()  # the start backbone, on the frames every epoch re-measures
            drift = {"stored_mean": model.temporal.feature_mean.detach().cpu().clone(),
                     "stored_std": model.temporal.feature_std.detach().cpu().clone(),
                     "reference_mean": reference_mean, "reference_std": reference_std}
        if val_loader is not None and config.eval_start and not config.resume:
            # Epoch 0: the starting model, scored by the code that scores every epoch. It is best.pt until an
            # epoch beats it, so fine-tuning can never leave a best.pt worse than its start.
            start_metrics = evaluate()
            stopping.update(0, start_metrics)
            if is_main:
                save_finetune_checkpoint(best_path, model=model, start=start, config=run_config, epoch=0,
                                         metrics=start_metrics, history=[], start_metrics=start_metrics, drift=drift)
            console.print(
                f"start (epoch 0): val verb {start_metrics['all_verb_accuracy_at_1']:.1f} noun "
                f"{start_metrics['all_noun_accuracy_at_1']:.1f} action {start_metrics['all_action_accuracy_at_1']:.1f}"
            )

        tensorboard = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            tensorboard = SummaryWriter(str(out / "tensorboard"))
        progress = _EpochProgress(console, enabled=config.progress and is_main)
        skipped = {"train": 0, "validation": 0}
        reported: set[str] = set()  # videos whose decoding problem was already printed
        try:
            for epoch in range(first_epoch, config.epochs + 1):
                if stopping.stopped_early:
                    break
                epoch_started = time.perf_counter()
                first_step = step
                sampler.set_epoch(epoch)
                data.train.set_epoch(epoch)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with progress.epoch(epoch, config.epochs, len(data.train)) as advance:
                    train_stats, step = train_one_epoch(
                        ddp_model, model, optimizer, loader, augment=augment, schedule=schedule, step=step,
                        backbone_lr_ratio=config.backbone_lr / config.lr, micro_batch_size=config.micro_batch_size,
                        label_smoothing=config.label_smoothing, cutmix_alpha=config.cutmix_alpha,
                        seed=config.seed, device=device, rank=rank, world=world,
                        autocast_dtype=autocast_dtype, on_batch=lambda n: advance(n * world), problems=problems,
                    )
                train_seconds = time.perf_counter() - epoch_started
                if drift is not None:  # the head's input scaling follows the backbone (see the module docstring)
                    follow_feature_drift(model.temporal, drift, *measure())
                lr = schedule(step - 1)  # the lr of the epoch's last step
                row: dict[str, float] = {"epoch": epoch, "step": step, "lr": lr,
                                         "backbone_lr": lr * config.backbone_lr / config.lr, **train_stats}
                if val_loader is not None:
                    row.update(evaluate())
                    skipped["validation"] = int(row["val_skipped"])
                row["train_segments_per_s"] = len(data.train) / train_seconds
                if device.type == "cuda":
                    row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                row["epoch_seconds"] = time.perf_counter() - epoch_started
                history.append(row)

                improved = stopping.update(epoch, row)  # every rank has the same metrics: all stop together
                if is_main:
                    fields = dict(model=model, start=start, config=run_config, epoch=epoch, metrics=row,
                                  history=history, start_metrics=start_metrics, drift=drift)
                    if improved:
                        save_finetune_checkpoint(best_path, **fields)
                    training_state = {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": {"step": step, **dataclasses.asdict(schedule)},
                        "rng": capture_rng_state(rng_generator),
                        **stopping.state(),
                    }
                    save_finetune_checkpoint(last_path, **fields, training_state=training_state)
                    _write_csv(csv_path, history)
                    _log_tensorboard(tensorboard, row, schedule, first_step, step)
                    progress.report(row, stopping, details=_epoch_details(row))
                for video_id in sorted(set(problems) - reported):
                    console.print(f"[yellow]skipped:[/] clips of {problems[video_id]}")
                reported = set(problems)
                if stop_after_epoch is not None and epoch >= stop_after_epoch:
                    break
        finally:
            if tensorboard is not None:
                tensorboard.close()
    if world > 1:
        dist.barrier()  # rank 0's files are complete before any process returns
    skipped["train"] = int(sum(row.get("train_skipped", 0) for row in history))  # resumed epochs included
    if problems:
        notes.append(f"{len(problems)} video(s) could not be decoded, their clips were skipped"
                     f"{' (this process saw these)' if world > 1 else ''}: {'; '.join(problems.values())}")

    plots: list[Path] = []
    if is_main and history:
        from epicfeat.temporal.plots import plot_training

        _write_csv(csv_path, history)
        steps = np.arange(step)
        plots = plot_training(history, out, lr_curve=(steps / steps_per_epoch, [schedule(int(s)) for s in steps]),
                              title=f"finetune {out.name}")
    if stopping.best_epoch == 0 and start_metrics:
        best_row = {"epoch": 0, **start_metrics}  # no epoch beat the start: best.pt is the starting model
    else:
        best_row = next((r for r in history if r["epoch"] == stopping.best_epoch), history[-1] if history else {})
    gain, verdict = judge(start_metrics, stopping.best_epoch, best_row)
    if verdict:
        notes.append(verdict)
    result = FinetuneResult(
        out=out, best_checkpoint=best_path, last_checkpoint=last_path, metrics_csv=csv_path, plots=tuple(plots),
        tensorboard=out / "tensorboard", best_epoch=stopping.best_epoch, best_metrics=dict(best_row),
        epochs_completed=len(history), stopped_early=stopping.stopped_early, history=tuple(history),
        pack_summary=data.summary, seconds=time.perf_counter() - started, notes=tuple(notes),
        start_metrics=start_metrics, skipped=skipped, gain=gain, verdict=verdict,
    )
    if config.progress and is_main:
        print_summary(result, console=console, title="epicfeat finetune")
    if verdict and is_main:
        print(verdict, file=sys.stderr)  # the run's result in one line, with or without --progress (job logs)
    return result


def judge(start_metrics: dict[str, float], best_epoch: int, best: dict[str, float]) -> tuple[float | None, str]:
    """(gain in validation action top-1 of best.pt over the start, one line saying whether fine-tuning helped)."""
    key = "all_action_accuracy_at_1"
    if not start_metrics or key not in best:
        return None, ""
    before, after = start_metrics[key], best[key]
    if best_epoch == 0:
        return 0.0, (f"fine-tuning did not help: no epoch beat the starting model's validation action top-1 "
                     f"{before:.2f}; best.pt is the starting model (epoch 0)")
    changes = ", ".join(
        f"{name} {start_metrics[k]:.2f} -> {best[k]:.2f} ({best[k] - start_metrics[k]:+.2f})"
        for name, k in (("verb", "all_verb_accuracy_at_1"), ("noun", "all_noun_accuracy_at_1"), ("action", key))
        if k in start_metrics and k in best
    )
    return after - before, f"fine-tuning helped: validation top-1 {changes} at epoch {best_epoch}"


# ------------------------------------------------------------------------------------- one epoch / eval
def train_one_epoch(
    ddp_model: nn.Module,
    model: ClipModel,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    *,
    augment: ClipAugment,
    schedule: LRSchedule,
    step: int,
    backbone_lr_ratio: float,
    micro_batch_size: int,
    label_smoothing: float,
    cutmix_alpha: float,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    autocast_dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
    problems: dict[str, str] | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over this process's share of the clips; returns mean losses, skips, data wait, and the step.

    ``problems`` collects why clips were skipped: the first error of each video, keyed by video id.

    CutMix is drawn per global step (``derive_seed(seed, step)``) over the global batch, and each process
    pastes its clips' partner boxes from an all-gather of every process's boxes, so N processes train exactly
    like one with the same global batch (``global_positions`` maps a process's clips to the global batch).

    Each loader batch is this process's part of one optimiser step; it runs as micro-batches whose summed losses
    are backpropagated (DDP averages over processes at the last one), then the gradients are scaled by
    world / (valid clips in the global batch): the step's gradient is the mean over every valid clip.
    """
    ddp_model.train()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # total, verb, noun loss sums; valid clips (no sync)
    skipped, data_wait = 0, 0.0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    iterator = iter(loader)
    for step_in_epoch in range(len(loader)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so the wait below is time the GPU sits idle for data
        waited = time.perf_counter()
        batch = next(iterator)
        data_wait += time.perf_counter() - waited
        for group in optimizer.param_groups:
            lr = schedule(step)
            group["lr"] = lr * backbone_lr_ratio if group.get("name") == "backbone" else lr
        optimizer.zero_grad(set_to_none=True)
        valid_all = batch["valid"]  # (b,) bool
        skipped += int((~valid_all).sum())
        _collect(problems, batch["error"])
        # Skipped clips still run (a black clip of the right shape, weight 0), so every DDP process runs the
        # same backward passes and the all-reduce never waits on a process that had nothing to compute.
        crop = augment.preprocess.crop
        pixels = torch.stack([
            augment.pixels(clip.to(device, non_blocking=True), int(s)) if ok else
            torch.zeros(clip.shape[0], 3, crop, crop, dtype=torch.uint8, device=device)
            for clip, s, ok in zip(batch["clip"], batch["aug_seed"], valid_all)
        ])  # (b, T, 3, crop, crop) uint8
        verbs, nouns = batch["verb"].to(device), batch["noun"].to(device)  # (b,)
        partner_verbs, partner_nouns, fraction = verbs, nouns, 0.0
        mix = None
        if cutmix_alpha > 0:
            # One draw per global step over the global batch: N processes paste what one process would.
            positions = global_positions(len(valid_all), rank, world).to(device)  # (b,)
            global_valid, global_verbs, global_nouns = (
                _gather_global(t.to(device), world) for t in (valid_all.to(torch.uint8), verbs, nouns)
            )  # (B,) each
            mix = sample_step_cutmix(global_valid.bool().cpu(), crop, crop, cutmix_alpha, derive_seed(seed, step))
        if mix is not None:
            y0, y1, x0, x1 = mix.box
            boxes = _gather_global(pixels[..., y0:y1, x0:x1].contiguous(), world)  # (B, T, 3, h, w) uint8
            partner = mix.partner.to(device)[positions]  # (b,) global positions of each clip's partner
            pixels[..., y0:y1, x0:x1] = boxes[partner]
            partner_verbs, partner_nouns, fraction = global_verbs[partner], global_nouns[partner], mix.fraction
        micro_starts = range(0, len(valid_all), micro_batch_size)
        for micro_index, begin in enumerate(micro_starts):
            part = slice(begin, begin + micro_batch_size)
            last_micro = micro_index == len(micro_starts) - 1
            clips = normalize_clips(pixels[part].permute(0, 1, 3, 4, 2), augment.preprocess)  # (b', T, 3, crop, crop)
            keep = valid_all[part].nonzero().squeeze(1).to(device)  # (v,) positions of decodable clips
            sync = contextlib.nullcontext() if (last_micro or world == 1) else ddp_model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    verb_logits, noun_logits = ddp_model(clips)  # (b', Cv), (b', Cn)
                verb_logits, noun_logits = verb_logits.float()[keep], noun_logits.float()[keep]  # (v, C)
                if len(keep):
                    verb_loss = _mixed_loss(verb_logits, verbs[part][keep], partner_verbs[part][keep], fraction,
                                            label_smoothing)
                    noun_loss = _mixed_loss(noun_logits, nouns[part][keep], partner_nouns[part][keep], fraction,
                                            label_smoothing)
                    loss = (verb_loss + noun_loss) * len(keep)  # a sum over clips: normalised after the step
                    sums += torch.stack([loss.detach(), verb_loss.detach() * len(keep), noun_loss.detach() * len(keep),
                                         torch.tensor(float(len(keep)), device=device)]).double()
                else:
                    loss = (verb_logits.sum() + noun_logits.sum()) * 0.0  # keeps the graph (and DDP) in step
                loss.backward()
        count = valid_all.sum().to(torch.float64)
        if world > 1:
            count = count.to(device)
            dist.all_reduce(count)
        count = float(count)
        if count > 0:
            scale = world / count  # DDP averaged over `world`; we want the mean over every valid clip
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            optimizer.step()
        step += 1
        if on_batch is not None:
            on_batch(len(valid_all))
    totals = sums.clone()
    skipped_t = torch.tensor([float(skipped), data_wait], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
        dist.all_reduce(skipped_t)
    totals, skipped_t = totals.cpu(), skipped_t.cpu()  # the epoch's one sync for the statistics
    n = max(float(totals[3]), 1.0)
    return {
        "train_loss": float(totals[0]) / n, "train_verb_loss": float(totals[1]) / n,
        "train_noun_loss": float(totals[2]) / n, "train_skipped": float(skipped_t[0]),
        "data_wait_seconds": float(skipped_t[1]) / world,
    }, step


@torch.inference_mode()
def evaluate_clips(
    model: ClipModel,
    loader: torch.utils.data.DataLoader,
    dataset: ClipDataset,
    *,
    preprocess: Preprocess,
    device: torch.device,
    world: int = 1,
    autocast_dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    tail_verbs: frozenset[int] | None = None,
    tail_nouns: frozenset[int] | None = None,
    unseen_participants: frozenset[str] | None = None,
    problems: dict[str, str] | None = None,
) -> dict[str, float]:
    """Bin-centre frames, extract's resize + centre crop + normalisation: loss and the official metrics.

    Each process scores its share of the segments; the logits are gathered so every process computes the same
    metrics (and so takes the same early-stopping decision). Clips that cannot be decoded are left out and
    counted as ``val_skipped``.
    """
    from epicfeat.metrics import epic_metrics

    model.eval()
    indices, verb_logits, noun_logits = [], [], []
    for batch in loader:
        valid = batch["valid"]
        _collect(problems, batch["error"])
        clips = normalize_clips(batch["clip"][valid].to(device), preprocess)  # (v, T, 3, crop, crop)
        if len(clips):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                verbs, nouns = model(clips)  # (v, Cv), (v, Cn)
            verb_logits.append(verbs.float().cpu())
            noun_logits.append(nouns.float().cpu())
        indices.append(batch["index"][valid])
    local = (torch.cat(indices).numpy(),
             torch.cat(verb_logits).numpy() if verb_logits else np.zeros((0, model.temporal.args.n_verbs), np.float32),
             torch.cat(noun_logits).numpy() if noun_logits else np.zeros((0, model.temporal.args.n_nouns), np.float32))
    parts = [local]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    index = np.concatenate([p[0] for p in parts])
    order = np.argsort(index, kind="stable")  # segment order, whatever the sharding
    index = index[order]
    verb_np = np.concatenate([p[1] for p in parts])[order]  # (S', Cv)
    noun_np = np.concatenate([p[2] for p in parts])[order]  # (S', Cn)
    if len(index) == 0:
        raise FinetuneError("no validation clip could be decoded; check --videos (see the skipped-clip notes)")
    verb_labels, noun_labels = dataset.verbs[index], dataset.nouns[index]
    verb_loss, noun_loss = (
        F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), label_smoothing=label_smoothing).item()
        for logits, labels in ((verb_np, verb_labels), (noun_np, noun_labels))
    )
    unseen = None
    if unseen_participants is not None:
        unseen = np.array([dataset.participants[i] in unseen_participants for i in index], dtype=bool)
    metrics = epic_metrics(verb_np, noun_np, verb_labels, noun_labels, tail_verbs=tail_verbs, tail_nouns=tail_nouns,
                           unseen=unseen)
    stats = {"val_loss": verb_loss + noun_loss, "val_verb_loss": verb_loss, "val_noun_loss": noun_loss,
             "val_skipped": float(len(dataset) - len(index))}
    return {**stats, **{name: float(value) for name, value in metrics.items()}}


# ------------------------------------------------------------------------------- features that move together
@torch.inference_mode()
def measure_feature_stats(
    backbone: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    preprocess: Preprocess,
    device: torch.device,
    world: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (two (2048,) float64 CPU tensors) of the backbone's features on ``loader``'s frames.

    Sums in float64, all-reduced over processes, so every process gets the same numbers. Undecodable clips are
    left out.
    """
    was_training = backbone.training
    backbone.eval()
    sums = torch.zeros(2, FEATURE_DIM, dtype=torch.float64, device=device)  # sum, sum of squares
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for batch in loader:
        clips = normalize_clips(batch["clip"][batch["valid"]].to(device), preprocess)  # (v, T, 3, crop, crop)
        if not len(clips):
            continue
        images = clips.reshape(-1, *clips.shape[2:])  # (v * T, 3, crop, crop)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            features = backbone(images).double()  # (v * T, 2048)
        sums += torch.stack([features.sum(0), (features * features).sum(0)])
        count += len(features)
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(count)
    backbone.train(was_training)
    if float(count) == 0:
        raise FinetuneError("no clip of the statistics segments could be decoded; check --videos")
    mean = sums[0] / count
    std = (sums[1] / count - mean * mean).clamp(min=0).sqrt()
    return mean.cpu(), std.cpu()


#: Stds below this are treated as this when measuring how a dimension's spread changed (stage two's min_std):
#: a dimension that was constant (a dead ReLU channel) has no scale to compare with.
DRIFT_MIN_STD = 1e-3


def follow_feature_drift(temporal: TemporalModel, drift: dict[str, torch.Tensor], mean: torch.Tensor,
                         std: torch.Tensor) -> None:
    """Move the temporal model's input mean/std by the change of the backbone's features since the start.

    Per dimension, the change from the start backbone (``reference_*``) to the current one (``mean``, ``std``) is
    taken as affine, f_now = a * f_start + b with a = std / reference_std and b = mean - a * reference_mean, and
    applied to the stage-two statistics: mean' = a * stored_mean + b, std' = a * stored_std. For a backbone whose
    features moved affinely, (f_now - mean') / std' == (f_start - stored_mean) / stored_std exactly: the head sees
    the inputs it was trained on. An unchanged backbone gives a = 1, b = 0: the stored statistics, untouched.
    """
    ref_std = drift["reference_std"].clamp(min=DRIFT_MIN_STD)
    scale = std.clamp(min=DRIFT_MIN_STD) / ref_std  # (D,) a
    shift = mean - scale * drift["reference_mean"]  # (D,) b
    unchanged = (mean == drift["reference_mean"]) & (std == drift["reference_std"])  # exact: keep the bits
    new_mean = torch.where(unchanged, drift["stored_mean"].double(), scale * drift["stored_mean"].double() + shift)
    new_std = torch.where(unchanged, drift["stored_std"].double(), scale * drift["stored_std"].double())
    temporal.set_feature_stats(new_mean.float(), new_std.float())


# -------------------------------------------------------------------------------------------- checkpoints
def save_finetune_checkpoint(
    path: Path,
    *,
    model: ClipModel,
    start: Start,
    config: dict[str, Any],
    epoch: int,
    metrics: dict[str, float],
    history: list[dict[str, float]],
    start_metrics: dict[str, float],
    training_state: dict[str, Any] | None = None,
    drift: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A train-temporal checkpoint (same format, read by ``load_checkpoint``) plus ``backbone`` and ``finetune``.

    ``feature_set`` is the identity of the features this backbone would give: the starting feature set's with the
    weights named by their hash, ``sha-<12 hex digits>`` (what ``create_backbone(weights=PATH)`` names any file
    holding them, whatever the file is called), and that hash. While the backbone is still the start's (best.pt
    of epoch 0) it is the starting feature set itself, so best.pt pairs with the features already extracted.
    ``finetune`` records where the run started. Written atomically like ``save_checkpoint``.
    """
    path = Path(path)
    backbone_state = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
    sha = weights_identity(model.backbone)
    feature_set = dict(start.checkpoint.feature_set)
    if sha != feature_set.get("weights_sha"):
        feature_set.update(weights=weights_name_of_sha(sha), weights_sha=sha)
    return save_checkpoint(
        path, model=model.temporal, model_args=start.checkpoint.model_args, config=config,
        verb_classes=start.checkpoint.verb_classes, noun_classes=start.checkpoint.noun_classes,
        feature_set=feature_set, feature_set_key=feature_set_key_of(feature_set), epoch=epoch, metrics=metrics,
        history=history, training_state=training_state,
        extra={
            "backbone": backbone_state,
            "finetune": {
                "start_checkpoint": str(start.checkpoint.path),
                "start_feature_set": dict(start.checkpoint.feature_set),
                "start_feature_set_key": start.checkpoint.feature_set_key,
                "start_metrics": {k: float(v) for k, v in start_metrics.items()},
                **({"drift": {k: v.detach().cpu() for k, v in drift.items()}} if drift is not None else {}),
            },
        },
    )


# ----------------------------------------------------------------------------------------------- helpers
@dataclass
class _Data:
    train: ClipDataset
    validation: ClipDataset | None
    stats: torch.utils.data.Subset  # the train segments the features' drift is measured on (restandardize)
    summary: dict[str, dict[str, int]]
    tail_verbs: frozenset[int] | None
    tail_nouns: frozenset[int] | None
    unseen_participants: frozenset[str] | None


def _load_data(config: FinetuneConfig, start: Start, notes: list[str]) -> _Data:
    """Annotations -> clip datasets over the segments whose videos exist (the others are dropped and counted)."""
    from epicfeat.data.annotations import EpicAnnotations
    from epicfeat.data.videos import find_videos

    if config.annotations is None or config.videos is None:
        raise FinetuneError("pass --annotations DIR (EPIC_100_*.csv) and --videos DIR (the folder holding P01/, ...)")
    annotations = EpicAnnotations(config.annotations, train_file=config.train_file)
    if tuple(annotations.verbs.keys) != start.checkpoint.verb_classes or \
            tuple(annotations.nouns.keys) != start.checkpoint.noun_classes:
        raise FinetuneError(f"the class tables in {config.annotations} differ from those {config.checkpoint} was "
                            "trained with; use the annotations of the stage-two run")
    p = start.preprocess
    # Training decodes a resize x resize square (shorter side to `resize`, centre square) for RandomResizedCrop to
    # cut from; evaluation decodes extract's exact resize + centre crop.
    train_decode = Preprocess(resize=p.resize, crop=p.resize, mean=p.mean, std=p.std)
    splits = {"train": config.train_splits}
    if config.train_splits == "train":
        splits["validation"] = "validation"
    datasets, summary = {}, {}
    for name, split in splits.items():
        segments = annotations.segments(split)
        lookup = find_videos(config.videos, segments["video_id"].unique())
        found = segments["video_id"].isin(list(lookup.found))
        if not found.all():
            notes.append(f"{int((~found).sum())} {name} segments dropped: {len(lookup.missing)} videos not under "
                         f"{config.videos} ({', '.join(lookup.missing[:5])}{'...' if len(lookup.missing) > 5 else ''})")
        segments = segments[found].reset_index(drop=True)
        segments, rows, not_stored = segment_rows(start.store, segments)
        if not_stored:
            notes.append(f"{not_stored} {name} segments dropped: their videos are not (completely) in feature set "
                         f"{start.store.identity.key()} (extract them, or stage two never saw them either)")
        if len(segments) == 0:
            raise FinetuneError(f"no {name} segment has its video under {config.videos} and in the feature set "
                                f"{start.store.identity.key()}; check --videos and --cache")
        paths = {k: Path(v) for k, v in lookup.found.items()}
        threads = decode_threads(config)
        dataset = ClipDataset(segments, paths, rows=rows, frames=config.frames,
                              decode=train_decode if name == "train" else p, train=name == "train", seed=config.seed,
                              decode_threads=threads)
        dataset.participants = segments["participant_id"].astype(str).tolist()
        datasets[name] = dataset
        if name == "train":
            # The frames the drift of the features is measured on: evaluation's (bin centres, centre crop).
            chosen = np.unique(np.linspace(0, len(segments) - 1, min(len(segments), config.stats_segments)).round())
            stats = torch.utils.data.Subset(
                ClipDataset(segments, paths, rows=rows, frames=config.frames, decode=p, train=False, seed=config.seed,
                            decode_threads=threads),
                chosen.astype(np.int64).tolist(),
            )
        summary[name] = {"segments": len(segments), "missing_video_dropped": int((~found).sum()),
                         "missing_videos": len(lookup.missing), "not_in_feature_set_dropped": not_stored}
    return _Data(
        train=datasets["train"], validation=datasets.get("validation"), stats=stats, summary=summary,
        tail_verbs=annotations.tail_verbs, tail_nouns=annotations.tail_nouns,
        unseen_participants=annotations.unseen_participants("validation") if "validation" in datasets else None,
    )


def decode_threads(config: FinetuneConfig) -> int:
    """Codec threads per decoding process, so that threads x decoders stays within this process's share of cores.

    ``--decode-threads`` when given; else the cores this process may use (its CPU affinity, divided among the
    processes torchrun starts on this node) over the decoders (``num_workers``, or this process itself).
    """
    if config.decode_threads > 0:
        return config.decode_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return max(1, share // max(1, config.num_workers))


def segment_rows(store: Any, segments: Any) -> tuple[Any, SegmentRows, int]:
    """Segments whose video the feature set holds, with their stored rows' times (stage two's join), and how many
    segments were dropped because the feature set lacks their video."""
    from epicfeat.temporal.data import rows_of_segments

    complete = set(store.complete_videos())
    stored = segments["video_id"].astype(str).isin(complete).to_numpy()
    segments = segments[stored].reset_index(drop=True)
    times, starts, counts = [], np.zeros(len(segments), np.int64), np.zeros(len(segments), np.int64)
    offset = 0
    for video_id, positions in segments.groupby("video_id", sort=True).indices.items():
        pts = store.read(str(video_id)).pts  # (rows,) float64 seconds
        lo, hi = rows_of_segments(pts, segments["start_sec"].to_numpy()[positions],
                                  segments["stop_sec"].to_numpy()[positions])  # (n,), (n,)
        for position, first, stop in zip(positions, lo, hi):
            times.append(pts[first:stop])
            starts[position], counts[position] = offset, stop - first
            offset += stop - first
    packed = np.concatenate(times) if times else np.zeros(0, np.float64)  # (R,) seconds
    return segments, SegmentRows(times=packed, start=starts, count=counts), int((~stored).sum())


def _eval_loader(dataset: ClipDataset, config: FinetuneConfig, rank: int, world: int, device: torch.device):
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))  # no padding, no duplicates
    return torch.utils.data.DataLoader(
        shard, batch_size=config.eval_batch_size, shuffle=False, num_workers=config.num_workers,
        pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
    )


def _gather_global(local: torch.Tensor, world: int) -> torch.Tensor:
    """(b, ...) of every process -> (world * b, ...) in global-batch order (clip j of process r at j * world + r)."""
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    stacked = torch.stack(parts, dim=1)  # (b, world, ...)
    return stacked.reshape(-1, *local.shape[1:])  # (b * world, ...)


def _mixed_loss(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, fraction: float,
                label_smoothing: float) -> torch.Tensor:
    """(1 - f) * CE(logits, labels) + f * CE(logits, partner labels): CutMix's labels mixed by the box's area."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if fraction == 0:
        return loss
    partner_loss = F.cross_entropy(logits, partner_labels, label_smoothing=label_smoothing)
    return (1.0 - fraction) * loss + fraction * partner_loss


def _collect(problems: dict[str, str] | None, errors: list[str]) -> None:
    """Keep the first error message of each video ("<video id>: <reason>")."""
    if problems is not None:
        for error in errors:
            if error:
                problems.setdefault(error.split(":", 1)[0], error)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # a decode process needs no intra-op threads (FFmpeg has its own)


def _init_distributed(config: FinetuneConfig) -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    cuda = config.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _device(config: FinetuneConfig, world: int) -> torch.device:
    if world > 1 and config.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    return resolve_device(config.device)


#: Keys that may differ between a run and its resumption: where things are and how they run, not what is learned.
_RESUMABLE_CHANGES = frozenset({"resume", "out", "annotations", "videos", "checkpoint", "weights", "device",
                                "precision", "progress", "eval_batch_size", "num_workers", "decode_threads",
                                "cache", "feature_set"})


def _check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise FinetuneError(f"--resume: the config differs from the one {path} was trained with ({details}); resume "
                            "with the run's own settings (its config.yaml), or start a new run in another --out")


def _epoch_details(row: dict[str, float]) -> list[str]:
    """What a fine-tuning epoch line adds to train-temporal's losses and accuracies."""
    parts = [f"{row['train_segments_per_s']:.1f} clips/s", f"data wait {row['data_wait_seconds']:.1f} s"]
    if "peak_gpu_memory_gb" in row:
        parts.append(f"peak GPU {row['peak_gpu_memory_gb']:.1f} GiB")
    if row.get("train_skipped"):
        parts.append(f"{int(row['train_skipped'])} clips skipped")
    return parts
