"""``epicfeat extract``: stage one, videos → backbone features (ResNet50 or any timm model) in a Zarr feature set."""
import typer

from epicfeat.cli._options import config_command
from epicfeat.configs import ExtractConfig


def _run(cfg: ExtractConfig) -> None:
    from epicfeat.extract import extract_features, print_summary

    summary = extract_features(cfg)
    print_summary(summary)
    if not summary.ok:
        raise typer.Exit(1)


extract = config_command(
    ExtractConfig, _run,
    doc="Stream videos through a backbone (resnet50 or timm:<model>) and cache per-frame features (resumable: re-run "
    "to continue).",
)
