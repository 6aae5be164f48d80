"""Stage configs are dataclasses; this module builds them from layers of plain values.

A field's docstring (the string literal under it) is its `--help` text (`monofast.cli.flags`
makes the flags). Values are parsed from strings (flags, `--set`), coerced from TOML/JSON
and preset values, checked, and saved as JSON beside the stage's outputs; `identity` is the
part of a config that decides a stage's results.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from monofast.common.errors import UserError


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the docstring written under it in the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for prev, node in zip(body, body[1:]):
            if (
                isinstance(prev, ast.AnnAssign)
                and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_scalar(tp: Any, text: str) -> Any:
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if tp in (int, float, str):
        if tp is int:
            return int(float(text)) if "e" in text.lower() else int(text)
        return tp(text)
    raise TypeError(f"unsupported config type {tp!r}")


def parse_value(tp: Any, text: str) -> Any:
    """Parse one command-line string into a value of the field's annotated type."""
    tp, optional = unwrap_optional(tp)
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis] or [str]
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return tuple(_parse_scalar(item, p) for p in parts)
    return _parse_scalar(tp, text)


def coerce_type(tp: Any, value: Any, where: str) -> Any:
    """Coerce a value from JSON/TOML/preset dicts to the field type (lists become tuples)."""
    if isinstance(value, str) and tp is not str:
        try:
            return parse_value(tp, value)
        except (ValueError, TypeError) as err:
            raise UserError(f"{where}: {err}") from None
    base, _ = unwrap_optional(tp)
    if typing.get_origin(base) in (tuple, list) and isinstance(value, (list, tuple)):
        return tuple(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """`value` (from a preset, a config file or a flag) as the type of `cls`'s field `name`."""
    return coerce_type(type_hints(cls)[name], value, f"{where}: {name}")


def flag(name: str) -> str:
    """The command-line flag of a field: `n_embd` -> `--n-embd`."""
    return "--" + name.replace("_", "-")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file: either flat `{field: value}` or `{stage: {...}}`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            return tomllib.loads(text)
        return json.loads(text)
    except Exception as err:  # tomllib and json raise different classes
        raise UserError(f"cannot parse config file {path}: {err}") from None


def build(cls: type, *layers: Mapping[str, Any], where: str = "config") -> Any:
    """Instantiate `cls` from override layers (later wins), checking every key.

    Unknown keys and invalid values become a `UserError` naming the key and the fix;
    `__post_init__` checks raise `ValueError`, which is re-raised as a `UserError`.
    """
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = type_hints(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            key_norm = key.replace("-", "_")
            if key_norm not in names:
                close = [n for n in sorted(names) if n.startswith(key_norm[:3])]
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UserError(f"{where}: unknown option {key!r} for {cls.__name__}{hint}")
            values[key_norm] = coerce_type(hints[key_norm], value, f"{where}: {key}")
    try:
        return cls(**values)
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def identity(cfg: Any) -> dict[str, Any]:
    """The part of a config that decides a stage's results: `to_dict` without the fields the
    class lists in its `RUNTIME` class variable (device, compute precision, resume, ...), so
    that resuming on another device or in another precision does not count as a change of
    config (the rule is in `monofast.common.device`)."""
    runtime = getattr(type(cfg), "RUNTIME", frozenset())
    return {k: v for k, v in to_dict(cfg).items() if k not in runtime}


def same_identity(recorded: Any, cfg: Any) -> bool:
    """Does an identity recorded earlier (a manifest's, a checkpoint's) match `cfg`'s? The
    fields `cfg`'s class now counts as runtime are left out of the recorded one too, so a
    record written before a field became runtime still matches."""
    if not isinstance(recorded, dict):
        return False
    runtime = getattr(type(cfg), "RUNTIME", frozenset())
    return {k: v for k, v in recorded.items() if k not in runtime} == identity(cfg)
