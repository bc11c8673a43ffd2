"""``epicfeat finetune``: the frame encoder and the stage-two head trained end to end on decoded clips.

    finetune(config)                    what `epicfeat finetune` calls (every torchrun process does)
      load_start(config)                the train-temporal checkpoint, its feature set's encoder and store
      _prepare(...)                     ClipModel, AdamW with a head and a backbone lr, the clips and loaders
      _resume(...)                      last.pt: config check, TrainingState.restore, both state dicts
      _score_start(...)                 epoch 0: the starting model, scored like every epoch; best.pt until beaten
      _train_epochs(...)                for each epoch left: _run_epoch (train_one_epoch, follow_feature_drift,
                                        evaluate_clips), then EpochLog.end_epoch
      _result(...)                      the FinetuneResult, its summary table, and judge(): did it help

A clip's T frames (and its context's) are those of the rows stage two sampled for its segment (``epicfeat.clips``),
so epoch 0 reproduces ``epicfeat evaluate`` on the start. Checkpoints are train-temporal checkpoints plus a ``backbone`` state
dict, so ``epicfeat extract --weights best.pt`` caches the fine-tuned features. Under torchrun each process
(``World``) takes its share of every global batch; losses are normalised by the global count of valid clips and
CutMix is drawn over the global batch, so N processes make one process's update. Only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from epicfeat.backbone import RESNET50, TIMM, weights_identity, weights_name_of_sha
from epicfeat.clips import (ClipAugment, ClipData, SkippedVideos, derive_seed, global_positions, load_clip_data,
                            sample_step_cutmix, worker_init)
from epicfeat.configs import FinetuneConfig
from epicfeat.devices import PRECISION_DTYPES, resolve_device
from epicfeat.encoder import FrameEncoder, create_encoder
from epicfeat.errors import EpicfeatError
from epicfeat.frames import Preprocess
from epicfeat.recipes import config_to_dict, save_config
from epicfeat.store import FeatureStore, open_feature_set
from epicfeat.temporal.checkpoint import (Checkpoint, check_feature_set, feature_set_key_of, load_checkpoint,
                                          save_checkpoint)
from epicfeat.temporal.model import TemporalModel
from epicfeat.temporal.precision import supported_precision
from epicfeat.temporal.train import mixed_cross_entropy, validation_metrics
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
    """clips (B, T, 3, H, W), values 0..255 -> the frame encoder -> (B, T, D) -> the temporal model -> verb (B, Cv)
    and noun (B, Cn) logits. Only the encoder's last ``trainable_stages`` stages (``backbone.stages()``: ResNet50's
    stem and layers, a timm model's coarse groups) train; batch norms' statistics stay frozen.
    ``set_precision``: the encoder autocasts to it, the LSTM casts explicitly (CUDA autocast would pick fp16)."""

    def __init__(self, encoder: FrameEncoder, temporal: TemporalModel, *, trainable_stages: int):
        super().__init__()
        self.encoder, self.temporal = encoder, temporal
        stages = encoder.backbone.stages()
        encoder.requires_grad_(False)
        for stage in stages[len(stages) - trainable_stages:]:
            stage.requires_grad_(True)

    def set_precision(self, precision: str) -> None:
        self.encoder.precision = precision
        self.temporal.compute_dtype = PRECISION_DTYPES[precision]

    def train(self, mode: bool = True) -> ClipModel:
        super().train(mode)
        # Frozen BatchNorm statistics: a batch holds few, highly correlated clips, so its statistics are noise.
        for module in self.encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, frames = clips.shape[:2]
        features = self.encoder(clips.reshape(batch * frames, *clips.shape[2:]))  # (B * T, D) float32
        with torch.autocast(features.device.type, enabled=False):  # the temporal model casts for itself
            return self.temporal(features.reshape(batch, frames, -1))  # (B, Cv), (B, Cn)


# ------------------------------------------------------------------------------------------------ the start
@dataclass
class Start:
    """What a run starts from: the stage-two checkpoint and the frame encoder its features came from."""

    checkpoint: Checkpoint
    encoder: FrameEncoder  # the feature set's, on the CPU, batch norms unfolded (they train)
    preprocess: Preprocess  # the feature set's resize and crop: clips are decoded as extract decoded frames
    store: FeatureStore  # the feature set stage two read: its rows' pts are the times clips are decoded at


def load_start(config: FinetuneConfig) -> Start:
    """Load the checkpoint and build the encoder of its feature set; refuse anything that does not match."""
    if config.checkpoint is None:
        raise FinetuneError("no starting checkpoint: pass --checkpoint runs/temporal/best.pt (a train-temporal run)")
    checkpoint = load_checkpoint(config.checkpoint)
    identity = checkpoint.feature_set
    backbone = identity.get("backbone", RESNET50)
    if backbone != RESNET50 and not backbone.startswith(TIMM):
        raise FinetuneError(f"{config.checkpoint}: trained on {backbone} features; finetune trains image backbones "
                            "only (resnet50, timm:<model name>): fine-tune another backbone outside epicfeat and "
                            "pass --weights to extract")
    args = checkpoint.model_args
    if args.fixed_length and config.frames not in (None, args.frames):
        raise FinetuneError(f"--frames {config.frames}: {config.checkpoint}'s {args.head} head reads exactly "
                            f"{args.frames} rows per segment (learned positions or its context's layout); leave "
                            "--frames out")
    encoder = create_encoder(identity, torch.device("cpu"), weights=checkpoint.backbone_weights(config.weights),
                             trainable=True)  # the weights' hash is checked
    stages = len(encoder.backbone.stages())
    if config.trainable_stages > stages:
        raise FinetuneError(f"--trainable-stages {config.trainable_stages}: {backbone} has {stages} stages "
                            f"(timm's coarse layer groups); give 0..{stages}")
    try:
        store = open_feature_set(Path(config.cache), config.feature_set or checkpoint.feature_set_key)
    except EpicfeatError as err:
        raise FinetuneError(
            f"{err}. finetune decodes each clip at the times of the stored rows stage two read, so it needs "
            f"{config.checkpoint}'s feature set: pass --cache (and --feature-set) where `epicfeat extract` wrote it"
        ) from None
    check_feature_set(checkpoint, store.identity)
    return Start(checkpoint=checkpoint, encoder=encoder, preprocess=Preprocess.from_identity(identity), store=store)


# --------------------------------------------------------------------------------------- the processes
@dataclass(frozen=True)
class World:
    """This process among torchrun's: its rank, how many processes there are, and its device (alone: 0 of 1)."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over every process (in place); the tensor itself when alone."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather_batch(self, local: torch.Tensor) -> torch.Tensor:
        """(b, ...) of every process -> (size * b, ...) in global-batch order (clip j of rank r at j * size + r)."""
        if self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local)
        return torch.stack(parts, dim=1).reshape(-1, *local.shape[1:])  # (b, size, ...) -> (b * size, ...)

    def gather_objects(self, local: Any) -> list[Any]:
        if self.size == 1:
            return [local]
        parts = [None] * self.size
        dist.all_gather_object(parts, local)
        return parts

    def shard(self, dataset: torch.utils.data.Dataset) -> torch.utils.data.Subset:
        """This process's share of ``dataset`` for scoring: every size-th item, no padding, no duplicates."""
        return torch.utils.data.Subset(dataset, list(range(self.rank, len(dataset), self.size)))


