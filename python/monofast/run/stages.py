"""The stages of a run and the run directory that holds one folder per stage.

Stages, in order (the same names for the folder, the preset key and the command):

1. `data`         corpus and tokenizer          `monofast data`
2. `gpt`          the tiny GPT                   `monofast gpt train`
3. `activations`  MLP activation shards          `monofast activations harvest` (alias `harvest`)
4. `sae`          sparse autoencoders            `monofast sae train`
5. `analysis`     feature statistics, examples   `monofast analysis`
6. `findings`     the paper's other findings     `monofast run --with findings`:
   `family`       SAEs of growing width          `monofast family`
   `twin/...`     a second GPT, harvest and SAE  (the stages above, another seed, in twin/)
   `findings`     splitting, universality,       `monofast findings`
                  specificity, steering
7. `site`         the static feature browser     `monofast site`

Stages of an extra (`findings`) run only when asked for (`--with findings`); the site shows
the findings when their folder is there.

Stages are named by import paths, so listing them (for `--help`) imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from monofast.common.checkpoint import CHECKPOINT_FILE
from monofast.common.files import MANIFEST_FILE
from monofast.common.errors import UserError



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
    aliases: tuple[str, ...] = ()
    """Other commands that run it alone (`harvest`, the seed recipe's word)."""
    resume_file: str = ""
    """A file the stage leaves behind when killed and continues from under `resume=True`
    (its config must have a `resume` field); empty when it always starts over."""
    distributed: bool = False
    """Under torchrun every rank runs it, each on its part of the work (`monofast.common.distributed`);
    other stages run on rank 0 alone."""
    extra: str = ""
    """The extra it belongs to (`findings`): it runs only when a run asks for it (`--with`)."""
    optional_inputs: tuple[str, ...] = ()
    """Earlier stages it reads when they have finished (the site shows the findings if there)."""

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
    Stage("data", "monofast.data.prepare:DataConfig", "monofast.data.prepare:run_stage", (),
          "corpus and byte-level BPE tokenizer"),
    Stage("gpt", "monofast.gpt.config:GPTTrainConfig", "monofast.gpt.train:run_stage", ("data",),
          "train the tiny GPT whose MLP activations the SAEs decompose", command="gpt train",
          resume_file=CHECKPOINT_FILE, distributed=True),
    Stage("activations", "monofast.activations.harvest:HarvestConfig", "monofast.activations.harvest:run_stage", ("data", "gpt"),
          "harvest the GPT's MLP activations into memory-mapped shards", command="activations harvest",
          aliases=("harvest",), distributed=True),
    Stage("sae", "monofast.sae.config:SAETrainConfig", "monofast.sae.train:run_stage", ("data", "activations", "gpt"),
          "train sparse autoencoders on the activations", command="sae train",
          resume_file=CHECKPOINT_FILE, distributed=True),
    Stage("analysis", "monofast.analysis.config:AnalysisConfig", "monofast.analysis.run:run_stage",
          ("data", "gpt", "sae"), "feature statistics, top-k and quantile examples, ablation effects"),
    Stage("family", "monofast.findings.config:FamilyConfig", "monofast.findings.family:run_stage",
          ("data", "activations", "gpt", "sae"), "SAEs of growing width on the same activations (feature splitting)",
          resume_file=CHECKPOINT_FILE, distributed=True, extra="findings"),
    Stage("findings", "monofast.findings.config:FindingsConfig", "monofast.findings.run:run_stage",
          ("data", "gpt", "sae", "analysis", "family", "twin/gpt", "twin/sae"),
          "feature splitting, universality, specificity and steering", extra="findings"),
    Stage("site", "monofast.site.config:SiteConfig", "monofast.site.build:run_stage", ("sae", "analysis"),
          "static feature browser that opens from file://", optional_inputs=("findings", "data", "gpt")),
)
"""Every stage, in pipeline order."""

EXTRAS = ("findings",)
"""What `--with` can add to a run."""

TWIN = "twin"
"""Folder of the second model: the GPT, activations and SAE stages again, another seed."""
TWIN_STAGES = ("gpt", "activations", "sae")


def run_order(extras: tuple[str, ...] | list[str] = EXTRAS) -> list[tuple[str, Stage]]:
    """(folder, stage) of every stage a run with `extras` has, in the order they run: the
    second model's stages (`twin/gpt`, ...) come with the findings, before the family."""
    out: list[tuple[str, Stage]] = []
    for stage in STAGES:
        if stage.extra and stage.extra not in extras:
            continue
        if stage.name == "family":
            out += [(f"{TWIN}/{name}", stage_named(name)) for name in TWIN_STAGES]
        out.append((stage.name, stage))
    return out


def stage_named(name: str) -> Stage:
    """The stage `name` (a twin's `twin/gpt` is the `gpt` stage)."""
    base = name.removeprefix(f"{TWIN}/")
    for stage in STAGES:
        if stage.name == base:
            return stage
    raise UserError(f"unknown stage {name!r}; stages are: {', '.join(s.name for s in STAGES)}")


@dataclass(frozen=True)
class RunDir:
    """A run directory: `root/<stage>/` per stage. `moved` puts some stages elsewhere in
    it (the second model's view: `gpt` -> `twin/gpt`, the data shared)."""

    root: Path
    moved: tuple[tuple[str, str], ...] = ()

    def folder_name(self, name: str) -> str:
        """The folder of stage `name`, relative to the root."""
        return dict(self.moved).get(name, name)

    def stage(self, name: str) -> Path:
        return self.root / self.folder_name(name)

    def twin(self) -> "RunDir":
        """The second model's view of this run: its GPT, activations and SAE in twin/."""
        return RunDir(self.root, tuple((name, f"{TWIN}/{name}") for name in TWIN_STAGES))

    def require(self, name: str) -> Path:
        """The folder of a finished earlier stage, or a `UserError` saying how to make it."""
        folder = self.stage(name)
        if not (folder / MANIFEST_FILE).is_file():
            rel = self.folder_name(name)
            stage = stage_named(rel)
            how = (f"`monofast run --run {self.root} --with {stage.extra or 'findings'}`"
                   if stage.extra or rel != name or rel.startswith(f"{TWIN}/")
                   else f"`{stage.cli()} --run {self.root}` or `monofast run --run {self.root}`")
            raise UserError(f"stage {rel!r} has not finished in {self.root} (no {rel}/{MANIFEST_FILE}); "
                            f"run {how} first")
        return folder


def stage_fields(stage: Stage) -> list[str]:
    return [f.name for f in dataclasses.fields(stage.config_cls())]


def default_run_dir(preset: str) -> Path:
    return Path(os.environ.get("MONOFAST_RUNS", "runs")) / preset


def run_dir(run: Path | None, name: str | None, preset: str) -> RunDir:
    """The run directory of a command: `--run DIR`, else `runs/NAME` (`--name`), else
    `runs/<preset>`; `MONOFAST_RUNS` moves `runs/`."""
    if run is not None:
        return RunDir(run)
    if name is not None:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise UserError(f"--name {name!r}: give a plain folder name such as quick-2; "
                            f"use --run DIR for a path")
        return RunDir(default_run_dir(name))
    return RunDir(default_run_dir(preset))
