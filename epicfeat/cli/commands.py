"""Registers every command module on the app. One line per command; no logic here."""
from epicfeat.cli import app, cache, extract, train_temporal

# typer's one-module-per-command layout: each module defines one function named after its command.
app.command("extract")(extract.extract)
app.command("train-temporal")(train_temporal.train_temporal)
app.add_typer(cache.app, name="cache", help="Inspect, verify and export feature sets.")
