"""Which SAE of a sweep the SAE stage publishes as `sae/`.

`quality` (the default): the lowest held-out L0 among the members that meet the quality
goal, CE-loss recovered at least `goal_ce_recovered` on every source and fewer than
`goal_dead` of their features dead. A λ tuned on one pair of corpora does not carry to
the next, so a sweep of a few λs in one pass lets the measurements choose. When no
member meets the goal, the one whose worst source recovers most is published, with one
warning naming the source that falls short and what to try. Without CE-loss recovered
(`--ce-eval-tokens 0`) the rule falls back to `target_l0` (nearest L0) or the first member.

`target_l0`: the member whose held-out L0 is nearest `--target-l0`. `first`: the sweep's first.
Without held-out rows (`--held-out 0`) neither rule can rank: the first is published, with a
warning when the sweep has several.
The choice, the rule and each member's verdict go into eval.json under "selection".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

RULES = ("quality", "target_l0", "first")


@dataclass(frozen=True)
class Goal:
    """The quality goal every SAE is held to (the SAE stage's rule, the findings' table)."""

    ce_recovered: float = 0.85
    """Least CE-loss recovered on every source."""
    dead: float = 0.10
    """Dead features (held out: never fired) must be fewer than this fraction."""
    l0: tuple[float, float] = (5.0, 50.0)
    """The L0 range of the goal; the selection rule ranks by L0 instead of requiring it."""


@dataclass
class Selection:
    """The member to publish and why."""

    published: str
    rule: str
    """The rule as applied, in words (eval.json's "selection.rule")."""
    met_goal: Optional[bool] = None
    """Whether the published member meets the goal (None: the rule did not measure it)."""
    shortfalls: dict[str, list[str]] = field(default_factory=dict)
    """Per member, what misses the goal ("CE-loss recovered on python 77.5% < 85%", "dead 12.0% >= 10%")."""
    warning: Optional[str] = None
    goal: Goal = field(default_factory=Goal)
    """The goal the members were held to."""

    def record(self) -> dict[str, Any]:
        return {"published": self.published, "rule": self.rule, "met_goal": self.met_goal,
                "goal": {"ce_loss_recovered": self.goal.ce_recovered, "dead_fraction": self.goal.dead,
                         "l0": list(self.goal.l0)},
                "members": {name: {"meets_goal": not short, "shortfalls": short}
                            for name, short in self.shortfalls.items()},
                "warning": self.warning}


def shortfalls(metrics: Mapping[str, Any], goal: Goal, check_l0: bool = False) -> list[str]:
    """What of `goal` one member's eval.json entry misses (empty: it meets the goal); a
    missing number counts as a miss, and so does NaN."""
    short = []
    lo, hi = goal.l0
    if check_l0 and not lo <= metrics.get("l0", math.nan) <= hi:
        short.append(f"L0 {metrics.get('l0', math.nan):.1f} outside {lo:g}-{hi:g}")
    short += [f"CE-loss recovered on {source} {rec:.1%} < {goal.ce_recovered:.0%}"
              for source, rec in sorted((metrics.get("ce_loss_recovered_by_source") or {}).items())
              if not rec >= goal.ce_recovered]
    if not few_dead(metrics, goal):
        short.append(f"dead {metrics.get('dead_fraction', math.nan):.1%} >= {goal.dead:.0%}")
    return short


def worst_source(metrics: Mapping[str, Any]) -> tuple[str, float]:
    """The source with the least CE-loss recovered (NaN ranks lowest)."""
    by_source = metrics["ce_loss_recovered_by_source"]
    name = min(by_source, key=lambda s: -math.inf if math.isnan(by_source[s]) else by_source[s])
    return name, by_source[name]


def few_dead(metrics: Mapping[str, Any], goal: Goal) -> bool:
    """Whether fewer than the goal's share of features are dead (a missing number is not)."""
    return metrics.get("dead_fraction", 1.0) < goal.dead


def advice(metrics: Mapping[str, Any], goal: Goal) -> str:
    """What to try when even the best member misses the goal."""
    if not few_dead(metrics, goal):
        return "try a lower --lr, more --epochs or a smaller --expansion"
    return "try a wider SAE (--expansion), more --epochs or a lower L1 coefficient (a higher --target-l0)"


def select(saes: dict[str, dict[str, Any]], names: list[str], rule: str = "quality",
           target_l0: float = 0.0, goal: Goal = Goal()) -> Selection:
    """The member of `names` (sweep order) to publish, from eval.json's "saes" entries."""
    if rule not in RULES:
        raise ValueError(f"selection rule {rule!r} is unknown; choose one of {', '.join(RULES)}")
    held_out = bool(names) and all({"l0", "dead_fraction"} <= saes.get(n, {}).keys() for n in names)
    measured = held_out and all("ce_loss_recovered_by_source" in saes[n] for n in names)
    if rule == "quality" and measured:
        short = {n: shortfalls(saes[n], goal) for n in names}
        meeting = [n for n in names if not short[n]]
        words = (f"quality: the lowest held-out L0 among the SAEs with CE-loss recovered >= "
                 f"{goal.ce_recovered:.0%} on every source and dead features < {goal.dead:.0%}")
        if meeting:
            best = min(meeting, key=lambda n: saes[n]["l0"])
            return Selection(best, words, True, short, goal=goal)
        best = max(names, key=lambda n: (few_dead(saes[n], goal), worst_source(saes[n])[1]))
        source, rec = worst_source(saes[best])
        miss = (f"CE-loss recovered {rec:.1%} on {source} (goal {goal.ce_recovered:.0%})"
                if not rec >= goal.ce_recovered else f"{saes[best]['dead_fraction']:.1%} of its features dead")
        warning = (f"no SAE of the sweep meets the quality goal; published {best}, the best on its worst source: "
                   f"{miss}; {advice(saes[best], goal)}")
        return Selection(best, words + "; none did, so the one whose worst source recovers most", False, short,
                         warning, goal)
    if rule != "first" and not held_out:
        # No rows held out (--held-out 0, or a last context longer than the 10% cap): no L0 or
        # dead fraction to rank by, so the first is published, saying so. Not ranked by the
        # training batches' statistics instead: eval.json does not hold them, and they were
        # measured on the rows the SAEs trained on while lambda and the LR still moved.
        unranked = None if len(names) < 2 else (
            f"no rows were held out, so the {len(names)} SAEs of the sweep were not compared; published "
            f"{names[0]}, the first; hold rows out (--held-out N) to choose by {rule}")
        return Selection(names[0], f"first: the sweep's first SAE ({rule}: no rows were held out to measure "
                                   f"L0 and dead features)", warning=unranked, goal=goal)
    why = "" if rule != "quality" else " (quality: no CE-loss recovered was measured)"
    if rule in ("quality", "target_l0") and target_l0 > 0:
        best = min(names, key=lambda n: abs(saes[n]["l0"] - target_l0))
        return Selection(best, f"target_l0: the held-out L0 nearest {target_l0:g}{why}", goal=goal)
    return Selection(names[0], f"first: the sweep's first SAE{why}", goal=goal)
