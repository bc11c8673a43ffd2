"""The temporal model (shapes, pooling, standardisation) and its checkpoints (weights_only, feature-set guard)."""
import pickle
import random

import numpy as np
import pytest
import torch

from epicfeat.errors import EpicfeatError
from epicfeat.temporal.checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_feature_set,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from epicfeat.temporal.model import POOLINGS, TemporalModelArgs, create_temporal_model

ARGS = dict(input_dim=6, hidden=5, layers=2, n_verbs=7, n_nouns=11)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning OpenMP threads
    made these runs up to 20x slower (1.4 s vs 25 s measured); the previous setting comes back after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(pooling="mean", **kwargs):
    torch.manual_seed(0)
    return create_temporal_model(TemporalModelArgs(**{**ARGS, "pooling": pooling, **kwargs})).eval()


@pytest.mark.parametrize("pooling", POOLINGS)
def test_forward_shapes_for_every_pooling(pooling):
    model = _model(pooling)
    for frames in (1, 4):
        verbs, nouns = model(torch.randn(3, frames, 6, dtype=torch.float16))
        assert verbs.shape == (3, 7) and nouns.shape == (3, 11)
        assert verbs.dtype == torch.float32 and torch.isfinite(verbs).all() and torch.isfinite(nouns).all()


def test_default_args_are_the_seed_architecture():
    args = TemporalModelArgs(n_verbs=97, n_nouns=300)
    model = create_temporal_model(args)
    assert (args.input_dim, args.hidden, args.layers, args.lstm_dropout, args.dropout, args.pooling) == (
        2048, 512, 2, 0.3, 0.5, "mean")
    assert model.lstm.bidirectional and model.lstm.num_layers == 2 and model.lstm.hidden_size == 512
    assert model.lstm.dropout == 0.3
    assert model.verb_head.in_features == 1024 and model.verb_head.out_features == 97
    assert model.noun_head.out_features == 300


def test_bad_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling must be one of mean, max, last, attention"):
        TemporalModelArgs(**ARGS, pooling="sum")


def test_last_pooling_reads_forward_end_and_backward_start():
    model = _model("last")
    x = torch.randn(2, 5, 6)
    outputs, _ = model.lstm(x)  # (2, 5, 10)
    pooled = model._pool(outputs)
    assert torch.equal(pooled[:, :5], outputs[:, 4, :5])  # forward direction after the last step
    assert torch.equal(pooled[:, 5:], outputs[:, 0, 5:])  # backward direction after reaching step 0


def test_attention_pooling_is_a_convex_combination_over_time():
    model = _model("attention")
    outputs = torch.randn(2, 4, 10)
    pooled = model._pool(outputs)
    weights = torch.softmax(model.attention(outputs), dim=1)  # (2, 4, 1)
    assert torch.allclose(pooled, (weights * outputs).sum(1))
    assert torch.allclose(weights.sum(1), torch.ones(2, 1))


def test_standardisation_is_part_of_the_model_and_its_state_dict():
    mean, std = torch.arange(6.0), torch.full((6,), 4.0)
    torch.manual_seed(0)
    scaled = create_temporal_model(TemporalModelArgs(**ARGS), mean, std).eval()
    torch.manual_seed(0)
    plain = create_temporal_model(TemporalModelArgs(**ARGS)).eval()  # identity scaling, same weights
    x = torch.randn(3, 4, 6) * 4 + mean
    assert torch.allclose(scaled(x)[0], plain((x - mean) / 4)[0], atol=1e-6)
    state = scaled.state_dict()
    assert torch.equal(state["feature_mean"], mean) and torch.equal(state["feature_std"], std)
    with pytest.raises(ValueError, match="both"):
        create_temporal_model(TemporalModelArgs(**ARGS), mean, None)


# ------------------------------------------------------------------------------------------------ checkpoints
IDENTITY_A = {"weights": "random-seed0", "weights_sha": "aaaa", "fps": 10.0, "resize": 128, "crop": 112,
              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "backbone": "resnet50",
              "dtype": "float16", "feature_dim": 6, "precision": "bf16", "decoder": "pyav-test", "device": "cpu",
              "tf32": False, "batch_size": 8, "channels_last": False, "compile": False, "fold_bn": True}
