"""The temporal heads (lstm, transformer, attentive, mean): shapes and dtypes in every precision, the context marker,
order (mean is blind to it), learning an order-defined verb through the training loop, ONNX export equal to PyTorch."""
import json
import math

import numpy as np
import onnxruntime
import pytest
import torch

from epicfeat.backbone import create_backbone
from epicfeat.configs import HEADS, TrainTemporalConfig
from epicfeat.export import TOLERANCE, ExportConfig, export
from epicfeat.store import FeatureSetIdentity
from epicfeat.temporal.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from epicfeat.temporal.data import Context, PackedSplit, feature_stats
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model
from epicfeat.temporal.train import StepSettings, score_split, train_one_epoch
from epicfeat.training import EarlyStopping, LRSchedule, TrainingState
from test_train_temporal import DIM, N_NOUNS, N_VERBS, _planted_split

SMALL = dict(input_dim=6, frames=4, hidden=5, width=8, depth=2, attention_heads=2, n_verbs=7, n_nouns=11)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(head, **overrides):
    torch.manual_seed(0)
    model = create_temporal_model(TemporalModelArgs(**{**SMALL, "head": head, **overrides}),
                                  torch.rand(6) * 3, torch.rand(6) + 0.5)
    if model.context_marker is not None:
        torch.nn.init.normal_(model.context_marker)  # trained markers are not zero
    return model.eval()


# ------------------------------------------------------------------------------------------ shapes and dtypes
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_head_gives_float32_logits_and_computes_its_layers_in_the_dtype_asked(head, dtype):
    model = _model(head)
    model.compute_dtype = dtype
    seen = []
    layer = {"lstm": model.lstm[0] if head == "lstm" else None, "mean": None,
             "transformer": model.encoder.layers[0].linear1 if head == "transformer" else None,
             "attentive": model.cross_attention if head == "attentive" else None}[head]  # a matmul of the head
    if layer is not None:
        layer.register_forward_hook(lambda module, inputs, out: seen.append(
            (out[0] if isinstance(out, tuple) else out).dtype))
    verbs, nouns = model(torch.randn(3, 4, 6, dtype=torch.float16))
    assert verbs.shape == (3, 7) and nouns.shape == (3, 11)
    assert verbs.dtype == nouns.dtype == torch.float32 and torch.isfinite(verbs).all() and torch.isfinite(nouns).all()
    assert seen == ([dtype] if layer is not None else [])
    if head in ("transformer", "attentive"):  # fp32 means fp32 inside an outer autocast too (a user's)
        model.compute_dtype = torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(3, 4, 6))
        assert seen[-1] == torch.float32


@pytest.mark.parametrize("head", HEADS)
def test_every_head_trains_its_parameters_in_bf16(head):
    model = _model(head).train()
    model.compute_dtype = torch.bfloat16
    verbs, nouns = model(torch.randn(5, 4, 6))
    (verbs.square().mean() + nouns.square().mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None and name != "context_marker"]
    assert missing == [] and all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_the_heads_have_the_sizes_their_args_say():
    transformer = _model("transformer", width=16, depth=3, attention_heads=4)
    assert len(transformer.encoder.layers) == 3 and transformer.encoder.layers[0].norm_first
    assert transformer.encoder.layers[0].self_attn.num_heads == 4 and transformer.positions.shape == (4, 16)
    probe = _model("attentive", width=16, queries=3)
    assert probe.queries.shape == (3, 16) and probe.verb_head.in_features == 48  # the 3 queries' outputs side by side
    assert _model("mean").verb_head.in_features == 6  # a linear classifier of each row
    with pytest.raises(ValueError, match="attention_heads"):
        TemporalModelArgs(**{**SMALL, "width": 10, "attention_heads": 4})
    with pytest.raises(ValueError, match="head must be one of"):
        TemporalModelArgs(**{**SMALL, "head": "gru"})


def test_the_model_args_of_a_config_name_the_head_and_its_context():
    config = TrainTemporalConfig(head="attentive", frames=8, width=64, attention_heads=4, queries=2,
                                 context_seconds=1.5, context_frames=3)
    args = TemporalModelArgs.of_config(config, input_dim=10, n_verbs=3, n_nouns=4)
    assert (args.head, args.frames, args.width, args.attention_heads, args.queries) == ("attentive", 8, 64, 4, 2)
    assert args.context == Context(1.5, 3) and args.sequence_length == 3 + 8 + 3
    no_context = TemporalModelArgs.of_config(TrainTemporalConfig(), input_dim=10, n_verbs=3, n_nouns=4)
    assert no_context.context == Context() and no_context.head == "lstm" and not no_context.fixed_length


