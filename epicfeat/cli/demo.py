"""``epicfeat demo``: generate synthetic EPIC-format data and run every stage on it, on the CPU, in minutes."""
from epicfeat.cli._options import config_command
from epicfeat.configs import DemoConfig


demo = config_command(
    DemoConfig, "epicfeat.demo:run_demo",
    doc="Run the whole pipeline on a generated synthetic dataset (re-run to resume) and print the results.",
)