@contextlib.contextmanager
def _joined(config: FinetuneConfig) -> Iterator[World]:
    """This process's World: under torchrun (WORLD_SIZE > 1) in a process group (created here unless one exists,
    and then destroyed here), one GPU per process (cuda:LOCAL_RANK) unless --device cpu."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield World(rank=0, size=1, device=resolve_device(config.device))
        return
    cuda = config.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else resolve_device(config.device)
    created = not dist.is_initialized()
    if created:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)
    finally:
        if created:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ entry point
#: Keys that may differ between a run and its resumption: where things are and how they run, not what is learned.
RESUMABLE_CHANGES = frozenset({"resume", "out", "annotations", "videos", "checkpoint", "weights", "device",
                               "precision", "progress", "eval_batch_size", "num_workers", "decode_threads",
                               "cache", "feature_set"})


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """``epicfeat finetune``: fine-tune encoder + temporal model on decoded clips; writes into ``config.out``."""
    started = time.perf_counter()
    with _joined(config) as world:
        return _run(config, world, started)


@dataclass
class _Run:
    """One finetune run's own parts: the model on its encoder, the clips and loaders, where it stands."""

    config: FinetuneConfig
    start: Start
    world: World
    model: ClipModel  # computes in the run's precision (ClipModel.set_precision)
    ddp_model: nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    data: ClipData
    sampler: torch.utils.data.DistributedSampler
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    stats_loader: torch.utils.data.DataLoader
    settings: ClipStepSettings
    state: TrainingState
    backbone_trains: bool
    skipped: SkippedVideos = dataclasses.field(default_factory=SkippedVideos)  # video id -> why its clips failed
    start_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the starting model, on validation
    drift: dict[str, torch.Tensor] | None = None  # restandardize: stored stats + the reference measurement

    def evaluate(self) -> dict[str, float]:
        """The model's loss and official metrics on the validation clips (every process gets the same)."""
        return evaluate_clips(self.model, self.skipped.watch(self.val_loader), self.data, self.world,
                              self.config.label_smoothing)

    def measure(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's feature mean and std on the statistics clips."""
        return measure_feature_stats(self.model, self.stats_loader, self.world)

    def save(self, path: Path, *, epoch: int, metrics: dict[str, float], history: list[dict[str, float]],
             training_state: dict[str, Any] | None = None) -> Path:
        """A train-temporal checkpoint plus ``backbone`` and ``finetune`` (the start; the drift's reference). Its
        feature set is the start's with the weights named by their hash, unless the backbone is still the start's."""
        start = self.start.checkpoint
        backbone = self.model.encoder.backbone
        feature_set = dict(start.feature_set)
        sha = weights_identity(backbone)
        if sha != feature_set.get("weights_sha"):
            feature_set.update(weights=weights_name_of_sha(sha), weights_sha=sha)
        # What is saved describes the run, not this invocation: `--config out/config.yaml` re-creates it from scratch.
        card = dataclasses.replace(start.card, config=config_to_dict(dataclasses.replace(self.config, resume=False)),
                                   feature_set=feature_set, feature_set_key=feature_set_key_of(feature_set))
        drift = {"drift": {k: v.detach().cpu() for k, v in self.drift.items()}} if self.drift is not None else {}
        extra = {
            "backbone": {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
            "finetune": {"start_checkpoint": str(start.path), "start_feature_set": dict(start.feature_set),
                         "start_feature_set_key": start.feature_set_key,
                         "start_metrics": {k: float(v) for k, v in self.start_metrics.items()}, **drift},
        }
        return save_checkpoint(path, model=self.model.temporal, card=card, epoch=epoch, metrics=metrics,
                               history=history, training_state=training_state, extra=extra)


def _run(config: FinetuneConfig, world: World, started: float) -> FinetuneResult:
    """One process's part of the run (see the module docstring's call tree)."""
    folder = RunFolder(config.out, error=FinetuneError, resumable=RESUMABLE_CHANGES)
    folder.check_start(config.resume)
    if config.batch_size % world.size:
        raise FinetuneError(f"--batch-size {config.batch_size} must be a multiple of the {world.size} processes")
    console = make_console(config.progress and world.is_main)
    start = load_start(config)
    frames = config.frames or int(start.checkpoint.config.get("frames", 16))
    # What the run computes in: --precision on a GPU, fp32 on a CPU, fp32 where this build cannot train an LSTM in
    # it. The saved config names it and T: what evaluate and predict run the checkpoint's LSTM in.
    precision, notes = supported_precision(config.precision if world.device.type == "cuda" else "fp32", world.device)
    config = dataclasses.replace(config, frames=frames, precision=precision)

    # Dropout draws from torch's global RNG (same seed on every rank).
    with reproducible(config.seed, deterministic=config.deterministic):
        run = _prepare(config, start, world)
        notes += run.data.notes
        if config.resume:
            _resume(run, folder, console)
        if world.is_main:
            folder.out.mkdir(parents=True, exist_ok=True)
            save_config(dataclasses.replace(config, resume=False), folder.out / "config.yaml")
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
        if config.restandardize and run.backbone_trains and run.drift is None:
            run.drift = _reference_drift(run)
        if run.val_loader is not None and config.eval_start and not config.resume:
            _score_start(run, folder, console)
        plots = _train_epochs(run, folder, console)
    if world.size > 1:
        dist.barrier()  # rank 0's files are complete before any process returns
    return _result(run, folder, plots, notes, time.perf_counter() - started, console)


def _prepare(config: FinetuneConfig, start: Start, world: World) -> _Run:
    """The stage-two model on its own encoder, AdamW with a head and a backbone lr, the clip loaders, the schedule."""
    model = ClipModel(start.encoder, start.checkpoint.create_model(), trainable_stages=config.trainable_stages)
    model = model.to(world.device)
    model.set_precision(config.precision)
    model.encoder.set_grad_checkpointing(config.activation_checkpointing)
    backbone_params = [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [{"params": list(model.temporal.parameters()), "name": "head"}]
    if backbone_params:  # the schedule's lr times backbone_lr / lr (TrainingState.set_lr)
        groups.append({"params": backbone_params, "name": "backbone", "lr_scale": config.backbone_lr / config.lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)

    # --- data: segments whose video exists; decoded on the fly in worker processes
    data = load_clip_data(config, start.checkpoint.card, start.store, start.preprocess,
                          context=start.checkpoint.model_args.context)
    sampler = torch.utils.data.DistributedSampler(
        data.train, num_replicas=world.size, rank=world.rank, shuffle=True, seed=config.seed, drop_last=False
    )
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=config.batch_size // world.size, sampler=sampler, num_workers=config.num_workers,
        pin_memory=world.device.type == "cuda", worker_init_fn=worker_init,
    )
    schedule = LRSchedule.per_step(lr=config.lr, min_lr=config.min_lr, warmup_epochs=config.warmup_epochs,
                                   epochs=config.epochs, steps_per_epoch=len(loader))
    stopping = EarlyStopping(patience=config.patience, validated=data.validation is not None)
    # capture_rng_state wants a generator; the data order needs none (seeded per epoch)
    state = TrainingState(optimizer, schedule, stopping, torch.Generator())
    settings = ClipStepSettings(
        augment=ClipAugment(start.preprocess.crop, scale=config.crop_scale, hflip=config.hflip,
                            color_jitter=config.color_jitter, grayscale=config.grayscale),
        micro_batch_size=config.micro_batch_size, label_smoothing=config.label_smoothing,
        cutmix_alpha=config.cutmix_alpha, seed=config.seed,
    )
    ddp_model = model
    if world.size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    return _Run(
        config=config, start=start, world=world, model=model, ddp_model=ddp_model, data=data, sampler=sampler,
        loader=loader, val_loader=_eval_loader(data.validation, config, world) if data.validation is not None else None,
        stats_loader=_eval_loader(data.stats, config, world), settings=settings, state=state,
        backbone_trains=bool(backbone_params),
    )


def _eval_loader(dataset: torch.utils.data.Dataset, config: FinetuneConfig, world: World):
    return torch.utils.data.DataLoader(
        world.shard(dataset), batch_size=config.eval_batch_size, shuffle=False, num_workers=config.num_workers,
        pin_memory=world.device.type == "cuda", worker_init_fn=worker_init,
    )


def _resume(run: _Run, folder: RunFolder, console) -> None:
    """Weights (head and backbone), optimiser, step, history, early stopping, RNG, the start's metrics and drift."""
    saved = load_checkpoint(folder.last)
    folder.check_resume_config(saved.config, config_to_dict(dataclasses.replace(run.config, resume=False)))
    run.state.restore(saved, folder, console=console, data_changed=": the videos or annotations changed")
    run.model.temporal.load_state_dict(saved.model_state)
    run.model.encoder.backbone.load_state_dict(saved.extra["backbone"])
    run.start_metrics = dict(saved.extra.get("finetune", {}).get("start_metrics", {}))
    run.drift = saved.extra.get("finetune", {}).get("drift")


def _reference_drift(run: _Run) -> dict[str, torch.Tensor]:
    """The stored statistics and the start encoder's, measured on the frames every epoch re-measures."""
    reference_mean, reference_std = run.measure()
    return {"stored_mean": run.model.temporal.feature_mean.detach().cpu().clone(),
            "stored_std": run.model.temporal.feature_std.detach().cpu().clone(),
            "reference_mean": reference_mean, "reference_std": reference_std}


def _score_start(run: _Run, folder: RunFolder, console) -> None:
    """Epoch 0: the starting model, scored like every epoch; best.pt until an epoch beats it."""
    run.start_metrics = run.evaluate()
    run.state.stopping.update(0, run.start_metrics)
    if run.world.is_main:
        run.save(folder.best, epoch=0, metrics=run.start_metrics, history=[])
    metrics = run.start_metrics
    console.print(
        f"start (epoch 0): val verb {metrics['all_verb_accuracy_at_1']:.1f} noun "
        f"{metrics['all_noun_accuracy_at_1']:.1f} action {metrics['all_action_accuracy_at_1']:.1f}"
    )


def _train_epochs(run: _Run, folder: RunFolder, console) -> list[Path]:
    """The epochs still to run, each closed by the epoch log (checkpoints, CSV, plots, TensorBoard); the plots."""
    reported: set[str] = set()  # videos whose decoding problem was already printed
    with EpochLog(folder, console, progress=run.config.progress, steps_per_epoch=len(run.loader),
                  title=f"finetune {folder.out.name}", writes=run.world.is_main) as log:
        for epoch in run.state.remaining_epochs(run.config.epochs):
            first_step = run.state.step
            row = _run_epoch(run, epoch, log)
            log.end_epoch(row, run.state, run.save, first_step, details=_epoch_details(row))
            for video_id in sorted(set(run.skipped) - reported):
                console.print(f"[yellow]skipped:[/] clips of {run.skipped[video_id]}")
            reported = set(run.skipped)
    return log.finish(run.state)


def _run_epoch(run: _Run, epoch: int, log: EpochLog) -> dict[str, float]:
    """Train one epoch, let the head's input scaling follow the encoder, validate: the epoch's metrics row."""
    config, state, world = run.config, run.state, run.world
    epoch_started = time.perf_counter()
    run.sampler.set_epoch(epoch)
    run.data.train.set_epoch(epoch)
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    with log.progress_bar(epoch, config.epochs, len(run.data.train)) as advance:
        train_stats = train_one_epoch(run.ddp_model, run.skipped.watch(run.loader), state, run.settings, world,
                                      on_batch=lambda clips: advance(clips * world.size))  # the global batch
    train_seconds = time.perf_counter() - epoch_started
    if run.drift is not None:  # the head's input scaling follows the encoder (see the module docstring)
        follow_feature_drift(run.model.temporal, run.drift, *run.measure())
    lr = state.schedule(state.step - 1)  # the lr of the epoch's last step
    row: dict[str, float] = {"epoch": epoch, "step": state.step, "lr": lr,
                             "backbone_lr": lr * config.backbone_lr / config.lr, **train_stats}
    if run.val_loader is not None:
        row.update(run.evaluate())
    row["train_segments_per_s"] = len(run.data.train) / train_seconds
    if world.device.type == "cuda":
        row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(world.device) / 2**30
    row["epoch_seconds"] = time.perf_counter() - epoch_started
    return row


def _epoch_details(row: dict[str, float]) -> list[str]:
    """What a fine-tuning epoch line adds to train-temporal's losses and accuracies."""
    parts = [f"{row['train_segments_per_s']:.1f} clips/s", f"data wait {row['data_wait_seconds']:.1f} s"]
    if "peak_gpu_memory_gb" in row:
        parts.append(f"peak GPU {row['peak_gpu_memory_gb']:.1f} GiB")
    if row.get("train_skipped"):
        parts.append(f"{int(row['train_skipped'])} clips skipped")
    return parts


def _result(run: _Run, folder: RunFolder, plots: list[Path], notes: list[str], seconds: float,
            console) -> FinetuneResult:
    """The run's result, its summary table and the one-line verdict."""
    history, stopping = run.state.history, run.state.stopping
    skipped = {"train": int(sum(row.get("train_skipped", 0) for row in history)),  # resumed epochs included
               "validation": int(history[-1]["val_skipped"]) if history and "val_skipped" in history[-1] else 0}
    notes = list(notes)
    if run.skipped:
        notes.append(f"{len(run.skipped)} video(s) could not be decoded, their clips were skipped"
                     f"{' (this process saw these)' if run.world.size > 1 else ''}: {'; '.join(run.skipped.values())}")
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
    if run.config.progress and run.world.is_main:
        print_summary(result, console=console, title="epicfeat finetune")
    if verdict and run.world.is_main:
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
@dataclass(frozen=True)
class ClipStepSettings:
    """One optimiser step: ``augment`` each clip, CutMix over the global batch (Beta(``cutmix_alpha``), 0: none;
    drawn from (``seed``, step)), micro-batches of ``micro_batch_size``, the mixed loss with ``label_smoothing``."""

    augment: ClipAugment
    micro_batch_size: int
    label_smoothing: float
    cutmix_alpha: float
    seed: int


def train_one_epoch(model: nn.Module, batches: Iterable[dict], state: TrainingState, settings: ClipStepSettings,
                    world: World, on_batch: Callable[[int], None]) -> dict[str, float]:
    """One pass over this process's share of the clips: the mean losses, skipped clips and data wait;
    ``state.step`` counts the optimiser steps. Each batch is this process's part of a step, whose gradient is the
    mean over every valid clip of the global batch."""
    model.train()
    sums = torch.zeros(4, dtype=torch.float64, device=world.device)  # total, verb, noun loss sums; valid clips
    skipped, data_wait = 0, 0.0
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    waited = time.perf_counter()
    for batch in batches:
        data_wait += time.perf_counter() - waited
        state.set_lr()
        state.optimizer.zero_grad(set_to_none=True)
        skipped += int((~batch["valid"]).sum())
        clips = _step_clips(batch, settings, state.step, world)
        sums += _backward_step(model, clips, settings, world)
        _mean_gradient_step(state.optimizer, params, clips.valid, world)
        state.step += 1
        on_batch(len(clips.valid))
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)  # so the wait that follows is time the GPU sits idle for data
        waited = time.perf_counter()
    return _epoch_means(sums, skipped, data_wait, world)


@dataclass
class _StepClips:
    """One optimiser step's clips on this process: augmented (and CutMix-pasted) pixels and the labels to mix."""

    pixels: torch.Tensor  # (b, T, 3, crop, crop) uint8
    valid: torch.Tensor  # (b,) bool: decodable clips (the others weigh 0)
    verbs: torch.Tensor  # (b,)
    nouns: torch.Tensor  # (b,)
    partner_verbs: torch.Tensor | None = None  # (b,) the CutMix partners' labels (None: no CutMix this step)
    partner_nouns: torch.Tensor | None = None
    fraction: float = 0.0  # the partner's share of each clip


def _step_clips(batch: dict, settings: ClipStepSettings, step: int, world: World) -> _StepClips:
    """Augment each clip (one parameter draw for all T frames), then CutMix drawn over the global batch."""
    device, crop = world.device, settings.augment.crop
    # Skipped clips still run (a black clip of the right shape, weight 0), so every DDP process runs the
    # same backward passes and the all-reduce never waits on a process that had nothing to compute.
    pixels = torch.stack([
        settings.augment(clip.to(device, non_blocking=True), int(seed)) if ok else
        torch.zeros(clip.shape[0], 3, crop, crop, dtype=torch.uint8, device=device)
        for clip, seed, ok in zip(batch["clip"], batch["aug_seed"], batch["valid"])
    ])  # (b, T, 3, crop, crop) uint8
    clips = _StepClips(pixels=pixels, valid=batch["valid"], verbs=batch["verb"].to(device),
                       nouns=batch["noun"].to(device))
    if settings.cutmix_alpha > 0:
        _paste_cutmix(clips, settings.cutmix_alpha, derive_seed(settings.seed, step), world)
    return clips


def _paste_cutmix(clips: _StepClips, alpha: float, seed: int, world: World) -> None:
    """One draw per global step over the global batch: N processes paste what one process would."""
    positions = global_positions(len(clips.valid), world.rank, world.size).to(world.device)  # (b,)
    global_valid, global_verbs, global_nouns = (
        world.gather_batch(t.to(world.device)) for t in (clips.valid.to(torch.uint8), clips.verbs, clips.nouns)
    )  # (B,) each
    crop = clips.pixels.shape[-1]
    mix = sample_step_cutmix(global_valid.bool().cpu(), crop, crop, alpha, seed)
    if mix is None:
        return
    y0, y1, x0, x1 = mix.box
    boxes = world.gather_batch(clips.pixels[..., y0:y1, x0:x1].contiguous())  # (B, T, 3, h, w) uint8
    partner = mix.partner.to(world.device)[positions]  # (b,) global positions of each clip's partner
    clips.pixels[..., y0:y1, x0:x1] = boxes[partner]
    clips.partner_verbs, clips.partner_nouns = global_verbs[partner], global_nouns[partner]
    clips.fraction = mix.fraction


def _backward_step(model: nn.Module, clips: _StepClips, settings: ClipStepSettings, world: World) -> torch.Tensor:
    """Forward and backward the step's clips as micro-batches of summed losses: (4,) float64 sums of the total,
    verb and noun losses over the valid clips, and their count."""
    sums = torch.zeros(4, dtype=torch.float64, device=world.device)
    starts = range(0, len(clips.valid), settings.micro_batch_size)
    for begin in starts:
        part = slice(begin, begin + settings.micro_batch_size)
        keep = clips.valid[part].nonzero().squeeze(1).to(world.device)  # (v,) positions of decodable clips
        # DDP all-reduces the gradients at the step's last micro-batch only.
        sync = contextlib.nullcontext() if (begin == starts[-1] or world.size == 1) else model.no_sync()
        with sync:
            verb_logits, noun_logits = model(clips.pixels[part])  # (b', Cv), (b', Cn), in the model's precision
            verb_logits, noun_logits = verb_logits.float()[keep], noun_logits.float()[keep]  # (v, C)
            if not len(keep):
                ((verb_logits.sum() + noun_logits.sum()) * 0.0).backward()  # keeps the graph (and DDP) in step
                continue
            verb_loss, noun_loss = (
                mixed_cross_entropy(logits, labels[part][keep], None if partners is None else partners[part][keep],
                                    clips.fraction, settings.label_smoothing)
                for logits, labels, partners in ((verb_logits, clips.verbs, clips.partner_verbs),
                                                 (noun_logits, clips.nouns, clips.partner_nouns))
            )
            loss = (verb_loss + noun_loss) * len(keep)  # a sum over clips: normalised after the step
            loss.backward()
        sums += torch.stack([loss.detach(), verb_loss.detach() * len(keep), noun_loss.detach() * len(keep),
                             torch.tensor(float(len(keep)), device=world.device)]).double()
    return sums


def _mean_gradient_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], valid: torch.Tensor,
                        world: World) -> None:
    """Scale the summed gradients to the mean over every valid clip of the global batch, then step (if any)."""
    count = valid.sum().to(torch.float64)  # (), on the CPU with the batch
    if world.size > 1:
        count = world.all_reduce(count.to(world.device))
    count = float(count)
    if count > 0:
        scale = world.size / count  # DDP averaged over the processes; we want the mean over every valid clip
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        optimizer.step()


