"""Stage two: train the BiLSTM verb/noun model on cached features, in minutes instead of hours.

Read it top to bottom:

    train_temporal(config)                  the one function `epicfeat train-temporal` calls
      load_training_data(config)            annotations + feature set -> packed train / validation splits
      fit(config, data)                     the training run:
        feature_stats(train)                standardisation statistics, stored inside the model
        for each epoch:
          train_one_epoch(...)              shuffle, TSN-sample T rows per segment, time-span CutMix, AdamW with
                                            gradient accumulation, LR set per optimiser step (warm-up + cosine)
          evaluate(...)                     bin-centre rows, loss and the official EPIC-100 metrics
          best.pt / last.pt, metrics.csv, TensorBoard scalars, early stopping on validation action top-1
        plots (loss, accuracy, lr) and a summary table

Feature-space CutMix. CutMix pastes a rectangle of one image into another and mixes the labels by area. Cached
features have no pixels, so we paste a *time span*: for a batch, draw lam ~ Beta(alpha, alpha), a span of
round((1 - lam) * T) consecutive steps at a random start, and a random partner for every sequence; the span of each
sequence is replaced by its partner's rows at the same steps. The verb and noun losses are then mixed by the span's
actual share of the sequence, span / T:  (1 - span/T) * CE(own labels) + span/T * CE(partner's labels).

Resuming. ``last.pt`` holds the optimiser, the schedule's step, fp16's loss scale and every RNG state (torch CPU
and CUDA, numpy, Python and the sampling generator that shuffles, samples rows and draws CutMix), so
``resume=True`` continues where the run stopped; on the deterministic CPU path the result is bit-identical to an
uninterrupted run.

Precision (``epicfeat.temporal.precision``): the LSTM computes in the precision the run names, by explicit casts
(never CUDA autocast, which runs RNNs in fp16); ``auto`` is resolved once and recorded in config.yaml and the
checkpoints, and validation and ``epicfeat evaluate`` compute in it too.

On a GPU the epoch is a device-side loop: the packed splits are uploaded once (their host copies then freed),
the sampling generator lives on the GPU, and one epoch reads nothing back until its mean losses (see
``train_one_epoch``). Packed splits are cached on disk per feature set and segments (``cached_pack_split``).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from epicfeat.config import atomic_write_text, config_to_dict, save_config
from epicfeat.configs import TrainTemporalConfig
from epicfeat.devices import resolve_device
from epicfeat.errors import EpicfeatError
from epicfeat.temporal.checkpoint import (
    capture_rng_state,
    check_feature_set,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from epicfeat.temporal.data import PackedSplit, cached_pack_split, feature_stats, pack_split
from epicfeat.temporal.model import TemporalModel, create_temporal_model
from epicfeat.temporal.precision import COMPUTE_DTYPES, grad_scaler, resolve_temporal_precision, supported_precision


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
class TrainResult:
    out: Path
    best_checkpoint: Path
    last_checkpoint: Path
    metrics_csv: Path
    plots: tuple[Path, ...]
    tensorboard: Path
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_completed: int
    stopped_early: bool
    history: tuple[dict[str, float], ...]
    pack_summary: dict[str, dict[str, int]]  # split -> PackedSplit.summary (clamped / dropped counts)
    seconds: float
    notes: tuple[str, ...] = ()  # things the user should know (batch capped, videos missing, ...)


# --------------------------------------------------------------------------------------------- entry points
def train_temporal(config: TrainTemporalConfig, *, stop_after_epoch: int | None = None) -> TrainResult:
    """``epicfeat train-temporal``: pack the splits of one feature set and train (or resume) a temporal model.

    ``stop_after_epoch`` ends this call after that epoch as if the job had been killed there (for tests and
    time-boxed jobs); run again with ``resume=True`` to continue on the same schedule.
    """
    return fit(config, load_training_data(config), stop_after_epoch=stop_after_epoch, release_host_copy=True)


def load_training_data(config: TrainTemporalConfig) -> TrainingData:
    """Open the feature set, read the annotations and pack the train (and validation) segments into memory."""
    from epicfeat.data.annotations import EpicAnnotations

    if config.annotations is None:
        raise TrainError("no annotations given: pass --annotations DIR (the folder holding EPIC_100_*.csv)")
    annotations = EpicAnnotations(config.annotations, train_file=config.train_file)
    store = open_feature_set(config.cache, config.feature_set)
    train = _pack(store, annotations.segments(config.train_splits), config.train_splits, config)
    if len(train) == 0:
        raise TrainError(
            f"none of the {config.train_splits} segments has features in feature set {store.path}: extract their "
            f"videos first (epicfeat extract --split train ...), or pick another --feature-set"
        )
    validation = None
    if config.train_splits == "train":
        validation = _pack(store, annotations.segments("validation"), "validation", config)
        if len(validation) == 0:
            raise TrainError(
                f"no validation segment has features in feature set {store.path}: extract them "
                "(epicfeat extract --split validation), or train on --train-splits train+validation (no early stopping)"
            )
    return TrainingData(
        train=train,
        validation=validation,
        verb_classes=tuple(annotations.verbs.keys),
        noun_classes=tuple(annotations.nouns.keys),
        feature_set=store.identity.to_dict(),
        feature_set_key=store.identity.key(),
        tail_verbs=annotations.tail_verbs,
        tail_nouns=annotations.tail_nouns,
        unseen_participants=annotations.unseen_participants("validation") if validation is not None else None,
    )


def _pack(store, segments, name: str, config: TrainTemporalConfig) -> PackedSplit:
    """The packed split, from the on-disk pack cache when ``config.pack_cache`` (16f, 32f and resumes share it)."""
    if config.pack_cache:
        return cached_pack_split(store, segments, name, progress=config.progress)
    return pack_split(store, segments, progress=config.progress)


def open_feature_set(cache: Path, feature_set: str | None):
    """The one feature set a run trains on: ``feature_set`` (a key under ``cache`` or a path), or the only one."""
    from epicfeat.store import FeatureStore

    if feature_set is not None:
        path = Path(feature_set)
        if not path.is_dir():
            path = Path(cache) / feature_set
        if not path.is_dir():
            available = [s.path.name for s in FeatureStore.list_sets(cache)] if Path(cache).is_dir() else []
            raise TrainError(
                f"feature set '{feature_set}' not found (neither a folder nor a key under {cache}); "
                f"available under {cache}: {', '.join(available) or 'none'}"
            )
        return FeatureStore.open(path)
    sets = FeatureStore.list_sets(cache) if Path(cache).is_dir() else []
    if not sets:
        raise TrainError(f"no feature set under {cache}: run `epicfeat extract` first, or pass --cache / --feature-set")
    if len(sets) > 1:
        # Never mix or guess: features from two sets (other weights, fps or crop) are different inputs.
        raise TrainError(
            f"{cache} holds {len(sets)} feature sets ({', '.join(s.path.name for s in sets)}); a run trains on one: "
            "choose it with --feature-set KEY"
        )
    return sets[0]


# ----------------------------------------------------------------------------------------------- the run
def fit(
    config: TrainTemporalConfig,
    data: TrainingData,
    *,
    stop_after_epoch: int | None = None,
    release_host_copy: bool = False,
) -> TrainResult:
    """Train (or resume) a temporal model on ``data``; writes everything into ``config.out``.

    ``release_host_copy``: once a split is on the GPU, drop its host features (``data``'s splits then hold an
    empty (0, D) tensor): the caller hands the data over, and the host RAM (15 GB for EPIC's train split) is free.
    """
    started = time.perf_counter()
    out = Path(config.out)
    best_path, last_path, csv_path = out / "best.pt", out / "last.pt", out / "metrics.csv"
    _check_out_folder(config, last_path)
    config = dataclasses.replace(config, feature_set=data.feature_set_key)  # the resolved config names the set
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    console = _console(config.progress)
    notes: list[str] = []
    # The precision is resolved once (auto -> bf16 / fp32) and recorded: validation and `evaluate` use it too.
    precision = supported_precision(resolve_temporal_precision(config.precision, device), device, notes)
    config = dataclasses.replace(config, precision=precision)
    # What is saved describes the run, not this invocation: `--config out/config.yaml` re-creates it from scratch.
    run_config = config_to_dict(dataclasses.replace(config, resume=False))

    with _determinism(config.deterministic):
        # --- seeds: model init and dropout draw from torch's global RNGs; shuffling, row sampling and CutMix
        # from `generator`, so the data order does not depend on how many dropout masks were drawn.
        _seed_everything(config.seed)
        train_split, val_split = data.train, data.validation
        _check_labels(train_split, "train", data)
        if val_split is not None:
            _check_labels(val_split, "validation", data)

        # --- data onto the device once: an epoch is then index_select on device memory, no loader to wait on
        train_on_device = _to_device(train_split, device, notes)
        val_on_device = _to_device(val_split, device, notes) if val_split is not None else None
        if release_host_copy:
            for host, moved in ((train_split, train_on_device), (val_split, val_on_device)):
                _release_host_features(host, moved)
        # The sampling generator lives with the data: the epoch's order, rows and CutMix are drawn there.
        generator = torch.Generator(device=train_on_device.device).manual_seed(config.seed)

        # --- model, standardised with the training split's statistics (computed where the split is)
        feature_mean, feature_std = feature_stats(train_on_device)
        model_args = config.model_args(
            input_dim=train_split.features.shape[1], n_verbs=len(data.verb_classes), n_nouns=len(data.noun_classes)
        )
        model = create_temporal_model(model_args, feature_mean, feature_std).to(device)
        model.compute_dtype = COMPUTE_DTYPES[precision]
        # Fused AdamW: one kernel for all 17 M parameters on a GPU instead of a loop of small ones.
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                      fused=device.type == "cuda")
        scaler = grad_scaler(precision, device)  # fp16 only; a no-op otherwise

        # --- batches and the learning-rate schedule (per optimiser step)
        batch_size = min(config.batch_size, len(train_split))
        if batch_size < config.batch_size:
            notes.append(
                f"effective batch {config.batch_size} exceeds the {len(train_split)} training segments: every "
                f"optimiser step uses the whole set ({batch_size}); small sets need a smaller --batch-size or more epochs"
            )
        micro_batch_size = min(config.micro_batch_size, batch_size)
        steps_per_epoch = math.ceil(len(train_split) / batch_size)
        schedule = LRSchedule(
            peak=config.lr,
            warmup_steps=round(config.warmup_epochs * steps_per_epoch),
            total_steps=config.epochs * steps_per_epoch,
            min_lr=config.min_lr,
        )

        # --- resume: weights, optimiser, schedule step, history, early-stopping counters and every RNG
        step, history, first_epoch = 0, [], 1
        stopping = EarlyStopping(patience=config.patience, validated=val_split is not None)
        if config.resume:
            checkpoint = load_checkpoint(last_path)
            check_feature_set(checkpoint, data.feature_set)
            _check_resume_config(checkpoint.config, config, last_path)
            state = checkpoint.training_state
            if state["scheduler"]["total_steps"] != schedule.total_steps:
                raise TrainError(
                    f"--resume: {last_path} was trained with {state['scheduler']['total_steps']} optimiser steps in "
                    f"all, this data gives {schedule.total_steps} ({len(train_split)} train segments): the packed train "
                    "split changed (videos added to or missing from the feature set?). Resume with the same data, "
                    "or start a new run in another --out"
                )
            model.load_state_dict(checkpoint.model_state)
            optimizer.load_state_dict(state["optimizer"])
            if scaler.is_enabled() and "grad_scaler" in state:
                scaler.load_state_dict(state["grad_scaler"])
            step = state["scheduler"]["step"]
            history = [dict(row) for row in checkpoint.history]
            first_epoch = checkpoint.epoch + 1
            stopping.load(state)
            _restore_rng(state["rng"], generator, last_path)
            console.print(f"resuming {last_path} after epoch {checkpoint.epoch} (step {step})")
        save_config(dataclasses.replace(config, resume=False), out / "config.yaml")
        unseen = _unseen_mask(val_split, data.unseen_participants) if val_split is not None else None
        for name, split in (("train", train_split), ("validation", val_split)):
            if split is not None and split.summary.get("missing_video_dropped"):
                notes.append(
                    f"{split.summary['missing_video_dropped']} {name} segments dropped: "
                    f"{split.summary.get('missing_videos', '?')} of their videos are not in the feature set "
                    "(run epicfeat extract for them)"
                )
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")

        from torch.utils.tensorboard import SummaryWriter

        # Scalars are written only after an epoch's last.pt, so a resumed run never logs an epoch twice.
        tensorboard = SummaryWriter(str(out / "tensorboard"))
        progress = _EpochProgress(console, enabled=config.progress)
        plots = None
        try:
            for epoch in range(first_epoch, config.epochs + 1):
                if stopping.stopped_early:
                    break
                epoch_started = time.perf_counter()
                first_step = step
                with progress.epoch(epoch, config.epochs, len(train_split)) as advance:
                    train_stats, step = train_one_epoch(
                        model, optimizer, train_split, device_split=train_on_device,
                        frames=config.frames, batch_size=batch_size, micro_batch_size=micro_batch_size,
                        schedule=schedule, step=step, label_smoothing=config.label_smoothing,
                        cutmix_alpha=config.cutmix_alpha, generator=generator, device=device,
                        on_batch=advance, scaler=scaler,
                    )
                train_seconds = time.perf_counter() - epoch_started
                row: dict[str, float] = {"epoch": epoch, "step": step, "lr": schedule(step - 1), **train_stats}
                if val_on_device is not None:
                    val_stats, _, _ = evaluate(
                        model, val_on_device, frames=config.frames, batch_size=config.eval_batch_size,
                        device=device, label_smoothing=config.label_smoothing,
                        tail_verbs=data.tail_verbs, tail_nouns=data.tail_nouns, unseen=unseen,
                    )
                    row.update(val_stats)
                row["train_segments_per_s"] = len(train_split) / train_seconds
                row["epoch_seconds"] = time.perf_counter() - epoch_started
                history.append(row)

                improved = stopping.update(epoch, row)

                checkpoint_fields = dict(
                    model=model, model_args=model_args, config=run_config,
                    verb_classes=data.verb_classes, noun_classes=data.noun_classes,
                    feature_set=data.feature_set, feature_set_key=data.feature_set_key,
                    epoch=epoch, metrics=row, history=history,
                )
                if improved:
                    save_checkpoint(best_path, **checkpoint_fields)
                training_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": {"step": step, **dataclasses.asdict(schedule)},
                    "rng": capture_rng_state(generator),
                    **stopping.state(),
                }
                if scaler.is_enabled():
                    training_state["grad_scaler"] = scaler.state_dict()
                save_checkpoint(last_path, **checkpoint_fields, training_state=training_state)
                _write_csv(csv_path, history)
                plots = _plot(history, out, schedule, step, steps_per_epoch)  # every epoch: a killed job keeps them
                _log_tensorboard(tensorboard, row, schedule, first_step, step)
                progress.report(row, stopping)
                if stop_after_epoch is not None and epoch >= stop_after_epoch:
                    break
        finally:
            tensorboard.close()
    _write_csv(csv_path, history)  # also when a resumed run had nothing left to do (killed before its CSV write)
    if plots is None:  # a resumed run that had no epoch left: draw what its history holds
        plots = _plot(history, out, schedule, step, steps_per_epoch)
    best_row = next((row for row in history if row["epoch"] == stopping.best_epoch), history[-1] if history else {})
    result = TrainResult(
        out=out,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        metrics_csv=csv_path,
        plots=tuple(plots),
        tensorboard=out / "tensorboard",
        best_epoch=stopping.best_epoch,
        best_metrics=dict(best_row),
        epochs_completed=len(history),
        stopped_early=stopping.stopped_early,
        history=tuple(history),
        pack_summary={name: dict(s.summary) for name, s in (("train", train_split), ("validation", val_split)) if s is not None},
        seconds=time.perf_counter() - started,
        notes=tuple(notes),
    )
    if config.progress:
        print_summary(result, console=console)
    return result


# ---------------------------------------------------------------------------------------- one epoch / eval
def train_one_epoch(
    model: TemporalModel,
    optimizer: torch.optim.Optimizer,
    split: PackedSplit,
    *,
    device_split: PackedSplit | None = None,
    frames: int,
    batch_size: int,
    micro_batch_size: int,
    schedule: "LRSchedule",
    step: int,
    label_smoothing: float,
    cutmix_alpha: float,
    generator: torch.Generator,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over ``split`` in a random order; returns the mean losses and the optimiser step count after it.

    Each optimiser step sees ``batch_size`` segments, run as micro-batches whose gradients accumulate (each
    micro-batch's loss is weighted by its share of the step, so the gradient is the batch mean).

    A device-side loop: the epoch's order, every segment's sampled rows, CutMix starts and partners are drawn from
    ``generator`` on the device it lives on (the data's device: ``device_split``, the same split moved there once;
    default ``split``), and features and labels are gathered there, so nothing crosses from the host and nothing
    waits for the GPU between steps. The CutMix spans of the whole epoch come from one host draw at its start
    (torch has no seeded Beta sampler), and the losses are read back once, at its end. ``scaler`` (fp16) scales
    the loss; its overflow check is the one per-step sync, and only fp16 has it.
    """
    device_split = split if device_split is None else device_split
    draw = generator.device  # where random numbers come from: the CPU, or the GPU holding the data
    model.train()
    order = torch.randperm(len(split), generator=generator, device=draw)  # (S,) the epoch's segment order
    full, rest = divmod(len(split), batch_size)
    micro_batches = full * math.ceil(batch_size / micro_batch_size) + math.ceil(rest / micro_batch_size)
    spans = draw_cutmix_spans(micro_batches, frames, cutmix_alpha, generator)  # (M,) or None
    loss_sums = torch.zeros(3, device=device)  # (3,) segment-weighted sums: total, verb, noun
    micro_index = 0
    for batch in order.split(batch_size):  # (B,) each
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        optimizer.zero_grad(set_to_none=True)
        for micro in batch.split(micro_batch_size):  # (b,) each
            segments = micro.to(device_split.device)  # no-op when the generator lives with the data
            rows = device_split.sample_rows(segments, frames, train=True, generator=generator)  # (b, T)
            span = spans[micro_index] if spans is not None else None
            micro_index += 1
            mix = sample_time_cutmix(len(micro), frames, cutmix_alpha, generator, span=span)
            if mix is not None:
                # CutMix on the row indices: pasting the partner's rows of the span before the one gather equals
                # pasting its features after it, without two more (b, T, D) copies.
                rows = apply_time_cutmix(rows.unsqueeze(-1), mix).squeeze(-1)  # (b, T)
            features = device_split.features.index_select(0, rows.reshape(-1))  # (b * T, D) float16
            features = _to(features.reshape(len(micro), frames, -1), device)  # (b, T, D)
            verbs = _to(device_split.verb_labels.index_select(0, segments), device)  # (b,)
            nouns = _to(device_split.noun_labels.index_select(0, segments), device)  # (b,)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                verb_logits, noun_logits = model(features)  # (b, Cv), (b, Cn)
            verb_loss = mixed_cross_entropy(verb_logits.float(), verbs, mix, label_smoothing)
            noun_loss = mixed_cross_entropy(noun_logits.float(), nouns, mix, label_smoothing)
            loss = verb_loss + noun_loss
            weighted = loss * (len(micro) / len(batch))
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
            loss_sums += torch.stack([loss, verb_loss, noun_loss]).detach() * len(micro)
        if scaler is not None:
            scaler.step(optimizer)  # skips the step when fp16 gradients overflowed, then adjusts the scale
            scaler.update()
        else:
            optimizer.step()
        step += 1
        if on_batch is not None:
            on_batch(len(batch))
    total, verb, noun = (loss_sums / len(split)).tolist()  # the epoch's one device sync
    return {"train_loss": total, "train_verb_loss": verb, "train_noun_loss": noun}, step


@torch.inference_mode()
def score_split(
    model: TemporalModel,
    split: PackedSplit,
    *,
    frames: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verb and noun logits of every segment of ``split``, read at its bin-centre rows: (S, Cv), (S, Cn) float32."""
    model.eval()
    verb_logits, noun_logits = [], []
    for begin in range(0, len(split), batch_size):
        segments = torch.arange(begin, min(begin + batch_size, len(split)), device=split.device)  # (B,)
        features = split.gather(segments, frames, train=False).to(device, non_blocking=True)  # (B, T, D)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            verbs, nouns = model(features)  # (B, Cv), (B, Cn)
        verb_logits.append(verbs.float())
        noun_logits.append(nouns.float())
    return torch.cat(verb_logits), torch.cat(noun_logits)  # (S, Cv), (S, Cn)


@torch.inference_mode()
def evaluate(
    model: TemporalModel,
    split: PackedSplit,
    *,
    frames: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    tail_verbs: frozenset[int] | None = None,
    tail_nouns: frozenset[int] | None = None,
    unseen: np.ndarray | None = None,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Score every segment at its bin-centre rows: (loss + official EPIC-100 metrics, verb logits, noun logits).

    The loss uses the training criterion (same label smoothing, no CutMix) so the two loss curves compare.
    Metric names are the official ones (``all_action_accuracy_at_1``, ``tail_*``, ``unseen_*``), in percent.
    """
    from epicfeat.metrics import epic_metrics

    verb_logits_all, noun_logits_all = score_split(
        model, split, frames=frames, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype
    )  # (S, Cv), (S, Cn)
    verb_labels, noun_labels = split.verb_labels.to(device), split.noun_labels.to(device)
    verb_loss = F.cross_entropy(verb_logits_all, verb_labels, label_smoothing=label_smoothing).item()
    noun_loss = F.cross_entropy(noun_logits_all, noun_labels, label_smoothing=label_smoothing).item()
    verb_np, noun_np = verb_logits_all.cpu().numpy(), noun_logits_all.cpu().numpy()
    metrics = epic_metrics(
        verb_np, noun_np, split.verb_labels.cpu().numpy(), split.noun_labels.cpu().numpy(),
        tail_verbs=tail_verbs, tail_nouns=tail_nouns, unseen=unseen,
    )
    stats = {"val_loss": verb_loss + noun_loss, "val_verb_loss": verb_loss, "val_noun_loss": noun_loss}
    return {**stats, **{name: float(value) for name, value in metrics.items()}}, verb_np, noun_np


# ----------------------------------------------------------------------------- schedule and time-span CutMix
@dataclass
class EarlyStopping:
    """The best epoch by validation action top-1, and the stop after ``patience`` epochs without a better one.

    Without validation (``train+validation`` runs) every epoch is the newest best and nothing stops early.
    ``state()`` goes into last.pt's training_state and ``load()`` takes it back, so a resumed run decides the same.
    """

    patience: int  # 0: never stop early
    validated: bool
    best_epoch: int = 0
    best_score: float = -math.inf
    epochs_without_improvement: int = 0
    stopped_early: bool = False

    def update(self, epoch: int, row: dict[str, float]) -> bool:
        """Record epoch ``epoch``'s metrics row; True when it is the new best."""
        score = row["all_action_accuracy_at_1"] if self.validated else float(epoch)
        improved = score > self.best_score
        if improved:
            self.best_epoch, self.best_score, self.epochs_without_improvement = epoch, score, 0
        else:
            self.epochs_without_improvement += 1
        self.stopped_early = self.validated and self.patience > 0 and self.epochs_without_improvement >= self.patience
        return improved

    def state(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_score": self.best_score,
                "epochs_without_improvement": self.epochs_without_improvement, "stopped_early": self.stopped_early}

    def load(self, state: dict[str, Any]) -> None:
        for name in ("best_epoch", "best_score", "epochs_without_improvement", "stopped_early"):
            setattr(self, name, state[name])


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up to ``peak``, then cosine to ``min_lr``.

    warm-up:  lr(s) = peak * (s + 1) / warmup_steps                       for s < warmup_steps
    cosine:   lr(s) = min_lr + (peak - min_lr) * (1 + cos(pi * p)) / 2,   p = (s - warmup_steps) / (total - warmup)
    The first step already moves (peak / warmup_steps, not 0), and the last step's lr is small but not zero.
    """

    peak: float
    warmup_steps: int
    total_steps: int
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(progress, 1.0)
        return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TimeCutMix:
    """One batch's time-span CutMix: steps [start, start + span) of sequence i come from sequence partner[i].

    ``start`` and ``span`` are ints or 0-d int64 tensors on the batch's device (a training step never reads them
    back to the host); a span of 0 mixes nothing.
    """

    partner: torch.Tensor  # (B,) int64, a permutation of the batch
    start: int | torch.Tensor
    span: int | torch.Tensor
    frames: int

    @property
    def fraction(self) -> float | torch.Tensor:
        """Share of each mixed sequence that comes from its partner: the weight of the partner's labels."""
        return self.span / self.frames


def draw_cutmix_spans(count: int, frames: int, alpha: float, generator: torch.Generator) -> torch.Tensor | None:
    """``count`` CutMix spans round((1 - lam) * T), lam ~ Beta(alpha, alpha): (count,) int64 on the generator's
    device, from one host draw (None when alpha is 0: no CutMix).

    torch has no seeded Beta sampler; a numpy Generator seeded from ``generator`` keeps one RNG stream to save.
    Rounding is half-to-even, like Python's round.
    """
    if alpha <= 0:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=count)  # (count,)
    return torch.from_numpy(np.rint((1.0 - lam) * frames).astype(np.int64)).to(generator.device)


