"""``epicfeat extract``: stage one, videos → ResNet50 features in a Zarr feature set."""
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
    doc="Stream videos through ResNet50 and cache per-frame 2048-d features (resumable: re-run to continue).",
)
