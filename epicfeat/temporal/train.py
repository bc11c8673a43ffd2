"""Stage two: train the BiLSTM verb/noun model on cached features, in minutes instead of hours.

    train_temporal(config)                  the one function `epicfeat train-temporal` calls
      load_training_data(config)            annotations + feature set -> packed train / validation splits
      fit(config, data)                     the run, on the scaffold of ``epicfeat.training``:
        _prepare(...)                       splits onto the device, the standardised model, AdamW, the schedule
        _resume(...)                        last.pt: feature set and config checks, TrainingState.restore
        _train_epochs(...)                  for each epoch left: train_one_epoch, evaluate, EpochLog.end_epoch

CutMix pastes a time span (features have no pixels): a partner's rows over round((1 - lam) * T) steps, the losses
mixed by span / T. The epoch is a device-side loop: splits uploaded once, the sampling generator with them, nothing
read back until the epoch's mean losses.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
from epicfeat.temporal.data import PackedSplit, feature_stats, packed_split
from epicfeat.temporal.model import TemporalModel, TemporalModelArgs, create_temporal_model
from epicfeat.temporal.precision import grad_scaler, resolve_temporal_precision, supported_precision
from epicfeat.training import (EarlyStopping, EpochLog, LRSchedule, RunFolder, TrainingState, TrainResult,
                               make_console, print_summary, reproducible)


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
    cross-entropy with ``label_smoothing``."""

    frames: int
    batch_size: int
    micro_batch_size: int
    label_smoothing: float = 0.0
    cutmix_alpha: float = 0.0


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
    pack = functools.partial(packed_split, store, cache=config.pack_cache, progress=config.progress)
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
    model_args = TemporalModelArgs(
        input_dim=data.train.features.shape[1], hidden=config.hidden, layers=config.layers,
        lstm_dropout=config.lstm_dropout, dropout=config.dropout, pooling=config.pooling,
        n_verbs=len(data.verb_classes), n_nouns=len(data.noun_classes),
    )
    model = create_temporal_model(model_args, *feature_stats(train_on_device)).to(device)
    model.compute_dtype = PRECISION_DTYPES[config.precision]
    # Fused AdamW: one kernel for all 17 M parameters on a GPU instead of a loop of small ones.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    batch_size = min(config.batch_size, len(data.train))
    if batch_size < config.batch_size:
        notes.append(f"effective batch {config.batch_size} exceeds the {len(data.train)} training segments: every "
                     f"optimiser step uses the whole set ({batch_size}); small sets need a smaller --batch-size or "
                     "more epochs")
    settings = StepSettings(frames=config.frames, batch_size=batch_size,
                            micro_batch_size=min(config.micro_batch_size, batch_size),
                            label_smoothing=config.label_smoothing, cutmix_alpha=config.cutmix_alpha)
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    schedule = LRSchedule.per_step(lr=config.lr, min_lr=config.min_lr, warmup_epochs=config.warmup_epochs,
                                   epochs=config.epochs, steps_per_epoch=steps_per_epoch)
    stopping = EarlyStopping(patience=config.patience, validated=data.validation is not None)
    state = TrainingState(optimizer, schedule, stopping, generator,
                          scaler=grad_scaler(config.precision, device))  # fp16 only; a no-op otherwise
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
    save = functools.partial(save_checkpoint, model=run.model, card=card)
    with EpochLog(folder, console, progress=config.progress, steps_per_epoch=run.steps_per_epoch,
                  title=folder.out.name) as log:
        for epoch in run.state.remaining_epochs(config.epochs):
            first_step = run.state.step
            row = _run_epoch(run, epoch, log)
            log.end_epoch(row, run.state, save, first_step)
    return log.finish(run.state)


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
def train_one_epoch(model: TemporalModel, split: PackedSplit, state: TrainingState, settings: StepSettings,
                    on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass over ``split`` in a random order: its mean losses; ``state.step`` counts the optimiser steps.

    Each step's ``batch_size`` segments run as micro-batches whose losses are weighted by their share of the step.
    Order, rows and CutMix are drawn from ``state.generator`` where the split is (the epoch's CutMix spans in one
    host draw at its start); the losses are read back once, at its end (fp16's scaler syncs each step).
    """
    generator, optimizer, scaler = state.generator, state.optimizer, state.scaler
    device = next(model.parameters()).device
    model.train()
    order = torch.randperm(len(split), generator=generator, device=generator.device)  # (S,) the epoch's order
    full, rest = divmod(len(split), settings.batch_size)
    micro_batches = full * math.ceil(settings.batch_size / settings.micro_batch_size) + \
        math.ceil(rest / settings.micro_batch_size)
    spans = draw_cutmix_spans(micro_batches, settings.frames, settings.cutmix_alpha, generator)  # (M,) or None
    loss_sums = torch.zeros(3, device=device)  # (3,) segment-weighted sums: total, verb, noun
    micro_index = 0
    for batch in order.split(settings.batch_size):  # (B,) each
        state.set_lr()
        optimizer.zero_grad(set_to_none=True)
        for micro in batch.split(settings.micro_batch_size):  # (b,) each
            span = spans[micro_index] if spans is not None else None
            micro_index += 1
            losses = _micro_batch_losses(model, split, micro, span, settings, generator, device)  # (3,)
            weighted = losses[0] * (len(micro) / len(batch))
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
            loss_sums += losses.detach() * len(micro)
        if scaler is not None:
            scaler.step(optimizer)  # skips the step when fp16 gradients overflowed, then adjusts the scale
            scaler.update()
        else:
            optimizer.step()
        state.step += 1
        if on_batch is not None:
            on_batch(len(batch))
    total, verb, noun = (loss_sums / len(split)).tolist()  # the epoch's one device sync
    return {"train_loss": total, "train_verb_loss": verb, "train_noun_loss": noun}


def _micro_batch_losses(model: TemporalModel, split: PackedSplit, micro: torch.Tensor, span: torch.Tensor | None,
                        settings: StepSettings, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One micro-batch of segment ids (b,): sampled rows, CutMix, gather, forward; (3,) total, verb, noun losses."""
    frames = settings.frames
    segments = micro.to(split.device)  # no-op when the generator lives with the data
    rows = split.sample_rows(segments, frames, train=True, generator=generator)  # (b, T)
    mix = sample_time_cutmix(len(micro), frames, settings.cutmix_alpha, generator, span=span)
    if mix is not None:
        # CutMix on the row indices: pasting the partner's rows of the span before the one gather equals
        # pasting its features after it, without two more (b, T, D) copies.
        rows = apply_time_cutmix(rows.unsqueeze(-1), mix).squeeze(-1)  # (b, T)
    features = split.features.index_select(0, rows.reshape(-1))  # (b * T, D) float16
    features = _to(features.reshape(len(micro), frames, -1), device)  # (b, T, D)
    verbs = _to(split.verb_labels.index_select(0, segments), device)  # (b,)
    nouns = _to(split.noun_labels.index_select(0, segments), device)  # (b,)
    verb_logits, noun_logits = model(features)  # (b, Cv), (b, Cn)
    partner = mix.partner.to(device) if mix is not None else None  # (b,) each sequence's CutMix partner
    fraction = mix.fraction if mix is not None else 0.0
    verb_loss, noun_loss = (
        mixed_cross_entropy(logits.float(), labels, labels[partner] if partner is not None else None, fraction,
                            settings.label_smoothing)
        for logits, labels in ((verb_logits, verbs), (noun_logits, nouns))
    )
    return torch.stack([verb_loss + noun_loss, verb_loss, noun_loss])  # (3,)


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


# ------------------------------------------------------------------------------------------ time-span CutMix
@dataclass(frozen=True)
class TimeCutMix:
    """Steps [start, start + span) of sequence i come from sequence partner[i] (start, span: ints or 0-d device
    tensors, never read back by a training step; a span of 0 mixes nothing)."""

    partner: torch.Tensor  # (B,) int64, a permutation of the batch
    start: int | torch.Tensor
    span: int | torch.Tensor
    frames: int

    @property
    def fraction(self) -> float | torch.Tensor:
        """Share of each mixed sequence that comes from its partner: the weight of the partner's labels."""
        return self.span / self.frames


def draw_cutmix_spans(count: int, frames: int, alpha: float, generator: torch.Generator) -> torch.Tensor | None:
    """``count`` spans round((1 - lam) * T) (half to even), lam ~ Beta(alpha, alpha): (count,) int64 on the
    generator's device (None when alpha is 0). torch has no seeded Beta sampler: numpy's, seeded from ``generator``."""
    if alpha <= 0:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=count)  # (count,)
    return torch.from_numpy(np.rint((1.0 - lam) * frames).astype(np.int64)).to(generator.device)


def sample_time_cutmix(batch: int, frames: int, alpha: float, generator: torch.Generator, *,
                       span: torch.Tensor | None = None) -> TimeCutMix | None:
    """A batch's CutMix: ``span`` (default: one drawn by ``draw_cutmix_spans``), a start uniform in
    [0, T - span] and a random partner per sequence, all on the generator's device; None without CutMix."""
    if alpha <= 0 or batch < 2:
        return None
    device = generator.device
    if span is None:
        span = draw_cutmix_spans(1, frames, alpha, generator)[0]  # () int64
    uniform = torch.rand((), generator=generator, device=device)  # ()
    start = torch.minimum((uniform * (frames - span + 1)).long(), frames - span)  # () in [0, T - span]
    partner = torch.randperm(batch, generator=generator, device=device)  # (B,)
    return TimeCutMix(partner=partner, start=start, span=span, frames=frames)


def apply_time_cutmix(features: torch.Tensor, mix: TimeCutMix) -> torch.Tensor:
    """features (B, T, D) -> (B, T, D) with each sequence's span replaced by its partner's rows at those steps."""
    steps = torch.arange(features.shape[1], device=features.device)  # (T,)
    start = torch.as_tensor(mix.start, device=features.device)
    inside = (steps >= start) & (steps < start + torch.as_tensor(mix.span, device=features.device))  # (T,)
    partners = features.index_select(0, mix.partner.to(features.device))  # (B, T, D)
    return torch.where(inside[None, :, None], partners, features)  # (B, T, D)


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor | None,
                        fraction: float | torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """CutMix's loss: (1 - f) * CE(logits, labels) + f * CE(logits, partner_labels), f the partner's share of each
    input (a time span here, a box's area in finetune); CE(logits, labels) without partners (no CutMix)."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if partner_labels is None:
        return loss
    partner_loss = F.cross_entropy(logits, partner_labels, label_smoothing=label_smoothing)
    return (1.0 - fraction) * loss + fraction * partner_loss


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
