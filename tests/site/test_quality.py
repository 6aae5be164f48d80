"""The sweep's trade-off figures (site index page, `monofast report`): L0 against CE-loss
recovered overall and per source, and against FVU, the published member ringed."""

from __future__ import annotations

import math
import re

from monofast.site import quality


def member(l0: float, fvu: float, overall: float, verse: float, code: float) -> dict:
    return {"l0": l0, "fvu": fvu, "ce_loss_recovered": overall,
            "ce_loss_recovered_by_source": {"verse": verse, "code": code}}


EVALUATION = {
    "saes": {"l1_2": member(56.7, 0.12, 0.92, 0.93, 0.91), "l1_3": member(40.0, 0.16, 0.888, 0.90, 0.87),
             "l1_4": member(25.2, 0.22, 0.838, 0.86, 0.81)},
    "selection": {"published": "l1_3", "goal": {"ce_loss_recovered": 0.85, "dead_fraction": 0.1, "l0": [5, 50]}},
}


def points(chart: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="3"', chart)]


def test_one_line_per_source_and_overall_with_the_published_member_ringed():
    ce, fvu = quality.pareto(EVALUATION)
    assert ce.count("<polyline") == 3 and len(points(ce)) == 9
    for name in ("overall", "verse", "code", "published (l1_3)", "goal: 85% on every source"):
        assert name in ce
    rings = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="6.5"', ce)
    assert len(rings) == 3 and len({x for x, _ in rings}) == 1  # the published member on all three lines
    assert "l1_4: L0 25.2, CE-loss recovered on code 0.81" in ce  # every point says which SAE it is
    # L0 runs left to right: the sparsest member is leftmost; higher CE-loss recovered is drawn higher.
    overall = sorted(points(ce)[:3])
    assert [round(y, 1) for _, y in overall] == sorted(round(y, 1) for _, y in overall)[::-1]
    assert fvu.count("<polyline") == 1 and len(points(fvu)) == 3 and "published (l1_3)" in fvu
    assert 'xmlns' not in ce and quality.pareto(EVALUATION, standalone=True)[0].startswith('<svg xmlns=')


def test_missing_numbers_leave_gaps_not_errors():
    evaluation = {"saes": {"a": member(30, 0.2, math.nan, math.nan, 0.9), "b": {"l0": 12.0, "fvu": 0.3}}}
    ce, fvu = quality.pareto(evaluation)
    assert len(points(ce)) == 1 and len(points(fvu)) == 2  # only the finite values are drawn
    assert "published (a)" in ce  # without a selection record, the first member is the published one
    assert quality.pareto({"saes": {"a": {"fvu": 0.1}}}) == [] and quality.pareto({}) == []
