"""``epicfeat train-temporal``: stage two, cached features → a temporal verb/noun model (``--head``)."""
from epicfeat.cli._options import config_command
from epicfeat.configs import TrainTemporalConfig


train_temporal = config_command(
    TrainTemporalConfig, "epicfeat.temporal.train:train_temporal",
    doc="Train a temporal verb/noun model (--head lstm | transformer | attentive | mean) on a cached feature set "
        "(resumable with --resume).",
)
