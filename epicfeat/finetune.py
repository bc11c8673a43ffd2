"""``epicfeat finetune``: end-to-end ResNet50 + BiLSTM training on decoded clips, started from a stage-two model.

Read it top to bottom:

    finetune(config)                          the one function `epicfeat finetune` calls; on the run scaffold
                                              of ``epicfeat.training`` (run folder, resume, epoch log), as
                                              train-temporal
      load_start(config)                      the train-temporal checkpoint, the backbone its feature set used
                                              (refused when the weights' hash differs) and that feature set
      _prepare(...)                           ClipModel, AdamW with a backbone and a head learning rate, and
        load_clip_data(...)                   segments -> their stored rows' times -> T frames decoded with PyAV
      _resume(...)                            last.pt: config check, TrainingState.restore, both state dicts
      _score_start(...)                       epoch 0: the starting model, scored by evaluate_clips like every
                                              epoch: the baseline, and best.pt until an epoch beats it
      _train_epochs(...)                      for each epoch left (TrainingState.remaining_epochs):
        _run_epoch(...)
          train_one_epoch(...)                augment each clip (one parameter draw for all T frames), CutMix
                                              (one box for all T frames, drawn per global step), backbone +
                                              BiLSTM forward/backward, gradient accumulation, warm-up + cosine
                                              per step
          follow_feature_drift(...)           the temporal model's input mean/std follow the backbone
          evaluate_clips(...)                 bin-centre frames, extract's resize + centre crop, official metrics
        EpochLog.end_epoch(...)               early stopping on validation action top-1, best.pt / last.pt,
                                              metrics.csv, plots, TensorBoard, the epoch line (rank 0 writes)
      _result(...)                            the FinetuneResult, its summary table and
        judge(...)                            the summary line: did fine-tuning help, and by how much

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

Precision (``--precision``; ``epicfeat.temporal.precision``): bf16 on a GPU is the backbone under bf16 autocast
and the LSTM in bf16 by explicit casts (``ClipModel.compute_dtype``, as stage two: CUDA autocast alone runs an LSTM
in fp16, without loss scaling); a CPU computes in fp32. The saved config records what the run computed in, which
is what ``evaluate`` and ``predict`` run the checkpoint's LSTM in.

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
import functools
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
from epicfeat.recipes import config_to_dict, save_config
from epicfeat.configs import FinetuneConfig
from epicfeat.devices import resolve_device
from epicfeat.errors import EpicfeatError
from epicfeat.frames import Preprocess
from epicfeat.store import open_feature_set
from epicfeat.temporal.checkpoint import (
    Checkpoint,
    check_feature_set,
    feature_set_key_of,
    load_checkpoint,
    save_checkpoint,
)
from epicfeat.temporal.model import TemporalModel
from epicfeat.temporal.precision import COMPUTE_DTYPES, supported_precision
from epicfeat.training import (EarlyStopping, EpochLog, LRSchedule, RunFolder, TrainingState, TrainResult,
                               make_console, print_summary, reproducible)

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
    """clips (B, T, 3, H, W) -> ResNet50 per frame -> (B, T, 2048) -> the stage-two TemporalModel -> logits.

    ``compute_dtype`` (float32 by default; set by the run from its precision) is what it computes in: the backbone
    under autocast to it, the LSTM by the temporal model's explicit casts (``TemporalModel.compute_dtype``: CUDA
    autocast would run it in float16), standardisation, pooling and heads in float32.
    """

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

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.temporal.compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype) -> None:
        self.temporal.compute_dtype = dtype

    def train(self, mode: bool = True) -> ClipModel:
        super().train(mode)
        # Frozen BatchNorm statistics: running mean/var are never updated, and batches are normalised with them.
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 2048) in ``compute_dtype``, under autocast to it."""
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        dtype = self.compute_dtype
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return self._backbone(images)

    def _backbone(self, images: torch.Tensor) -> torch.Tensor:
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
        features = self.features(images)  # (B * T, 2048)
        with torch.autocast(images.device.type, enabled=False):  # the temporal model casts for itself
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
#: Keys that may differ between a run and its resumption: where things are and how they run, not what is learned.
RESUMABLE_CHANGES = frozenset({"resume", "out", "annotations", "videos", "checkpoint", "weights", "device",
                               "precision", "progress", "eval_batch_size", "num_workers", "decode_threads",
                               "cache", "feature_set"})


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


