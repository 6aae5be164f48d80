"""Stages, run directories and manifests.

A run directory holds one folder per stage (`runs/<name>/data/`, `gpt/`, ...). Each
stage reads only earlier stages' files and, when done, writes `manifest.json` last:
its resolved config, the digests of the inputs it read, the digests of its outputs,
versions and timing. A stage whose manifest matches its config and inputs, and whose
outputs are intact, is skipped. The manifest is removed before a stage starts, so a
stage killed half-way is never mistaken for a finished one.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from monofast import __version__, config, files
from monofast.errors import UserError
from monofast.log import logger

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, named by import paths so that listing stages imports nothing heavy."""

    name: str
    """Folder name inside the run directory, and the key in presets."""
    config: str
    """`module:Class` of the stage's config dataclass."""
    runner: str
    """`module:function` called as `function(cfg, run: RunDir)`; writes into `run.stage(name)`."""
    inputs: tuple[str, ...]
    """Names of the earlier stages whose outputs it reads."""
    about: str
    """One line for `--help` and the results table."""
    command: str = ""
    """The CLI command that runs it alone, when it differs from the name (`gpt train`)."""

    def cli(self) -> str:
        return f"monofast {self.command or self.name}"

    def config_cls(self) -> type:
        return _load(self.config)

    def run_fn(self) -> Callable[[Any, "RunDir"], None]:
        return _load(self.runner)


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


STAGES: tuple[Stage, ...] = (
    Stage("data", "monofast.data:DataConfig", "monofast.data:run_stage", (),
          "corpus and byte-level BPE tokenizer"),
    Stage("gpt", "monofast.gpt:GPTTrainConfig", "monofast.gpt:run_stage", ("data",),
          "train the tiny GPT whose MLP activations the SAEs decompose", command="gpt train"),
    Stage("activations", "monofast.harvest:HarvestConfig", "monofast.harvest:run_stage", ("data", "gpt"),
          "harvest the GPT's MLP activations into memory-mapped shards", command="harvest"),
    Stage("sae", "monofast.sae_train:SAETrainConfig", "monofast.sae_train:run_stage", ("data", "activations", "gpt"),
          "train sparse autoencoders on the activations", command="sae train"),
    Stage("analysis", "monofast.analysis.config:AnalysisConfig", "monofast.analysis.run:run_stage",
          ("data", "gpt", "sae"), "feature statistics, top-k and quantile examples, ablation effects",
          command="analyze"),
    Stage("site", "monofast.site.config:SiteConfig", "monofast.site.build:run_stage", ("sae", "analysis"),
          "static feature browser that opens from file://"),
)


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise UserError(f"unknown stage {name!r}; stages are: {', '.join(s.name for s in STAGES)}")


@dataclass(frozen=True)
class RunDir:
    """A run directory: `root/<stage>/` per stage."""

    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name

    def require(self, name: str) -> Path:
        """The folder of a finished earlier stage, or a `UserError` saying how to make it."""
        folder = self.stage(name)
        if not (folder / MANIFEST).is_file():
            raise UserError(
                f"stage {name!r} has not finished in {self.root} (no {name}/{MANIFEST}); "
                f"run `{stage_named(name).cli()} --run {self.root}` or `monofast run --run {self.root}` first"
            )
        return folder


def resolve_config(stage: Stage, preset: str, *layers: Mapping[str, Any]) -> Any:
    """The stage's config: dataclass defaults < preset < each of `layers` in order."""
    from monofast import presets

    return config.build(stage.config_cls(), presets.stage_values(preset, stage.name), *layers,
                        where=f"{stage.name} config")


def _outputs(folder: Path) -> list[Path]:
    """Every finished file of a stage folder (manifest and temporary files excluded)."""
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST and not path.name.endswith(".tmp"):
            out.append(path)
    return out


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return files.read_json(path, "manifest")
    except UserError:
        return None  # a corrupt manifest means "not finished": the stage re-runs


def _input_digests(stage: Stage, run: RunDir) -> dict[str, str]:
    """Current digests of every file the stage reads, keyed `stage/relative/path`."""
    digests: dict[str, str] = {}
    for name in stage.inputs:
        folder = run.require(name)
        manifest = _read_manifest(folder) or {}
        for rel, record in manifest.get("outputs", {}).items():
            digest = files.current_digest(folder / rel, record)
            if digest is None:
                raise UserError(
                    f"{folder / rel} is missing but stage {name!r} recorded it; "
                    f"re-run it with `monofast run --run {run.root} --from {name}`"
                )
            digests[f"{name}/{rel}"] = digest
    return digests


def up_to_date(stage: Stage, cfg: Any, run: RunDir) -> bool:
    """True when the stage finished with this config and these inputs, outputs intact."""
    folder = run.stage(stage.name)
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT:
        return False
    if manifest.get("identity") != config.identity(cfg):
        return False
    if manifest.get("inputs") != _input_digests(stage, run):
        return False
    for rel, record in manifest.get("outputs", {}).items():
        if files.current_digest(folder / rel, record) != record.get("digest"):
            return False
    return True


def run_stage(stage: Stage, cfg: Any, run: RunDir, force: bool = False) -> bool:
    """Run one stage unless it is up to date. Returns True when it ran."""
    folder = run.stage(stage.name)
    if not force and up_to_date(stage, cfg, run):
        logger.info("%s: up to date in %s (use --force to redo)", stage.name, folder)
        return False
    inputs = _input_digests(stage, run)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    started = time.time()
    stage.run_fn()(cfg, run)
    seconds = time.time() - started
    outputs = {p.relative_to(folder).as_posix(): files.file_record(p) for p in _outputs(folder)}
    files.write_json(folder / MANIFEST, {
        "format": MANIFEST_FORMAT,
        "stage": stage.name,
        "config": config.to_dict(cfg),
        "identity": config.identity(cfg),
        "inputs": inputs,
        "outputs": outputs,
        "versions": _versions(),
        "started": started,
        "seconds": round(seconds, 3),
    })
    logger.info("%s: done in %.1f s -> %s", stage.name, seconds, folder)
    return True


def _versions() -> dict[str, str]:
    """Versions of monofast, Python and whichever heavy libraries the stage loaded."""
    versions = {"monofast": __version__, "python": platform.python_version()}
    for name in ("torch", "numpy", "tokenizers", "triton"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


def run_all(preset: str, run: RunDir, layers: Mapping[str, list[Mapping[str, Any]]] | None = None,
            force: bool = False, start: str | None = None, stop: str | None = None) -> dict[str, bool]:
    """Run every stage in order. `layers[stage]` are override dicts applied after the preset;
    `start` forces that stage and everything after it to re-run; `stop` is the last stage run."""
    layers = layers or {}
    unknown = set(layers) - {s.name for s in STAGES}
    if unknown:
        raise UserError(f"no stage named {', '.join(sorted(unknown))}; stages are: "
                        f"{', '.join(s.name for s in STAGES)}")
    for name in (start, stop):
        if name is not None:
            stage_named(name)
    ran: dict[str, bool] = {}
    forcing = force
    for stage in STAGES:
        if stage.name == start:
            forcing = True
        cfg = resolve_config(stage, preset, *layers.get(stage.name, []))
        ran[stage.name] = run_stage(stage, cfg, run, force=forcing)
        if stage.name == stop:
            break
    return ran


def stage_fields(stage: Stage) -> list[str]:
    return [f.name for f in dataclasses.fields(stage.config_cls())]


def default_run_dir(preset: str) -> Path:
    return Path(os.environ.get("MONOFAST_RUNS", "runs")) / preset
