"""Stage two: train the BiLSTM verb/noun model on cached features, in minutes instead of hours.

    train_temporal(config)                  the one function `epicfeat train-temporal` calls
      load_training_data(config)            annotations + feature set -> packed train / validation splits
      fit(config, data)                     the run, on the scaffold of ``epicfeat.training``:
        _prepare(...)                       splits onto the device, the standardised model, AdamW, the schedule
        _resume(...)                        last.pt: feature set and config checks, TrainingState.restore
        _train_epochs(...)                  for each epoch left: train_one_epoch, evaluate, EpochLog.end_epoch

CutMix pastes a time span (features have no pixels): a partner's rows over round((1 - lam) * L) steps, the losses
mixed by span / L. The epoch is a device-side loop: splits uploaded once, the sampling generator with them, the
epoch's draws made at its start (``plan_epoch``), nothing read back until its mean losses; on a GPU its full steps
replay one captured CUDA graph (``StepGraph``). Checkpoints and the epoch's files are written by the epoch log's
writer thread from host copies, while the next epoch trains.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from epicfeat.configs import TrainTemporalConfig
from epicfeat.data.annotations import EpicAnnotations
from epicfeat.devices import PRECISION_DTYPES, resolve_device
from epicfeat.errors import EpicfeatError
from epicfeat.metrics import epic_metrics
from epicfeat.recipes import config_to_dict, save_config
from epicfeat.store import open_feature_set
from epicfeat.temporal.checkpoint import ModelCard, check_feature_set, load_checkpoint, save_checkpoint
from epicfeat.temporal.data import Context, PackedSplit, feature_stats, packed_split
from epicfeat.temporal.model import TemporalModel, TemporalModelArgs, create_temporal_model
from epicfeat.temporal.precision import grad_scaler, resolve_temporal_precision, supported_precision
from epicfeat.training import (BackgroundWriter, EarlyStopping, EpochLog, LRSchedule, RunFolder, TrainingState,
                               TrainResult, host_copy, make_console, print_summary, reproducible)


class TrainError(EpicfeatError):
    """A training run that cannot start or continue as asked; the message says what to do."""


@dataclass(frozen=True)
class TrainingData:
    """What ``fit`` trains on; ``load_training_data`` builds it from a feature set, tests build it by hand."""

    train: PackedSplit
    validation: PackedSplit | None  # None: no held-out split (train+validation)
    verb_classes: tuple[str, ...]  # class keys, index = class id
    noun_classes: tuple[str, ...]
    feature_set: dict  # FeatureSetIdentity.to_dict() of the features
    feature_set_key: str
    tail_verbs: frozenset[int] | None = None  # official tail classes (None: no tail metrics)
    tail_nouns: frozenset[int] | None = None
    unseen_participants: frozenset[str] | None = None  # validation participants absent from train


@dataclass(frozen=True)
class StepSettings:
    """What one optimiser step does: T rows of each of ``batch_size`` segments, run as micro-batches of
    ``micro_batch_size`` whose gradients accumulate, time-span CutMix of Beta(``cutmix_alpha``) (0: none), and
    cross-entropy with ``label_smoothing``; ``graphs``: each epoch's full steps replay one captured step."""

    frames: int
    batch_size: int
    micro_batch_size: int
    label_smoothing: float = 0.0
    cutmix_alpha: float = 0.0
    graphs: bool = False  # replay full steps from a captured CUDA graph (``StepGraph``; needs no fp16 loss scaling)


# --------------------------------------------------------------------------------------------- entry points
def train_temporal(config: TrainTemporalConfig) -> TrainResult:
    """``epicfeat train-temporal``: pack the splits of one feature set and train (or resume) a temporal model."""
    return fit(config, load_training_data(config), release_host_copy=True)


