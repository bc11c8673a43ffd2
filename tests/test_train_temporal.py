"""Stage-two training: LR schedule, time-span CutMix, learning a planted temporal signal, exact resume, outputs."""
import contextlib
import csv
import dataclasses
import math

import numpy as np
import pytest
import torch

from epicfeat.store import StoreError
from epicfeat.temporal.checkpoint import CheckpointError, load_checkpoint
from epicfeat.temporal.data import PackedSplit
from epicfeat.temporal.train import (
    LRSchedule,
    StepSettings,
    TrainError,
    TrainingData,
    TrainTemporalConfig,
    cutmix_cross_entropy,
    fit,
    mixed_cross_entropy,
    plan_epoch,
    train_one_epoch,
)
from epicfeat.training import EarlyStopping, EpochLog, TrainingState

N_VERBS, N_NOUNS, DIM = 4, 3, 8
FEATURE_SET = {"weights": "random-seed0", "weights_sha": "0123", "fps": 10.0, "resize": 128, "crop": 112,
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "backbone": "resnet50",
               "dtype": "float16", "feature_dim": DIM, "precision": "bf16"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextlib.contextmanager
def killed_after_epoch(epoch: int):
    """The run inside is killed right after epoch ``epoch``'s files are written (a job's time limit, a SIGKILL): the
    epoch log raises KeyboardInterrupt there, so nothing after that line of the run happens. Tests stop runs this
    way instead of through a parameter of the production entry points."""
    end_epoch = EpochLog.end_epoch

    def end_then_killed(log, row, *args, **kwargs):
        end_epoch(log, row, *args, **kwargs)
        if row["epoch"] >= epoch:
            raise KeyboardInterrupt(f"killed after epoch {epoch}")

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(EpochLog, "end_epoch", end_then_killed)
        yield


# ------------------------------------------------------------------------------------- a planted-signal dataset
def _planted_split(n: int, seed: int) -> PackedSplit:
    """Segments whose verb only the *order* of rows reveals, and whose noun any single row reveals.

    verb bit 0 / bit 1: feature 0 / feature 1 rises (1) or falls (0) across the segment, around a random level,
    so the values of one row have the same distribution for every verb. The noun adds +2 to feature 2 + noun.
    Features are then scaled like random-weight ResNet50 features (mean ~13, std ~14): standardisation matters.
    """
    rng = np.random.default_rng(seed)
    verbs = rng.integers(0, N_VERBS, n)
    nouns = rng.integers(0, N_NOUNS, n)
    counts = rng.integers(6, 20, n)
    rows = []
    for verb, noun, count in zip(verbs, nouns, counts):
        t = np.linspace(-1.0, 1.0, count)  # position in the segment
        x = rng.normal(0.0, 0.2, (count, DIM))
        x[:, 0] += rng.normal() + (2 if verb & 1 else -2) * t
        x[:, 1] += rng.normal() + (2 if verb & 2 else -2) * t
        x[:, 2 + noun] += 2.0
        rows.append(13.0 + 14.0 * x)
    features = torch.tensor(np.concatenate(rows), dtype=torch.float16)  # (R, DIM)
    row_count = torch.tensor(counts, dtype=torch.int64)
    return PackedSplit(
        features=features,
        row_start=torch.cumsum(row_count, 0) - row_count,
        row_count=row_count,
        verb_labels=torch.tensor(verbs, dtype=torch.int64),
        noun_labels=torch.tensor(nouns, dtype=torch.int64),
        narration_ids=[f"P01_01_{i}" for i in range(n)],
        participant_ids=["P01" if i % 4 else "P18" for i in range(n)],
        video_ids=["P01_01"] * n,
        summary={"segments": n, "rows": int(counts.sum()), "empty_clamped": 2, "past_end_clamped": 1,
                 "missing_video_dropped": 0},
        feature_set=FEATURE_SET,
    )


def _data(n_train=400, n_val=200, *, validation=True, feature_set=FEATURE_SET, key="set-a") -> TrainingData:
    return TrainingData(
        train=_planted_split(n_train, seed=1),
        validation=_planted_split(n_val, seed=2) if validation else None,
        verb_classes=tuple(f"verb{i}" for i in range(N_VERBS)),
        noun_classes=tuple(f"noun{i}" for i in range(N_NOUNS)),
        feature_set=feature_set,
        feature_set_key=key,
        unseen_participants=frozenset({"P18"}) if validation else None,
    )


def _config(tmp_path, name="run", **overrides) -> TrainTemporalConfig:
    """The recipe, shrunk: a tiny BiLSTM, a higher lr and few epochs so that each run takes about a second."""
    small = dict(out=tmp_path / name, frames=8, hidden=24, layers=2, lstm_dropout=0.0, dropout=0.1, epochs=12,
                 lr=1e-2, warmup_epochs=1, batch_size=50, micro_batch_size=50, patience=0, device="cpu",
                 precision="fp32", progress=False)
    return TrainTemporalConfig(**{**small, **overrides})


# ------------------------------------------------------------------------------------------------ LR schedule
def test_lr_schedule_warms_up_linearly_then_follows_a_cosine():
    schedule = LRSchedule(peak=1.0, warmup_steps=4, total_steps=12, min_lr=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == 1.0  # cosine starts at the peak
    assert schedule(8) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine: p = 4/8
    assert schedule(11) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))  
    assert schedule(11) == pytest.approx(0.134254, abs=1e-6)  # 0.1 + 0.45 * (1 - 0.92388)
    no_warmup = LRSchedule(peak=2.0, warmup_steps=0, total_steps=3)
    assert [no_warmup(s) for s in range(3)] == pytest.approx([2.0, 1.5, 0.5])  # 1 + cos(pi * s / 3)


