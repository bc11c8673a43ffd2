"""``epicfeat finetune``: end-to-end ResNet50 + BiLSTM training on decoded clips, started from a stage-two model.

Read it top to bottom:

    finetune(config)                          the one function `epicfeat finetune` calls
      load_start(config)                      the train-temporal checkpoint + the backbone its feature set used
                                              (refused when the weights' hash differs from the feature set's)
      clip datasets                           segments -> T frames decoded with PyAV in DataLoader workers
      for each epoch:
        train_one_epoch(...)                  augment each clip (one parameter draw for all T frames), CutMix
                                              (one box for all T frames), backbone + BiLSTM forward/backward,
                                              gradient accumulation, warm-up + cosine per step, AdamW with a
                                              backbone and a head learning rate
        evaluate_clips(...)                   bin-centre frames, extract's resize + centre crop, official metrics
        best.pt / last.pt, metrics.csv, TensorBoard, early stopping on validation action top-1 (as train-temporal)

The backbone keeps its BatchNorm statistics (every BN layer stays in eval mode: clips are few per batch and
highly correlated, so batch statistics would be noise) and only the last ``trainable_stages`` ResNet stages train.

Checkpoints are train-temporal checkpoints (``load_checkpoint`` reads the temporal model, classes and config)
plus a ``backbone`` state dict, so ``create_backbone(weights=best.pt)`` / ``epicfeat extract --weights best.pt``
build a new feature set from the fine-tuned backbone. Their ``feature_set`` is that new feature set's identity
(weights ``file:best.pt`` and the fine-tuned weights' hash), so the temporal model pairs only with features the
fine-tuned backbone produced.

Scale-out: under ``torchrun`` (WORLD_SIZE > 1) each process takes its share of every global batch through a
DistributedSampler, gradients are averaged by DistributedDataParallel, and only rank 0 logs and writes files.
The loss of every step is normalised by the global number of valid clips, so N processes with a global batch B
compute the same update as one process with batch B (up to floating-point summation order).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
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
    apply_clip_cutmix,
    derive_seed,
    normalize_clips,
    sample_clip_cutmix,
)
from epicfeat.backbone import ResNet50Features, weights_identity
from epicfeat.config import config_to_dict, save_config
from epicfeat.configs import FinetuneConfig
from epicfeat.devices import resolve_device
from epicfeat.errors import EpicfeatError
from epicfeat.frames import Preprocess
from epicfeat.temporal.checkpoint import (
    Checkpoint,
    capture_rng_state,
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
    mixed_cross_entropy,
    print_summary,
)


class FinetuneError(EpicfeatError):
    """A fine-tuning run that cannot start or continue as asked; the message says what to do."""


@dataclass(frozen=True)
class FinetuneResult(TrainResult):
    start_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the starting model, on validation
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
    fps: float  # the feature set's row rate: clip times are sampled on the same grid


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
    if identity.get("fps") is None:
        raise FinetuneError(
            f"{config.checkpoint}: its feature set kept every frame (fps=None), so clip times cannot be sampled on "
            "the same grid; train stage two on a feature set extracted with --fps (e.g. 10)"
        )
    backbone = checkpoint.create_backbone(config.weights)  # the feature set's weights, hash checked
    preprocess = Preprocess.from_identity(identity)
    return Start(checkpoint=checkpoint, backbone=backbone, preprocess=preprocess, fps=float(identity["fps"]))


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
        if val_loader is not None and config.eval_start and not config.resume:
            start_metrics = evaluate()
            console.print(
                f"start: val verb {start_metrics['all_verb_accuracy_at_1']:.1f} noun "
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
                        seed=derive_seed(config.seed, epoch, rank), device=device, world=world,
                        autocast_dtype=autocast_dtype, on_batch=lambda n: advance(n * world), problems=problems,
                    )
                train_seconds = time.perf_counter() - epoch_started
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
                                  history=history, start_metrics=start_metrics)
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
    best_row = next((r for r in history if r["epoch"] == stopping.best_epoch), history[-1] if history else {})
    result = FinetuneResult(
        out=out, best_checkpoint=best_path, last_checkpoint=last_path, metrics_csv=csv_path, plots=tuple(plots),
        tensorboard=out / "tensorboard", best_epoch=stopping.best_epoch, best_metrics=dict(best_row),
        epochs_completed=len(history), stopped_early=stopping.stopped_early, history=tuple(history),
        pack_summary=data.summary, seconds=time.perf_counter() - started, notes=tuple(notes),
        start_metrics=start_metrics, skipped=skipped,
    )
    if config.progress and is_main:
        print_summary(result, console=console, title="epicfeat finetune")
    return result


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
    world: int = 1,
    autocast_dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
    problems: dict[str, str] | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over this process's share of the clips; returns mean losses, skips, data wait, and the step.

    ``problems`` collects why clips were skipped: the first error of each video, keyed by video id.

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
        micro_starts = range(0, len(valid_all), micro_batch_size)
        for micro_index, begin in enumerate(micro_starts):
            part = slice(begin, begin + micro_batch_size)
            valid = valid_all[part]
            last_micro = micro_index == len(micro_starts) - 1
            # Skipped clips still run (a black clip of the right shape, weight 0), so every DDP process runs the
            # same backward passes and the all-reduce never waits on a process that had nothing to compute.
            clips = torch.stack([
                augment(clip.to(device, non_blocking=True), int(s)) if ok else
                torch.zeros(clip.shape[0], 3, augment.preprocess.crop, augment.preprocess.crop, device=device)
                for clip, s, ok in zip(batch["clip"][part], batch["aug_seed"][part], valid)
            ])  # (b, T, 3, crop, crop)
            verbs, nouns = batch["verb"][part].to(device), batch["noun"][part].to(device)  # (b,)
            keep = valid.nonzero().squeeze(1).to(device)  # (v,) positions of decodable clips
            mix = sample_clip_cutmix(len(keep), clips.shape[-2], clips.shape[-1], cutmix_alpha,
                                     derive_seed(seed, step, micro_index))
            if mix is not None:  # partners among the valid clips only
                clips[keep] = apply_clip_cutmix(clips[keep], mix)
            sync = contextlib.nullcontext() if (last_micro or world == 1) else ddp_model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    verb_logits, noun_logits = ddp_model(clips)  # (b, Cv), (b, Cn)
                verb_logits, noun_logits = verb_logits.float()[keep], noun_logits.float()[keep]  # (v, C)
                if len(keep):
                    verb_loss = mixed_cross_entropy(verb_logits, verbs[keep], mix, label_smoothing)
                    noun_loss = mixed_cross_entropy(noun_logits, nouns[keep], mix, label_smoothing)
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
) -> Path:
    """A train-temporal checkpoint (same format, read by ``load_checkpoint``) plus ``backbone`` and ``finetune``.

    ``feature_set`` is the identity of the features this backbone would give: the starting feature set's with the
    weights renamed ``file:<this file's name>`` (what ``create_backbone(weights=PATH)`` names it) and the hash of
    the fine-tuned weights. ``finetune`` records where the run started. Written atomically like ``save_checkpoint``.
    """
    path = Path(path)
    backbone_state = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
    sha = weights_identity(model.backbone)
    feature_set = {**start.checkpoint.feature_set, "weights": f"file:{path.name}", "weights_sha": sha}
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
            },
        },
    )


# ----------------------------------------------------------------------------------------------- helpers
@dataclass
class _Data:
    train: ClipDataset
    validation: ClipDataset | None
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
        if len(segments) == 0:
            raise FinetuneError(f"no {name} segment has its video under {config.videos}; check --videos")
        dataset = ClipDataset(segments, {k: Path(v) for k, v in lookup.found.items()}, frames=config.frames,
                              fps=start.fps, decode=train_decode if name == "train" else p, train=name == "train",
                              seed=config.seed)
        dataset.participants = segments["participant_id"].astype(str).tolist()
        datasets[name] = dataset
        summary[name] = {"segments": len(segments), "missing_video_dropped": int((~found).sum()),
                         "missing_videos": len(lookup.missing)}
    return _Data(
        train=datasets["train"], validation=datasets.get("validation"), summary=summary,
        tail_verbs=annotations.tail_verbs, tail_nouns=annotations.tail_nouns,
        unseen_participants=annotations.unseen_participants("validation") if "validation" in datasets else None,
    )


def _eval_loader(dataset: ClipDataset, config: FinetuneConfig, rank: int, world: int, device: torch.device):
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))  # no padding, no duplicates
    return torch.utils.data.DataLoader(
        shard, batch_size=config.eval_batch_size, shuffle=False, num_workers=config.num_workers,
        pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
    )


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
                                "precision", "progress", "eval_batch_size", "num_workers"})


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