def load_training_data(config: TrainTemporalConfig) -> TrainingData:
    """Open the feature set, read the annotations and pack the train (and validation) segments into memory."""
    if config.annotations is None:
        raise TrainError("no annotations given: pass --annotations DIR (the folder holding EPIC_100_*.csv)")
    annotations = EpicAnnotations(config.annotations, train_file=config.train_file)
    store = open_feature_set(config.cache, config.feature_set)
    pack = functools.partial(packed_split, store, cache=config.pack_cache, progress=config.progress,
                             context=Context.of_config(config))  # with the rows around each segment the head reads
    train = pack(annotations.segments(config.train_splits), config.train_splits)
    if len(train) == 0:
        raise TrainError(
            f"none of the {config.train_splits} segments has features in feature set {store.path}: extract their "
            f"videos first (epicfeat extract --split train ...), or pick another --feature-set"
        )
    validation = None
    if config.train_splits == "train":
        validation = pack(annotations.segments("validation"), "validation")
        if len(validation) == 0:
            raise TrainError(
                f"no validation segment has features in feature set {store.path}: extract them "
                "(epicfeat extract --split validation), or train on --train-splits train+validation (no early stopping)"
            )
    return TrainingData(
        train=train, validation=validation, verb_classes=tuple(annotations.verbs.keys),
        noun_classes=tuple(annotations.nouns.keys), feature_set=store.identity.to_dict(),
        feature_set_key=store.identity.key(), tail_verbs=annotations.tail_verbs, tail_nouns=annotations.tail_nouns,
        unseen_participants=annotations.unseen_participants("validation") if validation is not None else None,
    )


# ----------------------------------------------------------------------------------------------- the run
#: Keys that may differ between a run and its resumption: where things are and how they run, not what is learned.
RESUMABLE_CHANGES = frozenset({"resume", "out", "annotations", "cache", "device", "precision", "progress",
                               "eval_batch_size", "pack_cache"})


@dataclass
class _Run:
    """One train-temporal run's own parts: its splits where it trains, its model, step settings and state."""

    config: TrainTemporalConfig
    data: TrainingData
    device: torch.device
    train_on_device: PackedSplit
    val_on_device: PackedSplit | None
    model: TemporalModel
    settings: StepSettings
    steps_per_epoch: int
    state: TrainingState
    unseen: np.ndarray | None  # (S_val,) bool: validation segments of participants absent from train
    notes: list[str]  # what the user should know about the run (a capped batch, a split left on the CPU, ...)


def fit(config: TrainTemporalConfig, data: TrainingData, *, release_host_copy: bool = False) -> TrainResult:
    """Train (or resume) a temporal model on ``data``; writes everything into ``config.out``.

    ``release_host_copy``: once a split is on the GPU, drop its host features (``data`` is handed over).
    """
    started = time.perf_counter()
    folder = RunFolder(config.out, error=TrainError, resumable=RESUMABLE_CHANGES)
    folder.check_start(config.resume)
    config = dataclasses.replace(config, feature_set=data.feature_set_key)  # the resolved config names the set
    folder.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    console = make_console(config.progress)
    # The precision is resolved once (auto -> bf16 / fp32) and recorded: validation and `evaluate` use it too.
    precision, notes = supported_precision(resolve_temporal_precision(config.precision, device), device)
    config = dataclasses.replace(config, precision=precision)

    # Seeds: model init and dropout draw from torch's global RNGs; shuffling, row sampling and CutMix from the
    # run's sampling generator, so the data order does not depend on how many dropout masks were drawn.
    with reproducible(config.seed, deterministic=config.deterministic):
        run = _prepare(config, data, device, release_host_copy)
        if config.resume:
            _resume(run, folder, console)
        save_config(dataclasses.replace(config, resume=False), folder.out / "config.yaml")
        notes += run.notes + _dropped_notes(data)
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
        plots = _train_epochs(run, folder, console)
    pack_summary = {name: dict(s.summary) for name, s in (("train", data.train), ("validation", data.validation))
                    if s is not None}
    result = TrainResult.of_run(folder, run.state, plots=plots, best_metrics=run.state.best_row(),
                                pack_summary=pack_summary, seconds=time.perf_counter() - started, notes=notes)
    if config.progress:
        print_summary(result, console=console)
    return result


