"""`epicfeat export`: ONNX (and TorchScript) models reproduce PyTorch within tolerance; clear errors."""
import json
import sys

import numpy as np
import onnxruntime
import pytest
import torch

from epicfeat.backbone import WeightsError, create_backbone
from epicfeat.config import resolve_config
from epicfeat.export import TOLERANCE, ExportConfig, ExportError, export
from epicfeat.store import FeatureSetIdentity
from epicfeat.temporal.checkpoint import load_checkpoint, save_checkpoint
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model

T, CROP = 4, 56
VERBS, NOUNS = ("take", "put", "open"), ("cup", "knife", "tap", "plate")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny attention-pooling head on a random-seed0 backbone feature set, with non-trivial feature statistics."""
    backbone = create_backbone("random", seed=0)
    identity = FeatureSetIdentity(weights=backbone.weights_name, weights_sha=backbone.weights_sha, fps=10.0,
                                  resize=64, crop=CROP, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                  precision="fp32")
    args = TemporalModelArgs(hidden=8, layers=2, pooling="attention", n_verbs=len(VERBS), n_nouns=len(NOUNS))
    torch.manual_seed(0)
    # Random-weight features at this crop sit around 0..3 with spread ~0.5: standardise them like training would.
    model = create_temporal_model(args, torch.rand(2048) * 3, torch.rand(2048) * 0.5 + 0.2)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "best.pt", model=model, model_args=args, config={"frames": T},
        verb_classes=VERBS, noun_classes=NOUNS, feature_set=identity.to_dict(), feature_set_key=identity.key(),
        epoch=1, metrics={}, history=[],
    )


def test_onnx_export_matches_pytorch(checkpoint, tmp_path):
    config = ExportConfig(checkpoint=checkpoint, format="onnx", out=tmp_path)
    result = export(config)
    assert sorted(p.name for p in result.files) == ["classes.json", "full_model.onnx", "temporal_head.onnx"]
    assert resolve_config(ExportConfig, config_file=tmp_path / "config.yaml") == config  # saved beside the models
    assert [(c.model, c.tolerance) for c in result.checks] == [("temporal_head", TOLERANCE["temporal_head"]),
                                                             ("full_model", TOLERANCE["full_model"])]
    assert all(0 <= c.max_abs_diff <= c.tolerance for c in result.checks)
    meta = json.loads((tmp_path / "classes.json").read_text())
    assert meta["verb_classes"] == list(VERBS) and meta["noun_classes"] == list(NOUNS)
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


def test_clear_errors(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # makes `import coremltools` fail, installed or not
    with pytest.raises(ExportError, match="pip install coremltools"):
        export(ExportConfig(checkpoint=checkpoint, format="coreml", out=tmp_path))
    with pytest.raises(WeightsError, match="hash"):
        export(ExportConfig(checkpoint=checkpoint, weights="random", seed=3, out=tmp_path))
    with pytest.raises(Exception, match="does not exist"):
        export(ExportConfig(checkpoint=tmp_path / "nope.pt", out=tmp_path))


def test_cli_coreml_without_coremltools_is_a_clear_error(checkpoint, tmp_path, monkeypatch):
    from epicfeat.cli.export import export as cli_export

    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(ExportError, match="coremltools, which is not installed"):
        cli_export(checkpoint=checkpoint, format="coreml", out=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before writing anything
