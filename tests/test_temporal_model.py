"""The temporal model (shapes, pooling, standardisation) and its checkpoints (weights_only, feature-set guard)."""
import pickle
import random

import numpy as np
import pytest
import torch

from epicfeat.errors import EpicfeatError
from epicfeat.temporal.checkpoint import (
    CheckpointError,
    ModelCard,
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
    assert len(model.lstm) == 2 and model.lstm_dropout.p == 0.3  # two stacked BiLSTM layers, dropout between
    assert all(layer.bidirectional and layer.num_layers == 1 and layer.hidden_size == 512 for layer in model.lstm)
    assert (model.lstm[0].input_size, model.lstm[1].input_size) == (2048, 1024)
    assert model.verb_head.in_features == 1024 and model.verb_head.out_features == 97
    assert model.noun_head.out_features == 300


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stacked_bilstm_computes_what_one_two_layer_lstm_with_dropout_did(dtype):
    """Inter-layer dropout is an nn.Dropout between single-layer BiLSTMs (drawing from torch's RNG, which last.pt
    saves; cuDNN's own dropout state is in no checkpoint). On the CPU that is the old nn.LSTM(num_layers=2,
    dropout=p) to the bit: the same initial weights, dropout masks, outputs and gradients, in fp32 and bf16."""
    torch.manual_seed(0)
    model = create_temporal_model(TemporalModelArgs(**ARGS, lstm_dropout=0.4)).train()
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 5, num_layers=2, dropout=0.4, bidirectional=True, batch_first=True)  # the old one
    old = dict(lstm.named_parameters())
    new = {name.replace("_l0", f"_l{k}"): p for k, layer in enumerate(model.lstm) for name, p in layer.named_parameters()}
    assert new.keys() == old.keys() and all(torch.equal(new[name], old[name]) for name in old)
    x = torch.randn(4, 7, 6)
    model.compute_dtype = dtype
    torch.manual_seed(1)
    outputs = model._run_lstm(x)  # (4, 7, 10)
    torch.manual_seed(1)
    expected, _ = torch.func.functional_call(lstm, {name: p.to(dtype) for name, p in old.items()}, (x.to(dtype),))
    assert outputs.dtype == dtype and torch.equal(outputs, expected)
    outputs.float().square().sum().backward()
    expected.float().square().sum().backward()
    assert all(torch.equal(new[name].grad, old[name].grad) for name in old)
    model.eval()
    assert torch.equal(model._run_lstm(x), model._run_lstm(x))  # no dropout in eval mode


def test_cast_lstm_weights_lie_in_one_buffer_in_parameter_order():
    """In bf16 each layer's cast weights are views of one new buffer, laid out as cuDNN keeps an LSTM's weights, so
    cuDNN uses them in place instead of warning "RNN module weights are not part of single contiguous chunk of
    memory" and compacting them at every call (tests/test_cuda.py checks the warning on a GPU)."""
    model = _model()
    model.compute_dtype = torch.bfloat16
    layouts = []

    def record(layer, inputs):
        weights = list(layer.parameters())
        layouts.append(([w.dtype for w in weights], {w.untyped_storage().data_ptr() for w in weights},
                        [w.storage_offset() for w in weights], [w.numel() for w in weights]))

    for layer in model.lstm:
        layer.register_forward_pre_hook(record)
    model(torch.randn(2, 3, 6))
    assert len(layouts) == 2
    for dtypes, storages, offsets, sizes in layouts:
        assert set(dtypes) == {torch.bfloat16} and len(storages) == 1  # one buffer per layer
        assert offsets == [sum(sizes[:k]) for k in range(len(sizes))]  # back to back, in parameter order
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights stay fp32


def test_bad_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling must be one of mean, max, last, attention"):
        TemporalModelArgs(**ARGS, pooling="sum")


def test_last_pooling_reads_forward_end_and_backward_start():
    model = _model("last")
    x = torch.randn(2, 5, 6)
    outputs = model._run_lstm(x)  # (2, 5, 10)
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


def _save(path, model, **card):
    card = ModelCard(**{"config": {"frames": 4, "out": "runs/x"}, "verb_classes": [f"v{i}" for i in range(7)],
                        "noun_classes": [f"n{i}" for i in range(11)], "feature_set": IDENTITY_A,
                        "feature_set_key": "set-a", **card})
    return save_checkpoint(path, model=model, card=card, epoch=3, metrics={"all_action_accuracy_at_1": 12.5},
                           history=[{"epoch": 1, "train_loss": 2.0}])


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
