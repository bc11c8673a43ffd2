"""The run scaffold's own contract (epicfeat.training): run folder checks, training state round trip, epoch log;
and training's validation (epicfeat.temporal.train.evaluate): the official metrics, one copy of the logits."""
import csv
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from epicfeat.errors import EpicfeatError
from epicfeat.metrics import epic_metrics
from epicfeat.temporal.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from epicfeat.temporal.data import PackedSplit
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model
from epicfeat.temporal.train import evaluate, score_split
from epicfeat.training import (
    EarlyStopping,
    EpochLog,
    LRSchedule,
    RunFolder,
    TrainingState,
    make_console,
    reproducible,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RunError(EpicfeatError):
    """The command's own error class: the scaffold raises it, not a class of its own."""


def _folder(tmp_path, resumable=frozenset({"resume", "out", "device"})) -> RunFolder:
    return RunFolder(tmp_path / "run", error=RunError, resumable=resumable)


# ---------------------------------------------------------------------------------------------- run folder
def test_a_new_run_refuses_a_folder_holding_one_and_resume_needs_one(tmp_path):
    folder = _folder(tmp_path)
    assert (folder.best, folder.last, folder.metrics_csv, folder.tensorboard) == (
        tmp_path / "run" / "best.pt", tmp_path / "run" / "last.pt", tmp_path / "run" / "metrics.csv",
        tmp_path / "run" / "tensorboard")
    folder.check_start(resume=False)  # no folder yet: a new run may start
    with pytest.raises(RunError, match=r"--resume: .*last\.pt does not exist; start the run without --resume"):
        folder.check_start(resume=True)
    folder.out.mkdir()
    folder.last.write_bytes(b"a run")
    with pytest.raises(RunError, match=r"already holds a run \(last\.pt\); pass --resume to continue it, or choose "
                                       r"a new --out"):
        folder.check_start(resume=False)
    folder.check_start(resume=True)
    assert folder.last.read_bytes() == b"a run"  # refusing never touches the finished work


def test_the_resume_config_check_names_every_changed_key_and_what_to_do(tmp_path):
    folder = _folder(tmp_path)
    saved = {"lr": 0.01, "epochs": 5, "device": "cpu", "out": "a", "resume": False}
    # Where things are and how they run may change (the resumable keys); nothing else may.
    folder.check_resume_config(saved, {**saved, "device": "cuda", "out": "b", "resume": True})
    with pytest.raises(RunError) as raised:
        folder.check_resume_config(saved, {**saved, "lr": 0.02, "epochs": 6, "device": "cuda", "seed": 1})
    message = str(raised.value)
    assert "(epochs: 5 -> 6, lr: 0.01 -> 0.02, seed: None -> 1)" in message  # sorted, resumable device left out
    assert message.endswith("resume with the run's own settings (its config.yaml), or start a new run in another --out")
    assert str(folder.last) in message


# ------------------------------------------------------------------------------------------ training state
def _model_and_state(seed: int):
    torch.manual_seed(seed)
    model = create_temporal_model(TemporalModelArgs(input_dim=6, hidden=4, n_verbs=3, n_nouns=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = LRSchedule(peak=1e-2, warmup_steps=2, total_steps=12)
    state = TrainingState(optimizer, schedule, EarlyStopping(patience=3, validated=True), torch.Generator())
    return model, state


def _train_steps(model, state: TrainingState, steps: int) -> list[float]:
    """A few optimiser steps drawing from every RNG a run uses; the losses."""
    losses = []
    for _ in range(steps):
        for group in state.optimizer.param_groups:
            group["lr"] = state.schedule(state.step)
        x = torch.randn(5, 4, 6, generator=state.generator)  # (B, T, D) the sampling generator
        x = x + torch.randn(1) + float(np.random.rand()) + random.random()  # the global torch, numpy, Python RNGs
        model.train()  # dropout draws from torch's global RNG
        verbs, nouns = model(x)  # (5, 3), (5, 2)
        loss = verbs.logsumexp(1).mean() + nouns.logsumexp(1).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.step += 1
        losses.append(loss.item())
    return losses


def _save(path, model, state: TrainingState, epoch: int):
    card = ModelCard(config={}, verb_classes=("a", "b", "c"), noun_classes=("x", "y"), feature_set={},
                     feature_set_key="k")
    return save_checkpoint(path, model=model, card=card, epoch=epoch, metrics={}, history=state.history,
                           training_state=state.capture())


def test_the_training_state_round_trips_bit_exactly_through_last_pt(tmp_path):
    folder = _folder(tmp_path)
    folder.out.mkdir()
    with reproducible(7, deterministic=True):
        model, state = _model_and_state(7)
        _train_steps(model, state, 3)
        state.history = [{"epoch": 1, "all_action_accuracy_at_1": 10.0}]
        state.stopping.update(1, state.history[0])
        _save(folder.last, model, state, epoch=1)
        expected = _train_steps(model, state, 4)  # what the uninterrupted run does next
        expected_weights = {k: v.clone() for k, v in model.state_dict().items()}

        # A new process: other seeds, other weights; then last.pt puts everything back.
        torch.manual_seed(123), np.random.seed(123), random.seed(123)
        resumed_model, resumed = _model_and_state(99)
        checkpoint = load_checkpoint(folder.last)
        resumed.restore(checkpoint, folder, data_changed="")
        resumed_model.load_state_dict(checkpoint.model_state)
        assert (resumed.step, resumed.epoch, resumed.history) == (3, 1, [{"epoch": 1, "all_action_accuracy_at_1": 10.0}])
        assert (resumed.stopping.best_epoch, resumed.stopping.best_score) == (1, 10.0)
        assert _train_steps(resumed_model, resumed, 4) == expected  # the same numbers, bit for bit
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, expected_weights[name]), name


def test_resume_is_refused_when_the_data_gives_another_schedule(tmp_path):
    folder = _folder(tmp_path)
    folder.out.mkdir()
    model, state = _model_and_state(0)
    _save(folder.last, model, state, epoch=1)
    other = TrainingState(state.optimizer, LRSchedule(peak=1e-2, warmup_steps=2, total_steps=16), state.stopping,
                          torch.Generator())
    with pytest.raises(RunError, match=r"was trained with 12 optimiser steps in all, this data gives 16: the data "
                                       r"changed\. Resume with the same data, or start a new run in another --out"):
        other.restore(load_checkpoint(folder.last), folder, data_changed=": the data changed")


def test_remaining_epochs_continue_after_the_last_and_stop_early():
    _, state = _model_and_state(0)
    assert list(state.remaining_epochs(4)) == [1, 2, 3, 4]
    state.epoch = 2  # resumed after epoch 2
    assert list(state.remaining_epochs(4)) == [3, 4]
    ran = []
    for epoch in state.remaining_epochs(10):
        ran.append(epoch)
        state.stopping.update(epoch, {"all_action_accuracy_at_1": 0.0 if epoch > 3 else 5.0})
    assert ran == [3, 4, 5, 6] and state.stopping.stopped_early  # best at 3, then patience 3


# ---------------------------------------------------------------------------------------------- epoch log
def test_the_epoch_log_writes_best_only_when_improved_and_every_file_every_epoch(tmp_path):
    folder = _folder(tmp_path)
    folder.out.mkdir()
    _, state = _model_and_state(0)
    saved = []

    def save(path, *, epoch, metrics, history, training_state=None):
        saved.append((path.name, epoch, len(history), training_state is not None))

    rows = [{"epoch": e, "step": 2 * e, "lr": 0.01, "train_loss": 1.0 / e, "val_loss": 1.0, "all_verb_accuracy_at_1": 1.0,
             "all_noun_accuracy_at_1": 1.0, "all_action_accuracy_at_1": score}
            for e, score in ((1, 5.0), (2, 4.0), (3, 6.0))]
    with EpochLog(folder, make_console(False), progress=False, steps_per_epoch=2, title="t") as log:
        for row in rows:
            first_step, state.step = state.step, int(row["step"])
            log.end_epoch(row, state, save, first_step)
    assert saved == [("best.pt", 1, 1, False), ("last.pt", 1, 1, True), ("last.pt", 2, 2, True),
                     ("best.pt", 3, 3, False), ("last.pt", 3, 3, True)]
    assert (state.epoch, state.stopping.best_epoch, state.best_row()["all_action_accuracy_at_1"]) == (3, 3, 6.0)
    with open(folder.metrics_csv) as f:
        assert [float(r["train_loss"]) for r in csv.DictReader(f)] == [1.0, 0.5, 1.0 / 3]
    assert sorted(p.name for p in log.finish(state)) == ["accuracy.png", "loss.png", "lr.png"]
    assert any(folder.tensorboard.iterdir())
    assert math.isclose(LRSchedule.per_step(lr=0.1, min_lr=0.0, warmup_epochs=1.5, epochs=3, steps_per_epoch=4)(0),
                        0.1 / 6)  # warm-up round(1.5 * 4) = 6 steps


def test_the_epoch_files_are_written_off_the_training_path_and_complete_when_the_log_closes(tmp_path, monkeypatch):
    """end_epoch returns while its CSV, plots and TensorBoard are still being written (a writer thread); leaving
    the log waits for them, and a write that failed is raised there, never lost."""
    import threading

    import epicfeat.temporal.plots as plots

    folder = _folder(tmp_path)
    folder.out.mkdir()
    _, state = _model_and_state(0)
    release, drawing = threading.Event(), threading.Event()
    draw = plots.plot_training

    def slow_plot(*args, **kwargs):
        drawing.set()
        assert release.wait(timeout=60)
        return draw(*args, **kwargs)

    monkeypatch.setattr(plots, "plot_training", slow_plot)
    row = {"epoch": 1, "step": 2, "lr": 0.01, "train_loss": 1.0, "all_action_accuracy_at_1": 5.0}
    with EpochLog(folder, make_console(False), progress=False, steps_per_epoch=2, title="t") as log:
        state.step = 2
        log.end_epoch(row, state, lambda path, **fields: None, 0)
        assert drawing.wait(timeout=60) and not (folder.out / "loss.png").exists()  # returned mid-drawing
        row["train_loss"] = 9.0  # the run goes on with its own copies: the files show the epoch as it ended
        release.set()
    assert sorted(p.name for p in folder.out.glob("*.png")) == ["accuracy.png", "loss.png", "lr.png"]
    with open(folder.metrics_csv) as f:
        assert [float(r["train_loss"]) for r in csv.DictReader(f)] == [1.0]

    monkeypatch.setattr(plots, "plot_training", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError), EpochLog(folder, make_console(False), progress=False, steps_per_epoch=2,
                                                     title="t") as log:
        log.end_epoch(dict(row, epoch=2), state, lambda path, **fields: None, 2)


def test_a_process_that_does_not_write_keeps_the_same_state_and_no_files(tmp_path):
    folder = _folder(tmp_path)
    _, state = _model_and_state(0)
    row = {"epoch": 1, "step": 1, "lr": 0.01, "train_loss": 1.0, "all_action_accuracy_at_1": 5.0}
    with EpochLog(folder, make_console(False), progress=False, steps_per_epoch=1, title="t", writes=False) as log:
        log.end_epoch(row, state, save=None, first_step=0)
    assert (state.history, state.stopping.best_epoch) == ([row], 1)
    assert log.finish(state) == [] and not folder.out.exists()


# ------------------------------------------------------------------------------------- validation (evaluate)
def _split(segments: int) -> PackedSplit:
    """Random features, 3 to 8 rows per segment, random labels of 3 verbs and 2 nouns."""
    generator = torch.Generator().manual_seed(segments)
    counts = torch.randint(3, 9, (segments,), generator=generator)  # (S,)
    return PackedSplit(features=torch.randn(int(counts.sum()), 6, generator=generator).half(),  # (R, 6)
                       row_start=torch.cumsum(counts, 0) - counts, row_count=counts,
                       verb_labels=torch.randint(0, 3, (segments,), generator=generator),
                       noun_labels=torch.randint(0, 2, (segments,), generator=generator),
                       narration_ids=[f"P01_01_{i}" for i in range(segments)], participant_ids=["P01"] * segments,
                       video_ids=["P01_01"] * segments)


def test_validation_metrics_are_the_official_metrics_of_the_scored_logits():
    """One definition: training's validation reports ``epicfeat.metrics.epic_metrics`` (what ``epicfeat evaluate``
    reports) of ``score_split``'s logits, and the training criterion as its loss."""
    model, _ = _model_and_state(3)
    split = _split(40)
    subsets = dict(tail_verbs=frozenset({1}), tail_nouns=frozenset({0}), unseen=np.arange(40) % 3 == 0)
    scoring = dict(frames=4, batch_size=16, device=torch.device("cpu"))
    row = evaluate(model, split, label_smoothing=0.1, **subsets, **scoring)
    verb_logits, noun_logits = score_split(model, split, **scoring)  # (40, 3), (40, 2)
    expected = epic_metrics(verb_logits.numpy(), noun_logits.numpy(), split.verb_labels.numpy(),
                            split.noun_labels.numpy(), **subsets)
    verb_loss = F.cross_entropy(verb_logits, split.verb_labels, label_smoothing=0.1).item()
    noun_loss = F.cross_entropy(noun_logits, split.noun_labels, label_smoothing=0.1).item()
    assert row == {"val_loss": verb_loss + noun_loss, "val_verb_loss": verb_loss, "val_noun_loss": noun_loss,
                   **expected}
    assert len(expected) == 12 and 0 < expected["all_action_accuracy_at_5"] < 100  # every subset, real values


def test_validation_copies_the_logits_to_the_host_once_whatever_the_number_of_batches(monkeypatch):
    """On a GPU each copy or read of a device tensor by the host waits for the GPU. Validation copies the logits of
    all batches in one ``cpu()`` (the labels in one each), then reads only host tensors. Counted on the CPU by
    wrapping those Tensor methods: 2 batches or 8, the same reads."""
    reads = []
    for name in ("cpu", "item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: reads.append(_n) or
                            _o(self, *a, **k))
    model, _ = _model_and_state(3)

    def validation_reads(segments: int) -> list[str]:
        split = _split(segments)
        reads.clear()
        evaluate(model, split, frames=4, batch_size=10, device=torch.device("cpu"))
        return list(reads)

    # the logits, the verb and noun labels; two losses; the host arrays epic_metrics takes
    assert validation_reads(20) == validation_reads(80) == ["cpu"] * 3 + ["item"] * 2 + ["numpy"] * 4


# ------------------------------------------------------------------------------------------------ the walls
def _private_imports(path) -> list[str]:
    """``from epicfeat.x import _name`` lines of one file: another module's private names."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("epicfeat"):
            found += [f"{node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.endswith("__")]  # __version__ is public
    return found


def test_no_module_of_the_package_imports_another_modules_private_names():
    """What two modules share is public (finetune imported seven private helpers of temporal/train.py)."""
    from pathlib import Path

    import epicfeat

    package = Path(epicfeat.__file__).parent
    assert {str(p.relative_to(package)): _private_imports(p) for p in sorted(package.rglob("*.py"))
            if _private_imports(p)} == {}
