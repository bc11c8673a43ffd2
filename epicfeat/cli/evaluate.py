"""``epicfeat evaluate``: official EPIC-100 metrics of a checkpoint (or an ensemble) on a labelled split."""
from epicfeat.cli._options import config_command
from epicfeat.configs import EvaluateConfig


evaluate = config_command(
    EvaluateConfig, "epicfeat.evaluate:evaluate",
    doc="Score a labelled split from the feature cache: metrics table and JSON, results pickle, per-class plot.",
)