def test_training_sets_the_lr_per_step(tmp_path):
    # 40 segments / batch 10 = 4 steps per epoch; 1 warm-up epoch = 4 steps; 3 epochs = 12 steps.
    data = _data(40, 20)
    result = fit(_config(tmp_path, epochs=3, batch_size=10, micro_batch_size=10, lr=0.02), data)
    lrs = [row["lr"] for row in result.history]  # lr of each epoch's last step (steps 3, 7, 11)
    assert [row["step"] for row in result.history] == [4, 8, 12]
    assert lrs == pytest.approx([0.02, 0.01 * (1 + math.cos(math.pi * 3 / 8)), 0.01 * (1 + math.cos(math.pi * 7 / 8))])


# ---------------------------------------------------------------------------------------------------- CutMix
def _distinct_split(segments: int, frames: int) -> PackedSplit:
    """Segment s owns rows s * T ... s * T + T - 1 and has verb s: T bins of one row each sample every row, and
    row // T says whose a row is."""
    count = torch.full((segments,), frames, dtype=torch.int64)
    return PackedSplit(features=torch.arange(segments * frames, dtype=torch.float16).unsqueeze(1),
                       row_start=torch.arange(segments) * frames, row_count=count,
                       verb_labels=torch.arange(segments), noun_labels=torch.arange(segments) % 3,
                       narration_ids=[str(i) for i in range(segments)], participant_ids=["P01"] * segments,
                       video_ids=["P01_01"] * segments)


