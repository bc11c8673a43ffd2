"""`epicfeat export`: a trained checkpoint -> deployable models, each checked against PyTorch.

Two models per format, plus ``classes.json`` (class names and the exact input specification):

* ``temporal_head``: features (1, T, 2048) float32 -> verb_logits (1, Cv), noun_logits (1, Cn). For runtimes that
  compute per-frame features themselves and keep the rolling window (what ``epicfeat predict`` does).
* ``full_model``: frames (1, T, 3, crop, crop) float32 RGB in 0..255 (resized and centre-cropped as the feature set
  says) -> the same logits. ImageNet normalisation, the ResNet50 backbone, the rounding of features to the stored
  dtype (float16, as the model saw in training) and the head are all inside.

Checks: every exported file is run (onnxruntime for ONNX, torch.jit for TorchScript) on seeded random inputs and
compared with the PyTorch model; the largest absolute logit difference is reported and must be within the stated
tolerance, else ExportError. ONNX uses torch's TorchScript-based exporter (``dynamo=False``): the default dynamo
exporter of torch >= 2.9 needs the ``onnxscript`` package, which is not a dependency here.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from epicfeat.config import atomic_write_text, save_config
from epicfeat.configs import ExportConfig
from epicfeat.errors import EpicfeatError
from epicfeat.frames import Preprocess
from epicfeat.predict import window_length
from epicfeat.temporal.checkpoint import load_checkpoint


# Max |PyTorch - exported| logit difference accepted. The head alone is exact to float32 rounding (~1e-6). The full
# model runs 50 conv layers whose kernels sum in a different order in each runtime (~1e-5 relative on features),
# and a feature sitting on a float16 rounding boundary can then round to the neighbouring value (one float16 step,
# ~1e-3 relative); the head turns that into logit changes of at most a few 1e-4. Measured with the seed-size head
# at T=16, 224 px: 6e-8 (head) and 1e-5 (full model).
TOLERANCE = {"temporal_head": 1e-4, "full_model": 2e-3}


class ExportError(EpicfeatError):
    """An export that cannot be done or does not reproduce the PyTorch model; the message says why."""


@dataclass(frozen=True)
class ExportCheck:
    model: str
    max_abs_diff: float
    tolerance: float


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    checks: list[ExportCheck] = field(default_factory=list)


class FullModel(nn.Module):
    """frames (B, T, 3, H, W) float RGB 0..255 -> (verb_logits, noun_logits): normalise, backbone, round, head."""

    def __init__(self, backbone: nn.Module, head: nn.Module, mean, std, feature_dtype: torch.dtype):
        super().__init__()
        self.backbone, self.head, self.feature_dtype = backbone, head, feature_dtype
        # (x/255 - mean) / std == (x - 255 mean) / (255 std), folded as in Preprocess.normalize.
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("pixel_inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255))

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, c, h, w = frames.shape
        pixels = frames.reshape(b * t, c, h, w)  # (B*T, 3, H, W): every frame through the backbone
        features = self.backbone((pixels - self.pixel_mean) * self.pixel_inv_std)  # (B*T, 2048)
        # Round to the feature set's stored dtype, as the training features were.
        features = features.to(self.feature_dtype).float()
        return self.head(features.reshape(b, t, -1))  # (B, T, 2048) -> (B, Cv), (B, Cn)


def build_models(config: ExportConfig):
    """(checkpoint, head, full model, example inputs) with the backbone matching the checkpoint's feature set."""
    checkpoint = load_checkpoint(config.checkpoint)
    feature_set = checkpoint.feature_set
    window = window_length(checkpoint)
    preprocess = Preprocess.from_identity(feature_set)
    head = checkpoint.create_model()
    backbone = checkpoint.create_backbone(config.weights, seed=config.seed)
    full = FullModel(backbone, head, preprocess.mean, preprocess.std,
                     getattr(torch, feature_set.get("dtype", "float16"))).eval()
    generator = torch.Generator().manual_seed(config.seed_inputs)
    # Random features spread like the training features (the head's own statistics), so the check exercises the
    # standardised range the model works in, not a corner of it.
    features = head.feature_mean + head.feature_std * torch.randn(1, window, head.args.input_dim, generator=generator)
    frames = torch.randint(0, 256, (1, window, 3, preprocess.crop, preprocess.crop), generator=generator).float()
    # features (1, T, 2048), frames (1, T, 3, crop, crop)
    inputs = {"temporal_head": ("features", features), "full_model": ("frames", frames)}
    return checkpoint, {"temporal_head": head, "full_model": full}, inputs


