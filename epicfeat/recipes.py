"""Recipes: a command's config resolved in layers, later wins: the dataclass defaults (``epicfeat/configs.py``),
a ``--config FILE`` recipe, then the CLI flags given (``None``: not given). An unknown key is an error naming the
key and the file: a misspelt hyper-parameter silently ignored would cost a whole training run.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from epicfeat.errors import EpicfeatError
from epicfeat.files import atomic_write_text

C = TypeVar("C")


class ConfigError(EpicfeatError, ValueError):
    """A config file or override that cannot be used; the message names the key and the source."""


def option(default: Any, help: str, *, cli: bool = True, flag: str | None = None) -> Any:
    """A config field with the help text that ``--help`` shows; ``cli=False`` leaves it to recipes only, ``flag``
    names its option when the field's name reads badly there (``--checkpoint`` for ``checkpoints``)."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli, "flag": flag})


def resolve_config(cls: type[C], *, config_file: str | os.PathLike | None = None,
                   overrides: Mapping[str, Any] | None = None) -> C:
    """Build a ``cls`` from its field defaults, a recipe file and CLI overrides (later wins)."""
    values: dict[str, Any] = {}
    source = "command line"
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        values.update(_check_keys(cls, read_yaml(path), str(path)))
        source = f"{path} + {source}"
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(_check_keys(cls, given, "command-line options"))
    return from_dict(cls, values, source=source)


def from_dict(cls: type[C], values: Mapping[str, Any], *, source: str = "dict") -> C:
    """Coerce plain YAML values (str, list, number) to the field types of ``cls`` and build it."""
    _check_keys(cls, values, source)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        try:
            kwargs[name] = _coerce(value, hints[name])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: key '{name}' = {value!r} is not a valid {hints[name]}: {err}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A YAML/JSON-safe dict of a config dataclass (paths become strings, tuples lists)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def save_config(config: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically, so a re-run can pass it back with ``--config``."""
    return atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def _check_keys(cls: type, values: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} "
            f"for {cls.__name__}; valid keys are: {', '.join(sorted(known))}"
        )
    return values


def _coerce(value: Any, hint: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in [a for a in args if a is not type(None)]:
            try:
                return _coerce(value, option)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"must be one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in items)
        if len(items) != len(args):
            raise ValueError(f"expected {len(args)} values, got {len(items)}")
        return tuple(_coerce(v, a) for v, a in zip(items, args))
    if hint is Path:
        return Path(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ValueError("expected true or false")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)  # YAML 1.1 reads "1.5e-4" as a string
    if hint is str:
        return str(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
