"""Stage configs are dataclasses; this module builds them from layers of plain values.

A field's docstring (the string literal under it) is its `--help` text (`monofast.cli.flags`
makes the flags). Values are parsed from strings (flags, `--set`), coerced from TOML/JSON
and preset values, checked against the field's type and then by the class, and saved as
JSON beside the stage's outputs; `identity` is the part of a config that decides a stage's
results.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
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


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)  # `1e4`, `2.0`: a whole number written as a float
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None
    if not (math.isfinite(number) and number.is_integer()):
        raise ValueError(f"expected an integer, got {text!r}")
    return int(number)


def _parse_scalar(tp: Any, text: str) -> Any:
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if tp is int:
        return _parse_int(text)
    if tp in (float, str):
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


INT_RANGE = (-(2**63), 2**63 - 1)
"""Integer options must fit 64 bits: every consumer (torch, numpy, the native module) takes them."""


def _shown(value: Any) -> str:
    """A value as the user wrote it in a config file (JSON spelling), short and on one line."""
    if isinstance(value, float) and not math.isfinite(value):
        text = repr(value)
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        text = f"{'-' if value < 0 else ''}<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    else:
        try:
            text = json.dumps(value, default=repr)
        except (TypeError, ValueError):  # huge integers, NaN inside a list
            try:
                text = repr(value)
            except ValueError:
                text = f"<{_kind(value)[2:].lstrip()}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def describe_type(tp: Any) -> str:
    """What a field of annotated type `tp` takes, in words: `an integer`, `a list of numbers`."""
    base, optional = unwrap_optional(tp)
    if typing.get_origin(base) in (tuple, list):
        (item,) = [a for a in typing.get_args(base) if a is not Ellipsis] or [str]
        plural = {bool: "true/false values", int: "integers", float: "finite numbers", str: "strings"}
        text = f"a list of {plural.get(item, getattr(item, '__name__', str(item)))}"
    else:
        text = {bool: "true or false", int: "an integer", float: "a finite number",
                str: "a string"}.get(base, getattr(base, "__name__", str(base)))
    return text + " or none" if optional else text


def _wrong(where: str, value: Any, tp: Any, what: str | None = None) -> UserError:
    if value is None:
        return UserError(f"{where} is null; expected {describe_type(tp)}")
    return UserError(f"{where} = {_shown(value)} is {what or _kind(value)}; expected {describe_type(tp)}")


def _check_scalar(tp: Any, value: Any, where: str, field_tp: Any = None) -> Any:
    """`value` as a `tp` (bool, int, float or str), or a `UserError` naming `where` and what
    the field (of type `field_tp`, an Optional of `tp`, say) takes."""
    expected = tp if field_tp is None else field_tp
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(where, value, expected)
    if tp is int:
        if isinstance(value, float) and not isinstance(value, bool):
            if not (math.isfinite(value) and value.is_integer()):
                raise _wrong(where, value, expected, "not a whole number")
            value = int(value)  # 1e4 in a TOML file
        if not isinstance(value, int) or isinstance(value, bool):
            raise _wrong(where, value, expected)
        if not INT_RANGE[0] <= value <= INT_RANGE[1]:
            raise UserError(f"{where} = {_shown(value)} is out of range; expected an integer "
                            f"between -2**63 and 2**63-1")
        return value
    if tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise _wrong(where, value, expected, "too large") from None
        if not isinstance(value, float):
            raise _wrong(where, value, expected)
        if not math.isfinite(value):
            raise _wrong(where, value, expected, "not a finite number")
        return value
    if tp is str:
        if isinstance(value, bool):  # `compile = true` in a TOML file reads as the text "true"
            return "true" if value else "false"
        if not isinstance(value, str):
            raise _wrong(where, value, expected)
        if "\0" in value:
            raise _wrong(where, value, expected, "a string with a NUL character")
        return value
    return value  # a type the config layers do not know: the dataclass checks it


def coerce_type(tp: Any, value: Any, where: str) -> Any:
    """`value` (from a JSON/TOML file, a preset, `--set` or a flag) as a value of the field
    type `tp`, or a `UserError` naming `where`, the value and the type expected.

    Strings are parsed (`"1e4"`, `"3,5"`), integers are accepted for floats, whole floats for
    integers, lists become tuples; booleans are never numbers, floats must be finite and
    integers must fit 64 bits."""
    base, optional = unwrap_optional(tp)
    if isinstance(value, str) and base is not str:
        try:
            value = parse_value(tp, value)
        except (ValueError, TypeError, OverflowError):
            raise UserError(f"{where} = {_shown(value)} is not {describe_type(tp)}") from None
    if value is None:
        if optional:
            return None
        raise _wrong(where, value, tp)
    if typing.get_origin(base) in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _wrong(where, value, tp)
        (item,) = [a for a in typing.get_args(base) if a is not Ellipsis] or [str]
        out = []
        for i, element in enumerate(value):
            if isinstance(element, str) and item is not str:
                try:
                    element = _parse_scalar(item, element)
                except (ValueError, TypeError, OverflowError):
                    raise UserError(f"{where}[{i}] = {_shown(element)} is not {describe_type(item)}") from None
            out.append(_check_scalar(item, element, f"{where}[{i}]"))
        return tuple(out)
    return _check_scalar(base, value, where, tp)


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """`value` (from a preset, a config file or a flag) as the type of `cls`'s field `name`."""
    return coerce_type(type_hints(cls)[name], value, f"{where}: {name}")


