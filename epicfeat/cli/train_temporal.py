"""``epicfeat train-temporal``: stage two, cached features → a BiLSTM verb/noun model."""
from epicfeat.cli._options import config_command
from epicfeat.configs import TrainTemporalConfig


def _run(cfg: TrainTemporalConfig) -> None:
    from epicfeat.temporal.train import train_temporal

    train_temporal(cfg)


train_temporal = config_command(
    TrainTemporalConfig, _run,
    doc="Train the BiLSTM verb/noun model on a cached feature set (resumable with --resume).",
)