@dataclass
class _Run:
    """One finetune run's own parts: the model on its backbone, the clip data and loaders, where it stands."""

    config: FinetuneConfig
    start: Start
    device: torch.device
    rank: int
    world: int
    model: ClipModel  # computes in the run's precision (ClipModel.compute_dtype)
    ddp_model: nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    data: ClipData
    sampler: torch.utils.data.DistributedSampler
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    stats_loader: torch.utils.data.DataLoader
    augment: ClipAugment
    state: TrainingState
    backbone_trains: bool
    problems: dict[str, str] = dataclasses.field(default_factory=dict)  # video id -> why its clips were skipped
    start_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the starting model, on validation
    drift: dict[str, torch.Tensor] | None = None  # restandardize: stored stats + the reference measurement

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def evaluate(self) -> dict[str, float]:
        """The model's loss and official metrics on the validation clips (every process gets the same)."""
        return evaluate_clips(
            self.model, self.val_loader, self.data.validation, preprocess=self.start.preprocess, device=self.device,
            world=self.world, label_smoothing=self.config.label_smoothing,
            tail_verbs=self.data.tail_verbs, tail_nouns=self.data.tail_nouns,
            unseen_participants=self.data.unseen_participants, problems=self.problems,
        )

    def measure(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's feature mean and std on the statistics clips (see the module docstring)."""
        return measure_feature_stats(self.model, self.stats_loader, preprocess=self.start.preprocess,
                                     device=self.device, world=self.world)


def _run(config: FinetuneConfig, rank: int, world: int, started: float, stop_after_epoch: int | None) -> FinetuneResult:
    """One process's part of the run (see the module docstring's call tree)."""
    folder = RunFolder(config.out, error=FinetuneError, resumable=RESUMABLE_CHANGES)
    folder.check_start(config.resume)
    if config.batch_size % world:
        raise FinetuneError(f"--batch-size {config.batch_size} must be a multiple of the {world} processes")
    console = make_console(config.progress and rank == 0)
    notes: list[str] = []
    device = _device(config, world)
    start = load_start(config)
    frames = config.frames or int(start.checkpoint.config.get("frames", 16))
    # The saved config names T and the precision the run computes in: what evaluate and predict run its LSTM in.
    config = dataclasses.replace(config, frames=frames, precision=_run_precision(config.precision, device, notes))

    # Dropout draws from torch's global RNG (same seed on every rank).
    with reproducible(config.seed, deterministic=config.deterministic):
        run = _prepare(config, start, device, rank, world, notes)
        if config.resume:
            _resume(run, folder, console)
        if run.is_main:
            folder.out.mkdir(parents=True, exist_ok=True)
            save_config(dataclasses.replace(config, resume=False), folder.out / "config.yaml")
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
        if config.restandardize and run.backbone_trains and run.drift is None:
            run.drift = _reference_drift(run)
        if run.val_loader is not None and config.eval_start and not config.resume:
            _score_start(run, folder, console)
        plots = _train_epochs(run, folder, console, stop_after_epoch)
    if world > 1:
        dist.barrier()  # rank 0's files are complete before any process returns
    return _result(run, folder, plots, notes, time.perf_counter() - started, console)


def _prepare(config: FinetuneConfig, start: Start, device: torch.device, rank: int, world: int,
             notes: list[str]) -> _Run:
    """The stage-two model on its own backbone, AdamW with a head and a backbone lr, the clip loaders, the schedule."""
    temporal = start.checkpoint.create_model()
    model = ClipModel(start.backbone, temporal, trainable_stages=config.trainable_stages,
                      activation_checkpointing=config.activation_checkpointing).to(device)
    model.compute_dtype = COMPUTE_DTYPES[config.precision]
    if device.type == "cuda":
        model.backbone.to(memory_format=torch.channels_last)
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": list(model.temporal.parameters()), "name": "head", "lr": config.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "name": "backbone", "lr": config.backbone_lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)

    # --- data: segments whose video exists; decoded on the fly in worker processes
    data = load_clip_data(config, start, notes)
    sampler = torch.utils.data.DistributedSampler(
        data.train, num_replicas=world, rank=rank, shuffle=True, seed=config.seed, drop_last=False
    )
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=config.batch_size // world, sampler=sampler, num_workers=config.num_workers,
        pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
    )
    schedule = LRSchedule.per_step(lr=config.lr, min_lr=config.min_lr, warmup_epochs=config.warmup_epochs,
                                   epochs=config.epochs, steps_per_epoch=len(loader))
    stopping = EarlyStopping(patience=config.patience, validated=data.validation is not None)
    # capture_rng_state wants a generator; the data order needs none (seeded per epoch)
    state = TrainingState(optimizer, schedule, stopping, torch.Generator())
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Run(
        config=config, start=start, device=device, rank=rank, world=world, model=model, ddp_model=ddp_model,
        data=data, sampler=sampler, loader=loader,
        val_loader=_eval_loader(data.validation, config, rank, world, device) if data.validation is not None else None,
        stats_loader=_eval_loader(data.stats, config, rank, world, device),
        augment=ClipAugment(start.preprocess, scale=config.crop_scale, hflip=config.hflip,
                            color_jitter=config.color_jitter, grayscale=config.grayscale),
        state=state, backbone_trains=bool(backbone_params),
    )


