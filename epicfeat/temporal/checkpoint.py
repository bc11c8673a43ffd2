"""Temporal-model checkpoints: one self-describing file, written atomically, loaded with ``weights_only=True``
(only tensors, numbers, strings, lists, tuples and dicts: no pickled code runs). Layout (a plain dict):

    format, format_version, epicfeat_version
    model                  the TemporalModel state dict (its feature_mean / feature_std buffers included)
    model_args             TemporalModelArgs as a dict (the head, its sizes, the context it reads)
    config                 the resolved TrainTemporalConfig as a dict (paths as strings)
    verb_classes, noun_classes   class keys, index = class id
    feature_set, feature_set_key the FeatureSetIdentity (dict) of the features it was trained on, and its key
    epoch, metrics, history      completed epochs (1-based), this epoch's metrics, every epoch's metrics row
    training_state         only in last.pt: optimizer, scheduler step, RNG states (as tensors), early stopping
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from epicfeat import __version__
from epicfeat.errors import EpicfeatError
from epicfeat.files import atomic_write
from epicfeat.store import FeatureSetIdentity
from epicfeat.temporal.model import TemporalModel, TemporalModelArgs, create_temporal_model

FORMAT = "epicfeat-temporal-checkpoint"
FORMAT_VERSION = 1


#: The keys save_checkpoint always writes; anything else in a file is kept in Checkpoint.extra.
_KNOWN_KEYS = frozenset({"format", "format_version", "epicfeat_version", "model", "model_args", "config",
                         "verb_classes", "noun_classes", "feature_set", "feature_set_key", "epoch", "metrics",
                         "history", "training_state"})


class CheckpointError(EpicfeatError):
    """A checkpoint that cannot be used: not an epicfeat checkpoint, or trained on another feature set."""


@dataclass(frozen=True)
class ModelCard:
    """What a run's checkpoints say besides the weights: its resolved config, class tables and feature set."""

    config: Mapping[str, Any]
    verb_classes: tuple[str, ...]
    noun_classes: tuple[str, ...]
    feature_set: Mapping[str, Any]  # a FeatureSetIdentity as a dict
    feature_set_key: str


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint (see the module docstring for what each field holds)."""

    path: Path
    model_state: dict[str, torch.Tensor]
    model_args: TemporalModelArgs
    config: dict[str, Any]
    verb_classes: tuple[str, ...]
    noun_classes: tuple[str, ...]
    feature_set: dict[str, Any]
    feature_set_key: str
    epoch: int
    metrics: dict[str, float]
    history: list[dict[str, float]]
    training_state: dict[str, Any] | None  # None in best.pt
    extra: dict[str, Any] = field(default_factory=dict)  # keys other writers added (finetune: backbone, finetune)

    @property
    def card(self) -> ModelCard:
        return ModelCard(config=self.config, verb_classes=self.verb_classes, noun_classes=self.noun_classes,
                         feature_set=self.feature_set, feature_set_key=self.feature_set_key)

    @property
    def window(self) -> int:
        """T: the rows per segment the model was trained on (the run's ``frames``); predict and export use it."""
        frames = self.config.get("frames")
        if not isinstance(frames, int) or frames < 1:
            raise CheckpointError(f"checkpoint {self.path} does not record its window length (config 'frames')")
        return frames

    @property
    def sequence_length(self) -> int:
        """L = K + T + K: the rows the model reads per window, its context's included."""
        return self.model_args.context.sequence_length(self.window)

    def create_model(self, device: torch.device | str = "cpu") -> TemporalModel:
        """The trained model (its head) in eval mode, standardisation included."""
        model = create_temporal_model(self.model_args)
        model.load_state_dict(self.model_state)
        return model.to(device).eval()

    def backbone_weights(self, weights: str | None = None) -> str | None:
        """What to build this model's frame encoder from (``create_encoder(weights=...)``, which checks the hash):
        ``weights`` when given, else this file for a finetune checkpoint (it carries its backbone), else None."""
        if weights is None and "backbone" in self.extra:
            return str(self.path)
        return weights


def save_checkpoint(path: str | os.PathLike, *, model: TemporalModel, card: ModelCard, epoch: int,
                    metrics: Mapping[str, float], history: list[Mapping[str, float]],
                    training_state: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically; ``extra`` adds keys (finetune's backbone), loaded into ``Checkpoint.extra``."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "epicfeat_version": __version__,
        "model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "model_args": model.args.to_dict(),
        "config": dict(card.config),
        "verb_classes": list(card.verb_classes),
        "noun_classes": list(card.noun_classes),
        "feature_set": dict(card.feature_set),
        "feature_set_key": card.feature_set_key,
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "history": [dict(row) for row in history],
        "training_state": dict(training_state) if training_state is not None else None,
    }
    payload.update(extra or {})
    with _crc32(training_state is None):
        return atomic_write(path, lambda f: torch.save(payload, f))


def _crc32(enabled: bool):
    """torch.save's CRC-32 of every zip entry, on or off (on where this torch cannot turn it off): last.pt, read
    back only by ``torch.load`` (which skips the checks), goes without; best.pt, which users ship, keeps them."""
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)  # torch >= 2.6
    if enabled or config is None:
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint`` (safely: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the best.pt or last.pt of a train-temporal run")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} is not an epicfeat temporal checkpoint: it holds Python objects that a safe load refuses "
            f"({str(err).splitlines()[0]}). Use a best.pt / last.pt written by `epicfeat train-temporal`."
        ) from None
    except Exception as err:  # garbage bytes fail anywhere inside torch.load, with any exception type
        raise CheckpointError(
            f"{path} is not an epicfeat temporal checkpoint (torch.load could not read it: {err}). It may be "
            "truncated or another kind of file; use a best.pt / last.pt written by `epicfeat train-temporal`."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not an epicfeat temporal checkpoint (no '{FORMAT}' marker); use a "
            "best.pt / last.pt written by `epicfeat train-temporal`."
        )
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer epicfeat (checkpoint format {payload['format_version']}, this one "
            f"reads up to {FORMAT_VERSION}); upgrade epicfeat."
        )
    return Checkpoint(
        path=path, model_state=payload["model"], model_args=TemporalModelArgs(**payload["model_args"]),
        config=payload["config"], verb_classes=tuple(payload["verb_classes"]),
        noun_classes=tuple(payload["noun_classes"]), feature_set=payload["feature_set"],
        feature_set_key=payload["feature_set_key"], epoch=payload["epoch"], metrics=payload["metrics"],
        history=payload["history"], training_state=payload["training_state"],
        extra={key: value for key, value in payload.items() if key not in _KNOWN_KEYS},
    )


def check_feature_set(checkpoint: Checkpoint, identity: Any) -> None:
    """Refuse to pair a checkpoint with features of another feature set (``identity``: a ``FeatureSetIdentity`` or
    its dict): a model gives meaningless scores on another set, silently, so this is an error, never a warning."""
    wanted, wanted_key = _identity_and_key(identity)
    if _canonical(wanted) == _canonical(checkpoint.feature_set):
        return
    differing = sorted(
        k for k in set(wanted) | set(checkpoint.feature_set)
        if _canonical(wanted.get(k)) != _canonical(checkpoint.feature_set.get(k))
    )
    # Weights are paired by content: the same weights_sha under another name (sha-...) gives the same numbers. The
    # source form (a video or its official frames) is not checked: same backbone and preprocessing, same content.
    named = [k for k in differing if k != "source"]
    if not named or (named == ["weights"] and wanted.get("weights_sha")):
        return
    raise CheckpointError(
        f"checkpoint {checkpoint.path} was trained on feature set '{checkpoint.feature_set_key}' but the features "
        f"given are from feature set '{wanted_key}' (they differ in: {', '.join(differing)}). Pick the cache folder "
        f"of '{checkpoint.feature_set_key}' (--feature-set {checkpoint.feature_set_key}), or re-extract the videos "
        "with that feature set's settings, or train a new model on this feature set."
    )


def feature_set_key_of(identity: Any) -> str:
    """The readable key of a FeatureSetIdentity (or of its dict); a short hash when the store cannot name it."""
    return _identity_and_key(identity)[1]


def _identity_and_key(identity: Any) -> tuple[dict, str]:
    if hasattr(identity, "to_dict") and hasattr(identity, "key"):
        return identity.to_dict(), identity.key()
    identity = dict(identity)
    try:
        return identity, FeatureSetIdentity.from_dict(identity).key()
    except Exception:  # a hand-made identity (tests, tools): name it by a hash of its fields
        digest = hashlib.sha256(json.dumps(_canonical(identity), sort_keys=True).encode()).hexdigest()[:8]
        return identity, f"feature-set-{digest}"


def _canonical(value: Any) -> Any:
    """Tuples and lists compare equal (a checkpoint round trip may turn one into the other)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------- RNG states
def capture_rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training run draws from, as tensors and numbers (``weights_only``-loadable)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),  # (624,) MT19937 words
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "sampling": generator.get_state(),
    }


def restore_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    """Put back what ``capture_rng_state`` saved (CUDA states only when this machine has as many GPUs)."""
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state["torch_cuda"]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    numpy_state = state["numpy"]
    np.random.set_state((
        "MT19937",
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss"]))
    generator.set_state(state["sampling"])
