"""Stages, run directories and manifests.

A run directory holds one folder per stage (`runs/<name>/data/`, `gpt/`, ...). Each
stage reads only earlier stages' files and, when done, writes `manifest.json` last:
its resolved config, the digests of the inputs it read, the digests of its outputs,
versions and timing. A stage whose manifest matches its config and inputs, and whose
outputs are intact, is skipped. The manifest is removed before a stage starts, so a
stage killed half-way is never mistaken for a finished one.

While a stage runs, `.attempt.json` in its folder records the config identity and
inputs it started with. A stage with a resume file (the GPT's and the SAE's
checkpoints) that was killed continues from it when it is run again with the same
config and inputs; `--force` starts it over.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from monofast import __version__, config, distributed, estimate, files
from monofast.errors import UserError
from monofast.log import logger

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
"""Bumped when a manifest's meaning changes; a folder with another format is refused."""
ATTEMPT = ".attempt.json"


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
    resume_file: str = ""
    """A file the stage leaves behind when killed and continues from under `resume=True`
    (its config must have a `resume` field); empty when it always starts over."""
    distributed: bool = False
    """Under torchrun every rank runs it, each on its part of the work (`monofast.distributed`);
    other stages run on rank 0 alone."""

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
          "train the tiny GPT whose MLP activations the SAEs decompose", command="gpt train",
          resume_file="checkpoint.pt", distributed=True),
    Stage("activations", "monofast.harvest:HarvestConfig", "monofast.harvest:run_stage", ("data", "gpt"),
          "harvest the GPT's MLP activations into memory-mapped shards", command="harvest",
          distributed=True),
    Stage("sae", "monofast.sae_train:SAETrainConfig", "monofast.sae_train:run_stage", ("data", "activations", "gpt"),
          "train sparse autoencoders on the activations", command="sae train",
          resume_file="checkpoint.pt", distributed=True),
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
    """Every finished file of a stage folder (manifest, attempt record and temporary files
    excluded)."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (path.is_file() and path.name not in (MANIFEST, ATTEMPT)
                and not any(part.endswith(".tmp") for part in rel.parts)):
            out.append(path)
    return out


def _remove_temporaries(folder: Path) -> None:
    """Delete what a killed process was writing: atomic writers give every file (and folder)
    a name ending in .tmp until it is complete, so any left when a stage starts is garbage."""
    for path in sorted(folder.rglob("*.tmp")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest; None when it has none or a corrupt one (the stage re-runs).
    A manifest of another format (another monofast version) is a `UserError`."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = files.read_json(path, "manifest")
    except UserError:
        return None
    if not isinstance(manifest, dict):
        return None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise incompatible(folder, manifest)
    return manifest


def incompatible(folder: Path, manifest: dict[str, Any]) -> UserError:
    """The error for a stage folder written by a monofast whose manifests this one cannot read."""
    writer = (manifest.get("versions") or {}).get("monofast", "an unknown version")
    stage = folder.name
    return UserError(
        f"{folder} was written by monofast {writer} (manifest format {manifest.get('format')!r}; "
        f"this monofast {__version__} reads format {MANIFEST_FORMAT}): redo it with "
        f"`monofast run --run {folder.parent} --from {stage}` (or `--force`), "
        f"or start a fresh run directory with --name NAME or --run DIR")


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
    _remove_temporaries(folder)
    attempt = {"identity": config.identity(cfg), "inputs": inputs}
    if not force:
        cfg = _continue_interrupted(stage, cfg, folder, attempt)
    files.write_json(folder / ATTEMPT, attempt)
    started = time.time()
    distributed.run_shared(stage, cfg, run, stage.run_fn())  # under torchrun, every rank's part is done after it
    finished = time.time()
    (folder / ATTEMPT).unlink(missing_ok=True)
    outputs = {p.relative_to(folder).as_posix(): files.file_record(p) for p in _outputs(folder)}
    files.write_json(folder / MANIFEST, {
        "format": MANIFEST_FORMAT,
        "stage": stage.name,
        "config": config.to_dict(cfg),
        "identity": config.identity(cfg),
        "inputs": inputs,
        "outputs": outputs,
        "versions": versions(),
        "started": started,
        "finished": finished,
        "seconds": round(finished - started, 3),
    })
    logger.info("%s: done in %.1f s -> %s", stage.name, finished - started, folder)
    return True


def _continue_interrupted(stage: Stage, cfg: Any, folder: Path, attempt: dict[str, Any]) -> Any:
    """`cfg` with `resume=True` when the stage can continue a killed attempt that started
    with the same config and inputs and left its resume file; else `cfg` unchanged."""
    if not stage.resume_file or getattr(cfg, "resume", True) or not (folder / stage.resume_file).is_file():
        return cfg
    try:
        previous = files.read_json(folder / ATTEMPT, "attempt record")
    except UserError:
        return cfg  # no record (or a torn one): the checkpoint's provenance is unknown
    if previous != attempt:
        return cfg
    logger.info("%s: continuing the interrupted run from %s (--force starts over)", stage.name,
                folder / stage.resume_file)
    return dataclasses.replace(cfg, resume=True)


VERSIONED = ("torch", "numpy", "tokenizers", "safetensors", "triton")


def versions() -> dict[str, str]:
    """Versions of monofast, Python, the platform and the installed libraries stages use."""
    out = {"monofast": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def run_all(preset: str, run: RunDir, layers: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
            force: bool = False, start: str | None = None, stop: str | None = None) -> dict[str, bool]:
    """Run every stage in order. `layers[stage]` are override dicts applied after the preset;
    `start` forces that stage and everything after it to re-run; `stop` is the last stage run.
    Logs a line with the elapsed time and an estimate of the time left before each stage
    that runs. Returns, per stage, whether it ran."""
    layers = layers or {}
    unknown = set(layers) - {s.name for s in STAGES}
    if unknown:
        raise UserError(f"no stage named {', '.join(sorted(unknown))}; stages are: "
                        f"{', '.join(s.name for s in STAGES)}")
    for name in (start, stop):
        if name is not None:
            stage_named(name)
    stages = list(STAGES)
    if stop is not None:
        stages = stages[:[s.name for s in stages].index(stop) + 1]
    configs = {s.name: resolve_config(s, preset, *layers.get(s.name, [])) for s in stages}
    forced = _forced(stages, force, start)
    todo = plan(stages, configs, run, forced)
    clock = _Clock(_estimates(configs, todo))
    ran: dict[str, bool] = {}
    for number, stage in enumerate(stages, 1):
        if todo[stage.name]:
            clock.announce(stage.name, number, len(stages), todo)
        began = time.time()
        ran[stage.name] = run_stage(stage, configs[stage.name], run, force=forced[stage.name])
        clock.done(stage.name, time.time() - began, ran[stage.name])
        todo[stage.name] = False
    logger.info("run: %d of %d stages ran, %d up to date, in %s -> %s", sum(ran.values()), len(ran),
                len(ran) - sum(ran.values()), estimate.duration(clock.elapsed()), run.root)
    return ran


def _forced(stages: list[Stage], force: bool, start: str | None) -> dict[str, bool]:
    out, forcing = {}, force
    for stage in stages:
        forcing = forcing or stage.name == start
        out[stage.name] = forcing
    return out


def plan(stages: list[Stage], configs: Mapping[str, Any], run: RunDir, forced: Mapping[str, bool]) -> dict[str, bool]:
    """Which stages will run: forced ones, those not up to date, and those reading from a
    stage that will run. Also refuses, before anything runs, a run directory written by an
    incompatible monofast."""
    todo: dict[str, bool] = {}
    for stage in stages:
        if forced[stage.name] or any(todo.get(name) for name in stage.inputs):
            todo[stage.name] = True
        else:
            todo[stage.name] = not up_to_date(stage, configs[stage.name], run)
    return todo


def _estimates(configs: Mapping[str, Any], todo: Mapping[str, bool]) -> dict[str, float]:
    """Estimated seconds of each stage that will run (measuring the device only when a
    stage that uses it will run)."""
    if not any(todo.get(name) for name in ("gpt", "activations", "sae", "analysis")):
        device = estimate.Device("cpu", "CPU", estimate.ASSUMED_GFLOPS["cpu"], measured=False)
    else:
        device = estimate.measure_device(getattr(configs.get("gpt"), "device", "auto"))
        logger.info("run: %s, matrix products at %.0f GFLOP/s (the time estimates below scale with it)",
                    device.name, device.gflops)
    return {name: e.seconds for name, e in estimate.estimate(configs, device).items()}


ETA_PRIOR_S = 60.0
"""How much finished-stage time it takes before their pace moves the estimate of the rest."""


class _Clock:
    """Elapsed time and the estimate of what is left, corrected by how the finished stages
    compared with their estimates."""

    def __init__(self, estimates: Mapping[str, float]):
        self.estimates = dict(estimates)
        self.started = time.time()
        self.spent = 0.0
        self.expected = 0.0

    def elapsed(self) -> float:
        return time.time() - self.started

    def done(self, name: str, seconds: float, ran: bool) -> None:
        if ran and name in self.estimates:
            self.spent += seconds
            self.expected += self.estimates[name]

    def announce(self, name: str, number: int, count: int, todo: Mapping[str, bool]) -> None:
        left = sum(self.estimates.get(n, 0.0) for n, runs in todo.items() if runs)
        # Shrunk towards 1 by a prior of ETA_PRIOR_S seconds on each side, so a stage of a
        # few seconds finishing early (data) does not cut the estimate of a long GPT stage.
        factor = (self.spent + ETA_PRIOR_S) / (self.expected + ETA_PRIOR_S)
        factor = min(max(factor, 0.33), 3.0)
        logger.info("run: stage %d/%d %s · %s elapsed · about %s left (estimate)", number, count, name,
                    estimate.duration(self.elapsed()), estimate.duration(left * factor))


def stage_fields(stage: Stage) -> list[str]:
    return [f.name for f in dataclasses.fields(stage.config_cls())]


def default_run_dir(preset: str) -> Path:
    return Path(os.environ.get("MONOFAST_RUNS", "runs")) / preset