def _resume(run: _Run, folder: RunFolder, console) -> None:
    """Weights (head and backbone), optimiser, step, history, early stopping, RNG, the start's metrics and drift."""
    saved = load_checkpoint(folder.last)
    folder.check_resume_config(saved.config, config_to_dict(dataclasses.replace(run.config, resume=False)))
    run.state.restore(saved, folder, console=console, data_changed=": the videos or annotations changed")
    run.model.temporal.load_state_dict(saved.model_state)
    run.model.backbone.load_state_dict(saved.extra["backbone"])
    run.start_metrics = dict(saved.extra.get("finetune", {}).get("start_metrics", {}))
    run.drift = saved.extra.get("finetune", {}).get("drift")


def _reference_drift(run: _Run) -> dict[str, torch.Tensor]:
    """The stored statistics and the start backbone's, measured on the frames every epoch re-measures."""
    reference_mean, reference_std = run.measure()
    return {"stored_mean": run.model.temporal.feature_mean.detach().cpu().clone(),
            "stored_std": run.model.temporal.feature_std.detach().cpu().clone(),
            "reference_mean": reference_mean, "reference_std": reference_std}


def _score_start(run: _Run, folder: RunFolder, console) -> None:
    """Epoch 0: the starting model, scored by the code that scores every epoch. It is best.pt until an epoch
    beats it, so fine-tuning can never leave a best.pt worse than its start."""
    run.start_metrics = run.evaluate()
    run.state.stopping.update(0, run.start_metrics)
    if run.is_main:
        _save(run, folder.best, epoch=0, metrics=run.start_metrics, history=[])
    metrics = run.start_metrics
    console.print(
        f"start (epoch 0): val verb {metrics['all_verb_accuracy_at_1']:.1f} noun "
        f"{metrics['all_noun_accuracy_at_1']:.1f} action {metrics['all_action_accuracy_at_1']:.1f}"
    )