def _epoch_means(sums: torch.Tensor, skipped: int, data_wait: float, world: World) -> dict[str, float]:
    """The epoch's mean losses over every process's valid clips, the skipped clips and the mean data wait."""
    totals = world.all_reduce(sums.clone()).cpu()  # the epoch's one sync for the statistics
    waits = world.all_reduce(torch.tensor([float(skipped), data_wait], dtype=torch.float64,
                                          device=world.device)).cpu()
    n = max(float(totals[3]), 1.0)
    return {
        "train_loss": float(totals[0]) / n, "train_verb_loss": float(totals[1]) / n,
        "train_noun_loss": float(totals[2]) / n, "train_skipped": float(waits[0]),
        "data_wait_seconds": float(waits[1]) / world.size,
    }


@torch.inference_mode()
def evaluate_clips(model: ClipModel, batches: Iterable[dict], data: ClipData, world: World,
                   label_smoothing: float = 0.0) -> dict[str, float]:
    """Bin-centre frames of ``data.validation``, extract's resize + centre crop: loss and the official metrics, the
    same on every process (the logits are gathered); undecodable clips are left out, counted as ``val_skipped``."""
    index, logits = _gathered_logits(model, batches, world)  # (S',), (S', Cv + Cn)
    if len(index) == 0:
        raise FinetuneError("no validation clip could be decoded; check --videos (see the skipped-clip notes)")
    dataset = data.validation
    unseen = None
    if data.unseen_participants is not None:
        unseen = np.array([dataset.participants[i] in data.unseen_participants for i in index], dtype=bool)
    verb_logits, noun_logits = logits.split([model.temporal.args.n_verbs, model.temporal.args.n_nouns], dim=1)
    metrics = validation_metrics(verb_logits, noun_logits, torch.from_numpy(dataset.verbs[index]),
                                 torch.from_numpy(dataset.nouns[index]), label_smoothing, tail_verbs=data.tail_verbs,
                                 tail_nouns=data.tail_nouns, unseen=unseen)
    return {**metrics, "val_skipped": float(len(dataset) - len(index))}


