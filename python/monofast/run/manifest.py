"""Manifests: how a stage is recorded as finished, and when it is up to date.

Each stage reads only earlier stages' files and, when done, writes `manifest.json` last:
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
import importlib.metadata
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from monofast import __version__
from monofast.common import config, distributed, files
from monofast.common.errors import UserError
from monofast.common.log import logger
from monofast.run.stages import TWIN, RunDir, Stage, stage_named

MANIFEST_FORMAT = 1
"""Bumped when a manifest's meaning changes; a folder with another format is refused."""


ATTEMPT = ".attempt.json"


def _outputs(folder: Path) -> list[Path]:
    """Every finished file of a stage folder (manifest, attempt record and temporary files
    excluded)."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (path.is_file() and path.name not in (files.MANIFEST_FILE, ATTEMPT)
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
    path = folder / files.MANIFEST_FILE
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
    """Current digests of every file the stage reads, keyed `stage/relative/path`. Each
    input stage must be intact and itself up to date with its own inputs (`_check_current`)."""
    current: set[str] = set()  # the stage folders found current, to check each once
    digests: dict[str, str] = {}
    present = [name for name in stage.optional_inputs if (run.stage(name) / files.MANIFEST_FILE).is_file()]
    for name in stage.inputs + tuple(present):
        folder = run.require(name)
        manifest = _read_manifest(folder) or {}
        digests.update({f"{run.folder_name(name)}/{rel}": digest for rel, digest in _intact(folder, manifest).items()})
        _check_current(run.folder_name(name), manifest, run.root, current)
    return digests


def _intact(folder: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """The digest of each output the manifest records, refusing one missing or changed since."""
    digests = {}
    for rel, record in manifest.get("outputs", {}).items():
        digest = files.current_digest(folder / rel, record)
        if digest is None or digest != record.get("digest"):
            raise files.not_as_recorded(folder / rel, folder)
        digests[rel] = digest
    return digests


def _check_current(label: str, manifest: dict[str, Any], root: Path, current: set[str]) -> None:
    """Refuse a finished stage (folder `label` of the run directory `root`) made from other
    files than the stages it read hold now: an SAE trained on the activations of a GPT
    retrained since, a site over the analysis of an earlier SAE. Its own files are intact, so
    only its manifest's record of what it read tells; the check goes up the chain of stages.
    `current` collects the folders already found current, to check each once."""
    if label in current:
        return
    recorded = manifest.get("inputs")
    if not isinstance(recorded, dict):
        return
    now: dict[str, str] = {}
    for read in sorted({_stage_folder(key, root) for key in recorded}):
        read_manifest = _read_manifest(root / read)
        if read_manifest is None:  # removed (activations deleted to free the disk) or being redone:
            recorded = {key: value for key, value in recorded.items() if _stage_folder(key, root) != read}
            continue  # nothing to compare; a stage that reads it again requires it itself
        now.update({f"{read}/{rel}": digest for rel, digest in _intact(root / read, read_manifest).items()})
        _check_current(read, read_manifest, root, current)
    if recorded != now:
        changed = sorted(key for key in recorded.keys() | now.keys() if recorded.get(key) != now.get(key))
        raise UserError(f"{root / label} was made from other files than the run holds now ({changed[0]} "
                        f"changed since, {len(changed)} in all): redo it and the stages after it with "
                        f"`{_redo(label, root)}`")
    current.add(label)


def _stage_folder(key: str, root: Path) -> str:
    """The stage folder of an input key `folder/relative/path` (`sae/l1_4/...` is the sae
    stage's, `twin/gpt/...` the second model's GPT): the shortest prefix with a manifest."""
    parts = key.split("/")
    for end in range(1, len(parts)):
        if (root.joinpath(*parts[:end]) / files.MANIFEST_FILE).is_file():
            return "/".join(parts[:end])
    return parts[0]


def _redo(label: str, root: Path) -> str:
    """The command that redoes stage folder `label` and what follows it: a stage of an extra
    (and the second model's) re-runs with `--with` when its inputs changed (`--from` takes
    only the main stages)."""
    try:
        extra = stage_named(label).extra
    except UserError:  # not a pipeline stage
        extra = ""
    if label.startswith(f"{TWIN}/"):  # the second model's stages come with the findings
        extra = "findings"
    return f"monofast run --run {root} --with {extra}" if extra else f"monofast run --run {root} --from {label}"


def refuse_left_behind(label: str, root: Path, redone: set[str]) -> None:
    """Refuse, before a run starts, a finished stage it does not run (folder `label`: the
    findings of an earlier `--with findings`, read by the site when there) that reads a stage
    the run redoes (`redone`), or that is already out of date: the stage reading it would
    fail after the long ones had run."""
    manifest = _read_manifest(root / label)
    if manifest is None:
        return
    ahead = sorted({_stage_folder(key, root) for key in manifest.get("inputs") or {}} & redone)
    if ahead:
        raise UserError(f"{root / label} reads {', '.join(f'{a}/' for a in ahead)}, which this run redoes, but is "
                        f"not part of the run: redo it too with `{_redo(label, root)}`, or remove the folder")
    _check_current(label, manifest, root, set())


def require_current(run: RunDir, name: str) -> Path:
    """The folder of finished stage `name` for a command outside the pipeline (`gpt sample`):
    its files intact and made from the files its inputs hold now, else a `UserError`."""
    folder = run.require(name)
    manifest = _read_manifest(folder) or {}
    _intact(folder, manifest)
    _check_current(run.folder_name(name), manifest, run.root, set())
    return folder


def up_to_date(stage: Stage, cfg: Any, run: RunDir) -> bool:
    """True when the stage finished with this config and these inputs, outputs intact."""
    folder = run.stage(stage.name)
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT:
        return False
    if not config.same_identity(manifest.get("identity"), cfg):
        return False
    if manifest.get("inputs") != _input_digests(stage, run):
        return False
    try:
        _intact(folder, manifest)
    except UserError:  # an output missing or changed since: the stage runs again
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
    (folder / files.MANIFEST_FILE).unlink(missing_ok=True)
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
    files.write_json(folder / files.MANIFEST_FILE, {
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