def test_the_epoch_plan_pastes_a_partners_span_per_micro_batch_and_weights_its_labels_by_the_span():
    frames = 8
    split = _distinct_split(24, frames)
    settings = StepSettings(frames=frames, batch_size=10, micro_batch_size=5, cutmix_alpha=1.0)
    plan = plan_epoch(split, settings, torch.Generator().manual_seed(0), torch.device("cpu"))
    own, partner = plan.verb_targets.T  # (S,) each: the segment at each position of the epoch, its partner
    assert sorted(own.tolist()) == list(range(24))  # every segment once, in a random order
    assert torch.equal(plan.noun_targets, plan.verb_targets % 3)  # the partner's noun too
    assert torch.allclose(plan.weights.sum(1), torch.ones(24))
    # Steps 10 and 20 start new batches: micro-batches are positions 0-4, 5-9, 10-14, 15-19 and 20-23.
    micro_batches = [range(0, 5), range(5, 10), range(10, 15), range(15, 20), range(20, 24)]
    mixed_spans = 0
    for positions in micro_batches:
        members = sorted(own[list(positions)].tolist())
        assert sorted(partner[list(positions)].tolist()) == members  # partners: a permutation of the micro-batch
        pasted = [(plan.rows[p] // frames != own[p]).nonzero().flatten().tolist() for p in positions]
        spans = {round(plan.weights[p, 1].item() * frames) for p in positions}
        assert len(spans) == 1  # one span per micro-batch ...
        (span,) = spans
        for p, steps in zip(positions, pasted):
            if partner[p] != own[p]:  # ... at one start: the partner's rows at those steps, the own rows elsewhere
                assert len(steps) == span and steps == list(range(steps[0], steps[0] + span)) if span else not steps
                assert torch.equal(plan.rows[p], torch.where(plan.rows[p] // frames == own[p],
                                                             own[p] * frames, partner[p] * frames)
                                   + torch.arange(frames))
                mixed_spans += bool(span)
    assert mixed_spans > 5
    without = plan_epoch(split, dataclasses.replace(settings, cutmix_alpha=0.0), torch.Generator().manual_seed(0),
                         torch.device("cpu"))
    assert torch.equal(without.rows // frames, without.verb_targets[:, :1].expand(-1, frames))
    assert torch.equal(without.weights, torch.tensor([[1.0, 0.0]]).expand(24, 2))


def test_cutmix_spans_follow_beta_one_and_fit_the_sequence():
    split = _distinct_split(400, 10)
    settings = StepSettings(frames=10, batch_size=400, micro_batch_size=2, cutmix_alpha=1.0)
    plan = plan_epoch(split, settings, torch.Generator().manual_seed(0), torch.device("cpu"))
    fractions = plan.weights[::2, 1]  # (200,) one per micro-batch
    assert set((fractions * 10).round().tolist()) <= set(range(11))
    assert fractions.mean().item() == pytest.approx(0.5, abs=0.05)  # E[1 - lam] = 1/2 for Beta(1, 1)


def test_cutmix_losses_mix_the_two_cross_entropies_by_the_partners_share():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels, partners = torch.tensor([0, 1]), torch.tensor([1, 0])
    own = (math.log(1 + math.exp(-2)) + math.log(2)) / 2  # CE of rows 0 and 1 against their own labels
    partner = (2 + math.log(1 + math.exp(-2)) + math.log(2)) / 2  # against the partner's labels [1, 0]
    assert mixed_cross_entropy(logits, labels, partners, 0.5, 0.0).item() == pytest.approx(0.5 * own + 0.5 * partner)
    assert mixed_cross_entropy(logits, labels, partners, 0.25, 0.0).item() == pytest.approx(
        0.75 * own + 0.25 * partner)
    assert mixed_cross_entropy(logits, labels, None, 0.0, 0.0).item() == pytest.approx(own)
    # With label smoothing, per input: torch's cross-entropy of each target, mixed.
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 5, (6, 2), generator=torch.Generator().manual_seed(1))
    share = torch.rand(6, generator=torch.Generator().manual_seed(2))
    expected = sum(w * torch.nn.functional.cross_entropy(logits, t, label_smoothing=0.1, reduction="none")
                   for w, t in ((1 - share, targets[:, 0]), (share, targets[:, 1])))
    mixed = cutmix_cross_entropy(logits, targets, torch.stack([1 - share, share], 1), 0.1)
    assert torch.allclose(mixed, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------- learning + outputs
def test_bilstm_learns_verbs_that_only_order_reveals_and_one_frame_does_not(tmp_path):
    data = _data()
    sequence = fit(_config(tmp_path, "t8"), data).history[-1]
    one_frame = fit(_config(tmp_path, "t1", frames=1), data).history[-1]
    # 4 verbs, 3 nouns: chance is 25 % / 33 %.
    assert sequence["all_verb_accuracy_at_1"] >= 90
    assert sequence["all_noun_accuracy_at_1"] >= 90
    assert sequence["all_action_accuracy_at_1"] >= 80
    assert one_frame["all_verb_accuracy_at_1"] <= 45  # one row carries no verb information
    assert one_frame["all_noun_accuracy_at_1"] >= 90  # ...but the model itself works: nouns are learned


def test_run_writes_checkpoints_metrics_plots_and_tensorboard(tmp_path):
    result = fit(_config(tmp_path, epochs=3, train_splits="train"), _data(100, 40))
    out = tmp_path / "run"
    assert result.out == out and result.epochs_completed == 3
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for name in ("train_loss", "val_loss", "lr", "all_verb_accuracy_at_1", "all_noun_accuracy_at_5",
                 "all_action_accuracy_at_1", "unseen_action_accuracy_at_1"):
        assert name in rows[0], name
    assert {p.name for p in result.plots} == {"loss.png", "accuracy.png", "lr.png"}
    for plot in result.plots:
        assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "config.yaml").read_text().count("feature_set: set-a") == 1

    best = load_checkpoint(out / "best.pt")  # weights_only=True inside
    last = load_checkpoint(out / "last.pt")
    assert best.epoch == result.best_epoch and last.epoch == 3
    assert best.metrics["all_action_accuracy_at_1"] == max(float(r["all_action_accuracy_at_1"]) for r in rows)
    assert best.training_state is None and last.training_state["scheduler"]["step"] == 6  # 100 / 50 * 3
    assert best.verb_classes == tuple(f"verb{i}" for i in range(N_VERBS)) and best.feature_set_key == "set-a"
    assert best.config["frames"] == 8 and best.model_args.hidden == 24 and best.model_args.input_dim == DIM
    train_rows = _data(100, 40).train.features.double()  # (R, DIM): the standardisation saved is the train split's
    assert torch.allclose(best.model_state["feature_mean"].double(), train_rows.mean(0), atol=1e-3)
    assert torch.allclose(best.model_state["feature_std"].double(), train_rows.std(0, correction=0), atol=1e-3)
    assert len(last.history) == 3
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png", "best.pt", "config.yaml", "last.pt", "loss.png", "lr.png", "metrics.csv", "tensorboard"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, precision):
    data = _data(60, 30)
    # Accumulation (2 micro-batches per step), dropout and CutMix all on: every RNG stream must come back
    # (and fp16's loss scale).
    settings = dict(epochs=4, batch_size=16, micro_batch_size=8, dropout=0.5, lstm_dropout=0.3, deterministic=True,
                    precision=precision)
    straight = fit(_config(tmp_path, "straight", **settings), data)
    with killed_after_epoch(2):
        fit(_config(tmp_path, "resumed", **settings), data)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt").epoch == 2
    resumed = fit(_config(tmp_path, "resumed", resume=True, **settings), data)

    a = load_checkpoint(tmp_path / "straight" / "last.pt").model_state
    b = load_checkpoint(tmp_path / "resumed" / "last.pt").model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = ("epoch_seconds", "train_segments_per_s")
    strip = lambda history: [{k: v for k, v in row.items() if k not in timing} for row in history]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    assert len((tmp_path / "resumed" / "metrics.csv").read_text().splitlines()) == 1 + 4
    assert not torch.are_deterministic_algorithms_enabled()  # the process setting is restored after the run


def test_resume_refuses_other_feature_sets_changed_recipes_and_overwrites(tmp_path):
    data = _data(40, 20)
    with killed_after_epoch(1):
        fit(_config(tmp_path, epochs=2), data)
    with pytest.raises(TrainError, match="already holds a run.*--resume"):
        fit(_config(tmp_path, epochs=2), data)
    with pytest.raises(TrainError, match=r"lr: 0.01 -> 0.02"):
        fit(_config(tmp_path, epochs=2, lr=0.02, resume=True), data)
    assert "lr: 0.01\n" in (tmp_path / "run" / "config.yaml").read_text()  # a refused resume leaves the run alone
    with pytest.raises(TrainError, match=r"2 optimiser steps in all, this data gives 4 \(60 train segments\)"):
        fit(_config(tmp_path, epochs=2, resume=True), _data(60, 20))  # the packed train split changed size
    other = _data(40, 20, feature_set={**FEATURE_SET, "weights": "imagenet1k_v2", "weights_sha": "4567"}, key="set-b")
    with pytest.raises(CheckpointError, match="trained on feature set 'set-a'.*from feature set"):
        fit(_config(tmp_path, epochs=2, resume=True), other)
    with pytest.raises(TrainError, match="does not exist"):
        fit(_config(tmp_path, "never-started", resume=True), data)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    data = _data(24, 12)
    one_row = dataclasses.replace(  # one row per segment: sampling draws cannot differ between the two runs
        data, train=dataclasses.replace(data.train, row_count=torch.ones(24, dtype=torch.int64)))
    settings = dict(epochs=2, batch_size=12, dropout=0.0, cutmix_alpha=0.0)
    whole = fit(_config(tmp_path, "whole", micro_batch_size=12, **settings), one_row)
    accumulated = fit(_config(tmp_path, "accumulated", micro_batch_size=4, **settings), one_row)
    a = load_checkpoint(whole.last_checkpoint).model_state
    b = load_checkpoint(accumulated.last_checkpoint).model_state
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_early_stopping_on_validation_action_top1(tmp_path):
    # lr ~ 0: validation accuracy never improves after epoch 1, so patience 2 stops after epoch 3.
    result = fit(_config(tmp_path, epochs=10, lr=1e-12, min_lr=0.0, patience=2), _data(40, 20))
    assert result.stopped_early and result.epochs_completed == 3 and result.best_epoch == 1
    assert load_checkpoint(result.last_checkpoint).training_state["stopped_early"] is True


def test_train_plus_validation_and_a_tiny_set(tmp_path):
    # 30 segments with the seed's effective batch of 100: the whole set is one step, and the user is told.
    result = fit(_config(tmp_path, epochs=2, batch_size=100, micro_batch_size=100, train_splits="train+validation"),
                 _data(30, validation=False))
    assert [row["step"] for row in result.history] == [1, 2]
    assert any("exceeds the 30 training segments" in note for note in result.notes)
    assert "val_loss" not in result.history[-1] and result.best_epoch == 2  # no validation: best = last epoch
    assert {p.name for p in result.plots} == {"loss.png", "lr.png"}
    assert load_checkpoint(result.best_checkpoint).epoch == 2


def test_config_keys_are_validated():
    with pytest.raises(ValueError, match="pooling must be one of"):
        TrainTemporalConfig(pooling="sum")
    with pytest.raises(ValueError, match="frames must be >= 1"):
        TrainTemporalConfig(frames=0)
    defaults = TrainTemporalConfig()
    assert (defaults.frames, defaults.lr, defaults.weight_decay, defaults.label_smoothing, defaults.warmup_epochs,
            defaults.epochs, defaults.patience, defaults.batch_size, defaults.cutmix_alpha) == (
        16, 1.5e-4, 1e-4, 0.1, 3, 50, 10, 100, 1.0)


# --------------------------------------------------------------------- through the store, CSVs and the CLI
def _timestamp(seconds: float) -> str:
    return f"00:00:{seconds:05.2f}"


def _write_epic_folder(root, rng) -> None:
    """A tiny EPIC-layout annotation folder: 4 verbs, 3 nouns, 3 train videos, 2 validation videos (P18 unseen)."""
    root.mkdir()
    (root / "EPIC_100_verb_classes.csv").write_text(
        "id,key,instances,category\n" + "".join(f"{i},verb{i},[],c\n" for i in range(N_VERBS)))
    (root / "EPIC_100_noun_classes.csv").write_text(
        "id,key,instances,category\n" + "".join(f"{i},noun{i},[],c\n" for i in range(N_NOUNS)))
    (root / "EPIC_100_tail_verbs.csv").write_text("verb\n3\n")
    (root / "EPIC_100_tail_nouns.csv").write_text("noun\n2\n")
    (root / "EPIC_100_unseen_participant_ids_validation.csv").write_text("participant_id\nP18\n")
    header = "narration_id,participant_id,video_id,start_timestamp,stop_timestamp,start_frame,stop_frame,verb_class,noun_class\n"
    for name, videos in (("EPIC_100_train.csv", ["P01_01", "P01_02", "P02_01"]),
                         ("EPIC_100_validation.csv", ["P01_03", "P18_01"])):
        lines = []
        for video in videos:
            for k in range(10):  # 10 segments of 1.5 s every 2 s
                start = 2.0 * k
                lines.append(f"{video}_{k},{video[:3]},{video},{_timestamp(start)},{_timestamp(start + 1.5)},"
                             f"{int(start * 50)},{int((start + 1.5) * 50)},{rng.integers(N_VERBS)},{rng.integers(N_NOUNS)}\n")
        (root / name).write_text(header + "".join(lines))


def _write_feature_set(cache, weights: str, video_ids, rng):
    from epicfeat.store import FeatureSetIdentity, FeatureStore

    sha = {"imagenet1k_v2": "ef01"}.get(weights, "abcd")  # other weights, other numbers (same sha = same weights)
    identity = FeatureSetIdentity(weights=weights, weights_sha=sha, fps=10.0, resize=128, crop=112,
                                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), feature_dim=DIM,
                                  decoder="pyav-test", device="cpu", tf32=False, batch_size=8,
                                  channels_last=False, compile=False, fold_bn=True)
    store = FeatureStore.create(cache, identity)
    for video_id in video_ids:
        with store.writer(video_id, attrs={"source_fps": 50.0, "duration": 20.0}) as writer:
            writer.append(rng.normal(13, 14, (200, DIM)), np.arange(200) / 10, np.arange(200) * 5)
            writer.commit()
    return identity


def test_cli_trains_on_a_feature_set_and_refuses_to_mix_sets(tmp_path):
    from epicfeat.cli.train_temporal import train_temporal as cli_train_temporal

    rng = np.random.default_rng(0)
    _write_epic_folder(tmp_path / "annotations", rng)
    videos = ["P01_01", "P01_02", "P02_01", "P01_03", "P18_01"]
    identity = _write_feature_set(tmp_path / "cache", "random-seed0", videos, rng)
    small = tmp_path / "small.yaml"
    small.write_text("hidden: 8\nlayers: 1\nmicro_batch_size: 5\nwarmup_epochs: 1\n")
    common = dict(config=small, annotations=tmp_path / "annotations", cache=tmp_path / "cache", frames=4,
                  epochs=2, batch_size=10, device="cpu", progress=False)

    cli_train_temporal(out=tmp_path / "run", **common)
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best.feature_set_key == identity.key() and best.feature_set == identity.to_dict()
    assert best.config["hidden"] == 8 and best.config["frames"] == 4 and best.config["batch_size"] == 10
    assert best.config["feature_set"] == identity.key()  # the resolved config names the set it used
    assert best.verb_classes == ("verb0", "verb1", "verb2", "verb3")
    assert load_checkpoint(tmp_path / "run" / "last.pt").training_state["scheduler"]["step"] == 6  # 30 / 10 * 2
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for name in ("tail_verb_accuracy_at_1", "tail_action_accuracy_at_1", "unseen_action_accuracy_at_1"):
        assert name in rows[0], name

    # A second feature set in the same cache: the run must be told which one, never mix or guess.
    other = _write_feature_set(tmp_path / "cache", "imagenet1k_v2", videos, rng)
    with pytest.raises(StoreError, match="holds 2 feature sets.*--feature-set"):
        cli_train_temporal(out=tmp_path / "run2", **common)
    with pytest.raises(CheckpointError, match=f"trained on feature set '{identity.key()}'.*'{other.key()}'"):
        cli_train_temporal(out=tmp_path / "run", feature_set=other.key(), resume=True, **common)
    with pytest.raises(StoreError, match="feature set 'nope' not found"):
        cli_train_temporal(out=tmp_path / "run3", feature_set="nope", **common)


# --------------------------------------------------------------------------------------------------- precision
def _recording_lstm_dtypes(monkeypatch):
    """Every forward of the run's LSTM, as (training?, input dtype, weight dtype): what the LSTM really computes in."""
    import epicfeat.temporal.train as train_module

    seen = []
    create = train_module.create_temporal_model

    def create_and_record(*args, **kwargs):
        model = create(*args, **kwargs)
        model.lstm[0].register_forward_pre_hook(
            lambda lstm, inputs: seen.append((lstm.training, inputs[0].dtype, lstm.weight_ih_l0.dtype)))
        return model

    monkeypatch.setattr(train_module, "create_temporal_model", create_and_record)
    return seen


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_the_lstm_computes_in_the_precision_asked_for_in_training_and_validation(tmp_path, monkeypatch,
                                                                                  precision, dtype):
    seen = _recording_lstm_dtypes(monkeypatch)
    result = fit(_config(tmp_path, epochs=2, precision=precision), _data(40, 20))
    # 40 segments / batch 50 -> 1 training step per epoch, then 1 validation batch: 2 epochs x (train, eval).
    assert seen == [(True, dtype, dtype), (False, dtype, dtype)] * 2
    last = load_checkpoint(result.last_checkpoint)
    assert last.config["precision"] == precision and all(v.dtype == torch.float32 for v in last.model_state.values())
    scaler = last.training_state.get("grad_scaler")
    assert (scaler is not None and scaler["scale"] > 0) if precision == "fp16" else scaler is None
    assert math.isfinite(result.history[-1]["train_loss"])


def test_bf16_stays_bf16_inside_an_autocast_region(tmp_path):
    """CUDA's autocast recasts RNNs to float16; the model's explicit casts must win over any autocast. CPU autocast
    to float16 stands in for it here: the LSTM still sees bfloat16."""
    from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model

    model = create_temporal_model(TemporalModelArgs(input_dim=DIM, hidden=4, n_verbs=3, n_nouns=2))
    model.compute_dtype = torch.bfloat16
    seen = []
    for layer in model.lstm:  # both layers of the BiLSTM
        layer.register_forward_pre_hook(lambda lstm, inputs: seen.append((inputs[0].dtype, lstm.weight_hh_l0.dtype)))
    with torch.autocast("cpu", dtype=torch.float16):
        verbs, _ = model(torch.randn(2, 3, DIM))
    verbs.float().sum().backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
    assert model.lstm[1].weight_hh_l0.grad.dtype == torch.float32  # fp32 master weights get fp32 gradients


def test_auto_precision_follows_the_device_and_is_recorded(tmp_path, monkeypatch):
    import epicfeat.devices
    from epicfeat.temporal.precision import resolve_temporal_precision

    monkeypatch.setattr(epicfeat.devices, "native_bf16_cpu", lambda *args: False)
    assert resolve_temporal_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_temporal_precision("auto", torch.device("cuda")) == "bf16"  # the path a GPU takes
    monkeypatch.setattr(epicfeat.devices, "native_bf16_cpu", lambda *args: True)
    assert resolve_temporal_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_temporal_precision("fp16", torch.device("cpu")) == "fp16"
    assert TrainTemporalConfig().precision == "auto"
    result = fit(_config(tmp_path, epochs=1, precision="auto"), _data(40, 20))
    assert "precision: bf16" in (tmp_path / "run" / "config.yaml").read_text()
    assert load_checkpoint(result.best_checkpoint).config["precision"] == "bf16"


def test_plots_are_redrawn_after_every_epoch(tmp_path, monkeypatch):
    import epicfeat.temporal.plots as plots
    import epicfeat.temporal.train as train_module

    drawn = []
    draw = plots.plot_training
    monkeypatch.setattr(plots, "plot_training", lambda history, *a, **k: drawn.append(len(history)) or
                        draw(history, *a, **k))
    epochs_run = []
    real_epoch = train_module.train_one_epoch

    def killed_in_epoch_two(*args, **kwargs):
        epochs_run.append(1)
        if len(epochs_run) == 2:
            raise KeyboardInterrupt("the job's time limit")  # a kill: nothing after this line of fit runs
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", killed_in_epoch_two)
    data = _data(40, 20)
    with pytest.raises(KeyboardInterrupt):
        fit(_config(tmp_path, epochs=3), data)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("*.png")) == ["accuracy.png", "loss.png", "lr.png"]  # epoch 1's plots
    first = (out / "accuracy.png").read_bytes()
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    fit(_config(tmp_path, epochs=3, resume=True), data)
    assert (out / "accuracy.png").read_bytes() != first  # epochs 2 and 3 drawn
    assert drawn == [1, 2, 3]  # after every epoch (and not once more at the end)
    assert not list(out.glob(".*partial"))  # PNGs are replaced atomically, no partial file is left