def export(config: ExportConfig) -> ExportResult:
    """Write both models in ``config.format`` plus classes.json into ``config.out``, checking each one."""
    if config.checkpoint is None:
        raise ExportError("--checkpoint is required (the best.pt of a train-temporal run)")
    if config.format not in ("onnx", "torchscript", "coreml"):
        raise ExportError(f"--format must be onnx, torchscript or coreml, got {config.format!r}")
    if config.format == "coreml":
        _require_coremltools()
    checkpoint, models, inputs = build_models(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult()
    for name, model in models.items():
        input_name, example = inputs[name]
        with torch.inference_mode():
            expected = [t.numpy() for t in model(example)]  # [(1, Cv), (1, Cn)]
        if config.format == "onnx":
            path = out / f"{name}.onnx"
            _export_onnx(model, example, input_name, path, config.opset)
            got = _run_onnx(path, input_name, example) if config.check else None
        elif config.format == "torchscript":
            path = out / f"{name}.pt"
            _trace(model, example).save(str(path))
            got = _run_torchscript(path, example) if config.check else None
        else:
            path = out / f"{name}.mlpackage"
            _export_coreml(model, example, input_name, path)
            got = None  # running a CoreML model needs macOS; the trace it is converted from is checked instead
        result.files.append(path)
        if got is not None:
            diff = max(float(np.abs(e - g).max()) for e, g in zip(expected, got))
            check = ExportCheck(name, diff, TOLERANCE[name])
            result.checks.append(check)
            if not diff <= check.tolerance:  # `not <=` also catches NaN
                raise ExportError(f"{path}: exported model differs from PyTorch by {diff:.3g} (max abs logit "
                                  f"difference), above the tolerance {check.tolerance:g}; do not deploy it")
    classes = out / "classes.json"
    atomic_write_text(classes, json.dumps(_metadata(checkpoint, inputs, result), indent=1) + "\n")
    result.files.append(classes)
    save_config(config, out / "config.yaml")  # the resolved config: `epicfeat export --config` redoes this export
    return result


def _metadata(checkpoint, inputs, result: ExportResult) -> dict:
    feature_set = checkpoint.feature_set
    return {
        "verb_classes": list(checkpoint.verb_classes),  # index = output position in verb_logits
        "noun_classes": list(checkpoint.noun_classes),
        "action_id": "verb * 1000 + noun (official EPIC-100)",
        "inputs": {
            "temporal_head": {"name": "features", "shape": list(inputs["temporal_head"][1].shape),
                              "dtype": "float32", "what": "last T ResNet50 features, oldest first"},
            "full_model": {"name": "frames", "shape": list(inputs["full_model"][1].shape), "dtype": "float32",
                           "what": "last T frames, oldest first, RGB 0..255, shorter side resized then centre crop"},
        },
        "outputs": ["verb_logits", "noun_logits"],
        "preprocessing": {k: feature_set.get(k) for k in ("fps", "resize", "crop", "mean", "std")},
        "feature_set": checkpoint.feature_set_key,
        "checkpoint": str(checkpoint.path),
        "checks": [{"model": c.model, "max_abs_diff": c.max_abs_diff, "tolerance": c.tolerance}
                   for c in result.checks],
    }


def _export_onnx(model: nn.Module, example: torch.Tensor, input_name: str, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        # The legacy exporter announces its deprecation, and warns that LSTMs exported at batch size 1 may not
        # run at other batch sizes: the shapes are fixed at (1, T, ...) on purpose, as documented in classes.json.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[input_name],
                          output_names=["verb_logits", "noun_logits"], opset_version=opset)


def _run_onnx(path: Path, input_name: str, example: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["verb_logits", "noun_logits"], {input_name: example.numpy()})


def _run_torchscript(path: Path, example: torch.Tensor) -> list[np.ndarray]:
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        return [t.numpy() for t in torch.jit.load(str(path))(example)]


def _trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        return torch.jit.trace(model, (example,))


def _require_coremltools():
    try:
        import coremltools  # noqa: F401
    except ImportError:
        raise ExportError(
            "--format coreml needs coremltools, which is not installed: pip install coremltools (its converter runs "
            "on Linux and macOS; running the .mlpackage needs macOS/iOS). --format onnx works everywhere."
        ) from None


def _export_coreml(model: nn.Module, example: torch.Tensor, input_name: str, path: Path) -> None:
    """Convert the TorchScript trace with coremltools (ML program, fp32). Untested here: no coremltools in CI."""
    import coremltools as ct

    traced = _trace(model, example)
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name=input_name, shape=tuple(example.shape))],
                         outputs=[ct.TensorType(name="verb_logits"), ct.TensorType(name="noun_logits")],
                         convert_to="mlprogram", compute_precision=ct.precision.FLOAT32)
    mlmodel.save(str(path))


def print_summary(result: ExportResult) -> None:
    for path in result.files:
        print(f"wrote {path}")
    for check in result.checks:
        print(f"check {check.model}: max abs logit difference vs PyTorch {check.max_abs_diff:.2e} "
              f"(tolerance {check.tolerance:g}): ok")
