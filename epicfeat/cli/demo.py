"""``epicfeat demo``: generate synthetic EPIC-format data and run every stage on it, on the CPU, in minutes."""
from epicfeat.cli._options import config_command
from epicfeat.configs import DemoConfig


def _run(cfg: DemoConfig) -> None:
    from epicfeat.demo import run_demo

    run_demo(cfg)


demo = config_command(
    DemoConfig, _run,
    doc="Run the whole pipeline on a generated synthetic dataset (re-run to resume) and print the results.",
)
