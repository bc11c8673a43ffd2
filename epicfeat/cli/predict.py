"""``epicfeat predict``: a video file or camera → a timeline of top-5 verbs, nouns and actions (and an annotated MP4)."""
import typer

from epicfeat.cli._options import config_command
from epicfeat.configs import PredictConfig


def _run(cfg: PredictConfig) -> None:
    from epicfeat.predict import predict, print_summary

    result = predict(cfg)
    print_summary(result)
    if result.error:  # stopped early (a damaged file, a camera gone): what was done is kept, but it is not all
        raise typer.Exit(1)


predict = config_command(
    PredictConfig, _run, arguments=("source",),
    doc="Recognise actions in a video or camera stream with a trained temporal checkpoint.",
)