def _prepare(config: TrainTemporalConfig, data: TrainingData, device: torch.device, release_host_copy: bool) -> _Run:
    """The splits on the device, the standardised model, AdamW, the step settings and the per-step schedule."""
    _check_labels(data.train, "train", data)
    if data.validation is not None:
        _check_labels(data.validation, "validation", data)
    notes = []
    # --- data onto the device once: an epoch is then index_select on device memory, no loader to wait on
    train_on_device = _to_device(data.train, device)
    val_on_device = _to_device(data.validation, device) if data.validation is not None else None
    for host, moved in ((data.train, train_on_device), (data.validation, val_on_device)):
        if moved is not None and moved.device.type != device.type:
            notes.append(f"{host.features.numel() * 2 / 1e9:.1f} GB of packed features do not fit on {device}: "
                         "batches are gathered on the CPU and copied over (slower)")
        if release_host_copy:
            _release_host_features(host, moved)
    # The sampling generator lives with the data: the epoch's order, rows and CutMix are drawn there.
    generator = torch.Generator(device=train_on_device.device).manual_seed(config.seed)

    # --- model, standardised with the training split's statistics (computed where the split is)
    model_args = TemporalModelArgs.of_config(config, input_dim=data.train.features.shape[1],
                                             n_verbs=len(data.verb_classes), n_nouns=len(data.noun_classes))
    model = create_temporal_model(model_args, *feature_stats(train_on_device)).to(device)
    model.compute_dtype = PRECISION_DTYPES[config.precision]
    # Fused AdamW: one kernel for all 17 M parameters instead of a loop of small ones (and no host read per step).
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type in ("cuda", "cpu"))
    batch_size = min(config.batch_size, len(data.train))
    if batch_size < config.batch_size:
        notes.append(f"effective batch {config.batch_size} exceeds the {len(data.train)} training segments: every "
                     f"optimiser step uses the whole set ({batch_size}); small sets need a smaller --batch-size or "
                     "more epochs")
    scaler = grad_scaler(config.precision, device)  # fp16 only; a no-op otherwise
    # CUDA graphs: the step's ~300 launches become one; not with fp16's scaler (it reads the GPU each step), nor
    # with the split left on the CPU (each batch is copied over).
    graphs = device.type == "cuda" and not scaler.is_enabled() and train_on_device.device == device
    settings = StepSettings(frames=config.frames, batch_size=batch_size,
                            micro_batch_size=min(config.micro_batch_size, batch_size),
                            label_smoothing=config.label_smoothing, cutmix_alpha=config.cutmix_alpha, graphs=graphs)
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    schedule = LRSchedule.per_step(lr=config.lr, min_lr=config.min_lr, warmup_epochs=config.warmup_epochs,
                                   epochs=config.epochs, steps_per_epoch=steps_per_epoch)
    stopping = EarlyStopping(patience=config.patience, validated=data.validation is not None)
    state = TrainingState(optimizer, schedule, stopping, generator, scaler=scaler)
    unseen = _unseen_mask(data.validation, data.unseen_participants) if data.validation is not None else None
    return _Run(config=config, data=data, device=device, train_on_device=train_on_device,
                val_on_device=val_on_device, model=model, settings=settings, steps_per_epoch=steps_per_epoch,
                state=state, unseen=unseen, notes=notes)


def _resume(run: _Run, folder: RunFolder, console) -> None:
    """Weights, optimiser, schedule step, history, early-stopping counters and every RNG from last.pt."""
    checkpoint = load_checkpoint(folder.last)
    check_feature_set(checkpoint, run.data.feature_set)
    folder.check_resume_config(checkpoint.config, config_to_dict(run.config))
    run.state.restore(checkpoint, folder, console=console, data_changed=(
        f" ({len(run.data.train)} train segments): the packed train split changed (videos added to or missing from "
        "the feature set?)"
    ))
    run.model.load_state_dict(checkpoint.model_state)


def _dropped_notes(data: TrainingData) -> list[str]:
    notes = []
    for name, split in (("train", data.train), ("validation", data.validation)):
        if split is not None and split.summary.get("missing_video_dropped"):
            notes.append(
                f"{split.summary['missing_video_dropped']} {name} segments dropped: "
                f"{split.summary.get('missing_videos', '?')} of their videos are not in the feature set "
                "(run epicfeat extract for them)"
            )
    return notes


