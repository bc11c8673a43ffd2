"""``epicfeat evaluate``: official EPIC-100 metrics of a checkpoint (or an ensemble) on a labelled split."""
from epicfeat.cli._options import config_command
from epicfeat.configs import EvaluateConfig


def _run(cfg: EvaluateConfig) -> None:
    from epicfeat.evaluate import evaluate

    evaluate(cfg)


evaluate = config_command(
    EvaluateConfig, _run,
    doc="Score a labelled split from the feature cache: metrics table and JSON, results pickle, per-class plot.",
)
