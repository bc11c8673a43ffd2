"""``epicfeat demo``: generate synthetic EPIC-format data and run every stage on it, on the CPU, in minutes."""
from typing import Annotated, Optional

import typer

from epicfeat.cli import _options as opt
from epicfeat.config import resolve_config


def demo(
    out: Annotated[Optional[str], typer.Option("--out", help="Folder for data, features, runs and the submission (default: demo_out/).", show_default=False)] = None,
    config: opt.ConfigFile = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs per temporal model (default: 30).", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the dataset, the random backbone and training (default: 0).", show_default=False)] = None,
    device: opt.Device = None,
    progress: opt.Progress = None,
) -> None:
    """Run the whole pipeline on the embedded synthetic dataset (re-run to resume) and print the results."""
    from epicfeat.demo import DemoConfig, run_demo

    overrides = dict(out=out, epochs=epochs, seed=seed, device=device, progress=progress)
    run_demo(resolve_config(DemoConfig, defaults="demo", config_file=config, overrides=overrides))