def _train_epochs(run: _Run, folder: RunFolder, console) -> list[Path]:
    """The epochs still to run, each closed by the epoch log (checkpoints, CSV, plots, TensorBoard); the plots."""
    config, data = run.config, run.data
    # What is saved describes the run, not this invocation: `--config out/config.yaml` re-creates it from scratch.
    card = ModelCard(config=config_to_dict(dataclasses.replace(config, resume=False)), verb_classes=data.verb_classes,
                     noun_classes=data.noun_classes, feature_set=data.feature_set,
                     feature_set_key=data.feature_set_key)
    with EpochLog(folder, console, progress=config.progress, steps_per_epoch=run.steps_per_epoch,
                  title=folder.out.name) as log:
        save = functools.partial(_save_in_background, log.writer, run.model, card)
        for epoch in run.state.remaining_epochs(config.epochs):
            first_step = run.state.step
            row = _run_epoch(run, epoch, log)
            log.end_epoch(row, run.state, save, first_step)
    return log.finish(run.state)


@dataclass(frozen=True)
class _ModelSnapshot:
    """What ``save_checkpoint`` reads of a model (its args, its state dict), as host copies taken at one moment."""

    args: TemporalModelArgs
    state: dict[str, torch.Tensor]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


def _save_in_background(writer: BackgroundWriter, model: TemporalModel, card: ModelCard, path: Path, *,
                        training_state: dict[str, Any] | None = None, **fields: Any) -> None:
    """``save_checkpoint`` on the epoch log's writer thread: the weights and training state copied to the host now
    (tens of ms), written and fsynced there while the next epoch trains (last.pt: ~200 MB at EPIC size)."""
    snapshot = _ModelSnapshot(model.args, host_copy(model.state_dict()))
    writer.submit(save_checkpoint, path, model=snapshot, card=card, training_state=host_copy(training_state),
                  **fields)


def _run_epoch(run: _Run, epoch: int, log: EpochLog) -> dict[str, float]:
    """Train one epoch, validate: the epoch's metrics row."""
    config, state = run.config, run.state
    epoch_started = time.perf_counter()
    with log.progress_bar(epoch, config.epochs, len(run.data.train)) as advance:
        train_stats = train_one_epoch(run.model, run.train_on_device, state, run.settings, on_batch=advance)
    train_seconds = time.perf_counter() - epoch_started
    row: dict[str, float] = {"epoch": epoch, "step": state.step, "lr": state.schedule(state.step - 1), **train_stats}
    if run.val_on_device is not None:
        val_stats = evaluate(
            run.model, run.val_on_device, frames=config.frames, batch_size=config.eval_batch_size,
            device=run.device, label_smoothing=config.label_smoothing,
            tail_verbs=run.data.tail_verbs, tail_nouns=run.data.tail_nouns, unseen=run.unseen,
        )
        row.update(val_stats)
    row["train_segments_per_s"] = len(run.data.train) / train_seconds
    row["epoch_seconds"] = time.perf_counter() - epoch_started
    return row


# ---------------------------------------------------------------------------------------- one epoch / eval
#: Eager steps at the start of each epoch before its step is captured: lazy initialisation (the optimiser's state,
#: cuDNN's and cuBLAS's handles and workspaces) must happen outside a capture. They are real steps of the epoch.
GRAPH_WARMUP_STEPS = 2


