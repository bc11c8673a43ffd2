"""``epicfeat train-temporal``: stage two, cached features → a BiLSTM verb/noun model."""
from epicfeat.cli._options import config_command
from epicfeat.configs import TrainTemporalConfig


train_temporal = config_command(
    TrainTemporalConfig, "epicfeat.temporal.train:train_temporal",
    doc="Train the BiLSTM verb/noun model on a cached feature set (resumable with --resume).",
)