# ------------------------------------------------------------------------------------------ order and context
@pytest.mark.parametrize("head", HEADS)
def test_only_the_mean_head_is_blind_to_the_order_of_rows(head):
    model = _model(head)
    x = torch.randn(2, 4, 6)
    forward, backward = model(x)[0], model(x.flip(1))[0]
    if head == "mean":
        torch.testing.assert_close(forward, backward)
    else:
        assert (forward - backward).abs().max() > 1e-4


@pytest.mark.parametrize("head", HEADS)
def test_with_context_every_head_reads_k_t_k_rows_and_tells_the_context_rows_apart(head):
    model = _model(head, context_seconds=2.0, context_frames=2)
    x = torch.randn(2, 2 + 4 + 2, 6)  # (B, K + T + K, D)
    verbs, _ = model(x)
    assert verbs.shape == (2, 7)
    with torch.no_grad():
        model.context_marker.zero_()
    unmarked, _ = model(x)
    assert (verbs - unmarked).abs().max() > 1e-4  # the marker changes what the head sees
    with pytest.raises(ValueError, match=r"reads 8 rows per segment \(K \+ T \+ K = 2 \+ 4 \+ 2\), got 4"):
        model(torch.randn(2, 4, 6))


def test_a_bilstm_without_context_reads_any_number_of_rows_and_the_attention_heads_refuse_another_t():
    assert _model("lstm")(torch.randn(1, 9, 6))[0].shape == (1, 7)
    assert _model("mean")(torch.randn(1, 9, 6))[0].shape == (1, 7)
    with pytest.raises(ValueError, match="reads 4 rows per segment"):
        _model("transformer")(torch.randn(1, 9, 6))


# ------------------------------------------------------------------------------------------------- learning
# _planted_split: segments whose verb only the order of rows reveals, whose noun any row reveals (stage two's).


def _train(head: str, frames: int, train: PackedSplit, validation: PackedSplit, epochs: int = 24) -> dict:
    """``epochs`` of train-temporal's own loop (train_one_epoch) on a small ``head``: validation top-1 (%)."""
    torch.manual_seed(0)
    args = TemporalModelArgs(head=head, input_dim=DIM, frames=frames, hidden=24, lstm_dropout=0.0, width=32,
                             attention_heads=4, attention_dropout=0.0, dropout=0.1, n_verbs=N_VERBS, n_nouns=N_NOUNS)
    model = create_temporal_model(args, *feature_stats(train))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3 if head in ("transformer", "attentive") else 1e-2)
    steps = math.ceil(len(train) / 50)
    state = TrainingState(optimizer, LRSchedule.per_step(lr=optimizer.defaults["lr"], min_lr=0.0, warmup_epochs=1,
                                                         epochs=epochs, steps_per_epoch=steps),
                          EarlyStopping(patience=0, validated=False), torch.Generator().manual_seed(0))
    settings = StepSettings(frames=frames, batch_size=50, micro_batch_size=50)
    for _ in range(epochs):
        train_one_epoch(model, train, state, settings)
    verbs, nouns = score_split(model, validation, frames=frames, batch_size=100, device=torch.device("cpu"))
    return {"verb": 100 * (verbs.argmax(1) == validation.verb_labels).float().mean().item(),
            "noun": 100 * (nouns.argmax(1) == validation.noun_labels).float().mean().item()}


def test_every_head_but_mean_learns_verbs_that_only_order_reveals_and_beats_the_one_frame_baseline():
    train, validation = _planted_split(400, seed=1), _planted_split(200, seed=2)
    one_frame = _train("lstm", 1, train, validation)
    top1 = {head: _train(head, 8, train, validation) for head in HEADS}
    # 4 verbs, 3 nouns: chance is 25 % / 33 %.
    assert one_frame["verb"] <= 45 and one_frame["noun"] >= 90  # one row says nothing about the verb
    for head in ("lstm", "transformer", "attentive"):
        assert top1[head]["verb"] >= 85 and top1[head]["verb"] > one_frame["verb"] + 30, (head, top1)
        assert top1[head]["noun"] >= 90, (head, top1)
    assert top1["mean"]["verb"] <= 45 and top1["mean"]["noun"] >= 90, top1  # order-blind, yet it learns nouns


