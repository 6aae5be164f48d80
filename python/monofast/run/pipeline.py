"""`monofast run`: every stage in order, with the time elapsed and an estimate of the time
left before each stage that runs; and, under torchrun, how the other ranks follow rank 0
into the stages that share their work."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from monofast.common.errors import UserError
from monofast.common.log import logger
from monofast.run import estimate
from monofast.run.manifest import refuse_left_behind, run_stage, up_to_date
from monofast.run.resolve import resolve_config
from monofast.run.stages import EXTRAS, STAGES, TWIN, RunDir, Stage, run_order, stage_named


class Job(NamedTuple):
    """One stage of a run, in the folder a run directory's view gives it."""

    stage: Stage
    cfg: Any
    run: RunDir

    @property
    def label(self) -> str:
        """Its folder in the run directory: `gpt`, `twin/gpt`."""
        return self.run.folder_name(self.stage.name)

    def inputs(self) -> list[str]:
        """Labels of the jobs whose outputs it reads."""
        return [self.run.folder_name(n) for n in self.stage.inputs + self.stage.optional_inputs]


def run_all(preset: str, run: RunDir, layers: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
            force: bool = False, start: str | None = None, stop: str | None = None,
            extras: Sequence[str] = ()) -> dict[str, bool]:
    """Run every stage in order, with the stages of `extras` (`findings`: the family of
    SAEs, the second model in twin/ and the findings). `layers[stage]` are override dicts
    applied after the preset; `start` forces that stage and everything after it to re-run;
    `stop` is the last stage run. Logs a line with the elapsed time and an estimate of the
    time left before each stage that runs. Returns, per stage folder, whether it ran."""
    layers = layers or {}
    unknown = set(layers) - {s.name for s in STAGES}
    if unknown:
        raise UserError(f"no stage named {', '.join(sorted(unknown))}; stages are: "
                        f"{', '.join(s.name for s in STAGES)}")
    for extra in extras:
        if extra not in EXTRAS:
            raise UserError(f"--with {extra}: no such extra; choose {', '.join(EXTRAS)}")
    for name in (start, stop):
        if name is not None:
            stage_named(name)
    jobs = _jobs(preset, run, layers, extras)
    if stop is not None:
        jobs = jobs[:[j.label for j in jobs].index(stop) + 1]
    forced = _forced(jobs, force, start)
    todo = plan(jobs, forced)
    clock = _Clock(_estimates(jobs, todo))
    ran: dict[str, bool] = {}
    for number, job in enumerate(jobs, 1):
        if todo[job.label]:
            clock.announce(job.label, number, len(jobs), todo)
        began = time.time()
        ran[job.label] = run_stage(job.stage, job.cfg, job.run, force=forced[job.label])
        clock.done(job.label, time.time() - began, ran[job.label])
        todo[job.label] = False
    logger.info("run: %d of %d stages ran, %d up to date, in %s -> %s", sum(ran.values()), len(ran),
                len(ran) - sum(ran.values()), estimate.duration(clock.elapsed()), run.root)
    return ran


def _jobs(preset: str, run: RunDir, layers: Mapping[str, Sequence[Mapping[str, Any]]],
          extras: Sequence[str]) -> list[Job]:
    """The stages of the run in order, with their configs; with the findings, the second
    model's GPT, harvest and SAE (the same configs, other seeds) come before the family."""
    order = run_order(extras)
    configs = {stage.name: resolve_config(stage, preset, *layers.get(stage.name, []))
               for folder, stage in order if folder == stage.name}
    if "findings" in extras and getattr(configs.get("gpt"), "model", ""):
        raise UserError("--with findings compares two tiny GPTs trained from different seeds; it does not "
                        "run on a Hugging Face model (--model)")
    jobs = []
    for folder, stage in order:
        cfg, view = configs[stage.name], run
        if folder != stage.name:  # the second model: another seed, in twin/
            offset = configs["findings"].twin_seed_offset
            view = run.twin()
            if stage.name == "gpt":
                cfg = dataclasses.replace(cfg, seed=cfg.seed + offset)
            elif stage.name == "sae":  # far from the seeds (seed + i) of the first model's sweep
                cfg = dataclasses.replace(cfg, seed=cfg.seed + 7_919 * offset)
        jobs.append(Job(stage, cfg, view))
    return jobs


def _forced(jobs: list[Job], force: bool, start: str | None) -> dict[str, bool]:
    out, forcing = {}, force
    for job in jobs:
        forcing = forcing or job.label == start
        out[job.label] = forcing
    return out


def plan(jobs: list[Job], forced: Mapping[str, bool]) -> dict[str, bool]:
    """Which stages will run: forced ones, those not up to date, and those reading from a
    stage that will run. Also refuses, before anything runs, a run directory written by an
    incompatible monofast, and a finished stage outside the run (`refuse_left_behind`) that
    a stage of it reads and the run would leave out of date."""
    todo: dict[str, bool] = {}
    for job in jobs:
        if forced[job.label] or any(todo.get(name) for name in job.inputs()):
            todo[job.label] = True
        else:
            todo[job.label] = not up_to_date(job.stage, job.cfg, job.run)
    redone = {label for label, runs in todo.items() if runs}
    for job in jobs:  # a finished stage outside the run, read by one that runs, must stay current
        for name in job.stage.optional_inputs if todo[job.label] else ():
            if job.run.folder_name(name) not in todo:
                refuse_left_behind(job.run.folder_name(name), job.run.root, redone)
    return todo


def _estimates(jobs: list[Job], todo: Mapping[str, bool]) -> dict[str, float]:
    """Estimated seconds of each stage that will run (measuring the device only when a
    stage that uses it will run); the second model's stages cost what the first's do."""
    configs = {job.stage.name: job.cfg for job in jobs if job.run.folder_name(job.stage.name) == job.stage.name}
    heavy = ("gpt", "activations", "sae", "analysis", "family", "findings")
    if not any(runs and label.split("/")[-1] in heavy for label, runs in todo.items()):
        device = estimate.Device("cpu", "CPU", estimate.ASSUMED_GFLOPS["cpu"], measured=False)
    else:
        device = estimate.measure_device(getattr(configs.get("gpt"), "device", "auto"))
        logger.info("run: %s, matrix products at %.0f GFLOP/s (the time estimates below scale with it)",
                    device.name, device.gflops)
    seconds = {name: e.seconds for name, e in estimate.estimate(configs, device).items()}
    return {job.label: seconds[job.stage.name] for job in jobs if job.stage.name in seconds}


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


def follow(name: str, cfg: Any, root: Path) -> None:
    """On a rank other than 0: run its part of the stage `name` that rank 0 leads
    (`monofast.common.distributed.join` calls it); `name` is the stage's folder (`twin/gpt`)."""
    run = RunDir(root).twin() if name.startswith(f"{TWIN}/") else RunDir(root)
    stage_named(name).run_fn()(cfg, run)
