"""`epicfeat export`: a trained checkpoint -> deployable models, each checked against ``epicfeat predict`` itself.

Two models per format, plus ``classes.json`` (class names and every preprocessing setting):

* ``temporal_head``: features (1, L, D) float32 -> verb_logits (1, Cv), noun_logits (1, Cn); L = T, or K + T + K
  for a head trained with context (classes.json's ``window`` says which rows).
* ``full_model``: frames (1, L, 3, crop, crop) float32 RGB 0..255 -> the same logits (normalisation, backbone,
  rounding to the stored dtype and head inside); for a video backbone each row is a clip: (1, L, clip_len, 3, crop,
  crop).

The TorchScript full model computes in the feature set's precision and equals ``predict``; ONNX and CoreML have no
bf16 convolution, so theirs is fp32. Every exported file is run on seeded random inputs and must agree within
``TOLERANCE`` with the PyTorch model it came from and, at the feature set's precision, with ``predict``'s path;
a CoreML package's interface is read back instead (it runs on macOS only).
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from epicfeat.configs import ExportConfig
from epicfeat.encoder import FrameEncoder, create_encoder
from epicfeat.errors import EpicfeatError
from epicfeat.files import atomic_write_text
from epicfeat.frames import Preprocess
from epicfeat.predict import checkpoint_weights
from epicfeat.recipes import save_config
from epicfeat.temporal.checkpoint import Checkpoint, load_checkpoint

# Max |reference - exported| logit difference accepted. The full model's runtimes sum convolutions in other
# orders, so a feature on a float16 rounding boundary may round one step away: a few 1e-4 in the logits.
TOLERANCE = {"temporal_head": 1e-4, "full_model": 2e-3}
MIN_DYNAMO_OPSET = 18  # the dynamo exporter's translation tables start at opset 18
# ONNX and CoreML have no bf16 convolution; TorchScript follows the feature set.
_FULL_MODEL_PRECISION = {"onnx": "fp32", "coreml": "fp32"}


class ExportError(EpicfeatError):
    """An export that cannot be done or does not reproduce the PyTorch model; the message says why."""


@dataclass(frozen=True)
class ExportCheck:
    model: str
    precision: str  # what the exported model computes its backbone in
    max_abs_diff: float  # vs the PyTorch model it was exported from (same precision)
    max_abs_diff_vs_predict: float  # vs epicfeat predict's own path on the same frames
    tolerance: float
    matches_predict: bool  # computed in the feature set's precision and within tolerance of predict


@dataclass(frozen=True)
class CoremlCheck:
    model: str
    inputs: dict[str, list[int]]  # name -> shape, read back from the saved .mlpackage
    outputs: list[str]


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    checks: list[ExportCheck] = field(default_factory=list)
    coreml_checks: list[CoremlCheck] = field(default_factory=list)
    feature_set_precision: str = "fp32"


class FullModel(nn.Module):
    """frames (B, T, [clip_len,] 3, H, W) float RGB 0..255 -> (verb_logits, noun_logits): the frame encoder, the
    rounding to the stored dtype, the head (fp32). The encoder runs channels-last (images; not clips), as ``predict``
    does: a CPU's bf16 kernels depend on the layout."""

    def __init__(self, encoder: FrameEncoder, head: nn.Module, feature_dtype: torch.dtype, *, window: int):
        super().__init__()
        self.encoder, self.head, self.feature_dtype = encoder, head, feature_dtype
        self.window = window  # a constant, not the input's shape: coremltools fails on traced shape arithmetic

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(frames.flatten(0, 1))  # (B*T, D) float32: every frame (clip) through the backbone
        # Round to the feature set's stored dtype, as the training features were.
        features = features.to(self.feature_dtype).float()
        features = features.reshape(-1, self.window, self.encoder.num_features)  # (B, T, D)
        return self.head(features)  # (B, Cv), (B, Cn)