# --------------------------------------------------------------------------------------------------- export
T, CROP = 4, 56


def _export_checkpoint(path, head, context_frames=0):
    """A tiny ``head`` on a random-seed0 backbone feature set, standardised as training would."""
    backbone = create_backbone("random", seed=0)
    identity = FeatureSetIdentity(weights=backbone.weights_name, weights_sha=backbone.weights_sha, fps=10.0,
                                  resize=64, crop=CROP, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                  precision="fp32", fold_bn=False, decoder="pyav-test", device="cpu", tf32=False,
                                  batch_size=8, channels_last=False, compile=False)
    args = TemporalModelArgs(head=head, frames=T, hidden=8, width=16, attention_heads=4, queries=2, n_verbs=3,
                             n_nouns=4, context_seconds=1.0 if context_frames else 0.0, context_frames=context_frames)
    torch.manual_seed(0)
    model = create_temporal_model(args, torch.rand(2048) * 3, torch.rand(2048) * 0.5 + 0.2)
    if model.context_marker is not None:
        torch.nn.init.normal_(model.context_marker)
    card = ModelCard(config={"frames": T}, verb_classes=("take", "put", "open"),
                     noun_classes=("cup", "knife", "tap", "plate"), feature_set=identity.to_dict(),
                     feature_set_key=identity.key())
    return save_checkpoint(path, model=model, card=card, epoch=1, metrics={}, history=[])


@pytest.mark.parametrize("head, context_frames", [("transformer", 2), ("attentive", 0), ("mean", 1)])  # lstm: test_export
def test_each_heads_onnx_export_equals_pytorch(head, context_frames, tmp_path):
    checkpoint = _export_checkpoint(tmp_path / "best.pt", head, context_frames)
    result = export(ExportConfig(checkpoint=checkpoint, format="onnx", out=tmp_path / "onnx"))
    assert all(0 <= c.max_abs_diff <= c.tolerance and c.matches_predict for c in result.checks)
    rows = T + 2 * context_frames  # K + T + K
    meta = json.loads((tmp_path / "onnx" / "classes.json").read_text())
    assert meta["inputs"]["temporal_head"]["shape"] == [1, rows, 2048]
    assert meta["inputs"]["full_model"]["shape"] == [1, rows, 3, CROP, CROP]
    assert (meta["window"]["head"], meta["window"]["frames"], meta["window"]["rows"]) == (head, T, rows)
    # Independently of export's own check: fresh features through the file and through the checkpoint's model.
    model = load_checkpoint(checkpoint).create_model()
    features = torch.randn(1, rows, 2048, generator=torch.Generator().manual_seed(7)) * 0.5 + 1.5
    with torch.inference_mode():
        verbs, nouns = model(features)
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "temporal_head.onnx"),
                                           providers=["CPUExecutionProvider"])
    got_verbs, got_nouns = session.run(None, {"features": features.numpy()})
    np.testing.assert_allclose(got_verbs, verbs.numpy(), atol=TOLERANCE["temporal_head"])
    np.testing.assert_allclose(got_nouns, nouns.numpy(), atol=TOLERANCE["temporal_head"])
    assert np.ptp(got_verbs) > 1e-3  # distinct logits: a constant model would pass trivially


# ------------------------------------------------------------------------------------------ bench's timings
def test_time_heads_gives_each_heads_epoch_time_model_share_and_parameters():
    from epicfeat.temporal.compare import time_heads

    train = _planted_split(60, seed=1)
    rows = time_heads(train, heads=HEADS, frames=4, batch_size=20, device=torch.device("cpu"),
                      classes=(N_VERBS, N_NOUNS), hidden=8, width=16, attention_heads=4)
    assert [row["head"] for row in rows] == list(HEADS)
    for row in rows:
        assert row["epoch_s"] > 0 and row["model_s"] > 0 and row["model_share"] == row["model_s"] / row["epoch_s"]
        assert (row["steps"], row["segments"], row["rows"]) == (3, 60, 4)
    parameters = {row["head"]: row["parameters"] for row in rows}
    assert parameters["mean"] == (DIM + 1) * (N_VERBS + N_NOUNS)  # two linear classifiers of a row
    assert parameters["lstm"] > parameters["mean"] and parameters["transformer"] > parameters["attentive"]
