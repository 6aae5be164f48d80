"""`--target-l0`: find the L1 coefficient that gives a target L0, inside the one training pass.

Two facts about L1 sparse autoencoders drive the method:

- Across a sweep trained on the same batches, log L0 is close to linear in log lambda
  (on the quick store the slope is about -1.1 to -1.4).
- At a fixed lambda, L0 keeps falling all through training, roughly as a power of the
  step (on the quick store, april2024 at lambda 4: L0 145 at 10% of the run, 68 at 20%,
  36 at 40%, 21 at 80%, 19 at the end; anthropic2023 at lambda 3: 101 at 20%, 55 at
  50%, 41 at 80%, 35 at the end). A controller that aims the current L0 at the target
  therefore overshoots: it ends sparser than asked.

So, every `CONTROL_EVERY` of the steps (10%) up to `LAST_CONTROL` (80%):

1. Each member's L0 is measured on a fixed probe of rows (the caller's; the SAE stage uses
   held-out rows, the same rows its final evaluation reads).
2. The slope d log L0 / d log lambda is fitted through the members' points (one member,
   or members too close to fit, keep the last slope; the first is -1), clamped to
   [-3, -0.8]: a flat fit means L0 has not answered lambda yet, not that a huge move is due.
3. The L0 to aim at now is target x (steps / step)^DRIFT: what will have fallen to the
   target by the end if L0 keeps falling as step^-DRIFT at a fixed lambda. DRIFT is a
   constant measured on the quick store (0.6), not a rate estimated on the fly: a member
   whose L0 barely answers a lower lambda would read as fast drift and be sent lower
   still, a loop that runs away. A wrong DRIFT costs little at the last control points
   (at 80%, 0.3 off moves the aim by 7%), which matter most.
4. The members aim at a bracket around that L0, adjacent members `START_GAP` (x1.5) apart
   in L0 at first, the gap halving (in log) at each control point down to `MIN_GAP` (10%),
   the smallest lambda aiming highest. Each member then moves on its own, multiplicatively:
   lambda x (L0 / aimed L0)^(GAIN / |slope|), by at most x`MAX_UP` up or /`MAX_DOWN` down at
   once. Members are steered apart, not through one shared line, so a member that fell
   silent (L0 near 0) cannot drag the others; the gain under 1 and the smaller step up
   allow for the lag of L0 behind lambda, and a lambda too large kills features that a
   smaller one does not quickly bring back.
5. The last 20% of the steps train at fixed lambdas; the held-out evaluation measures
   every member and the one whose L0 is nearest the target is published. The bracket
   absorbs what the drift model gets wrong.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from monofast.common.errors import UserError

CONTROL_EVERY = 0.1
"""Fraction of the steps between two control points."""
LAST_CONTROL = 0.8
"""No control point after this fraction of the steps: the members then train at fixed lambdas."""
SLOPE_PRIOR = -1.0
"""d log L0 / d log lambda before any fit."""
SLOPE_RANGE = (-3.0, -0.8)
"""The fitted slope is clamped to this range."""
DRIFT = 0.6
"""-d log L0 / d log step at a fixed lambda, from a control point to the end of the run. On
the quick store: 0.6-0.7 for anthropic2023 from 20% or 80% of the steps; 0.8 (from 20%)
down to 0.4 (from 80%) for april2024, whose LR decays over the last 20%."""
GAIN = 0.7
"""Share of the log-distance to its aim that a member's lambda covers at one control point."""
MAX_UP, MAX_DOWN = 1.5, 2.0
"""Largest factors by which one control point may raise or lower a member's lambda."""
START_GAP, MIN_GAP = 1.5, 1.1
"""Ratio in L0 between the aims of adjacent members at the first control point, and the
least it shrinks to."""


def check_target(target_l0: float, d_sae: int) -> None:
    """A target L0 must lie strictly between 0 and the number of features."""
    if not 0 < target_l0 < d_sae:
        raise UserError(f"--target-l0 {target_l0:g} is out of range: it must be between 0 and the "
                        f"{d_sae} features of the SAE")


def check_lambdas(lambdas: Sequence[float]) -> None:
    if any(not (lam > 0 and math.isfinite(lam)) for lam in lambdas):
        raise UserError(f"--target-l0 steers lambda geometrically, so every --l1-coeff must be > 0; "
                        f"got {','.join(f'{lam:g}' for lam in lambdas)}")