def sample_time_cutmix(
    batch: int, frames: int, alpha: float, generator: torch.Generator, *, span: torch.Tensor | None = None
) -> TimeCutMix | None:
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


def mixed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, mix: TimeCutMix | None, label_smoothing: float
) -> torch.Tensor:
    """(1 - f) * CE(logits, labels) + f * CE(logits, labels[partner]), f = the span's fraction (0 without mix)."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if mix is None:
        return loss
    partner_labels = labels[mix.partner.to(labels.device)]  # (B,)
    partner_loss = F.cross_entropy(logits, partner_labels, label_smoothing=label_smoothing)
    return (1.0 - mix.fraction) * loss + mix.fraction * partner_loss


# ---------------------------------------------------------------------------------------------------- helpers
def _supported_autocast(device: torch.device, dtype: torch.dtype | None, notes: list[str]) -> torch.dtype | None:
    """``dtype`` if an LSTM trains under autocast with it here, else None (fp32) with a note saying why.

    cuDNN runs bf16 LSTMs only from version 9.13 on; older builds fall back to a kernel without bf16 and fail.
    A tiny forward/backward finds out before the run instead of crashing in its first step.
    """
    if dtype is None:
        return None
    try:
        probe = torch.nn.LSTM(8, 8, batch_first=True, bidirectional=True).to(device)
        with torch.autocast(device.type, dtype=dtype):
            outputs, _ = probe(torch.ones(2, 3, 8, device=device))  # (2, 3, 16)
        outputs.float().sum().backward()
        return dtype
    except RuntimeError as err:
        notes.append(f"{dtype} autocast LSTMs do not run here ({str(err).splitlines()[0]}); training in fp32")
        return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device


@contextlib.contextmanager
def _determinism(enabled: bool) -> Iterator[None]:
    """Deterministic kernels for the duration of the run; the process's previous settings come back after."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                torch.backends.cudnn.deterministic)
    # cuBLAS needs a fixed workspace to be deterministic; it must be set before the first cuBLAS call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[1], previous[2]


