"""How config values are read: YAML and `--section.key=value` strings coerced to each field's type and
checked, unknown keys refused with a "did you mean", and every key described for --help and the docs.
The sections themselves are the dataclasses of `peftkit.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from peftkit.errors import PeftkitError


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its one help text (and the values it accepts)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise PeftkitError(f"config key '{key}': {message}")


def keys(cls: type, path: list[str]) -> list[str]:
    for section in path:
        cls = typing.get_type_hints(cls)[section]
    return [f.name for f in dataclasses.fields(cls)]


def unknown(dotted: str, valid: list[str], origin: str) -> typing.NoReturn:
    parent, _, name = dotted.rpartition(".")
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
    raise PeftkitError(f"{origin}: unknown config key '{dotted}'{hint} (valid here: {', '.join(valid)})")


def build(cls: type, data: Any, prefix: str, origin: str) -> Any:
    if not isinstance(data, dict):
        raise PeftkitError(f"{origin}: config key '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in fields:
            unknown(dotted, list(fields), origin)
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = build(kind, value, dotted + ".", origin)
        else:
            kwargs[key] = coerce(value, kind, dotted, fields[key].metadata.get("choices"), origin)
    try:
        return cls(**kwargs)
    except PeftkitError as err:
        raise PeftkitError(f"{origin}: {err}") from None


def coerce(value: Any, kind: Any, key: str, choices: tuple | None, origin: str) -> Any:
    def bad(expected: str) -> typing.NoReturn:
        raise PeftkitError(f"{origin}: config key '{key}' must be {expected}, got {value!r}")

    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        kind = next(a for a in args if a is not type(None))
    if set(args) == {int, str}:  # a count or a word (eval.qa_questions=all)
        if isinstance(value, str) and value in (choices or ()):
            return value
        try:
            return coerce(value, int, key, None, origin)
        except PeftkitError:
            bad("an integer or " + " or ".join(repr(c) for c in choices or ()))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        bad("true or false")
    if kind is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                bad("an integer")
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            bad("an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            bad("a number")
        return float(value)
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            value = [v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip()]
        if typing.get_args(kind) == (int,):
            if not isinstance(value, list) or not all(
                isinstance(v, int | str) and not isinstance(v, bool) for v in value
            ):
                bad("a list of integers")
            try:
                return [int(v) for v in value]
            except ValueError:
                bad("a list of integers")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            bad("a list of names")
        return value
    if kind is str:
        if isinstance(value, bool | dict | list) or value is None:
            bad("a string")
        value = str(value)
        if choices and value not in choices:
            bad("one of " + ", ".join(repr(c) for c in choices))
        return value
    raise AssertionError(f"unsupported config type {kind} for {key}")


def describe(root: type) -> list[tuple[str, str, Any, str]]:
    """Every key of the `root` dataclass and its sections as (dotted key, type, default, help), for --help and the docs."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
                continue
            kind = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
            help_text = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                words = ", ".join(f.metadata["choices"])
                help_text += f" (a number or {words})" if kind == "int | str" else f" (one of: {words})"
            rows.append((prefix + f.name, kind, getattr(default, f.name), help_text))

    walk(root, "")
    return rows
