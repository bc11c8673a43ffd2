"""``epicfeat finetune``: ResNet50 + BiLSTM fine-tuned end to end on decoded clips (several GPUs: torchrun)."""
from epicfeat.cli._options import config_command
from epicfeat.configs import FinetuneConfig


finetune = config_command(
    FinetuneConfig, "epicfeat.finetune:finetune",
    doc="Fine-tune the backbone and the temporal model end to end on decoded clips (resumable; torchrun for DDP).",
)