def _save(run: _Run, path: Path, *, epoch: int, metrics: dict[str, float], history: list[dict[str, float]],
          training_state: dict[str, Any] | None = None) -> Path:
    """This run's checkpoint at ``path`` (what the epoch log calls for best.pt and last.pt)."""
    # What is saved describes the run, not this invocation: `--config out/config.yaml` re-creates it from scratch.
    return save_finetune_checkpoint(
        path, model=run.model, start=run.start, config=config_to_dict(dataclasses.replace(run.config, resume=False)),
        epoch=epoch, metrics=metrics, history=history, start_metrics=run.start_metrics,
        training_state=training_state, drift=run.drift,
    )


def _train_epochs(run: _Run, folder: RunFolder, console, stop_after_epoch: int | None) -> list[Path]:
    """The epochs still to run, each closed by the epoch log (checkpoints, CSV, plots, TensorBoard); the plots."""
    save = functools.partial(_save, run)
    reported: set[str] = set()  # videos whose decoding problem was already printed
    with EpochLog(folder, console, progress=run.config.progress, steps_per_epoch=len(run.loader),
                  title=f"finetune {folder.out.name}", writes=run.is_main) as log:
        for epoch in run.state.remaining_epochs(run.config.epochs, stop_after_epoch):
            first_step = run.state.step
            row = _run_epoch(run, epoch, log)
            log.end_epoch(row, run.state, save, first_step, details=_epoch_details(row))
            for video_id in sorted(set(run.problems) - reported):
                console.print(f"[yellow]skipped:[/] clips of {run.problems[video_id]}")
            reported = set(run.problems)
    return log.finish(run.state)


