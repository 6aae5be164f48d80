"""When the sparse form of the SAE step pays, measured on this machine, and the trainer's switch.

The sparse step (`monofast.kernels.sparse`) gives the dense step's results with four of its
five products shrunk to the firing entries, so its cost grows with the firing density
(L0 / d_sae) while the dense step's does not. Where they cross depends on the shapes, the
precision, the kernels and the machine, so it is measured, not guessed: before training,
each distinct SAE shape of the run times the dense step once and the sparse step at two
densities (a random SAE whose encoder biases make each feature fire at that rate), fits the
sparse cost as a line in the density, and takes the density where it meets the dense cost.
TopK fires k / d_sae by construction, so the two steps are timed at that k and the faster
one is kept.

A measurement is kept per machine in the cache folder (`sparse_crossover.json`, keyed by
the processor, the torch version, the threads, the kernels' code, the shapes and precisions;
`monofast.common.measured`), like an autotuner's: later runs on the machine read it, so they switch at the same steps and
write the same files (the two forms agree to rounding, not to the bit), and a resumed
run continues exactly as it would have. A measurement disturbed by other work is tried
again (`ATTEMPTS`) and kept in any case. Delete the file to measure again;
`--sparse-step on` or `off` needs no measurement at all.

In training an L1 SAE starts dense (about half its features fire at initialisation) and
grows sparse as the penalty bites; the switch re-reads each SAE's L0 wherever the loop
reads values back anyway and moves to the sparse step once the density falls below the
crossover (back above it, with a margin either side so that noise does not flip it). Every
switch is logged, and eval.json records the measurement and each SAE's switches.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch

from monofast.common import files
from monofast.common.device import dtype_name
from monofast.common.measured import machine as measured_on
from monofast.common.measured import race, remembered
from monofast.common.log import logger
from monofast.sae.model import BATCH_VARIANTS, SparseAutoencoder

MODES = ("auto", "on", "off")
PROBE_DENSITIES = (0.01, 0.08)
"""Firing densities at which the sparse step is timed: around a trained SAE's and well above."""
MARGIN = 0.15
"""Hysteresis: switch to sparse below (1 - MARGIN) x the crossover, back above (1 + MARGIN) x."""
ROUNDS = 7
"""Timed steps per case (after one untimed), the best kept."""
STEADY = 1.5
"""Timings whose median is above this x their best were disturbed (another process ran)."""
ATTEMPTS = 3
"""Measurements tried until one is steady (the last is kept otherwise)."""
CACHE_FILE = "sparse_crossover.json"


