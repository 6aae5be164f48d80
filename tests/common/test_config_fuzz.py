"""Every option of every stage, given arbitrary values through the real config layers (a
value as `--set` or a preset gives it, a TOML or JSON config file, a command-line flag),
either resolves or ends in a one-line `UserError`: never another exception."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monofast.cli import flags
from monofast.common.errors import UserError
from monofast.run.resolve import file_layer, resolve_config
from monofast.run.stages import STAGES

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

EDGES = st.sampled_from([
    0, -1, 1, 2**63 - 1, 2**63, -(2**63) - 1, 10**400, 1e308, -0.0, 0.5, 1e-300,
    math.nan, math.inf, -math.inf, "", " ", "nan", "inf", "-inf", "1e400", "1e4", "2.0", "1,2",
    "true", "none", "auto", "cpu", "cuda:0", "train", "\x00", "a\nb", "x=", "=y",
])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | EDGES
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=6)

OPTIONS = [(stage, f.name) for stage in STAGES for f in dataclasses.fields(stage.config_cls()) if f.init]


def _ids(option: tuple[Any, str]) -> str:
    return f"{option[0].name}.{option[1]}"


def _resolves_or_user_error(stage, *layers: dict[str, Any]) -> None:
    try:
        cfg = resolve_config(stage, "smoke", *layers)
    except UserError as err:
        assert "\n" not in str(err), str(err)
    else:
        assert isinstance(cfg, stage.config_cls())


@pytest.mark.parametrize("option", OPTIONS, ids=_ids)
@FUZZ
@given(value=VALUES)
def test_any_value_of_any_option_resolves_or_is_a_user_error(option, value):
    stage, name = option
    _resolves_or_user_error(stage, {name: value})


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_several_options_at_once(stage, data):
    names = [f.name for f in dataclasses.fields(stage.config_cls()) if f.init]
    layer = data.draw(st.dictionaries(st.sampled_from(names), VALUES, max_size=4))
    _resolves_or_user_error(stage, layer)


# ---------------------------------------------------------------------------------------
# Config files

def _toml(value: Any) -> str | None:
    """`value` in TOML, or None where TOML cannot say it (null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if value.bit_length() < 64 else None  # TOML integers are 64-bit
    if isinstance(value, float):
        return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan" if math.isnan(value) else repr(value))
    if isinstance(value, str):
        return json.dumps(value).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        items = [_toml(v) for v in value]
        return None if None in items else "[" + ", ".join(items) + "]"  # type: ignore[arg-type]
    items = [(json.dumps(k), _toml(v)) for k, v in value.items()]
    return None if any(v is None for _, v in items) else "{" + ", ".join(f"{k} = {v}" for k, v in items) + "}"


def _through_file(stage, text: str, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"config{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            layer = file_layer(path, stage.name)
        except UserError as err:
            assert "\n" not in str(err), str(err)
            return
        _resolves_or_user_error(stage, layer)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
@FUZZ
@given(data=st.data())
def test_config_files_resolve_or_are_a_user_error(stage, data):
    names = [f.name for f in dataclasses.fields(stage.config_cls()) if f.init]
    values = data.draw(st.dictionaries(st.sampled_from(names), VALUES, min_size=1, max_size=3))
    flat = data.draw(st.booleans())
    as_json = {stage.name: values} if not flat else values
    _through_file(stage, json.dumps(as_json), ".json")
    lines = [f"{k} = {v}" for k, v in ((k, _toml(v)) for k, v in values.items()) if v is not None]
    _through_file(stage, "\n".join(lines if flat else [f"[{stage.name}]", *lines]) + "\n", ".toml")


# ---------------------------------------------------------------------------------------
# Command-line flags

class _Refused(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Refused(message)


@pytest.mark.parametrize("option", OPTIONS, ids=_ids)
@settings(FUZZ, max_examples=10)
@given(text=st.text(max_size=12) | EDGES.filter(lambda v: isinstance(v, str)))
def test_any_flag_text_parses_resolves_or_is_a_user_error(option, text):
    stage, name = option
    cls = stage.config_cls()
    parser = _Parser()
    flags.add_arguments(parser, cls)
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    flag = field.metadata.get("flag", "--" + name.replace("_", "-"))
    try:
        args = parser.parse_args([f"{flag}={text}"])
    except _Refused:
        return  # argparse's own one-line error: exit code 2
    try:
        overrides = flags.cli_overrides(cls, args)
    except UserError as err:
        assert "\n" not in str(err), str(err)
        return
    _resolves_or_user_error(stage, overrides)
