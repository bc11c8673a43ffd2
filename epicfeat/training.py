"""The run scaffold train-temporal and finetune share: each command keeps its model, data, ``train_one_epoch`` and
``evaluate``; this module owns what every run does around them, in this order:

    folder = RunFolder(config.out, ...); folder.check_start(config.resume)
    with reproducible(config.seed, deterministic=config.deterministic):
        state = TrainingState(optimizer, LRSchedule.per_step(...), EarlyStopping(...), generator, scaler)
        on --resume: folder.check_resume_config(saved, current); state.restore(last.pt, folder, ...)
        with EpochLog(folder, console, ...) as log:
            for epoch in state.remaining_epochs(config.epochs):
                with log.progress_bar(epoch, ...) as advance: the command's train_one_epoch and evaluate -> row
                log.end_epoch(row, state, save, first_step)   best.pt / last.pt, metrics.csv, plots, TensorBoard
        plots = log.finish(state)
    result = TrainResult.of_run(folder, state, ...); print_summary(result)

A resumed run is bit-exact on the deterministic CPU path; only the process that ``writes`` (rank 0) writes files.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from epicfeat.errors import EpicfeatError
from epicfeat.files import atomic_write_text
from epicfeat.temporal import plots
from epicfeat.temporal.checkpoint import Checkpoint, capture_rng_state, restore_rng_state


# ------------------------------------------------------------------------------------------ the run folder
class RunFolder:
    """``out`` of one run: best.pt, last.pt, metrics.csv, tensorboard/, config.yaml, the plots. ``error``: the
    command's exception class; ``resumable``: the config keys a resumption may change (not what is learned)."""

    def __init__(self, out: str | os.PathLike, *, error: type[EpicfeatError], resumable: frozenset[str]):
        self.out = Path(out)
        self.error, self.resumable = error, resumable
        self.best, self.last = self.out / "best.pt", self.out / "last.pt"
        self.metrics_csv, self.tensorboard = self.out / "metrics.csv", self.out / "tensorboard"

    def check_start(self, resume: bool) -> None:
        """--resume needs a run to continue; a new run never overwrites one."""
        if resume and not self.last.is_file():
            raise self.error(f"--resume: {self.last} does not exist; start the run without --resume (or fix --out)")
        if not resume and self.last.is_file():
            raise self.error(
                f"{self.out} already holds a run ({self.last.name}); pass --resume to continue it, or choose a new --out"
            )

    def check_resume_config(self, saved: dict[str, Any], current: dict[str, Any]) -> None:
        """Refuse to resume with a config that changes what is learned; the message names every changed key."""
        changed = sorted(k for k in current if k not in self.resumable and saved.get(k) != current[k])
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise self.error(
                f"--resume: the config differs from the one {self.last} was trained with ({details}); resume with "
                "the run's own settings (its config.yaml), or start a new run in another --out"
            )


# -------------------------------------------------------------------------------- seeds and determinism
@contextlib.contextmanager
def reproducible(seed: int, *, deterministic: bool) -> Iterator[None]:
    """The run's block: global RNGs seeded (model init, dropout), deterministic kernels when asked (restored after)."""
    with determinism(deterministic):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
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


# ------------------------------------------------------------------------------- schedule, early stopping
@dataclass(frozen=True)
class LRSchedule:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up to ``peak``, then cosine to ``min_lr``.

    warm-up:  lr(s) = peak * (s + 1) / warmup_steps                       for s < warmup_steps (never 0)
    cosine:   lr(s) = min_lr + (peak - min_lr) * (1 + cos(pi * p)) / 2,   p = (s - warmup_steps) / (total - warmup)
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

    @classmethod
    def per_step(cls, *, lr: float, min_lr: float, warmup_epochs: float, epochs: int,
                 steps_per_epoch: int) -> LRSchedule:
        """The schedule of a run of ``epochs`` epochs of ``steps_per_epoch`` optimiser steps each."""
        return cls(peak=lr, warmup_steps=round(warmup_epochs * steps_per_epoch), total_steps=epochs * steps_per_epoch,
                   min_lr=min_lr)


@dataclass
class EarlyStopping:
    """The best epoch by validation action top-1, and the stop after ``patience`` epochs without a better one.
    Without validation every epoch is the newest best and nothing stops early. ``state()`` goes into last.pt."""

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

    _STATE = ("best_epoch", "best_score", "epochs_without_improvement", "stopped_early")  # what last.pt keeps

    def state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._STATE}

    def load(self, state: dict[str, Any]) -> None:
        for name in self._STATE:
            setattr(self, name, state[name])