@dataclass
class Crossover:
    """One SAE shape's measurement."""

    d_sae: int
    k: Optional[int]
    dense_ms: float
    """Forward and backward of the dense step, ms."""
    sparse_ms: dict[str, float]
    """Forward and backward of the sparse step, ms, by firing density (as text, for JSON)."""
    density: float
    """Firing density below which the sparse step is faster (0: never; 1: always)."""
    steady: bool = True
    """Whether the timings were undisturbed."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _time(sae: SparseAutoencoder, x: torch.Tensor,
          cases: dict[Any, tuple[bool, Optional[float]]]) -> tuple[dict[Any, float], bool]:
    """Each case's best time for a forward and backward of `sae` on x over `ROUNDS`
    interleaved rounds (`measured.race`: the best is the least disturbed), and whether the
    timings were steady (every case's median within `STEADY` x its best). A case is
    (sparse, firing density to set first, None for as it is)."""
    params = list(sae.parameters())

    def step(sparse: bool) -> Callable[[], None]:
        def run() -> None:
            sae.sparse_step = sparse
            out = sae(x)
            torch.autograd.grad(out.mse + out.l1, params)
        return run

    setup = {name: (lambda d=density: _fire_at(sae, x, d)) for name, (_, density) in cases.items() if density is not None}
    times = race({name: step(sparse) for name, (sparse, _) in cases.items()}, ROUNDS, x.device, setup)
    steady = all(statistics.median(t) <= STEADY * min(t) for t in times.values())
    return {name: min(t) for name, t in times.items()}, steady


@torch.no_grad()
def _fire_at(sae: SparseAutoencoder, x: torch.Tensor, density: float) -> None:
    """Set the encoder biases so that each feature fires on about `density` of the rows of x."""
    pre = (x - sae.b_dec) @ sae.W_enc  # [B, F]
    rank = max(1, min(x.shape[0], round(x.shape[0] * (1 - density))))
    sae.b_enc.copy_(-pre.kthvalue(rank, dim=0).values)


def measure(sae: SparseAutoencoder, batch_size: int) -> Crossover:
    """Time the dense and sparse steps of a fresh SAE shaped like `sae` (its weights are
    not touched) on random rows, and find the density where they cost the same."""
    probe = SparseAutoencoder(replace(sae.cfg), device=sae.W_enc.device, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, sae.cfg.d_in, generator=gen).to(sae.W_enc.device)
    k = sae.cfg.top_k
    if k is not None:
        timed, steady = _time(probe, x, {"dense": (False, None), "sparse": (True, None)})
        return Crossover(sae.cfg.d_sae, k, timed["dense"], {f"{k / sae.cfg.d_sae:.4g}": timed["sparse"]},
                         1.0 if timed["sparse"] < timed["dense"] else 0.0, steady)
    cases: dict[Any, tuple[bool, Optional[float]]] = {"dense": (False, 0.5)}
    cases.update({density: (True, density) for density in PROBE_DENSITIES})
    timed, steady = _time(probe, x, cases)
    dense = timed.pop("dense")
    (d1, t1), (d2, t2) = timed.items()
    slope = (t2 - t1) / (d2 - d1)
    if slope <= 0:  # noise swamped the density's effect: go by the lower density's timing
        density = 1.0 if t1 < dense else 0.0
    else:
        density = min(1.0, max(0.0, d1 + (dense - t1) / slope))
    return Crossover(sae.cfg.d_sae, None, dense, {f"{d:g}": t for d, t in timed.items()}, density, steady)


def cache_key(sae: SparseAutoencoder, batch_size: int) -> str:
    """What a measurement depends on: the machine, torch, the kernels' code, the shapes and
    precisions."""
    cfg = sae.cfg
    return (f"{measured_on(sae.W_enc.device)} | {cfg.variant} B{batch_size} D{cfg.d_in} F{cfg.d_sae}"
            f"{f' k{cfg.top_k}' if cfg.top_k else ''} | {cfg.dtype} with "
            f"{dtype_name(sae.compute_dtype) if sae.compute_dtype else cfg.dtype} products")


def measured(sae: SparseAutoencoder, batch_size: int) -> Crossover:
    """This machine's crossover for SAEs shaped like `sae`: from the cache, else measured
    (and cached), tried again while the machine is busy."""

    def measure_steadily() -> dict[str, Any]:
        crossover = measure(sae, batch_size)
        for _ in range(ATTEMPTS - 1):
            if crossover.steady:
                break
            crossover = measure(sae, batch_size)
        if not crossover.steady:
            logger.warning("sae: the machine was busy while the sparse step's crossover was measured (timings "
                           "varied by more than %.1fx, %d tries); it is kept all the same, so that runs here "
                           "stay alike: delete %s to measure again on a quiet machine", STEADY, ATTEMPTS,
                           files.cache_dir() / CACHE_FILE)
        return crossover.to_json()

    return Crossover(**remembered(CACHE_FILE, cache_key(sae, batch_size), measure_steadily))


@dataclass
class _State:
    sparse: bool = False
    switches: list[tuple[int, str, float]] = field(default_factory=list)
    """(step, "sparse" or "dense", firing density then)."""
    steps: dict[str, int] = field(default_factory=lambda: {"dense": 0, "sparse": 0})


class SparseSwitch:
    """Chooses, per SAE of a sweep, the dense or the sparse form of the step.

    `mode`: auto (by the measured crossover), on (always sparse), off (always dense).
    `unavailable`: why the sparse form is out of the question (then every step is dense).
    """

    def __init__(self, mode: str, saes: Sequence[SparseAutoencoder], names: Sequence[str], batch_size: int,
                 start: int = 0, resumed: Optional[dict[str, Any]] = None, unavailable: Optional[str] = None):
        if mode not in MODES:
            raise ValueError(f"sparse_step {mode!r} is unknown; choose one of {', '.join(MODES)}")
        self.mode = mode
        self.names = list(names)
        self.saes = list(saes)
        if unavailable is None and saes and saes[0].cfg.variant in BATCH_VARIANTS:
            unavailable = f"the {saes[0].cfg.variant} variant's step ranks the whole batch (no sparse form)"
        if unavailable is None and mode == "off":
            unavailable = "turned off (--sparse-step off)"
        self.unavailable = unavailable
        self.crossovers: dict[tuple[int, Optional[int]], Crossover] = {}
        self.states = [_State() for _ in self.saes]
        self.last_step = start
        if self.unavailable is None and mode == "auto":
            for sae in self.saes:
                key = (sae.cfg.d_sae, sae.cfg.top_k)
                if key not in self.crossovers:
                    self.crossovers[key] = measured(sae, batch_size)
            for key, c in self.crossovers.items():
                logger.info("sae: on this machine the sparse step is faster below a firing density of %.2f%% "
                            "for %s features%s (dense %.1f ms; sparse %s)", 100 * c.density, f"{key[0]:,}",
                            f" at k={key[1]}" if key[1] else "", c.dense_ms,
                            ", ".join(f"{v:.1f} ms at {float(d):.2%}" for d, v in c.sparse_ms.items()))
        for i, sae in enumerate(self.saes):
            sae.sparse_step = False
            if resumed is not None and self.unavailable is None and self.names[i] in resumed:
                saved = resumed[self.names[i]]  # continue exactly where the checkpoint stood
                self.states[i] = _State(bool(saved["sparse"]), [tuple(s) for s in saved["switches"]],
                                        dict(saved["steps"]))
                sae.sparse_step = self.states[i].sparse
            elif self.unavailable is None and mode == "on":
                self._set(i, True, 0, float("nan"))
            elif self.unavailable is None and sae.cfg.top_k is not None:
                self._set(i, self.crossovers[(sae.cfg.d_sae, sae.cfg.top_k)].density >= 1.0, 0,
                          sae.cfg.top_k / sae.cfg.d_sae)

    def _set(self, i: int, sparse: bool, step: int, density: float) -> None:
        state = self.states[i]
        if state.sparse == sparse and state.switches:
            return
        state.sparse = sparse
        self.saes[i].sparse_step = sparse
        state.switches.append((step, "sparse" if sparse else "dense", density))
        why = (f" (firing density {density:.2%}, crossover {self._crossover(i):.2%} measured here)"
               if self.mode == "auto" else " (--sparse-step on)")
        logger.info("sae %s: the %s step from step %d%s", self.names[i], "sparse" if sparse else "dense", step, why)

    def _crossover(self, i: int) -> float:
        sae = self.saes[i]
        return self.crossovers[(sae.cfg.d_sae, sae.cfg.top_k)].density

    def update(self, step: int, l0s: Sequence[float]) -> None:
        """After `step` steps, with each SAE's latest L0 (read back anyway): count the steps
        since the last update and switch where the density crossed the crossover."""
        for state in self.states:
            state.steps["sparse" if state.sparse else "dense"] += step - self.last_step
        self.last_step = step
        if self.unavailable is not None or self.mode != "auto":
            return
        for i, (sae, l0) in enumerate(zip(self.saes, l0s)):
            if sae.cfg.top_k is not None:
                continue
            density = l0 / sae.cfg.d_sae
            crossover = self._crossover(i)
            if not self.states[i].sparse and density < crossover * (1 - MARGIN):
                self._set(i, True, step, density)
            elif self.states[i].sparse and density > crossover * (1 + MARGIN):
                self._set(i, False, step, density)

    def state(self) -> dict[str, Any]:
        """For a checkpoint: each SAE's form of the step and its history."""
        return {name: {"sparse": st.sparse, "switches": [list(s) for s in st.switches], "steps": dict(st.steps)}
                for name, st in zip(self.names, self.states)}

    def report(self) -> dict[str, Any]:
        """For eval.json's training section."""
        if self.unavailable is not None:
            return {"mode": self.mode, "unavailable": self.unavailable}
        out: dict[str, Any] = {"mode": self.mode}
        if self.crossovers:  # the densities only: the timings behind them are in the cache file
            out["crossover_density"] = {f"{d}" + (f" k{k}" if k else ""): round(c.density, 6)
                                        for (d, k), c in self.crossovers.items()}
        out["saes"] = {name: {"switches": saved["switches"], "steps": saved["steps"]}
                       for name, saved in self.state().items()}
        return out
