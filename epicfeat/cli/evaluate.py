"""``epicfeat evaluate``: official EPIC-100 metrics of a checkpoint (or an ensemble) on a labelled split."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from epicfeat.cli import _options as opt
from epicfeat.config import resolve_config


def evaluate(
    checkpoint: opt.Checkpoints = None,
    config: opt.ConfigFile = None,
    annotations: opt.Annotations = None,
    cache: opt.Cache = None,
    feature_set: opt.FeatureSet = None,
    out: opt.Out = None,
    split: Annotated[Optional[str], typer.Option(help="Labelled split to score: validation | train (default: validation).", show_default=False)] = None,
    ensemble_weights: opt.EnsembleWeights = None,
    ensemble_mode: opt.EnsembleMode = None,
    allow_missing: Annotated[Optional[bool], typer.Option("--allow-missing/--no-allow-missing", help="Score only segments whose videos are in the feature set (metrics then cover a subset).", show_default=False)] = None,
    device: opt.Device = None,
    progress: opt.Progress = None,
) -> None:
    """Score a labelled split from the feature cache: metrics table and JSON, results pickle, per-class plot."""
    from epicfeat.evaluate import EvaluateConfig
    from epicfeat.evaluate import evaluate as run_evaluation

    overrides = dict(
        checkpoints=_paths(checkpoint), annotations=annotations, cache=cache, feature_set=feature_set, out=out,
        split=split, ensemble_weights=ensemble_weights or None, ensemble_mode=ensemble_mode,
        allow_missing=allow_missing, device=device, progress=progress,
    )
    run_evaluation(resolve_config(EvaluateConfig, defaults="evaluate", config_file=config, overrides=overrides))


def _paths(paths: Optional[list[Path]]) -> Optional[tuple[Path, ...]]:
    return tuple(paths) if paths else None
