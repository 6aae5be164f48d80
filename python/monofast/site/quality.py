"""The trade-off a sweep of SAEs spans (the view SAEBench recommends): each member's L0
against its CE-loss recovered (overall and per source) and against its FVU, with the
published member ringed and the quality goal drawn in. The site's index page and
`monofast report` (pareto.svg) show it, from sae/eval.json alone."""

from __future__ import annotations

import math
from typing import Any

from monofast.site import svg


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _members(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    saes = evaluation.get("saes")
    return {name: m for name, m in saes.items() if isinstance(m, dict)} if isinstance(saes, dict) else {}


def _tip(name: str, m: dict[str, Any], what: str, value: float) -> str:
    return f"{name}: L0 {_number(m.get('l0')):.1f}, {what} {value:.3g}"


def pareto(evaluation: dict[str, Any], standalone: bool = False) -> list[str]:
    """Two charts (SVG text) of the sweep in `evaluation` (eval.json): L0 against CE-loss
    recovered, one line per source and one overall, and L0 against FVU; empty when no
    member has an L0. `standalone`: SVG files of their own."""
    members = _members(evaluation)
    if not any(math.isfinite(_number(m.get("l0"))) for m in members.values()):
        return []
    selection = evaluation.get("selection") if isinstance(evaluation.get("selection"), dict) else {}
    published = selection.get("published") or next(iter(members))
    goal = selection.get("goal") or {}
    if not goal and str(selection.get("rule", "")).startswith("quality"):  # recorded before the goal was
        from monofast.sae.select import Goal

        goal = {"ce_loss_recovered": Goal().ce_recovered}
    mark = f"published ({published})"
    charts = []
    sources = sorted({s for m in members.values() for s in (m.get("ce_loss_recovered_by_source") or {})})
    lines = [svg.XYSeries("overall", [(_number(m.get("l0")), _number(m.get("ce_loss_recovered")),
                                       _tip(n, m, "CE-loss recovered", _number(m.get("ce_loss_recovered"))))
                                      for n, m in members.items()])]
    for source in sources:
        lines.append(svg.XYSeries(source, [
            (_number(m.get("l0")), v, _tip(n, m, f"CE-loss recovered on {source}", v))
            for n, m in members.items()
            if math.isfinite(v := _number((m.get("ce_loss_recovered_by_source") or {}).get(source)))]))
    if any(math.isfinite(y) for s in lines for _, y, _ in s.points):
        chosen = members.get(published, {})
        rings = [(_number(chosen.get("l0")), y, "") for y in
                 [_number(chosen.get("ce_loss_recovered")),
                  *(_number(v) for v in (chosen.get("ce_loss_recovered_by_source") or {}).values())]]
        rings = [r for r in rings if math.isfinite(r[0]) and math.isfinite(r[1])]
        rings[:1] = [(x, y, mark) for x, y, _ in rings[:1]]  # one label, on the first point drawn
        target = _number(goal.get("ce_loss_recovered"))
        goal_line = [(target, f"goal: {target:.0%} on every source")] if math.isfinite(target) else []
        charts.append(svg.xy("CE-loss recovered against L0, each SAE of the sweep", lines, "L0 (features per token)",
                             "CE-loss recovered", log_x=True, marked=rings, hlines=goal_line, standalone=standalone))
    fvu = [svg.XYSeries("FVU", [(_number(m.get("l0")), _number(m.get("fvu")), _tip(n, m, "FVU", _number(m.get("fvu"))))
                                for n, m in members.items()])]
    if any(math.isfinite(y) for _, y, _ in fvu[0].points):
        chosen = members.get(published, {})
        charts.append(svg.xy("FVU (variance unexplained) against L0", fvu, "L0 (features per token)",
                             "FVU", log_x=True, marked=[(_number(chosen.get("l0")), _number(chosen.get("fvu")), mark)],
                             standalone=standalone))
    return charts