def _run_epoch(run: _Run, epoch: int, log: EpochLog) -> dict[str, float]:
    """Train one epoch, let the head's input scaling follow the backbone, validate: the epoch's metrics row."""
    config, state, device = run.config, run.state, run.device
    epoch_started = time.perf_counter()
    run.sampler.set_epoch(epoch)
    run.data.train.set_epoch(epoch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with log.progress_bar(epoch, config.epochs, len(run.data.train)) as advance:
        train_stats, state.step = train_one_epoch(
            run.ddp_model, run.model, state.optimizer, run.loader, augment=run.augment, schedule=state.schedule,
            step=state.step, backbone_lr_ratio=config.backbone_lr / config.lr,
            micro_batch_size=config.micro_batch_size, label_smoothing=config.label_smoothing,
            cutmix_alpha=config.cutmix_alpha, seed=config.seed, device=device, rank=run.rank, world=run.world,
            on_batch=_GlobalAdvance(advance, run.world), problems=run.problems,
        )
    train_seconds = time.perf_counter() - epoch_started
    if run.drift is not None:  # the head's input scaling follows the backbone (see the module docstring)
        follow_feature_drift(run.model.temporal, run.drift, *run.measure())
    lr = state.schedule(state.step - 1)  # the lr of the epoch's last step
    row: dict[str, float] = {"epoch": epoch, "step": state.step, "lr": lr,
                             "backbone_lr": lr * config.backbone_lr / config.lr, **train_stats}
    if run.val_loader is not None:
        row.update(run.evaluate())
    row["train_segments_per_s"] = len(run.data.train) / train_seconds
    if device.type == "cuda":
        row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    row["epoch_seconds"] = time.perf_counter() - epoch_started
    return row


class _GlobalAdvance:
    """The progress bar counts the global batch: each process's n clips stand for n x world."""

    def __init__(self, advance: Callable[[int], None], world: int):
        self.advance, self.world = advance, world

    def __call__(self, n: int) -> None:
        self.advance(n * self.world)


def _result(run: _Run, folder: RunFolder, plots: list[Path], notes: list[str], seconds: float,
            console) -> FinetuneResult:
    """The run's result, its summary table and the one-line verdict."""
    history, stopping = run.state.history, run.state.stopping
    skipped = {"train": int(sum(row.get("train_skipped", 0) for row in history)),  # resumed epochs included
               "validation": int(history[-1]["val_skipped"]) if history and "val_skipped" in history[-1] else 0}
    if run.problems:
        notes.append(f"{len(run.problems)} video(s) could not be decoded, their clips were skipped"
                     f"{' (this process saw these)' if run.world > 1 else ''}: {'; '.join(run.problems.values())}")
    if stopping.best_epoch == 0 and run.start_metrics:
        best_row = {"epoch": 0, **run.start_metrics}  # no epoch beat the start: best.pt is the starting model
    else:
        best_row = run.state.best_row()
    gain, verdict = judge(run.start_metrics, stopping.best_epoch, best_row)
    if verdict:
        notes.append(verdict)
    result = FinetuneResult.of_run(
        folder, run.state, plots=plots, best_metrics=best_row, pack_summary=run.data.summary, seconds=seconds,
        notes=notes, start_metrics=run.start_metrics, skipped=skipped, gain=gain, verdict=verdict,
    )
    if run.config.progress and run.is_main:
        print_summary(result, console=console, title="epicfeat finetune")
    if verdict and run.is_main:
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
    for _ in range(len(loader)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so the wait below is time the GPU sits idle for data
        waited = time.perf_counter()
        batch = next(iterator)
        data_wait += time.perf_counter() - waited
        _set_lr(optimizer, schedule(step), backbone_lr_ratio)
        optimizer.zero_grad(set_to_none=True)
        skipped += int((~batch["valid"]).sum())
        _collect(problems, batch["error"])
        clips = _step_clips(batch, augment, device, cutmix_alpha=cutmix_alpha, seed=seed, step=step, rank=rank,
                            world=world)
        _backward_step(ddp_model, clips, sums, micro_batch_size=micro_batch_size, label_smoothing=label_smoothing,
                       device=device, world=world)
        _mean_gradient_step(optimizer, params, clips.valid, device, world)
        step += 1
        if on_batch is not None:
            on_batch(len(clips.valid))
    return _epoch_means(sums, skipped, data_wait, device, world), step


@dataclass
class _StepClips:
    """One optimiser step's clips on this process: augmented (and CutMix-pasted) pixels and the labels to mix."""

    pixels: torch.Tensor  # (b, T, 3, crop, crop) uint8
    valid: torch.Tensor  # (b,) bool: decodable clips (the others weigh 0)
    verbs: torch.Tensor  # (b,)
    nouns: torch.Tensor  # (b,)
    partner_verbs: torch.Tensor  # (b,) the CutMix partners' labels (the own ones without CutMix)
    partner_nouns: torch.Tensor
    fraction: float  # the partner's share of each clip (0.0 without CutMix)
    preprocess: Preprocess


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, backbone_lr_ratio: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * backbone_lr_ratio if group.get("name") == "backbone" else lr


def _step_clips(batch: dict, augment: ClipAugment, device: torch.device, *, cutmix_alpha: float, seed: int,
                step: int, rank: int, world: int) -> _StepClips:
    """Augment each clip (one parameter draw for all T frames), then CutMix drawn over the global batch."""
    valid_all = batch["valid"]  # (b,) bool
    # Skipped clips still run (a black clip of the right shape, weight 0), so every DDP process runs the
    # same backward passes and the all-reduce never waits on a process that had nothing to compute.
    crop = augment.preprocess.crop
    pixels = torch.stack([
        augment.pixels(clip.to(device, non_blocking=True), int(s)) if ok else
        torch.zeros(clip.shape[0], 3, crop, crop, dtype=torch.uint8, device=device)
        for clip, s, ok in zip(batch["clip"], batch["aug_seed"], valid_all)
    ])  # (b, T, 3, crop, crop) uint8
    verbs, nouns = batch["verb"].to(device), batch["noun"].to(device)  # (b,)
    clips = _StepClips(pixels=pixels, valid=valid_all, verbs=verbs, nouns=nouns, partner_verbs=verbs,
                       partner_nouns=nouns, fraction=0.0, preprocess=augment.preprocess)
    if cutmix_alpha > 0:
        _paste_cutmix(clips, cutmix_alpha, derive_seed(seed, step), device, rank, world)
    return clips


def _paste_cutmix(clips: _StepClips, alpha: float, seed: int, device: torch.device, rank: int, world: int) -> None:
    """One draw per global step over the global batch: N processes paste what one process would."""
    positions = global_positions(len(clips.valid), rank, world).to(device)  # (b,)
    global_valid, global_verbs, global_nouns = (
        _gather_global(t.to(device), world) for t in (clips.valid.to(torch.uint8), clips.verbs, clips.nouns)
    )  # (B,) each
    crop = clips.preprocess.crop
    mix = sample_step_cutmix(global_valid.bool().cpu(), crop, crop, alpha, seed)
    if mix is None:
        return
    y0, y1, x0, x1 = mix.box
    boxes = _gather_global(clips.pixels[..., y0:y1, x0:x1].contiguous(), world)  # (B, T, 3, h, w) uint8
    partner = mix.partner.to(device)[positions]  # (b,) global positions of each clip's partner
    clips.pixels[..., y0:y1, x0:x1] = boxes[partner]
    clips.partner_verbs, clips.partner_nouns, clips.fraction = global_verbs[partner], global_nouns[partner], mix.fraction


def _backward_step(ddp_model: nn.Module, clips: _StepClips, sums: torch.Tensor, *, micro_batch_size: int,
                   label_smoothing: float, device: torch.device, world: int) -> None:
    """Forward and backward the step's clips as micro-batches of summed losses; adds to the epoch's (4,) float64
    ``sums`` (total, verb and noun losses over the valid clips, and their count)."""
    micro_starts = range(0, len(clips.valid), micro_batch_size)
    for micro_index, begin in enumerate(micro_starts):
        part = slice(begin, begin + micro_batch_size)
        last_micro = micro_index == len(micro_starts) - 1
        inputs = normalize_clips(clips.pixels[part].permute(0, 1, 3, 4, 2), clips.preprocess)  # (b', T, 3, crop, crop)
        keep = clips.valid[part].nonzero().squeeze(1).to(device)  # (v,) positions of decodable clips
        # DDP all-reduces the gradients at the step's last micro-batch only.
        sync = contextlib.nullcontext() if (last_micro or world == 1) else ddp_model.no_sync()
        with sync:
            verb_logits, noun_logits = ddp_model(inputs)  # (b', Cv), (b', Cn), in the model's compute_dtype
            verb_logits, noun_logits = verb_logits.float()[keep], noun_logits.float()[keep]  # (v, C)
            loss, micro_sums = _micro_loss(clips, part, keep, verb_logits, noun_logits, label_smoothing, device)
            loss.backward()
        if micro_sums is not None:
            sums += micro_sums


def _micro_loss(clips: _StepClips, part: slice, keep: torch.Tensor, verb_logits: torch.Tensor,
                noun_logits: torch.Tensor, label_smoothing: float,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the micro-batch's summed loss to backpropagate, its (4,) float64 sums: total, verb, noun, valid clips;
    None when no clip of it was decodable)."""
    if not len(keep):
        return (verb_logits.sum() + noun_logits.sum()) * 0.0, None  # keeps the graph (and DDP) in step
    verb_loss = _mixed_loss(verb_logits, clips.verbs[part][keep], clips.partner_verbs[part][keep], clips.fraction,
                            label_smoothing)
    noun_loss = _mixed_loss(noun_logits, clips.nouns[part][keep], clips.partner_nouns[part][keep], clips.fraction,
                            label_smoothing)
    loss = (verb_loss + noun_loss) * len(keep)  # a sum over clips: normalised after the step
    sums = torch.stack([loss.detach(), verb_loss.detach() * len(keep), noun_loss.detach() * len(keep),
                        torch.tensor(float(len(keep)), device=device)]).double()
    return loss, sums


def _mean_gradient_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], valid: torch.Tensor,
                        device: torch.device, world: int) -> None:
    """Scale the summed gradients to the mean over every valid clip of the global batch, then step (none valid:
    no step, the weights stay)."""
    count = valid.sum().to(torch.float64)
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


def _epoch_means(sums: torch.Tensor, skipped: int, data_wait: float, device: torch.device,
                 world: int) -> dict[str, float]:
    """The epoch's mean losses over every process's valid clips, the skipped clips and the mean data wait."""
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
    }


@torch.inference_mode()
def evaluate_clips(
    model: ClipModel,
    loader: torch.utils.data.DataLoader,
    dataset: ClipDataset,
    *,
    preprocess: Preprocess,
    device: torch.device,
    world: int = 1,
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

    index, verb_np, noun_np = _gathered_logits(model, loader, preprocess=preprocess, device=device, world=world,
                                               problems=problems)
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


def _gathered_logits(model: ClipModel, loader: torch.utils.data.DataLoader, *, preprocess: Preprocess,
                     device: torch.device, world: int,
                     problems: dict[str, str] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(segment indices (S',), verb logits (S', Cv), noun logits (S', Cn)) of every decodable clip of every
    process, in segment order whatever the sharding."""
    model.eval()
    indices, verb_logits, noun_logits = [], [], []
    for batch in loader:
        valid = batch["valid"]
        _collect(problems, batch["error"])
        clips = normalize_clips(batch["clip"][valid].to(device), preprocess)  # (v, T, 3, crop, crop)
        if len(clips):
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
    verb_np = np.concatenate([p[1] for p in parts])[order]  # (S', Cv)
    noun_np = np.concatenate([p[2] for p in parts])[order]  # (S', Cn)
    return index[order], verb_np, noun_np


# ------------------------------------------------------------------------------- features that move together
@torch.inference_mode()
def measure_feature_stats(
    model: ClipModel,
    loader: torch.utils.data.DataLoader,
    *,
    preprocess: Preprocess,
    device: torch.device,
    world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (two (2048,) float64 CPU tensors) of the backbone's features on ``loader``'s frames.

    Sums in float64, all-reduced over processes, so every process gets the same numbers. Undecodable clips are
    left out.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, FEATURE_DIM, dtype=torch.float64, device=device)  # sum, sum of squares
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for batch in loader:
        clips = normalize_clips(batch["clip"][batch["valid"]].to(device), preprocess)  # (v, T, 3, crop, crop)
        if not len(clips):
            continue
        images = clips.reshape(-1, *clips.shape[2:])  # (v * T, 3, crop, crop)
        features = model.features(images).double()  # (v * T, 2048)
        sums += torch.stack([features.sum(0), (features * features).sum(0)])
        count += len(features)
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(count)
    model.train(was_training)
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
class ClipData:
    """A run's clip datasets (segments whose videos exist and are in the feature set) and what was dropped."""

    train: ClipDataset
    validation: ClipDataset | None
    stats: torch.utils.data.Subset  # the train segments the features' drift is measured on (restandardize)
    summary: dict[str, dict[str, int]]
    tail_verbs: frozenset[int] | None
    tail_nouns: frozenset[int] | None
    unseen_participants: frozenset[str] | None


def load_clip_data(config: FinetuneConfig, start: Start, notes: list[str]) -> ClipData:
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
    return ClipData(
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


def _run_precision(precision: str, device: torch.device, notes: list[str]) -> str:
    """What the run computes in: ``precision`` on a GPU, fp32 on a CPU (``FinetuneConfig.precision``), and fp32
    with a note where this build cannot train an LSTM in it (``supported_precision``)."""
    return supported_precision(precision if device.type == "cuda" else "fp32", device, notes)


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


def _epoch_details(row: dict[str, float]) -> list[str]:
    """What a fine-tuning epoch line adds to train-temporal's losses and accuracies."""
    parts = [f"{row['train_segments_per_s']:.1f} clips/s", f"data wait {row['data_wait_seconds']:.1f} s"]
    if "peak_gpu_memory_gb" in row:
        parts.append(f"peak GPU {row['peak_gpu_memory_gb']:.1f} GiB")
    if row.get("train_skipped"):
        parts.append(f"{int(row['train_skipped'])} clips skipped")
    return parts