def not_utf8(text: str) -> str | None:
    """`text` shown with its bytes that are not UTF-8 as `\\xff` escapes, when it has any (Python
    gives undecodable command-line bytes as lone surrogates, which no tokenizer or file
    takes); else None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the bytes as typed
    except UnicodeEncodeError:  # a surrogate no byte makes (`"\\ud800"` in a JSON file)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def flag(name: str) -> str:
    """The command-line flag of a field: `n_embd` -> `--n-embd`."""
    return "--" + name.replace("_", "-")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file: either flat `{field: value}` or `{stage: {...}}`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                        f"save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror or err}; check its permissions") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as err:  # tomllib and json raise different classes
        raise UserError(f"cannot parse config file {path}: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} holds {'null' if data is None else _kind(data)}, not a table of "
                        f"options; write "
                        f'{{"option": value}} or {{"stage": {{"option": value}}}}')
    return data


def build(cls: type, *layers: Mapping[str, Any], where: str = "config") -> Any:
    """Instantiate `cls` from override layers (later wins), checking every key.

    Unknown keys and values of the wrong type become a `UserError` naming the key and the
    fix; `__post_init__` checks raise `ValueError`, which is re-raised as a `UserError`. Any
    other exception `__post_init__` raises on a value of the right type (an `OverflowError`
    from arithmetic on a huge one) is a `UserError` naming the option that causes it, when
    one does; else it is a bug and propagates.
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
    except UserError:
        raise
    except ValueError as err:
        raise UserError(f"{where}: {_one_line(err)}") from None
    except Exception as err:
        name = _culprit(cls, values, type(err))
        if name is None:
            raise
        raise UserError(f"{where}: {name} = {_shown(values[name])} cannot be used "
                        f"({type(err).__name__}: {_one_line(err)}); give another value") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _culprit(cls: type, values: dict[str, Any], error: type[BaseException]) -> str | None:
    """The option whose value makes `cls(**values)` raise `error`: the one whose removal (back
    to its default) stops it, else the one that raises it alone; None when none does."""
    def raises(kwargs: dict[str, Any]) -> bool:
        try:
            cls(**kwargs)
        except error:
            return True
        except Exception:
            return False
        return False

    if raises({}):
        return None  # the defaults alone raise it: a bug, not a value
    for name in values:
        if not raises({k: v for k, v in values.items() if k != name}):
            return name
    for name in values:
        if raises({name: values[name]}):
            return name
    return None


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
    record written before a field became runtime still matches; and a field the record
    lacks (one added to the class since) matches when `cfg` leaves it at its default, which
    keeps what the stage did before it existed."""
    if not isinstance(recorded, dict):
        return False
    runtime = getattr(type(cfg), "RUNTIME", frozenset())
    now = identity(cfg)
    defaults = _field_defaults(type(cfg))
    added = {k for k in now if k not in recorded and k in defaults and now[k] == defaults[k]}
    return ({k: v for k, v in recorded.items() if k not in runtime}
            == {k: v for k, v in now.items() if k not in added})


def _field_defaults(cls: type) -> dict[str, Any]:
    """Each field's default as `to_dict` writes it (fields without one are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            continue
        out[f.name] = json.loads(json.dumps(value))
    return out