def train_one_epoch(model: TemporalModel, split: PackedSplit, state: TrainingState, settings: StepSettings,
                    on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass over ``split`` in a random order: its mean losses; ``state.step`` counts the optimiser steps.

    The epoch's draws (order, rows, CutMix) are made at its start in a few whole-epoch ops (``plan_epoch``), so a
    step is slices of the plan, one gather, the model, the losses and the optimiser, and nothing is read back until
    the epoch's mean losses (fp16's scaler syncs each step). With ``settings.graphs`` the full steps after
    ``GRAPH_WARMUP_STEPS`` replay one captured step (``StepGraph``). Each step's ``batch_size`` segments run as
    micro-batches whose losses are weighted by their share of the step.
    """
    optimizer = state.optimizer
    device = next(model.parameters()).device
    model.train()
    plan = plan_epoch(split, settings, state.generator, device)
    loss_sums = torch.zeros(2, device=device)  # (2,) sums over the epoch's segments: verb, noun
    step = functools.partial(_optimiser_step, model, split, state, settings, loss_sums)
    graph = None
    for index, begin in enumerate(range(0, len(split), settings.batch_size)):
        end = min(begin + settings.batch_size, len(split))
        state.set_lr()
        if settings.graphs and end - begin == settings.batch_size and index >= GRAPH_WARMUP_STEPS:
            graph = graph or StepGraph(step, plan, settings.batch_size, optimizer)  # captured once an epoch, not run
            graph(plan, slice(begin, end))
        else:
            optimizer.zero_grad(set_to_none=True)
            with _side_stream(device) if settings.graphs else contextlib.nullcontext():
                step(plan, slice(begin, end))
        state.step += 1
        if on_batch is not None:
            on_batch(end - begin)
    verb, noun = (loss_sums / len(split)).tolist()  # the epoch's one device sync
    return {"train_loss": verb + noun, "train_verb_loss": verb, "train_noun_loss": noun}


def _optimiser_step(model: TemporalModel, split: PackedSplit, state: TrainingState, settings: StepSettings,
                   loss_sums: torch.Tensor, plan: EpochPlan, batch: slice) -> None:
    """One optimiser step on the plan's segments ``batch``: the micro-batches' forward and backward (gradients
    accumulate from None or zero), the losses added to ``loss_sums`` (2,), the optimiser's step."""
    scaler = state.scaler
    for first in range(batch.start, batch.stop, settings.micro_batch_size):
        part = slice(first, min(first + settings.micro_batch_size, batch.stop))
        losses = _micro_batch_losses(model, split, plan, part, settings.label_smoothing)  # (2,) verb, noun sums
        weighted = losses.sum() / (batch.stop - batch.start)  # the micro-batch's share of the step's mean loss
        (scaler.scale(weighted) if scaler is not None else weighted).backward()
        loss_sums += losses.detach()
    if scaler is not None:
        scaler.step(state.optimizer)  # skips the step when fp16 gradients overflowed, then adjusts the scale
        scaler.update()
    else:
        state.optimizer.step()


def _micro_batch_losses(model: TemporalModel, split: PackedSplit, plan: EpochPlan, part: slice,
                        label_smoothing: float) -> torch.Tensor:
    """The plan's segments ``part``: one gather, forward, CutMix's cross-entropies; (2,) verb, noun loss sums."""
    rows = plan.rows[part]  # (b, L), CutMix already pasted
    features = split.features.index_select(0, rows.reshape(-1))  # (b * L, D) float16
    device = plan.weights.device
    features = _to(features.reshape(rows.shape[0], rows.shape[1], -1), device)  # (b, L, D)
    verb_logits, noun_logits = model(features)  # (b, Cv), (b, Cn)
    weights = plan.weights[part]  # (b, 2)
    losses = torch.stack([cutmix_cross_entropy(verb_logits, plan.verb_targets[part], weights, label_smoothing),
                          cutmix_cross_entropy(noun_logits, plan.noun_targets[part], weights, label_smoothing)])
    return losses.sum(dim=1)  # (2, b) -> (2,)