def _gathered_logits(model: ClipModel, batches: Iterable[dict], world: World) -> tuple[np.ndarray, torch.Tensor]:
    """(segment indices (S',), host logits (S', Cv + Cn)) of every process's decodable clips, in segment order."""
    model.eval()
    indices, logits = [], []
    for batch in batches:
        valid = batch["valid"]
        clips = batch["clip"][valid].to(world.device).permute(0, 1, 4, 2, 3)  # (v, T, H, W, 3) -> (v, T, 3, H, W)
        if len(clips):
            verbs, nouns = model(clips)  # (v, Cv), (v, Cn)
            logits.append(torch.cat([verbs, nouns], dim=1).float())  # (v, Cv + Cn), where the model ran
        indices.append(batch["index"][valid])
    width = model.temporal.args.n_verbs + model.temporal.args.n_nouns
    # The logits come to the host in one copy (a GPU waits for no per-batch read).
    local = torch.cat(logits).cpu() if logits else torch.zeros(0, width)  # (S', Cv + Cn)
    parts = world.gather_objects((torch.cat(indices).numpy(), local))
    index = np.concatenate([part[0] for part in parts])
    order = np.argsort(index, kind="stable")  # segment order, whatever the sharding
    return index[order], torch.cat([part[1] for part in parts])[torch.from_numpy(order)]