def _check_out_folder(config: TrainTemporalConfig, last_path: Path) -> None:
    if config.resume and not last_path.is_file():
        raise TrainError(f"--resume: {last_path} does not exist; start the run without --resume (or fix --out)")
    if not config.resume and last_path.is_file():
        raise TrainError(
            f"{config.out} already holds a run ({last_path.name}); pass --resume to continue it, or choose a new --out"
        )


#: Keys that may differ between a run and its resumption: where things are and how they run, not what is learned.
_RESUMABLE_CHANGES = frozenset({"resume", "out", "annotations", "cache", "device", "precision", "progress",
                                "eval_batch_size", "pack_cache"})


def _check_resume_config(saved: dict[str, Any], config: TrainTemporalConfig, path: Path) -> None:
    current = config_to_dict(config)
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise TrainError(
            f"--resume: the config differs from the one {path} was trained with ({details}); resume with the "
            f"run's own settings (its config.yaml), or start a new run in another --out"
        )


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


def _to_device(split: PackedSplit, device: torch.device, notes: list[str]) -> PackedSplit:
    """The split on the device when it fits there; else kept on the CPU (each batch is gathered, then copied)."""
    if split.device == device:
        return split
    try:
        return split.to(device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        notes.append(f"{split.features.numel() * 2 / 1e9:.1f} GB of packed features do not fit on {device}: "
                     "batches are gathered on the CPU and copied over (slower)")
        return split


def _release_host_features(host: PackedSplit | None, moved: PackedSplit | None) -> None:
    """Free ``host``'s feature rows when ``moved`` is a copy of it on another device (nothing else reads them)."""
    if host is not None and moved is not None and moved is not host and moved.device != host.device:
        host.features = host.features.new_empty((0, host.features.shape[1]))  # (0, D)


def _restore_rng(state: dict[str, Any], generator: torch.Generator, path: Path) -> None:
    try:
        restore_rng_state(state, generator)
    except RuntimeError as err:  # a CPU generator's state does not fit a CUDA generator, and back
        raise TrainError(
            f"--resume: {path} was trained with its data on another kind of device than {generator.device} "
            f"({str(err).splitlines()[0]}); resume on the same kind of device (--device), or start a new run"
        ) from err


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


def _write_csv(path: Path, history: list[dict[str, float]]) -> None:
    """metrics.csv rewritten whole (atomically) from the history, so a resumed run never duplicates a row."""
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def _plot(history: list[dict[str, float]], out: Path, schedule: LRSchedule, step: int,
          steps_per_epoch: int) -> list[Path]:
    """loss.png, accuracy.png and lr.png of the history so far (the lr curve: every optimiser step up to ``step``)."""
    from epicfeat.temporal.plots import plot_training

    steps = range(step)
    lr_curve = ([s / steps_per_epoch for s in steps], [schedule(s) for s in steps])
    return plot_training(history, out, lr_curve=lr_curve, title=out.name)


def _log_tensorboard(writer, row: dict[str, float], schedule: LRSchedule, first_step: int, step: int) -> None:
    """The lr of every optimiser step of the epoch (x = step), and the epoch's losses / metrics (x = epoch)."""
    epoch = int(row["epoch"])
    for s in range(first_step, step):
        writer.add_scalar("lr", schedule(s), s)
    for name, value in row.items():
        if name in ("epoch", "step", "lr"):
            continue
        group = "loss" if name.endswith("loss") else "speed" if name.endswith(("_per_s", "seconds")) else "accuracy"
        writer.add_scalar(f"{group}/{name}", value, epoch)
    writer.flush()


def _console(enabled: bool):
    from rich.console import Console

    return Console(stderr=True, quiet=not enabled)


class _EpochProgress:
    """One rich progress bar per epoch (segments, segments/s, ETA) and one result line after it."""

    def __init__(self, console, *, enabled: bool):
        self.console, self.enabled = console, enabled

    @contextlib.contextmanager
    def epoch(self, epoch: int, epochs: int, segments: int) -> Iterator[Callable[[int], None]]:
        if not self.enabled:
            yield lambda n: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        bar = Progress(
            TextColumn(f"[bold]epoch {epoch}/{epochs}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("segments  {task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        started = time.perf_counter()
        task = bar.add_task("train", total=segments, rate="")
        with bar:
            def advance(n: int) -> None:
                done = bar.tasks[0].completed + n
                rate = done / max(time.perf_counter() - started, 1e-9)
                bar.update(task, advance=n, rate=f"{rate:,.0f}/s")

            yield advance

    def report(self, row: dict[str, float], stopping: EarlyStopping, details: list[str] | None = None) -> None:
        """One line per epoch: losses and top-1 accuracies, then ``details`` (default: lr, speed, epoch time)."""
        if not self.enabled:
            return
        parts = [f"epoch {int(row['epoch'])}", f"train loss {row['train_loss']:.3f}"]
        if "val_loss" in row:
            parts += [
                f"val loss {row['val_loss']:.3f}",
                f"verb {row['all_verb_accuracy_at_1']:.1f}",
                f"noun {row['all_noun_accuracy_at_1']:.1f}",
                f"action {row['all_action_accuracy_at_1']:.1f}",
            ]
        if details is None:
            details = [f"lr {row['lr']:.2e}", f"{row['train_segments_per_s']:,.0f} seg/s", f"{row['epoch_seconds']:.1f} s"]
        marker = " [green]*best*[/]" if stopping.best_epoch == int(row["epoch"]) else ""
        self.console.print("  ".join(parts + details) + marker, soft_wrap=True)
        if stopping.stopped_early:
            self.console.print(f"early stop: no better validation action top-1 for {stopping.patience} epochs")


def print_summary(result: TrainResult, *, console=None, title: str = "epicfeat train-temporal") -> None:
    """The end-of-run table: best epoch and its metrics, clamped / dropped segments, where everything went."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title, show_header=False)
    table.add_row("epochs completed", f"{result.epochs_completed}" + (" (early stop)" if result.stopped_early else ""))
    table.add_row("best epoch", str(result.best_epoch))
    for name, value in result.best_metrics.items():
        if name.startswith(("all_", "tail_", "unseen_")) or name in ("train_loss", "val_loss"):
            table.add_row(f"  {name}", f"{value:.2f}" if "accuracy" in name else f"{value:.4f}")
    for split, summary in result.pack_summary.items():
        table.add_row(
            f"{split} segments",
            f"{summary.get('segments', 0):,} ({summary.get('empty_clamped', 0)} empty clamped, "
            f"{summary.get('past_end_clamped', 0)} past-end clamped, "
            f"{summary.get('missing_video_dropped', 0)} dropped: video missing)",
        )
    speeds = [row["train_segments_per_s"] for row in result.history if "train_segments_per_s" in row]
    if speeds:
        table.add_row("training speed", f"{np.median(speeds):,.0f} segments/s (median epoch)")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("best checkpoint", str(result.best_checkpoint))
    table.add_row("last checkpoint", str(result.last_checkpoint))
    table.add_row("metrics", str(result.metrics_csv))
    table.add_row("plots", ", ".join(str(p) for p in result.plots))
    table.add_row("tensorboard", f"tensorboard --logdir {result.tensorboard}")
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
