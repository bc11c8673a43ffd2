"""The ``epicfeat`` command line: one module per command, each a thin wrapper over one package function.

Every user mistake (a click usage error, an ``EpicfeatError``) ends in one line on stderr and exit 2. Click's
errors are recognised by class name: typer 0.26 and later bundle their own click.
"""
import sys

import typer

from epicfeat.cli._options import Interrupted
from epicfeat.errors import EpicfeatError

app = typer.Typer(
    name="epicfeat",
    help="EPIC-KITCHENS-100 action recognition as a two-stage feature cache: extract ResNet50 features once, "
    "then train temporal models on them in minutes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help is plain text: "<root>/P01" or "(default: x)" must print as written
)


def main() -> None:
    """Console entry point: user-facing errors become one clear message and exit code 2, never a traceback."""
    from epicfeat.cli import commands  # noqa: F401  (registers every command: only the entry point needs them all)

    try:
        exit_code = app(standalone_mode=False)  # click returns typer.Exit's code here instead of exiting
    except EpicfeatError as err:
        _fail(f"error: {err}")
    except (Interrupted, KeyboardInterrupt):
        _interrupted()
    except Exception as err:
        if _is_click(err, "Abort"):  # click turns Ctrl-C (KeyboardInterrupt) into Abort
            _interrupted()
        if not _is_click(err, "ClickException"):
            raise
        _fail(f"error: {_usage(err)}", code=getattr(err, "exit_code", 2))
    sys.exit(exit_code if isinstance(exit_code, int) else 0)


def _interrupted() -> None:
    args = sys.argv[1:]
    # Training runs continue only when asked (a re-run without --resume refuses to overwrite the folder).
    if args and args[0] in ("train-temporal", "finetune") and "--resume" not in args:
        hint = "run the same command with --resume to continue from the last finished epoch."
    else:
        hint = "re-run the same command to resume."
    typer.secho(f"interrupted: completed work is kept; {hint}", err=True)
    sys.exit(130)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    sys.exit(code)


def _is_click(err: BaseException, name: str) -> bool:
    return any(klass.__name__ == name for klass in type(err).__mro__)


def _usage(err: Exception) -> str:
    """click's message on one line (whatever it wrapped), then where the options are."""
    message = err.format_message() if hasattr(err, "format_message") else str(err)
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "epicfeat"
    return f"{' '.join(message.split())}\nTry '{command} --help' for the options and their defaults."