# ------------------------------------------------------------------------------- features that move together
@torch.inference_mode()
def measure_feature_stats(model: ClipModel, batches: Iterable[dict], world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (two (D,) float64 CPU tensors) of the encoder's features on ``batches``' decodable
    frames, summed in float64 over every process (each gets the same numbers)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, model.encoder.num_features, dtype=torch.float64, device=world.device)  # sum, sum of squares
    count = torch.zeros(1, dtype=torch.float64, device=world.device)
    for batch in batches:
        clips = batch["clip"][batch["valid"]].to(world.device)  # (v, T, H, W, 3) uint8
        if not len(clips):
            continue
        images = clips.reshape(-1, *clips.shape[2:]).permute(0, 3, 1, 2)  # (v * T, 3, H, W)
        features = model.encoder(images).double()  # (v * T, D)
        sums += torch.stack([features.sum(0), (features * features).sum(0)])
        count += len(features)
    world.all_reduce(sums)
    world.all_reduce(count)
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
    """Move the temporal model's input mean/std by the change of the encoder's features since the start.

    Per dimension the change is taken as affine, f_now = a * f_start + b (a = std / reference_std, b = mean -
    a * reference_mean), and applied to the stored statistics: mean' = a * stored_mean + b, std' = a * stored_std,
    so the head sees the inputs it was trained on; an unchanged encoder keeps the stored statistics bit for bit.
    """
    ref_std = drift["reference_std"].clamp(min=DRIFT_MIN_STD)
    scale = std.clamp(min=DRIFT_MIN_STD) / ref_std  # (D,) a
    shift = mean - scale * drift["reference_mean"]  # (D,) b
    unchanged = (mean == drift["reference_mean"]) & (std == drift["reference_std"])  # exact: keep the bits
    new_mean = torch.where(unchanged, drift["stored_mean"].double(), scale * drift["stored_mean"].double() + shift)
    new_std = torch.where(unchanged, drift["stored_std"].double(), scale * drift["stored_std"].double())
    temporal.set_feature_stats(new_mean.float(), new_std.float())