def fit_slope(lambdas: Sequence[float], l0s: Sequence[float], prior: float = SLOPE_PRIOR) -> float:
    """Least-squares slope of log L0 against log lambda over the members that still fire
    (L0 >= 0.5), clamped to `SLOPE_RANGE`; `prior` when fewer than two distinct lambdas remain."""
    points = [(math.log(lam), math.log(l0)) for lam, l0 in zip(lambdas, l0s) if l0 >= 0.5]
    low, high = SLOPE_RANGE
    if len(points) < 2:
        return min(high, max(low, prior))
    x_mean = sum(x for x, _ in points) / len(points)
    y_mean = sum(y for _, y in points) / len(points)
    sxx = sum((x - x_mean) ** 2 for x, _ in points)
    if sxx < 1e-6:
        return min(high, max(low, prior))
    slope = sum((x - x_mean) * (y - y_mean) for x, y in points) / sxx
    return min(high, max(low, slope))


def aims(centre: float, count: int, log_gap: float) -> list[float]:
    """`count` L0 aims spaced by exp(log_gap), geometrically centred on `centre`, descending
    (the member with the smallest lambda aims highest)."""
    middle = (count - 1) / 2
    return [centre * math.exp((middle - i) * log_gap) for i in range(count)]


def step_lambda(lam: float, l0: float, aim: float, slope: float) -> float:
    """One multiplicative control step: lambda x (L0 / aim)^(GAIN / |slope|), bounded."""
    factor = math.exp(GAIN * (math.log(max(l0, 1e-3)) - math.log(aim)) / abs(slope))
    return lam * min(MAX_UP, max(1 / MAX_DOWN, factor))


class LambdaSearch:
    """Steers the sweep members' lambdas toward `target_l0` at fixed control points.

    After every step, `due(done)` says whether `done` steps make a control point; there,
    `control(done, l0s)` takes the members' measured L0 and returns their new lambdas.
    """

    def __init__(self, target_l0: float, lambdas: Sequence[float], steps: int):
        check_lambdas(lambdas)
        self.target = float(target_l0)
        self.lambdas = [float(lam) for lam in lambdas]
        self.steps = steps
        every = max(1, round(steps * CONTROL_EVERY))
        self.points = list(range(every, int(steps * LAST_CONTROL) + 1, every))
        """Steps after which the lambdas are steered."""
        self.ranks = sorted(range(len(self.lambdas)), key=lambda i: self.lambdas[i])
        """Members by starting lambda: the i-th aims at the i-th highest L0 of the bracket."""
        self.log_gap = math.log(START_GAP)
        """log of the ratio between adjacent members' aims."""
        self.slope = SLOPE_PRIOR
        self.history: list[dict[str, Any]] = []

    def due(self, done: int) -> bool:
        return done in self.points

    def control(self, done: int, l0s: Sequence[float]) -> list[float]:
        """The members' lambdas after the control point at `done` steps, from their L0 there."""
        self.slope = fit_slope(self.lambdas, l0s, self.slope)
        centre = self.target * (self.steps / done) ** DRIFT
        ordered = aims(centre, len(self.lambdas), self.log_gap)
        aimed = [0.0] * len(self.lambdas)
        for rank, member in enumerate(self.ranks):
            aimed[member] = ordered[rank]
        moved = [step_lambda(lam, l0, aim, self.slope) for lam, l0, aim in zip(self.lambdas, l0s, aimed)]
        self.history.append({"step": done, "l1_coeff": self.lambdas, "l0": [float(v) for v in l0s],
                             "slope": self.slope, "aimed_l0": aimed, "next_l1_coeff": moved})
        self.lambdas = moved
        self.log_gap = max(math.log(MIN_GAP), self.log_gap / 2)
        return list(moved)

    def state(self) -> dict[str, Any]:
        """Everything `restore` needs to continue exactly (for checkpoints)."""
        return {"lambdas": list(self.lambdas), "slope": self.slope, "log_gap": self.log_gap,
                "history": list(self.history)}

    def restore(self, state: dict[str, Any]) -> None:
        self.lambdas = [float(lam) for lam in state["lambdas"]]
        self.slope = float(state["slope"])
        self.log_gap = float(state["log_gap"])
        self.history = list(state["history"])

    def report(self) -> dict[str, Any]:
        """For eval.json: the target, the final lambdas and every control point."""
        return {"target_l0": self.target, "l1_coeff": self.lambdas, "slope": self.slope,
                "control_points": self.history}
