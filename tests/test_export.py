"""`epicfeat export`: ONNX (and TorchScript) models reproduce PyTorch within tolerance; clear errors."""
import json
import sys

import numpy as np
import onnxruntime
import pytest
import torch

from epicfeat.backbone import WeightsError, create_backbone
from epicfeat.recipes import resolve_config
from epicfeat.export import TOLERANCE, ExportConfig, ExportError, export
from epicfeat.store import FeatureSetIdentity
from epicfeat.temporal.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model

T, CROP = 4, 56
VERBS, NOUNS = ("take", "put", "open"), ("cup", "knife", "tap", "plate")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checkpoint(path, precision, fold_bn=False):
    """A tiny attention-pooling head on a random-seed0 backbone feature set, with non-trivial feature statistics."""
    backbone = create_backbone("random", seed=0)
    identity = FeatureSetIdentity(weights=backbone.weights_name, weights_sha=backbone.weights_sha, fps=10.0,
                                  resize=64, crop=CROP, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                  precision=precision, fold_bn=fold_bn, decoder="pyav-test", device="cpu", tf32=False,
                                  batch_size=8, channels_last=False, compile=False)
    args = TemporalModelArgs(hidden=8, layers=2, pooling="attention", n_verbs=len(VERBS), n_nouns=len(NOUNS))
    torch.manual_seed(0)
    # Random-weight features at this crop sit around 0..3 with spread ~0.5: standardise them like training would.
    model = create_temporal_model(args, torch.rand(2048) * 3, torch.rand(2048) * 0.5 + 0.2)
    card = ModelCard(config={"frames": T}, verb_classes=VERBS, noun_classes=NOUNS, feature_set=identity.to_dict(),
                     feature_set_key=identity.key())
    return save_checkpoint(path, model=model, card=card, epoch=1, metrics={}, history=[])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", "fp32")


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """The same model on a bf16 feature set (what extract writes on a GPU or a bf16 CPU)."""
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", "bf16")


def test_onnx_export_matches_pytorch(checkpoint, tmp_path):
    config = ExportConfig(checkpoint=checkpoint, format="onnx", out=tmp_path)
    result = export(config)
    assert sorted(p.name for p in result.files) == ["classes.json", "full_model.onnx", "temporal_head.onnx"]
    assert resolve_config(ExportConfig, config_file=tmp_path / "config.yaml") == config  # saved beside the models
    assert [(c.model, c.tolerance) for c in result.checks] == [("temporal_head", TOLERANCE["temporal_head"]),
                                                             ("full_model", TOLERANCE["full_model"])]
    assert all(0 <= c.max_abs_diff <= c.tolerance for c in result.checks)
    # Checked against predict's own path (FrameEncoder.encode + head) too; an fp32 feature set: the same precision.
    assert all(c.matches_predict and 0 <= c.max_abs_diff_vs_predict <= c.tolerance for c in result.checks)
    meta = json.loads((tmp_path / "classes.json").read_text())
    assert meta["verb_classes"] == list(VERBS) and meta["noun_classes"] == list(NOUNS)
    assert meta["preprocessing"] == {
        "resize": 64, "crop": CROP, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "resize_mode": "shorter_side", "crop_mode": "center", "interpolation": "swscale_bilinear", "color": "rgb24",
        "fps": 10.0, "sampling": "each target k / fps takes the first frame at or after it",
        "value_range": "0..255 (uint8 RGB as float32; normalisation is inside full_model)",
        "layout": "NCHW per frame: frames (1, T, 3, crop, crop)", "precision": "fp32", "feature_dtype": "float16",
        "decoder": "pyav-test",
    }
    assert [c["matches_predict"] for c in meta["checks"]] == [True, True]
    assert meta["inputs"]["full_model"]["precision"] == "fp32" and meta["window"]["frames"] == T
    assert meta["inputs"]["full_model"]["shape"] == [1, T, 3, CROP, CROP]
    assert meta["inputs"]["temporal_head"]["shape"] == [1, T, 2048]

    # Independently of export's own check: fresh inputs, both files, against the PyTorch model of the checkpoint.
    loaded = load_checkpoint(checkpoint)
    head = loaded.create_model()
    backbone = create_backbone("random", seed=0)
    generator = torch.Generator().manual_seed(123)
    frames = torch.randint(0, 256, (1, T, 3, CROP, CROP), generator=generator).float()  # RGB 0..255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        features = backbone((frames[0] / 255 - mean) / std).to(torch.float16)  # (T, 2048) as stored
        verbs, nouns = head(features[None])  # (1, Cv), (1, Cn)
    full = onnxruntime.InferenceSession(str(tmp_path / "full_model.onnx"), providers=["CPUExecutionProvider"])
    got_verbs, got_nouns = full.run(None, {"frames": frames.numpy()})
    assert got_verbs.shape == (1, len(VERBS)) and got_nouns.shape == (1, len(NOUNS))
    np.testing.assert_allclose(got_verbs, verbs.numpy(), atol=TOLERANCE["full_model"])
    np.testing.assert_allclose(got_nouns, nouns.numpy(), atol=TOLERANCE["full_model"])
    head_session = onnxruntime.InferenceSession(str(tmp_path / "temporal_head.onnx"),
                                                providers=["CPUExecutionProvider"])
    got_verbs, got_nouns = head_session.run(None, {"features": features.float()[None].numpy()})
    np.testing.assert_allclose(got_verbs, verbs.numpy(), atol=TOLERANCE["temporal_head"])
    np.testing.assert_allclose(got_nouns, nouns.numpy(), atol=TOLERANCE["temporal_head"])
    assert np.ptp(got_verbs) > 1e-3  # distinct logits: a constant model would pass trivially


