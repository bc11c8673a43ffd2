"""Registers every command module on the app. One line per command; no logic here."""
from epicfeat.cli import app, cache, extract, train_temporal
from epicfeat.cli import demo, evaluate, submit
from epicfeat.cli import export, predict
from epicfeat.cli import finetune

# typer's one-module-per-command layout: each module defines one function named after its command.
app.command("extract")(extract.extract)
app.command("train-temporal")(train_temporal.train_temporal)
app.command("evaluate")(evaluate.evaluate)
app.command("submit")(submit.submit)
app.command("demo")(demo.demo)
app.command("predict")(predict.predict)
app.command("export")(export.export)
app.command("finetune")(finetune.finetune)
app.add_typer(cache.app, name="cache", help="Inspect, verify and export feature sets.")
