"""Command-line flags from a stage's config dataclass: one `--kebab-case` flag per field,
its help the field's docstring and the value the command will use, and back to the values
the user typed."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from typing import Any, Mapping

from monofast.common.config import (
    coerce_type,
    field_docs,
    flag,
    parse_value,
    type_hints,
    unwrap_optional,
)
from monofast.run.resolve import Origin, defaults


class _Unset:
    """Default of every generated flag, so `--limit none` (a real None) differs from no flag."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None,
                  origins: Mapping[str, Origin] | None = None) -> None:
    """Add one `--kebab-case` flag per field of `cls`; its help ends with the value the
    command will use without the flag and where that comes from (`origins`: the default,
    the preset or the config file). Defaults stay `UNSET` so that only flags the user typed
    override the preset and config file."""
    group = parser.add_argument_group(title or f"{cls.__name__} options")
    origins = origins or defaults(cls)
    docs = field_docs(cls)
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        meta = f.metadata
        name = meta.get("flag", flag(f.name))
        value, source = origins[f.name]
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        help_text = (docs.get(f.name, "") + f" (now: {shown}, from the {source})").strip().replace("%", "%%")
        if source == "default":
            help_text = help_text.replace(", from the default)", ", the default)")
        base, _ = unwrap_optional(tp)
        if meta.get("repeat"):
            group.add_argument(name, dest=f.name, action="append", default=None,
                               metavar=meta.get("metavar", "VALUE"), help=help_text)
        elif base is bool:
            group.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=UNSET, help=help_text)
        else:
            group.add_argument(name, dest=f.name, default=UNSET, metavar=meta.get("metavar", _metavar(base)),
                               type=functools.partial(_argparse_value, tp), help=help_text)


def _metavar(tp: Any) -> str:
    if typing.get_origin(tp) in (tuple, list):
        return "A,B,..."
    return {int: "N", float: "X"}.get(tp, "TEXT")


def _argparse_value(tp: Any, text: str) -> Any:
    try:
        return parse_value(tp, text)
    except (ValueError, TypeError, OverflowError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cli_overrides(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields the user set explicitly on the command line."""
    out: dict[str, Any] = {}
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, UNSET)
        if value is UNSET or (value is None and f.metadata.get("repeat")):
            continue
        if f.metadata.get("repeat"):
            value = tuple(value)
            value = coerce_type(hints[f.name], value, f.metadata.get("flag", flag(f.name)))
        out[f.name] = value
    return out