def test_torchscript_export_matches_pytorch(checkpoint, tmp_path):
    result = export(ExportConfig(checkpoint=checkpoint, format="torchscript", out=tmp_path, check=True))
    assert sorted(p.name for p in result.files) == ["classes.json", "full_model.pt", "temporal_head.pt"]
    assert len(result.checks) == 2 and all(c.max_abs_diff <= c.tolerance for c in result.checks)


def test_a_bf16_feature_set_exports_a_bf16_full_model_that_equals_predict(bf16_checkpoint, tmp_path, capsys):
    """predict computes a bf16 set's backbone in bf16: the TorchScript full model does too and equals predict; the
    ONNX one computes in fp32 (ONNX has no bf16 Conv) and says that it differs, by how much."""
    from epicfeat.export import print_summary

    scripted = export(ExportConfig(checkpoint=bf16_checkpoint, format="torchscript", out=tmp_path / "ts"))
    _, full = scripted.checks
    assert (full.model, full.precision, full.matches_predict) == ("full_model", "bf16", True)
    # The same kernels as predict (same layout, batch and precision), so the same numbers on every CPU kind.
    assert full.max_abs_diff_vs_predict == 0.0
    onnx = export(ExportConfig(checkpoint=bf16_checkpoint, format="onnx", out=tmp_path / "onnx"))
    onnx_full = onnx.checks[1]
    assert (onnx_full.precision, onnx_full.matches_predict) == ("fp32", False)
    assert onnx_full.max_abs_diff <= TOLERANCE["full_model"]  # a faithful export of its fp32 model ...
    # ... which is not predict's: the bf16 rounding of the backbone shows in the logits.
    assert onnx_full.max_abs_diff_vs_predict > 10 * full.max_abs_diff_vs_predict + 1e-4
    meta = json.loads((tmp_path / "onnx" / "classes.json").read_text())
    assert meta["preprocessing"]["precision"] == "bf16" and meta["inputs"]["full_model"]["precision"] == "fp32"
    print_summary(onnx)
    assert "computes in fp32 where the feature set (and predict) use bf16" in capsys.readouterr().out


