"""A stage's config, resolved from its layers: the dataclass default, the preset, a TOML or
JSON config file (`--config`, flat or grouped by stage), then the command line (later wins).
`explain` says which layer each value came from, for `--help`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from monofast.common import config
from monofast.common.errors import UserError
from monofast.run import presets
from monofast.run.stages import STAGES, Stage, stage_fields


def resolve_config(stage: Stage, preset: str, *layers: Mapping[str, Any]) -> Any:
    """The stage's config: dataclass defaults < preset < each of `layers` in order."""
    return config.build(stage.config_cls(), presets.stage_values(preset, stage.name), *layers,
                        where=f"{stage.name} config")


def file_layer(path: Path | None, stage: str) -> dict[str, Any]:
    """The part of a config file that applies to `stage`: its `[stage]` table, plus the
    top-level keys that are fields of the stage's config. Keys no stage has, and tables
    named after no stage, are a `UserError`."""
    if path is None:
        return {}
    data = config.load_config_file(path)
    fields = set(stage_fields(_named(stage)))
    stage_names = {s.name for s in STAGES}
    every = {name for s in STAGES for name in stage_fields(s)}
    layer = {k: v for k, v in data.items() if not isinstance(v, dict) and k.replace("-", "_") in fields}
    unknown_top = [k for k, v in data.items() if not isinstance(v, dict) and k.replace("-", "_") not in every]
    if unknown_top:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown_top)}")
    bad_tables = [k for k, v in data.items() if isinstance(v, dict) and k not in stage_names]
    if bad_tables:
        raise UserError(f"{path}: unknown stage table(s) {', '.join(bad_tables)}; "
                        f"stages are {', '.join(sorted(stage_names))}")
    layer.update(data.get(stage, {}))
    return layer


def _named(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


class Origin(NamedTuple):
    """A resolved value and the layer it came from."""

    value: Any
    source: str
    """`default`, `<preset> preset` or `config FILE`."""


def defaults(cls: type) -> dict[str, Origin]:
    """Every field of a config dataclass at its default."""
    out: dict[str, Origin] = {}
    for f in dataclasses.fields(cls):
        if f.init:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
            out[f.name] = Origin(default, "default")
    return out


def explain(stage: Stage, preset: str, config_file: Path | None = None) -> dict[str, Origin]:
    """Every field's value before the command line, and where it comes from: what `--help`
    shows. The layers are read as `resolve_config` reads them; a config file that cannot be
    read is left out here (the command itself then reports it)."""
    cls = stage.config_cls()
    out = defaults(cls)
    layers = [(f"{preset} preset", presets.stage_values(preset, stage.name))]
    if config_file is not None:
        try:
            layers.append((f"config {config_file}", file_layer(config_file, stage.name)))
        except UserError:
            pass
    for where, layer in layers:
        for key, value in layer.items():
            name = key.replace("-", "_")
            if name in out:
                try:
                    out[name] = Origin(config.coerce(cls, name, value, where), where)
                except UserError:
                    pass  # --help still shows the rest; running the command names the bad value
    return out
