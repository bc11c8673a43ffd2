"""``epicfeat export``: a temporal checkpoint → ONNX / TorchScript / CoreML models (head alone and full), checked."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from epicfeat.cli import _options as opt
from epicfeat.config import resolve_config


def export(
    checkpoint: Annotated[Optional[Path], typer.Option(help="best.pt / last.pt of a train-temporal run.", show_default=False)] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="onnx | torchscript | coreml [onnx].", show_default=False)] = None,
    out: opt.Out = None,
    config: opt.ConfigFile = None,
    weights: Annotated[Optional[str], typer.Option(help="Backbone weights of the full model; default: derived from the checkpoint's feature set.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for --weights random.", show_default=False)] = None,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset [17].", show_default=False)] = None,
    check: Annotated[Optional[bool], typer.Option("--check/--no-check", help="Compare each export with PyTorch on random inputs.", show_default=False)] = None,
) -> None:
    """Export the temporal head and the full frames-to-logits model, with class names, checked against PyTorch."""
    from epicfeat.export import ExportConfig, print_summary
    from epicfeat.export import export as run_export

    overrides = dict(checkpoint=checkpoint, format=format, out=out, weights=weights, seed=seed, opset=opset, check=check)
    cfg = resolve_config(ExportConfig, defaults="export", config_file=config, overrides=overrides)
    print_summary(run_export(cfg))
