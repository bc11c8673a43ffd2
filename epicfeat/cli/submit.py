"""``epicfeat submit``: score the test split and write the EPIC-100 action recognition leaderboard zip."""
from typing import Annotated, Optional

import typer

from epicfeat.cli import _options as opt
from epicfeat.cli.evaluate import _paths
from epicfeat.config import resolve_config


def submit(
    checkpoint: opt.Checkpoints = None,
    config: opt.ConfigFile = None,
    annotations: opt.Annotations = None,
    cache: opt.Cache = None,
    feature_set: opt.FeatureSet = None,
    out: opt.Out = None,
    ensemble_weights: opt.EnsembleWeights = None,
    ensemble_mode: opt.EnsembleMode = None,
    sls_pt: Annotated[Optional[int], typer.Option("--sls-pt", help="Pretraining supervision level: 0 none, 1 public image dataset (ImageNet), 2 public image and video datasets, 3 self-supervised on public data, 4 self-supervised on public data and EPIC-KITCHENS, 5 private data (default: from the backbone weights: random 0, ImageNet 1).", show_default=False)] = None,
    sls_tl: Annotated[Optional[int], typer.Option("--sls-tl", help="Training-label level: 0 none, 1 video-level labels, 2 plus narration timestamps, 3 full temporal supervision (start/stop + classes), 4 plus spatial annotations from pretrained detectors, 5 plus other prior knowledge (default: 3, what train-temporal uses).", show_default=False)] = None,
    sls_td: Annotated[Optional[int], typer.Option("--sls-td", help="Training-data level: 0 zero-shot, 1 few-shot, 2 at most 25% of train, 3 the train split, 4 train + validation, 5 train + validation + other data (default: from the checkpoints' train_splits: 3 or 4).", show_default=False)] = None,
    device: opt.Device = None,
    progress: opt.Progress = None,
) -> None:
    """Score EPIC_100_test_timestamps.csv and write submission.zip (test.json) ready to upload."""
    from epicfeat.evaluate import SubmitConfig
    from epicfeat.evaluate import submit as run_submit

    overrides = dict(
        checkpoints=_paths(checkpoint), annotations=annotations, cache=cache, feature_set=feature_set, out=out,
        ensemble_weights=ensemble_weights or None, ensemble_mode=ensemble_mode, sls_pt=sls_pt, sls_tl=sls_tl,
        sls_td=sls_td, device=device, progress=progress,
    )
    run_submit(resolve_config(SubmitConfig, defaults="submit", config_file=config, overrides=overrides))