class StepGraph:
    """A full optimiser step captured once as a CUDA graph, then replayed: per step the host copies the step's
    slice of the plan into the graph's static inputs, sets the lr and launches the graph, instead of ~300 ops.

    The optimiser must be capturable with its lr in a device tensor (``_make_capturable``; ``set_lr`` fills it).
    Elsewhere than CUDA the same static-input step runs eagerly: the CPU rehearses everything but the capture."""

    def __init__(self, step: Callable[[EpochPlan, slice], None], plan: EpochPlan, size: int,
                 optimizer: torch.optim.Optimizer):
        self.inputs = EpochPlan(*(tensor[:size].clone() for tensor in plan.tensors()))  # static (B, ...) each
        self.step, self.optimizer, self.whole = step, optimizer, slice(0, size)
        self.graph = None
        if plan.weights.device.type == "cuda":
            _make_capturable(optimizer, plan.weights.device)
            optimizer.zero_grad(set_to_none=True)  # the captured backward's gradients live in the graph's memory
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # checkpoints write meanwhile
                    step(self.inputs, self.whole)
                self.graph = graph
            except RuntimeError as err:  # a capture this CUDA / cuDNN refuses: the same step, eagerly
                warnings.warn(f"stage two: the step could not be captured as a CUDA graph, it runs eagerly "
                              f"({str(err).splitlines()[0]})", RuntimeWarning, stacklevel=2)
                optimizer.zero_grad(set_to_none=True)

    def __call__(self, plan: EpochPlan, batch: slice) -> None:
        for static, source in zip(self.inputs.tensors(), plan.tensors()):
            static.copy_(source[batch])
        if self.graph is not None:
            self.graph.replay()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.step(self.inputs, self.whole)


def _make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """A captured optimiser step reads its step count and lr from device memory: capturable, the lr a device tensor
    (``TrainingState.set_lr`` fills it in place)."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not (isinstance(group["lr"], torch.Tensor) and group["lr"].device == device):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


@contextlib.contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """Eager steps of a graphed epoch run on a side stream, as CUDA graphs' warm-up must (nothing elsewhere)."""
    if device.type != "cuda":
        yield
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)


