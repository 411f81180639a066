"""Layered settings for a subcommand: command-line flags over ``HEXGEN_*`` environment variables over a TOML file.

A subcommand's parser is built as usual; ``make_layered(parser)`` then records every option's default and
hides it (argparse's SUPPRESS), so after parsing, a value present in the namespace was given as a flag.
``resolve`` fills the rest from the environment (``HEXGEN_`` plus the option's name in capitals), then from
the config file (the option's name as a key, dashes or underscores), then from the recorded defaults.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hexgen.engine.quant_bytes import QUANTIZATIONS, scheme_of

ENV_PREFIX = "HEXGEN_"
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A config file or environment value that cannot be used; the message names it and says why."""


def add_quantize_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--quantize none|int8|int4`` (default none), checked by ``quantize_scheme`` so that a bad value gets
    the command's one-line error."""
    parser.add_argument(
        "--quantize",
        default="none",
        metavar="|".join(QUANTIZATIONS),
        help=f"{what}: none (the checkpoint's dtype), int8 (per output channel) or int4 (groups of 32); default none",
    )


def quantize_scheme(name: str) -> str | None:
    """The engine's scheme (None: full precision) for a ``--quantize`` value; SettingsError in one line for a
    bad one. O(1)."""
    try:
        return scheme_of(name)
    except ValueError as exc:
        raise SettingsError(f"--quantize: {exc}") from None


@dataclass(frozen=True)
class Option:
    dest: str
    flag: str
    kind: str  # "flag" (store_true), "list" (append), or "value"
    convert: Any  # the option's type (str when it has none)
    choices: tuple[Any, ...] | None
    default: Any


def make_layered(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("help", "func", "config")) -> None:
    """Record each option's default on the parser and hide it, so that ``resolve`` can tell given flags apart."""
    options: dict[str, Option] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in skip:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            kind = "flag"
        elif isinstance(action, argparse._AppendAction):
            kind = "list"
        else:
            kind = "value"
        flag = max(action.option_strings, key=len)
        choices = tuple(action.choices) if action.choices else None
        options[action.dest] = Option(action.dest, flag, kind, action.type or str, choices, action.default)
        action.default = argparse.SUPPRESS
    parser.set_defaults(_layered=options)


def load_config_file(path: str) -> dict[str, Any]:
    """The TOML file's top-level table (options may also sit under a ``[join]`` table)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    return data


def resolve(args: argparse.Namespace, env: Mapping[str, str], config: Mapping[str, Any], source: str) -> None:
    """Fill every option not given as a flag: environment, then ``config`` (read from ``source``), then default.

    Raises SettingsError for an unknown config key or a value of the wrong type. O(options + config keys)."""
    options: dict[str, Option] = args._layered
    table = config.get("join", config) if isinstance(config.get("join"), dict) else config
    by_key = {dest.replace("_", "-"): dest for dest in options}
    file_values: dict[str, Any] = {}
    for key, value in table.items():
        dest = by_key.get(key.replace("_", "-"))
        if dest is None:
            known = ", ".join(sorted(by_key))
            raise SettingsError(f"{source}: unknown key {key!r} (known: {known})")
        file_values[dest] = _from_file(options[dest], value, f"{source}: {key}")
    for dest, option in options.items():
        if hasattr(args, dest):
            continue
        name = ENV_PREFIX + dest.upper()
        if name in env:
            setattr(args, dest, _from_env(option, env[name], name))
        elif dest in file_values:
            setattr(args, dest, file_values[dest])
        else:
            setattr(args, dest, option.default)


def _checked(option: Option, value: Any, where: str) -> Any:
    if option.choices is not None and value not in option.choices:
        raise SettingsError(f"{where}: {value!r} is not one of {', '.join(map(str, option.choices))}")
    return value


def _from_env(option: Option, raw: str, name: str) -> Any:
    if option.kind == "flag":
        if raw.strip().lower() in TRUE:
            return True
        if raw.strip().lower() in FALSE:
            return False
        raise SettingsError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")
    if option.kind == "list":
        return [_checked(option, item, name) for item in raw.replace(",", " ").split()]
    try:
        value = option.convert(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}={raw!r}: expected {_type_name(option.convert)}") from None
    return _checked(option, value, name)


def _from_file(option: Option, value: Any, where: str) -> Any:
    if option.kind == "flag":
        if not isinstance(value, bool):
            raise SettingsError(f"{where} must be true or false")
        return value
    if option.kind == "list":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise SettingsError(f"{where} must be a string or a list of strings")
        return [_checked(option, i, where) for i in items]
    expected = option.convert
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected in (int, float, str) and (not isinstance(value, expected) or isinstance(value, bool)):
        raise SettingsError(f"{where} must be {_type_name(expected)}")
    return _checked(option, value, where)


def _type_name(kind: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, getattr(kind, "__name__", "a value"))
