"""`monofast run`: every stage in order, with the time elapsed and an estimate of the time
left before each stage that runs; and, under torchrun, how the other ranks follow rank 0
into the stages that share their work."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from monofast.common.errors import UserError
from monofast.common.log import logger
from monofast.run import estimate
from monofast.run.manifest import run_stage, up_to_date
from monofast.run.resolve import resolve_config
from monofast.run.stages import STAGES, RunDir, Stage, stage_named


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


def follow(name: str, cfg: Any, root: Path) -> None:
    """On a rank other than 0: run its part of the stage `name` that rank 0 leads
    (`monofast.common.distributed.join` calls it)."""
    stage_named(name).run_fn()(cfg, RunDir(root))