def test_the_host_copy_of_a_split_moved_to_another_device_is_released():
    from epicfeat.temporal.train import _release_host_features  # noqa: PLC2701 - the helper fit uses

    split = _planted_split(10, seed=0)
    moved = split.to("meta")  # stands in for the GPU copy
    _release_host_features(split, moved)
    assert split.features.shape == (0, DIM) and moved.features.shape[0] > 0
    same = _planted_split(10, seed=0)
    _release_host_features(same, same)  # a CPU run trains on the host copy itself: kept
    assert same.features.shape[0] > 0


def test_an_epoch_reads_nothing_back_from_the_device_per_step(monkeypatch):
    """On a GPU every read of a tensor's value by the host (item, tolist, int(t), bool(t), ...) waits for the GPU.
    The epoch's loop may read twice in all (the CutMix seed at its start, the mean losses at its end), however many
    steps it has. Counted on the CPU by wrapping those Tensor methods; SGD because CPU AdamW reads its step count."""
    from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model

    reads = []
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: reads.append(_n) or
                            _o(self, *a, **k))

    def epoch_reads(segments: int) -> list[str]:
        split = _planted_split(segments, seed=3)
        model = create_temporal_model(TemporalModelArgs(input_dim=DIM, hidden=4, n_verbs=N_VERBS, n_nouns=N_NOUNS))
        model.compute_dtype = torch.bfloat16
        state = TrainingState(torch.optim.SGD(model.parameters(), lr=0.1),
                              LRSchedule(peak=0.1, warmup_steps=2, total_steps=20),
                              EarlyStopping(patience=0, validated=False), torch.Generator().manual_seed(0))
        settings = StepSettings(frames=4, batch_size=10, micro_batch_size=5, label_smoothing=0.1, cutmix_alpha=1.0)
        reads.clear()
        train_one_epoch(model, split, state, settings)
        return list(reads)

    assert epoch_reads(20) == epoch_reads(80) == ["__int__", "tolist"]  # 2 steps or 8 steps: the same 2 reads