@dataclass
class _Models:
    checkpoint: Checkpoint
    preprocess: Preprocess
    window: int  # L: the rows (frames) per window the models take
    head: nn.Module
    encoder: FrameEncoder  # predict's: the feature set's precision, channels-last
    features: torch.Tensor  # (1, T, D) float32 check input of the head
    frames: np.ndarray  # (1, T, [clip_len,] crop, crop, 3) uint8 check input of the full model, as predict gets them

    @property
    def precision(self) -> str:
        return self.checkpoint.feature_set["precision"]

    @property
    def feature_dtype(self) -> torch.dtype:
        return getattr(torch, self.checkpoint.feature_set["dtype"])

    def full_model(self, precision: str) -> FullModel:
        encoder = FrameEncoder(self.encoder.backbone, mean=self.preprocess.mean, std=self.preprocess.std,
                               precision=precision, channels_last=self.frames.ndim == 5)  # not for clips (6-d)
        return FullModel(encoder, self.head, self.feature_dtype, window=self.window).eval()

    def frames_input(self) -> torch.Tensor:
        """The check frames as the full model takes them: (1, T, [clip_len,] 3, crop, crop) float32 RGB 0..255."""
        return torch.from_numpy(self.frames).movedim(-1, -3).float().contiguous()

    @torch.inference_mode()
    def predict_path(self, name: str) -> list[np.ndarray]:
        """Logits of ``predict``'s own code on the check input of model ``name``."""
        if name == "temporal_head":
            return [t.numpy() for t in self.head(self.features)]
        pixels = torch.from_numpy(self.frames[0]).movedim(-1, -3)  # (T, [clip_len,] 3, crop, crop), a view
        features = self.encoder.encode(pixels, dtype=self.feature_dtype)  # (T, D), stored dtype
        return [t.numpy() for t in self.head(features[None])]  # (1, T, D) -> (1, Cv), (1, Cn)


def build_models(config: ExportConfig) -> _Models:
    """The checkpoint's head and encoder (matching its feature set) and seeded check inputs."""
    checkpoint = load_checkpoint(config.checkpoint)
    window = checkpoint.sequence_length  # rows per window, context included
    preprocess = Preprocess.from_identity(checkpoint.feature_set)
    head = checkpoint.create_model()
    # As predict runs it by default: channels-last, not compiled (tracing needs the plain modules).
    settings = {**checkpoint.feature_set, "channels_last": True, "compile": False}
    encoder = create_encoder(settings, torch.device("cpu"), weights=checkpoint_weights(checkpoint, config.weights),
                             seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed_inputs)
    # Random features spread like the training features (the head's own statistics).
    features = head.feature_mean + head.feature_std * torch.randn(1, window, head.args.input_dim, generator=generator)
    clip_len = int(checkpoint.feature_set["clip_len"])
    clip = (clip_len,) if clip_len > 1 else ()  # a video backbone's rows are clips
    frames = torch.randint(0, 256, (1, window, *clip, preprocess.crop, preprocess.crop, 3), generator=generator,
                           dtype=torch.uint8).numpy()  # (1, T, [clip_len,] crop, crop, 3)
    return _Models(checkpoint, preprocess, window, head, encoder, features, frames)


