"""Registers every command module on the app, in pipeline order (as `epicfeat --help` lists them). No logic here."""
from epicfeat.cli import app, cache, demo, evaluate, export, extract, finetune, predict, submit, train_temporal

# typer's one-module-per-command layout: each module defines one function named after its command.
app.command("demo")(demo.demo)
app.command("extract")(extract.extract)
app.command("train-temporal")(train_temporal.train_temporal)
app.command("evaluate")(evaluate.evaluate)
app.command("submit")(submit.submit)
app.command("finetune")(finetune.finetune)
app.command("predict")(predict.predict)
app.command("export")(export.export)
app.add_typer(cache.app, name="cache", help="Inspect, verify and export feature sets.")