# ---------------------------------------------------------------------------------------- training state
@dataclass
class TrainingState:
    """Where a run stands besides its weights (last.pt's ``training_state`` and history). ``generator``: the run's
    sampling generator; ``scaler``: fp16's loss scaler (None, or disabled, elsewhere); ``epoch``: completed epochs."""

    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    stopping: EarlyStopping
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None = None
    step: int = 0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def capture(self) -> dict[str, Any]:
        """last.pt's training_state: optimiser, schedule step, every RNG state, early stopping, fp16's loss scale."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.step, **dataclasses.asdict(self.schedule)},
            "rng": capture_rng_state(self.generator),
            **self.stopping.state(),
        }
        if self.scaler is not None and self.scaler.is_enabled():
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def restore(self, checkpoint: Checkpoint, folder: RunFolder, *, data_changed: str, console=None) -> None:
        """Continue after ``checkpoint`` (last.pt; the weights are the command's to load): refused when this data
        gives another number of optimiser steps (``data_changed`` says what to suspect)."""
        state = checkpoint.training_state
        saved_steps = state["scheduler"]["total_steps"]
        if saved_steps != self.schedule.total_steps:
            raise folder.error(
                f"--resume: {folder.last} was trained with {saved_steps} optimiser steps in all, this data gives "
                f"{self.schedule.total_steps}{data_changed}. Resume with the same data, or start a new run in "
                "another --out"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a captured step's lr tensor, loaded to the CPU: a number again
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"].item()
        if self.scaler is not None and self.scaler.is_enabled() and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = state["scheduler"]["step"]
        self.history = [dict(row) for row in checkpoint.history]
        self.epoch = checkpoint.epoch
        self.stopping.load(state)
        try:
            restore_rng_state(state["rng"], self.generator)
        except RuntimeError as err:  # a CPU generator's state does not fit a CUDA generator, and back
            raise folder.error(
                f"--resume: {folder.last} was trained with its data on another kind of device than "
                f"{self.generator.device} ({str(err).splitlines()[0]}); resume on the same kind of device (--device), "
                "or start a new run"
            ) from err
        if console is not None:
            console.print(f"resuming {folder.last} after epoch {checkpoint.epoch} (step {self.step})")

    def set_lr(self) -> None:
        """Every parameter group's lr for step ``step``: the schedule's times the group's ``lr_scale`` (default 1);
        an lr held in a tensor (a captured step reads it there) is filled in place."""
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr * group.get("lr_scale", 1.0))
            else:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    def remaining_epochs(self, epochs: int) -> Iterator[int]:
        """The epochs still to run: those after the last completed one, none once early stopping has decided."""
        for epoch in range(self.epoch + 1, epochs + 1):
            if self.stopping.stopped_early:
                return
            yield epoch

    def best_row(self) -> dict[str, float]:
        """The metrics row of the best epoch (the last one when none is marked best yet; {} before any)."""
        fallback = self.history[-1] if self.history else {}
        return dict(next((row for row in self.history if row["epoch"] == self.stopping.best_epoch), fallback))


# --------------------------------------------------------------------------------------------- epoch log
class BackgroundWriter:
    """One thread that writes a run's files in the order they are submitted while training goes on. What it is
    given must not change afterwards (host copies); a failed write is raised by the next ``submit`` or ``wait``."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epicfeat-writer")
        self._pending: list[Future] = []

    def submit(self, write: Callable[..., Any], /, *args, **kwargs) -> Future:
        self._raise_failures(wait=False)
        future = self._pool.submit(write, *args, **kwargs)
        self._pending.append(future)
        return future

    def wait(self) -> None:
        """Until every write submitted so far is on disk."""
        self._raise_failures(wait=True)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def _raise_failures(self, *, wait: bool) -> None:
        done = [f for f in self._pending if wait or f.done()]
        self._pending = [f for f in self._pending if f not in done]
        for future in done:
            future.result()  # re-raises the write's exception here


