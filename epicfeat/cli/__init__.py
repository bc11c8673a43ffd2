"""The ``epicfeat`` command line: one module per command, each a thin wrapper over one package function."""
import sys

import typer

from epicfeat.errors import EpicfeatError

app = typer.Typer(
    name="epicfeat",
    help="EPIC-KITCHENS-100 action recognition as a two-stage feature cache: extract ResNet50 features once, "
    "then train temporal models on them in minutes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Imported here so `epicfeat --help` stays the only place that needs every command module.
    from epicfeat.cli import commands  # noqa: F401


def main() -> None:
    """Console entry point: user-facing errors become one clear message and exit code 2, never a traceback."""
    _register()
    try:
        exit_code = app(standalone_mode=False)  # click returns typer.Exit's code here instead of exiting
    except EpicfeatError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted: completed work is kept; re-run the same command to resume.", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        raise
    sys.exit(exit_code if isinstance(exit_code, int) else 0)