def export(config: ExportConfig) -> ExportResult:
    """Write both models in ``config.format`` plus classes.json into ``config.out``, checking each one."""
    if config.checkpoint is None:
        raise ExportError("--checkpoint is required (the best.pt of a train-temporal run)")
    if config.format not in ("onnx", "torchscript", "coreml"):
        raise ExportError(f"--format must be onnx, torchscript or coreml, got {config.format!r}")
    if config.format == "onnx":
        _require_onnx(config)
    if config.format == "coreml":
        _require_coremltools()
    models = build_models(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(feature_set_precision=models.precision)
    full_precision = _FULL_MODEL_PRECISION.get(config.format, models.precision)
    for name in ("temporal_head", "full_model"):
        precision = "fp32" if name == "temporal_head" else full_precision
        model = models.head if name == "temporal_head" else models.full_model(precision)
        input_name = "features" if name == "temporal_head" else "frames"
        example = models.features if name == "temporal_head" else models.frames_input()
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
            result.coreml_checks.append(_check_coreml(path, name, input_name, example, models))
            got = None  # running a CoreML model needs macOS: its interface is checked instead
        result.files.append(path)
        if got is not None:
            result.checks.append(_check(path, name, precision, model, example, got, models))
    classes = out / "classes.json"
    atomic_write_text(classes, json.dumps(_metadata(models, config, result, full_precision), indent=1) + "\n")
    result.files.append(classes)
    save_config(config, out / "config.yaml")  # the resolved config: `epicfeat export --config` redoes this export
    return result


def _check(path: Path, name: str, precision: str, model: nn.Module, example: torch.Tensor,
           got: list[np.ndarray], models: _Models) -> ExportCheck:
    """Exported logits vs the PyTorch model (must agree: else the export is broken) and vs predict's path."""
    with torch.inference_mode():
        reference = [t.numpy() for t in model(example)]  # [(1, Cv), (1, Cn)]
    diff = max(float(np.abs(e - g).max()) for e, g in zip(reference, got))
    diff_predict = max(float(np.abs(e - g).max()) for e, g in zip(models.predict_path(name), got))
    tolerance = TOLERANCE[name]
    if not diff <= tolerance:  # `not <=` also catches NaN
        raise ExportError(f"{path}: exported model differs from PyTorch by {diff:.3g} (max abs logit difference), "
                          f"above the tolerance {tolerance:g}; do not deploy it")
    same_precision = name == "temporal_head" or precision == models.precision
    if same_precision and not diff_predict <= tolerance:
        raise ExportError(f"{path}: exported model differs from `epicfeat predict` by {diff_predict:.3g} (max abs "
                          f"logit difference), above the tolerance {tolerance:g}; do not deploy it")
    return ExportCheck(name, precision, diff, diff_predict, tolerance, same_precision)


def _check_coreml(path: Path, name: str, input_name: str, example: torch.Tensor, models: _Models) -> CoremlCheck:
    """Read the saved package back: one input of the example's shape, the two logits outputs."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    inputs = {i.name: [int(d) for d in i.type.multiArrayType.shape] for i in spec.description.input}
    outputs = [o.name for o in spec.description.output]
    expected = {input_name: list(example.shape)}
    if inputs != expected or outputs != ["verb_logits", "noun_logits"]:
        raise ExportError(f"{path}: the converted model has inputs {inputs} and outputs {outputs}, expected "
                          f"{expected} and ['verb_logits', 'noun_logits']; do not deploy it")
    return CoremlCheck(name, inputs, outputs)


def _metadata(models: _Models, config: ExportConfig, result: ExportResult, full_precision: str) -> dict:
    checkpoint, feature_set = models.checkpoint, models.checkpoint.feature_set
    clip_len = int(feature_set["clip_len"])
    preprocessing = {
        **models.preprocess.identity(),  # resize, crop, mean, std, resize_mode, crop_mode, interpolation, color
        "fps": feature_set["fps"],  # frames per second sampled from the source (null: every frame)
        "sampling": "each target k / fps takes the first frame at or after it",
        "value_range": "0..255 (uint8 RGB as float32; normalisation is inside full_model)",
        "layout": "NCHW per frame: frames " + ("(1, T, 3, crop, crop)" if clip_len == 1 else
                                               "(1, T, clip_len, 3, crop, crop): a clip per row"),
        "precision": models.precision,  # the feature set's backbone precision (what predict computes in)
        "feature_dtype": feature_set["dtype"],  # features are rounded to this, as stored
        "decoder": feature_set["decoder"],
    }
    if clip_len > 1:  # a video backbone's
        preprocessing["clip"] = {"frames": clip_len, "fps": feature_set["clip_fps"],
                                 "rule": "clip_len frames at fps, clip_len // 2 of them before the row's frame; at a "
                                         "video's ends the edge frame repeats"}
    return {
        "verb_classes": list(checkpoint.verb_classes),  # index = output position in verb_logits
        "noun_classes": list(checkpoint.noun_classes),
        "action_id": "verb * 1000 + noun (official EPIC-100)",
        "format": config.format,
        "inputs": {
            "temporal_head": {"name": "features", "shape": list(models.features.shape), "dtype": "float32",
                              "precision": "fp32", "what": "the window's L rows of features, oldest first"},
            "full_model": {"name": "frames", "shape": list(models.frames_input().shape),
                           "dtype": "float32", "precision": full_precision,
                           "what": "the window's L frames, oldest first, RGB 0..255, shorter side resized then "
                                   "centre crop"},
        },
        "outputs": ["verb_logits", "noun_logits"],
        "window": {
            "frames": checkpoint.window,
            "context_seconds": checkpoint.model_args.context.seconds,
            "context_frames": checkpoint.model_args.context.frames,
            "rows": models.window,
            "head": checkpoint.model_args.head,
            "rule": "the T rows are the bin centres of the window's rows, as epicfeat evaluate samples a segment: "
                    "row (2k + 1) * n // (2T) of the n rows in the window, k = 0..T-1 (epicfeat predict "
                    "--window-seconds; its default 2.0 s is the median EPIC-100 validation segment). With context "
                    "(K > 0) the rows are K bin centres of the context_seconds before the window, the T, then K of "
                    "the context_seconds after it (a side without rows repeats the window's edge row)",
        },
        "preprocessing": preprocessing,
        "feature_set": checkpoint.feature_set_key,
        "checkpoint": str(checkpoint.path),
        "checks": [{"model": c.model, "precision": c.precision, "max_abs_diff": c.max_abs_diff,
                    "max_abs_diff_vs_predict": c.max_abs_diff_vs_predict, "tolerance": c.tolerance,
                    "matches_predict": c.matches_predict} for c in result.checks],
        "coreml_checks": [{"model": c.model, "inputs": c.inputs, "outputs": c.outputs,
                           "numeric_parity": "not run: CoreML models run on macOS / iOS only"}
                          for c in result.coreml_checks],
    }


# ------------------------------------------------------------------------------------------------ formats
def _require_onnx(config: ExportConfig) -> None:
    if config.opset < MIN_DYNAMO_OPSET:
        raise ExportError(f"--opset {config.opset}: the dynamo ONNX exporter needs opset >= {MIN_DYNAMO_OPSET}")
    needed = ["onnxscript"] + (["onnxruntime"] if config.check else [])  # the exporter; the runtime of the check
    missing = [name for name in needed if not _importable(name)]
    if missing:
        raise ExportError(f"--format onnx needs {' and '.join(missing)}, which epicfeat depends on but this environment "
                          f"lacks: pip install {' '.join(missing)}")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _export_onnx(model: nn.Module, example: torch.Tensor, input_name: str, path: Path, opset: int) -> None:
    # The exporter prints its progress and warns about torch.export internals: the command prints its summary only.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=[input_name],
                              output_names=["verb_logits", "noun_logits"], opset_version=opset, external_data=False)
        except Exception as err:  # noqa: BLE001 - torch.export / onnxscript failures: one line, which model, why
            raise ExportError(f"{path}: the dynamo ONNX exporter failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); --format torchscript works "
                              "with every torch") from None


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


def _require_coremltools() -> None:
    try:
        import coremltools  # noqa: F401
    except ImportError:
        raise ExportError(
            "--format coreml needs coremltools, which is not installed: pip install 'epicfeat[coreml]' (or pip "
            "install coremltools; its converter runs on Linux and macOS, running the .mlpackage needs macOS/iOS). "
            "--format onnx works everywhere."
        ) from None


def _export_coreml(model: nn.Module, example: torch.Tensor, input_name: str, path: Path) -> None:
    """Convert the TorchScript trace (coremltools' torch.export converter has no LSTM) to an fp32 ML program."""
    import coremltools as ct

    traced = _trace(model, example)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            mlmodel = ct.convert(traced, inputs=[ct.TensorType(name=input_name, shape=tuple(example.shape))],
                                 outputs=[ct.TensorType(name="verb_logits"), ct.TensorType(name="noun_logits")],
                                 convert_to="mlprogram", compute_precision=ct.precision.FLOAT32)
        except Exception as err:  # noqa: BLE001 - any converter failure: one line, which model, why
            raise ExportError(f"{path}: coremltools {ct.__version__} cannot convert this model with torch "
                              f"{torch.__version__} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    mlmodel.save(str(path))


def print_summary(result: ExportResult) -> None:
    for path in result.files:
        print(f"wrote {path}")
    for check in result.checks:
        print(f"check {check.model} ({check.precision}): max abs logit difference vs PyTorch {check.max_abs_diff:.2e}, "
              f"vs epicfeat predict {check.max_abs_diff_vs_predict:.2e} (tolerance {check.tolerance:g}): "
              + ("equals predict" if check.matches_predict else
                 f"ok, but computes in {check.precision} where the feature set (and predict) use "
                 f"{result.feature_set_precision}; --format torchscript exports it in {result.feature_set_precision}"))
    for check in result.coreml_checks:
        shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape in check.inputs.items())
        print(f"check {check.model}: CoreML inputs {shapes}, outputs {', '.join(check.outputs)}: ok; numeric parity "
              "can only be checked on macOS (coremltools runs models there only)")