@torch.inference_mode()
def score_split(model: TemporalModel, split: PackedSplit, *, frames: int, batch_size: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Verb and noun logits of every segment of ``split``, read at its bin-centre rows: (S, Cv), (S, Cn) float32."""
    model.eval()
    verb_logits, noun_logits = [], []
    for begin in range(0, len(split), batch_size):
        segments = torch.arange(begin, min(begin + batch_size, len(split)), device=split.device)  # (B,)
        features = split.gather(segments, frames, train=False).to(device, non_blocking=True)  # (B, T, D)
        verbs, nouns = model(features)  # (B, Cv), (B, Cn)
        verb_logits.append(verbs.float())
        noun_logits.append(nouns.float())
    return torch.cat(verb_logits), torch.cat(noun_logits)  # (S, Cv), (S, Cn)


@torch.inference_mode()
def evaluate(model: TemporalModel, split: PackedSplit, *, label_smoothing: float = 0.0,
             tail_verbs: frozenset[int] | None = None, tail_nouns: frozenset[int] | None = None,
             unseen: np.ndarray | None = None, **scoring: Any) -> dict[str, float]:
    """Score every segment at its bin-centre rows (``scoring``: ``score_split``'s frames, batch_size, device): the
    loss and the official metrics (``validation_metrics``); the logits come to the host in one copy."""
    verb_logits, noun_logits = score_split(model, split, **scoring)  # (S, Cv), (S, Cn) where the model ran
    logits = torch.cat([verb_logits, noun_logits], dim=1).cpu()  # (S, Cv + Cn)
    verb_logits, noun_logits = logits.split([verb_logits.shape[1], noun_logits.shape[1]], dim=1)  # (S, Cv), (S, Cn)
    return validation_metrics(verb_logits, noun_logits, split.verb_labels.cpu(), split.noun_labels.cpu(),
                              label_smoothing, tail_verbs=tail_verbs, tail_nouns=tail_nouns, unseen=unseen)


def validation_metrics(verb_logits: torch.Tensor, noun_logits: torch.Tensor, verb_labels: torch.Tensor,
                       noun_labels: torch.Tensor, label_smoothing: float, **subsets: Any) -> dict[str, float]:
    """Host logits (S, Cv), (S, Cn) and labels (S,) -> the training criterion's losses (no CutMix) and
    ``epic_metrics`` (what ``epicfeat evaluate`` reports; ``subsets``: its tail_verbs, tail_nouns, unseen)."""
    verb_loss, noun_loss = (F.cross_entropy(scores, labels, label_smoothing=label_smoothing).item()
                            for scores, labels in ((verb_logits, verb_labels), (noun_logits, noun_labels)))
    metrics = epic_metrics(verb_logits.numpy(), noun_logits.numpy(), verb_labels.numpy(), noun_labels.numpy(),
                           **subsets)
    return {"val_loss": verb_loss + noun_loss, "val_verb_loss": verb_loss, "val_noun_loss": noun_loss, **metrics}


# ---------------------------------------------------------------------------------- the epoch's draws, CutMix
@dataclass(frozen=True)
class EpochPlan:
    """An epoch's draws, in its order: segment s reads ``rows[s]`` of the split (its CutMix partner's rows already
    pasted over the span), and its loss is ``weights[s]`` times the cross-entropies against ``*_targets[s]``."""

    rows: torch.Tensor  # (S, L) int64 rows of split.features, where the split is
    verb_targets: torch.Tensor  # (S, 2) int64: the segment's label, its partner's
    noun_targets: torch.Tensor  # (S, 2) int64
    weights: torch.Tensor  # (S, 2) float32: 1 - f, f (f: the partner's share of the sequence; 0 without CutMix)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.rows, self.verb_targets, self.noun_targets, self.weights


def plan_epoch(split: PackedSplit, settings: StepSettings, generator: torch.Generator,
               device: torch.device) -> EpochPlan:
    """The epoch's order, rows and CutMix, drawn from ``generator`` where it lives in a few ops for all segments;
    targets and weights on ``device`` (the model's). CutMix: each micro-batch one span round((1 - lam) * T),
    lam ~ Beta(alpha, alpha), at a start uniform in [0, T - span] of the segment's rows (after its K context rows:
    the context stays each segment's own), pasted from a random partner in the micro-batch."""
    where = generator.device  # the split's device in train-temporal
    order = torch.randperm(len(split), generator=generator, device=where).to(split.device)  # (S,) the epoch's order
    rows = split.sample_rows(order, settings.frames, train=True, generator=generator)  # (S, L)
    verbs, nouns = split.verb_labels[order], split.noun_labels[order]  # (S,) each
    partner = torch.arange(len(split), device=where)  # (S,) position of each segment's partner: itself
    share = torch.zeros(len(split), device=where)  # (S,) the partner's share f
    if settings.cutmix_alpha > 0:
        k, length = split.context.frames, settings.frames  # the span lies in the segment's T rows
        micro, count = _micro_batch_index(len(split), settings, where)  # (S,) each position's micro-batch; M
        spans = draw_cutmix_spans(count, length, settings.cutmix_alpha, generator)  # (M,)
        uniform = torch.rand(count, generator=generator, device=where)  # (M,)
        starts = torch.minimum((uniform * (length - spans + 1)).long(), length - spans)  # (M,) in [0, L - span]
        # A random partner inside each micro-batch: its positions sorted by (micro-batch, a uniform key).
        keys = micro.double() + torch.rand(len(split), generator=generator, device=where, dtype=torch.float64)
        partner = torch.argsort(keys, stable=True)  # (S,) a permutation within each micro-batch
        steps = torch.arange(rows.shape[1], device=where) - k  # (L,) positions from the segment's first row
        start, span = starts[micro].unsqueeze(1), spans[micro].unsqueeze(1)  # (S, 1) each
        inside = ((steps >= start) & (steps < start + span)).to(rows.device)  # (S, L)
        # Pasting the partner's rows before the one gather equals pasting its features after it.
        rows = torch.where(inside, rows[partner.to(rows.device)], rows)  # (S, L)
        share = spans[micro] / length  # (S,)
    partner = partner.to(verbs.device)
    targets = [_to(torch.stack([labels, labels[partner]], dim=1), device) for labels in (verbs, nouns)]  # (S, 2)
    weights = _to(torch.stack([1.0 - share, share], dim=1).float(), device)  # (S, 2)
    return EpochPlan(rows=rows, verb_targets=targets[0], noun_targets=targets[1], weights=weights)


def _micro_batch_index(segments: int, settings: StepSettings, device: torch.device) -> tuple[torch.Tensor, int]:
    """(S,) the micro-batch each position of the epoch falls in (each step splits its batch anew), and their count."""
    per_step = math.ceil(settings.batch_size / settings.micro_batch_size)
    position = torch.arange(segments, device=device)  # (S,)
    micro = (position // settings.batch_size) * per_step + (position % settings.batch_size) // settings.micro_batch_size
    full, rest = divmod(segments, settings.batch_size)
    return micro, full * per_step + math.ceil(rest / settings.micro_batch_size)


def draw_cutmix_spans(count: int, frames: int, alpha: float, generator: torch.Generator) -> torch.Tensor | None:
    """``count`` spans round((1 - lam) * T) (half to even), lam ~ Beta(alpha, alpha): (count,) int64 on the
    generator's device (None when alpha is 0). torch has no seeded Beta sampler: numpy's, seeded from ``generator``."""
    if alpha <= 0:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=count)  # (count,)
    return torch.from_numpy(np.rint((1.0 - lam) * frames).astype(np.int64)).to(generator.device)


def cutmix_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                         label_smoothing: float) -> torch.Tensor:
    """CutMix's loss per input, (b,): sum_k weights[:, k] * CE(logits, targets[:, k]) with label smoothing, for
    logits (b, C), targets and weights (b, K) whose weights sum to 1 per input. One log-softmax for all K targets:
    smoothing's term, the mean log-probability, does not depend on the target."""
    log_probs = torch.log_softmax(logits.float(), dim=1)  # (b, C)
    picked = (log_probs.gather(1, targets) * weights).sum(dim=1)  # (b,)
    return -(1.0 - label_smoothing) * picked - label_smoothing * log_probs.mean(dim=1)  # (b,)


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor | None,
                        fraction: float | torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """CutMix's mean loss: (1 - f) * CE(logits, labels) + f * CE(logits, partner_labels), f the partner's share of
    each input (a box's area in finetune), by ``cutmix_cross_entropy``; CE(logits, labels) without partners."""
    if partner_labels is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    fraction = torch.as_tensor(fraction, dtype=torch.float32, device=logits.device)
    weights = torch.stack([1.0 - fraction, fraction]).expand(len(labels), 2)  # (b, 2)
    targets = torch.stack([labels, partner_labels], dim=1)  # (b, 2)
    return cutmix_cross_entropy(logits, targets, weights, label_smoothing).mean()


# ---------------------------------------------------------------------------------------------------- helpers
def _check_labels(split: PackedSplit, name: str, data: TrainingData) -> None:
    if split.verb_labels is None or split.noun_labels is None:
        raise TrainError(f"the {name} split has no labels; train on labelled splits (train, validation)")
    for labels, classes, what in ((split.verb_labels, data.verb_classes, "verb"),
                                  (split.noun_labels, data.noun_classes, "noun")):
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise TrainError(
                f"the {name} split has {what} class ids outside 0..{len(classes) - 1} (max {int(labels.max())}); "
                f"the annotations and the {what} class table do not belong together"
            )


def _to_device(split: PackedSplit, device: torch.device) -> PackedSplit:
    """The split on the device when it fits there; else kept on the CPU (each batch is gathered, then copied)."""
    if split.device == device:
        return split
    try:
        return split.to(device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return split


def _release_host_features(host: PackedSplit | None, moved: PackedSplit | None) -> None:
    """Free ``host``'s feature rows when ``moved`` is a copy of it on another device (nothing else reads them)."""
    if host is not None and moved is not None and moved is not host and moved.device != host.device:
        host.features = host.features.new_empty((0, host.features.shape[1]))  # (0, D)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a tensor; CPU -> GPU copies go through pinned memory without blocking the host (no sync per step)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _unseen_mask(split: PackedSplit, unseen_participants: frozenset[str] | None) -> np.ndarray | None:
    if unseen_participants is None:
        return None
    return np.array([p in unseen_participants for p in split.participant_ids], dtype=bool)  # (S,)