def host_copy(value: Any) -> Any:
    """``value`` (tensors in nested dicts / lists) with every tensor copied to the host: a snapshot later steps
    cannot change (a CPU tensor is copied too)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(item) for item in value)
    return value


class EpochLog:
    """What a run shows and writes after every epoch: best.pt / last.pt, metrics.csv, the plots, TensorBoard
    scalars (after last.pt, so a resumed run never logs an epoch twice), a progress bar and the epoch's line.
    Only a process that ``writes`` (rank 0) touches files. The CSV, plots and TensorBoard are written by
    ``writer``, off the training's path (a command's ``save`` may use it too); leaving the log waits for them."""

    def __init__(self, folder: RunFolder, console, *, progress: bool, steps_per_epoch: int, title: str,
                 writes: bool = True):
        self.folder, self.console, self.writes = folder, console, writes
        self.steps_per_epoch, self.title = steps_per_epoch, title
        self.shows_progress = progress and writes
        self.plots: list[Path] | None = None  # the PNGs drawn by this call (None: none drawn yet)
        self.writer = BackgroundWriter()
        self._tensorboard = None

    def __enter__(self) -> EpochLog:
        if self.writes:
            self._tensorboard = SummaryWriter(str(self.folder.tensorboard))
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self.writer.close()  # a run that stops (finished, killed by an exception) leaves its files complete
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()

    @contextlib.contextmanager
    def progress_bar(self, epoch: int, epochs: int, segments: int) -> Iterator[Callable[[int], None]]:
        """The epoch's progress bar: a context giving ``advance(n)`` to call after each batch of n segments."""
        if not self.shows_progress:
            yield lambda n: None
            return
        bar = Progress(TextColumn(f"[bold]epoch {epoch}/{epochs}[/]"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("segments  {task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn(), console=self.console, transient=True)
        task = bar.add_task("train", total=segments, rate="")
        started = time.perf_counter()

        def advance(n: int) -> None:  # the bar shows the epoch's rate so far
            rate = (bar.tasks[0].completed + n) / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:,.0f}/s")

        with bar:
            yield advance

    def end_epoch(self, row: dict[str, float], state: TrainingState, save: Callable[..., Any], first_step: int,
                  details: list[str] | None = None) -> None:
        """Record the epoch's ``row``: history, early stopping, then (writing process) best.pt when it is the new
        best, last.pt, metrics.csv, plots, TensorBoard and the epoch line.

        ``save(path, epoch=, metrics=, history=, training_state=None)`` writes the command's checkpoint.
        """
        epoch = int(row["epoch"])
        state.history.append(row)
        state.epoch = epoch
        improved = state.stopping.update(epoch, row)  # every process has the same metrics: all stop together
        if not self.writes:
            return
        history = [dict(r) for r in state.history]  # the writer's copy: the run appends to its own
        fields = {"epoch": epoch, "metrics": dict(row), "history": history}
        if improved:
            save(self.folder.best, **fields)
        save(self.folder.last, **fields, training_state=state.capture())
        self.writer.submit(self._write_files, history, dict(row), state.schedule, first_step, state.step)
        self._report(row, state.stopping, details)

    def finish(self, state: TrainingState) -> list[Path]:
        """metrics.csv and the plots, also when a resumed run had no epoch left (killed before its CSV write)."""
        if not self.writes:
            return []
        self.writer.wait()
        write_csv(self.folder.metrics_csv, state.history)
        if self.plots is None and state.history:
            self.plots = self._plot(state.history, state.schedule, state.step)
        return list(self.plots or [])

    def _write_files(self, history: list[dict[str, float]], row: dict[str, float], schedule: LRSchedule,
                     first_step: int, step: int) -> None:
        """The writer's part of an epoch's end: metrics.csv, the plots, TensorBoard (after last.pt, in order)."""
        write_csv(self.folder.metrics_csv, history)
        self.plots = self._plot(history, schedule, step)
        log_tensorboard(self._tensorboard, row, schedule, first_step, step)

    def _report(self, row: dict[str, float], stopping: EarlyStopping, details: list[str] | None) -> None:
        """One line per epoch: losses and top-1 accuracies, then ``details`` (default: lr, speed, epoch time)."""
        if not self.shows_progress:
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

    def _plot(self, history: list[dict[str, float]], schedule: LRSchedule, step: int) -> list[Path]:
        """loss.png, accuracy.png and lr.png of the history so far (the lr curve: every optimiser step so far)."""
        steps = range(step)
        lr_curve = ([s / self.steps_per_epoch for s in steps], [schedule(s) for s in steps])
        return plots.plot_training(history, self.folder.out, lr_curve=lr_curve, title=self.title)


def write_csv(path: Path, history: list[dict[str, float]]) -> None:
    """metrics.csv rewritten whole (atomically) from the history, so a resumed run never duplicates a row."""
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def log_tensorboard(writer, row: dict[str, float], schedule: LRSchedule, first_step: int, step: int) -> None:
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


def make_console(enabled: bool):
    """The run's console on stderr (quiet without --progress, and on every process but rank 0)."""
    return Console(stderr=True, quiet=not enabled)


# ------------------------------------------------------------------------------------------------ result
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

    @classmethod
    def of_run(cls, folder: RunFolder, state: TrainingState, *, plots: list[Path], best_metrics: dict[str, float],
               pack_summary: dict[str, dict[str, int]], seconds: float, notes: list[str], **extra) -> TrainResult:
        """The result of a run that ended (finished, or stopped early)."""
        return cls(
            out=folder.out, best_checkpoint=folder.best, last_checkpoint=folder.last, metrics_csv=folder.metrics_csv,
            plots=tuple(plots), tensorboard=folder.tensorboard, best_epoch=state.stopping.best_epoch,
            best_metrics=best_metrics, epochs_completed=len(state.history), stopped_early=state.stopping.stopped_early,
            history=tuple(state.history), pack_summary=pack_summary, seconds=seconds, notes=tuple(notes), **extra,
        )


def print_summary(result: TrainResult, *, console=None, title: str = "epicfeat train-temporal") -> None:
    """The end-of-run table: best epoch and its metrics, clamped / dropped segments, where everything went."""
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
