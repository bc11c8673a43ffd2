"""``epicfeat submit``: score the test split and write the EPIC-100 action recognition leaderboard zip."""
from epicfeat.cli._options import config_command
from epicfeat.configs import SubmitConfig


submit = config_command(
    SubmitConfig, "epicfeat.evaluate:submit",
    doc="Score EPIC_100_test_timestamps.csv and write submission.zip (test.json) ready to upload.",
)
