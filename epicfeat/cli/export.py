"""``epicfeat export``: a temporal checkpoint → ONNX / TorchScript / CoreML models (head alone and full), checked."""
from epicfeat.cli._options import config_command
from epicfeat.configs import ExportConfig


def _run(cfg: ExportConfig) -> None:
    from epicfeat.export import export, print_summary

    print_summary(export(cfg))


export = config_command(
    ExportConfig, _run,
    doc="Export the temporal head and the full frames-to-logits model, with class names, checked against PyTorch.",
)
