"""``epicfeat finetune``: ResNet50 + BiLSTM fine-tuned end to end on decoded clips, from a train-temporal checkpoint.

One GPU:   epicfeat finetune --checkpoint runs/temporal/best.pt --videos V --annotations A --out runs/finetune
Many GPUs: torchrun --nproc-per-node 4 -m epicfeat finetune ...   (see pipelines/slurm_finetune.sbatch)
"""
from epicfeat.cli._options import config_command
from epicfeat.configs import FinetuneConfig


finetune = config_command(
    FinetuneConfig, "epicfeat.finetune:finetune",
    doc="Fine-tune the backbone and the temporal model end to end on decoded clips (resumable; torchrun for DDP).",
)