def test_the_exported_backbone_folds_its_batch_norms_when_the_feature_set_was_extracted_so(checkpoint, tmp_path):
    """extract folds batch norms by default (fold_bn in the identity): export's backbone is then folded too, so its
    features are the cached ones; a set extracted with --no-fold-bn keeps them."""
    from epicfeat.export import build_models

    def norms(path) -> int:
        encoder = build_models(ExportConfig(checkpoint=path, out=tmp_path)).encoder
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())

    folded = _checkpoint(tmp_path / "folded.pt", "fp32", fold_bn=True)
    assert (norms(folded), norms(_checkpoint(tmp_path / "unfolded.pt", "fp32", fold_bn=False)), norms(checkpoint)) \
        == (0, 53, 53)
    result = export(ExportConfig(checkpoint=folded, format="onnx", out=tmp_path / "onnx"))
    assert all(c.max_abs_diff <= c.tolerance and c.matches_predict for c in result.checks)


def test_coreml_export_converts_with_the_declared_interface(checkpoint, tmp_path, monkeypatch):
    ct = pytest.importorskip("coremltools")
    result = export(ExportConfig(checkpoint=checkpoint, format="coreml", out=tmp_path))
    assert sorted(p.name for p in result.files) == ["classes.json", "full_model.mlpackage", "temporal_head.mlpackage"]
    assert result.checks == []  # no numeric check: CoreML runs on macOS only
    assert [(c.model, c.inputs, c.outputs) for c in result.coreml_checks] == [
        ("temporal_head", {"features": [1, T, 2048]}, ["verb_logits", "noun_logits"]),
        ("full_model", {"frames": [1, T, 3, CROP, CROP]}, ["verb_logits", "noun_logits"]),
    ]
    meta = json.loads((tmp_path / "classes.json").read_text())
    assert [c["numeric_parity"] for c in meta["coreml_checks"]] == ["not run: CoreML models run on macOS / iOS only"] * 2

    def unsupported(*args, **kwargs):
        raise RuntimeError("PyTorch convert function for op 'frobnicate' not implemented.\nmore details")

    monkeypatch.setattr(ct, "convert", unsupported)  # what a torch newer than coremltools knows looks like
    with pytest.raises(ExportError) as caught:
        export(ExportConfig(checkpoint=checkpoint, format="coreml", out=tmp_path / "again"))
    message = str(caught.value)
    assert "\n" not in message and f"coremltools {ct.__version__} cannot convert this model with torch" in message
    assert "RuntimeError: PyTorch convert function for op 'frobnicate' not implemented." in message


def test_clear_errors(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # makes `import coremltools` fail, installed or not
    with pytest.raises(ExportError, match="pip install coremltools"):
        export(ExportConfig(checkpoint=checkpoint, format="coreml", out=tmp_path))
    with pytest.raises(WeightsError, match="hash"):
        export(ExportConfig(checkpoint=checkpoint, weights="random", seed=3, out=tmp_path))
    with pytest.raises(Exception, match="does not exist"):
        export(ExportConfig(checkpoint=tmp_path / "nope.pt", out=tmp_path))
    with pytest.raises(ExportError, match="needs opset >= 18"):
        export(ExportConfig(checkpoint=checkpoint, format="onnx", opset=17, out=tmp_path))
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # last: every later export here would need it
    with pytest.raises(ExportError, match=r"needs onnxscript, which epicfeat depends on but this environment lacks: pip install onnxscript"):
        export(ExportConfig(checkpoint=checkpoint, format="onnx", out=tmp_path))


def test_cli_coreml_without_coremltools_is_a_clear_error(checkpoint, tmp_path, monkeypatch):
    from epicfeat.cli.export import export as cli_export

    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(ExportError, match="coremltools, which is not installed"):
        cli_export(checkpoint=checkpoint, format="coreml", out=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before writing anything