IDENTITY_B = {**IDENTITY_A, "weights": "imagenet1k_v2", "weights_sha": "bbbb"}


def _save(path, model, **overrides):
    fields = dict(
        model=model, model_args=model.args, config={"frames": 4, "out": "runs/x"},
        verb_classes=[f"v{i}" for i in range(7)], noun_classes=[f"n{i}" for i in range(11)],
        feature_set=IDENTITY_A, feature_set_key="set-a", epoch=3,
        metrics={"all_action_accuracy_at_1": 12.5}, history=[{"epoch": 1, "train_loss": 2.0}],
    )
    return save_checkpoint(path, **{**fields, **overrides})


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    model = _model("attention")
    model.set_feature_stats(torch.arange(6.0), torch.full((6,), 2.0))
    path = _save(tmp_path / "best.pt", model)
    raw = torch.load(path, weights_only=True)  # must not need any pickled class
    assert raw["format"] == "epicfeat-temporal-checkpoint" and raw["model_args"]["pooling"] == "attention"
    checkpoint = load_checkpoint(path)
    assert checkpoint.model_args == model.args
    assert checkpoint.verb_classes == tuple(f"v{i}" for i in range(7)) and len(checkpoint.noun_classes) == 11
    assert checkpoint.epoch == 3 and checkpoint.metrics == {"all_action_accuracy_at_1": 12.5}
    assert checkpoint.feature_set_key == "set-a" and checkpoint.training_state is None
    restored = checkpoint.create_model()
    x = torch.randn(2, 4, 6)
    assert torch.equal(restored(x)[1], model(x)[1])
    assert torch.equal(restored.feature_std, torch.full((6,), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp file left behind


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    garbage = tmp_path / "notes.pt"
    garbage.write_bytes(b"this is not a torch file at all")
    with pytest.raises(CheckpointError, match="notes.pt is not an epicfeat temporal checkpoint"):
        load_checkpoint(garbage)
    state_dict_only = tmp_path / "weights.pt"
    torch.save(_model().state_dict(), state_dict_only)
    with pytest.raises(CheckpointError, match="weights.pt is a PyTorch file but not an epicfeat"):
        load_checkpoint(state_dict_only)
    pickled_object = tmp_path / "object.pt"
    torch.save({"optimizer": torch.optim.SGD(_model().parameters(), lr=0.1)}, pickled_object)
    with pytest.raises(CheckpointError, match="object.pt is not an epicfeat temporal checkpoint: it holds Python"):
        load_checkpoint(pickled_object)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    assert issubclass(CheckpointError, EpicfeatError)


def test_checkpoint_from_another_feature_set_is_refused(tmp_path):
    checkpoint = load_checkpoint(_save(tmp_path / "best.pt", _model()))
    check_feature_set(checkpoint, dict(IDENTITY_A, mean=(0.485, 0.456, 0.406)))  # same set (tuple or list): fine
    with pytest.raises(CheckpointError) as err:
        check_feature_set(checkpoint, IDENTITY_B)
    message = str(err.value)
    assert "'set-a'" in message  # the checkpoint's feature set
    assert "imagenet1k_v2" in message  # the other one's key names its weights
    assert "weights, weights_sha" in message and "re-extract" in message and "--feature-set set-a" in message


def test_checkpoint_feature_set_check_with_a_store_identity(tmp_path):
    from epicfeat.store import FeatureSetIdentity

    identity = FeatureSetIdentity.from_dict(IDENTITY_A)
    checkpoint = load_checkpoint(_save(tmp_path / "best.pt", _model(), feature_set=identity.to_dict(),
                                       feature_set_key=identity.key()))
    check_feature_set(checkpoint, identity)
    other = FeatureSetIdentity.from_dict(IDENTITY_B)
    with pytest.raises(CheckpointError, match=f"'{identity.key()}'.*'{other.key()}'"):
        check_feature_set(checkpoint, other)


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture_rng_state(generator)
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=generator))
    restore_rng_state(torch.load(path, weights_only=True), generator)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=generator))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])
    with pytest.raises(pickle.UnpicklingError):  # sanity: the raw numpy state would not load safely
        torch.save({"numpy": np.random.get_state()}, tmp_path / "raw.pt")
        torch.load(tmp_path / "raw.pt", weights_only=True)
