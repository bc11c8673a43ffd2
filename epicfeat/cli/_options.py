"""Command-line options built from a command's config dataclass, so each default and help text has one source.

Every option defaults to ``None`` ("not given"), so a value from ``--config FILE`` is only overridden by a flag the
user typed. ``Literal`` → a choice (an Enum: typer < 0.19 has no ``Literal``), ``bool`` → ``--x/--no-x``, a
variadic tuple → a repeatable option (strings also split on commas), a fixed tuple → one option of that many values.
"""
from __future__ import annotations

import dataclasses
import enum
import inspect
import pkgutil
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from epicfeat.recipes import resolve_config

ConfigFile = Annotated[
    Optional[Path],
    typer.Option("--config", metavar="FILE", show_default=False,
                 help="YAML recipe (e.g. configs/temporal_32f.yaml, or a run's saved config.yaml) that replaces the "
                      "defaults shown here; flags override it."),
]


class Interrupted(Exception):
    """Ctrl-C inside a command. click swallows KeyboardInterrupt (as Abort, or as exit code 130 in newer typer);
    this one passes through it, so the entry point can say how to resume."""


def config_command(cls: type, run: Callable[[Any], Any] | str, *, arguments: tuple[str, ...] = (),
                   config_file: bool = True, doc: str | None = None) -> Callable[..., None]:
    """A typer command for ``cls``: parse the flags, resolve the config and call ``run(config)``. A "module:function"
    ``run`` is imported when the command runs, so ``epicfeat --help`` imports no torch. ``arguments`` names fields
    taken as positional arguments (``predict SOURCE``); ``config_file`` False: no ``--config``."""
    hints = typing.get_type_hints(cls)
    parameters = [_parameter(f, hints[f.name], positional=f.name in arguments)
                  for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]
    parameters.sort(key=lambda p: p.default is not inspect.Parameter.empty)  # typer wants arguments first
    if config_file:  # first of the options: a recipe is the starting point that the flags after it adjust
        first_option = sum(p.default is inspect.Parameter.empty for p in parameters)
        parameters.insert(first_option, inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                                                          annotation=ConfigFile))

    def command(**given: Any) -> None:
        recipe = given.pop("config", None)
        overrides = {name: _from_cli(value) for name, value in given.items()}
        config = resolve_config(cls, config_file=recipe, overrides=overrides)
        try:
            (pkgutil.resolve_name(run) if isinstance(run, str) else run)(config)
        except KeyboardInterrupt:
            raise Interrupted() from None

    command.__signature__ = inspect.Signature(parameters)  # what typer reads to build the options
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = doc
    return command


def help_text(field: dataclasses.Field) -> str:
    """The field's help with its default appended once, in one notation: ``... (default: 10)``."""
    text = field.metadata.get("help", "")
    if field.default is True or field.default is False:  # a switch: the default is the spelling that is on
        default = ("--" if field.default else "--no-") + field.name.replace("_", "-")
    else:
        default = _show(field.default)
    return f"{text} (default: {default})" if default else text


def _parameter(field: dataclasses.Field, hint: Any, *, positional: bool) -> inspect.Parameter:
    cli_type, extra = _cli_type(hint, field.name)
    if positional:
        info = typer.Argument(help=field.metadata.get("help", ""), show_default=False, **extra)
        return inspect.Parameter(field.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[cli_type, info])
    flag = "--" + field.name.replace("_", "-")
    names = [f"{flag}/--no-{flag[2:]}"] if _base(hint) is bool else [field.metadata.get("flag") or flag]
    metavar = None if "case_sensitive" in extra or _base(hint) is bool else _metavar(cli_type)
    info = typer.Option(*names, help=help_text(field), show_default=False, metavar=metavar, **extra)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[cli_type], info])


def _cli_type(hint: Any, name: str) -> tuple[Any, dict[str, Any]]:
    base = _base(hint)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is typing.Literal:
        choices = enum.Enum(f"{name.title().replace('_', '')}Choice", {v: v for v in args}, type=str)
        return choices, {"case_sensitive": False}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return list[_base(args[0])], {}
    if origin is tuple:
        return tuple[tuple(_base(a) for a in args)], {}
    return base, {}


def _metavar(cli_type: Any) -> str:
    args = typing.get_args(cli_type)
    if typing.get_origin(cli_type) is tuple:
        return " ".join(_METAVARS.get(a, "VALUE") for a in args)
    return _METAVARS.get(args[0] if args else cli_type, "VALUE")


_METAVARS = {int: "INT", float: "NUMBER", str: "TEXT", Path: "PATH"}


def _base(hint: Any) -> Any:
    """``X | None`` → ``X``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint


def _from_cli(value: Any) -> Any:
    """Typer's values → the plain values ``resolve_config`` coerces (``None``: not given)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        if not value:
            return None  # a repeatable option not given arrives as []
        items = [_from_cli(v) for v in value]
        if all(isinstance(v, str) for v in items):  # --video-ids P01_01,P01_02 as well as repeated
            items = [part.strip() for v in items for part in v.split(",") if part.strip()]
        return tuple(items)
    return value


def _show(default: Any) -> str:
    if default is None or default == () or default == "":
        return ""
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, tuple):
        return ", ".join(_show(v) or "none" for v in default)
    return str(default)
