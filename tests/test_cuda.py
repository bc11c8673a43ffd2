"""The CUDA paths, on tiny synthetic data: extract, stage two's epoch and resume, a finetune step, predict, evaluate.

Run by the GPU check (seconds each on one GPU):

    python -m pytest -m cuda tests/

Without a GPU they are skipped. ``EPICFEAT_TEST_CUDA_DEVICE=cpu python -m pytest -m cuda tests/`` runs the same tests
on the CPU (a rehearsal of the GPU check: everything but the CUDA kernels); what only a GPU shows (bf16 LSTMs in
finetune, a cuda device in the identity) is asserted for the device the tests run on.
"""
import math
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from test_finetune import _recording_dtypes
from test_train_temporal import _config, _data, killed_after_epoch

import epicfeat.finetune as finetune_module
import epicfeat.temporal.train as train_module
from epicfeat.configs import EvaluateConfig, ExtractConfig, FinetuneConfig, PredictConfig, TrainTemporalConfig
from epicfeat.devices import PRECISION_DTYPES
from epicfeat.evaluate import evaluate
from epicfeat.extract import extract_features
from epicfeat.predict import predict
from epicfeat.store import FeatureStore
from epicfeat.temporal.checkpoint import load_checkpoint

DEVICE = torch.device(os.environ.get("EPICFEAT_TEST_CUDA_DEVICE", "cuda"))
CUDA = DEVICE.type == "cuda"
# Deterministic cuBLAS (stage two's --deterministic) needs this before the first cuBLAS call of the process.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
FRAMES, RESIZE, CROP = 4, 72, 64  # tiny clips, as tests/test_finetune.py

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(CUDA and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                              "EPICFEAT_TEST_CUDA_DEVICE=cpu rehearses these tests on the CPU"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def _extract(dataset, cache, device, **settings):
    summary = extract_features(ExtractConfig(**{
        "videos": dataset.videos, "annotations": dataset.annotations, "cache": cache, "weights": "random",
        "resize": RESIZE, "crop": CROP, "batch_size": 8, "precision": "fp32", "fold_bn": False, "decode_workers": 0,
        "device": str(device), "progress": False, **settings}))
    assert summary.ok
    return FeatureStore.open(summary.store)


def _cuda_flags() -> tuple[bool, bool, bool]:
    backends = torch.backends
    return backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark


def _set_cuda_flags(cudnn_tf32: bool, matmul_tf32: bool, cudnn_benchmark: bool) -> None:
    backends = torch.backends
    backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark = \
        cudnn_tf32, matmul_tf32, cudnn_benchmark


@pytest.fixture(scope="module")
def stage_two(synthetic_dataset, tmp_path_factory):
    """Features of the train and validation splits extracted on the device, and a small BiLSTM trained there."""
    root = tmp_path_factory.mktemp("cuda")
    for split in ("train", "validation"):
        _extract(synthetic_dataset, root / "cache", DEVICE, split=split)
    result = train_module.train_temporal(TrainTemporalConfig(
        annotations=synthetic_dataset.annotations, cache=root / "cache", out=root / "temporal", frames=FRAMES,
        hidden=16, layers=1, lstm_dropout=0.0, dropout=0.0, epochs=5, lr=1e-2, warmup_epochs=1, batch_size=4,
        micro_batch_size=4, patience=0, precision="fp32", device=str(DEVICE), progress=False))
    return root, result.best_checkpoint


# ---------------------------------------------------------------------------------------------------- extract
def test_extract_on_the_device_matches_the_cpu_and_leaves_the_cuda_flags_as_they_were(synthetic_dataset, tmp_path):
    video_id = sorted(p.stem for p in synthetic_dataset.videos.rglob("*.MP4"))[0]
    previous = _cuda_flags()
    _set_cuda_flags(True, True, False)  # TF32 on, no autotuning: not what extract runs with
    try:
        device = _extract(synthetic_dataset, tmp_path / "device", DEVICE, video_ids=(video_id,))
        assert _cuda_flags() == (True, True, False)  # put back: a later model of this process computes as before
    finally:
        _set_cuda_flags(*previous)
    cpu = _extract(synthetic_dataset, tmp_path / "cpu", torch.device("cpu"), video_ids=(video_id,))
    assert device.identity.device.startswith(f"{DEVICE.type}-") and device.identity.tf32 is False
    assert device.identity.precision == "fp32"
    assert (device.identity.key() != cpu.identity.key()) == CUDA  # the device is part of a feature set's identity
    on_device, on_cpu = (np.asarray(s.read(video_id).features[:], np.float32) for s in (device, cpu))  # (rows, 2048)
    assert on_device.shape == on_cpu.shape and on_cpu.shape[0] > 10
    # fp32 on both (TF32 off), other kernels: summation order differs, and a stored float16 value may then round
    # to the neighbouring step: one float16 step (2^-10 relative) plus fp32 noise, under 1e-3 of the largest value.
    scale = float(np.abs(on_cpu).max())
    np.testing.assert_allclose(on_device, on_cpu, rtol=2e-3, atol=1e-3 * scale)

    bf16 = _extract(synthetic_dataset, tmp_path / "bf16", DEVICE, video_ids=(video_id,), precision="bf16",
                    fold_bn=None)
    # fold_bn auto: folded on a CPU (1.3x faster there), not on a GPU (0.86x on an H200), recorded resolved
    assert bf16.identity.precision == "bf16" and bf16.identity.fold_bn is (DEVICE.type == "cpu")
    features = np.asarray(bf16.read(video_id).features[:], np.float32)
    # bf16 keeps 8 significant bits; over ResNet50's 53 layers the features move by a few percent, never more.
    assert np.abs(features - on_cpu).mean() <= 0.05 * np.abs(on_cpu).mean()


# ------------------------------------------------------------------------------------------------- stage two
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_stage_two_epoch_on_the_device_computes_in_its_precision_and_resumes_exactly(tmp_path, monkeypatch,
                                                                                       precision):
    seen = set()
    create = train_module.create_temporal_model

    def create_and_record(*args, **kwargs):
        model = create(*args, **kwargs)
        for layer in model.lstm:
            layer.register_forward_pre_hook(
                lambda lstm, inputs: seen.add((inputs[0].device.type, inputs[0].dtype, lstm.weight_ih_l0.dtype)))
        return model

    monkeypatch.setattr(train_module, "create_temporal_model", create_and_record)
    data = _data(60, 30)
    settings = dict(epochs=3, batch_size=16, micro_batch_size=8, dropout=0.5, lstm_dropout=0.3, deterministic=True,
                    precision=precision, device=str(DEVICE))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        straight = train_module.fit(_config(tmp_path, "straight", **settings), data)
    # Each layer's cast bf16 weights lie in one buffer as cuDNN lays them out: cuDNN uses them in place.
    assert not [w for w in caught if "not part of single contiguous chunk" in str(w.message)]
    with killed_after_epoch(1):
        train_module.fit(_config(tmp_path, "resumed", **settings), data)
    resumed = train_module.fit(_config(tmp_path, "resumed", resume=True, **settings), data)

    dtype = PRECISION_DTYPES[precision]
    # bf16 really is bf16 (CUDA autocast would make it fp16); a cuDNN without bf16 LSTMs says so in the notes.
    assert seen == {(DEVICE.type, dtype, dtype)}, straight.notes
    last = load_checkpoint(straight.last_checkpoint)
    assert last.config["precision"] == precision and math.isfinite(straight.history[-1]["train_loss"])
    a, b = last.model_state, load_checkpoint(resumed.last_checkpoint).model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the resumed run is the same run
    timing = ("epoch_seconds", "train_segments_per_s")
    assert [{k: v for k, v in row.items() if k not in timing} for row in resumed.history] == \
        [{k: v for k, v in row.items() if k not in timing} for row in straight.history]


# -------------------------------------------------------------------------------------------------- finetune
def test_a_finetune_epoch_on_the_device_trains_its_lstm_in_bf16(synthetic_dataset, stage_two, tmp_path,
                                                                 monkeypatch):
    """--precision bf16: the backbone under bf16 autocast and the LSTM in bf16 by explicit casts on a GPU (CUDA
    autocast alone ran it in fp16, without loss scaling); a CPU computes in fp32 (FinetuneConfig.precision)."""
    root, checkpoint = stage_two
    seen = []
    clip_model = finetune_module.ClipModel

    def recording_clip_model(*args, **kwargs):
        model = clip_model(*args, **kwargs)
        seen.append(_recording_dtypes(model))  # the hooks' list, filled as the model runs
        return model

    monkeypatch.setattr(finetune_module, "ClipModel", recording_clip_model)
    result = finetune_module.finetune(FinetuneConfig(
        checkpoint=checkpoint, videos=synthetic_dataset.videos, annotations=synthetic_dataset.annotations,
        cache=root / "cache", out=tmp_path / "ft", epochs=1, batch_size=4, micro_batch_size=2, eval_batch_size=8,
        num_workers=0, lr=1e-4, backbone_lr=1e-4, warmup_epochs=0, trainable_stages=1, precision="bf16",
        device=str(DEVICE), progress=False))

    expected = "bf16" if CUDA else "fp32"
    dtype = PRECISION_DTYPES[expected]
    (calls,) = seen
    assert {call for call in calls if call[0] == "lstm"} == {("lstm", True, dtype, dtype),
                                                            ("lstm", False, dtype, dtype)}, result.notes
    assert {call[3] for call in calls if call[0] == "backbone"} == {dtype}  # autocast for the backbone ...
    assert {call[2] for call in calls if call[0] == "head"} == {torch.float32}  # ... and fp32 heads
    assert load_checkpoint(result.last_checkpoint).config["precision"] == expected  # what evaluate runs it in
    row = result.history[-1]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    assert 0 <= row["all_action_accuracy_at_1"] <= 100


# ------------------------------------------------------------------------------------- predict and evaluate
# Both compare the device with the CPU on the same stored features: the backbone's fp32 features agree to a float16
# step, and cuDNN's fp32 LSTM may use TF32 (torch's default for it), so scores agree to about 1e-3, checked at 1e-2.
SCORE_TOLERANCE = 1e-2


def test_predict_on_the_device_gives_the_cpu_timeline(synthetic_dataset, stage_two):
    _, checkpoint = stage_two
    video = min(synthetic_dataset.videos.rglob("*.MP4"))
    every_class = max(len(load_checkpoint(checkpoint).verb_classes), len(load_checkpoint(checkpoint).noun_classes))
    runs = {device: predict(PredictConfig(source=str(video), checkpoint=checkpoint, window_seconds=1.0, stride=2,
                                          max_seconds=4.0, top_k=every_class, device=device, progress=False))
            for device in (str(DEVICE), "cpu")}
    assert runs[str(DEVICE)].error is None
    on_device, on_cpu = runs[str(DEVICE)].predictions, runs["cpu"].predictions
    assert len(on_device) == len(on_cpu) > 3
    for a, b in zip(on_device, on_cpu):
        assert a.time == b.time
        for got, expected in ((dict(a.verbs), dict(b.verbs)), (dict(a.nouns), dict(b.nouns))):
            assert got.keys() == expected.keys()
            assert all(got[name] == pytest.approx(p, abs=SCORE_TOLERANCE) for name, p in expected.items())


def test_evaluate_computes_the_official_metrics_from_logits_on_the_device(synthetic_dataset, stage_two, tmp_path):
    root, checkpoint = stage_two
    runs = {device: evaluate(EvaluateConfig(checkpoints=(checkpoint,), annotations=synthetic_dataset.annotations,
                                            cache=root / "cache", out=tmp_path / device, device=device,
                                            progress=False))
            for device in (str(DEVICE), "cpu")}
    on_device, on_cpu = (pickle.loads(runs[d].results_pickle.read_bytes()) for d in (str(DEVICE), "cpu"))
    assert list(on_device["narration_id"]) == list(on_cpu["narration_id"])
    for scores in ("verb_output", "noun_output"):  # per-segment log-probabilities
        np.testing.assert_allclose(on_device[scores], on_cpu[scores], atol=SCORE_TOLERANCE)
    metrics, cpu_metrics = runs[str(DEVICE)].metrics, runs["cpu"].metrics
    assert metrics.keys() == cpu_metrics.keys() and "all_action_accuracy_at_1" in metrics
    segments = len(on_cpu["narration_id"])
    for key, value in cpu_metrics.items():
        if not math.isnan(value):  # an empty subset is NaN on both
            # A segment whose best classes lie closer than the tolerance may rank them either way: two such
            # segments at most.
            assert metrics[key] == pytest.approx(value, abs=2 * 100 / segments + 1e-9), key
