"""The SAE stage's publication rule on synthetic sweep results (`monofast.sae.select`)."""

from __future__ import annotations

import json
import math

import pytest

from monofast.sae.select import Goal, select


def member(l0: float, shakespeare: float, python: float, dead: float = 0.0) -> dict:
    return {"l0": l0, "dead_fraction": dead, "fvu": 0.2,
            "ce_loss_recovered": (shakespeare + python) / 2,
            "ce_loss_recovered_by_source": {"shakespeare": shakespeare, "python": python}}


SWEEP = {
    "l1_1": member(80.0, 0.97, 0.96),
    "l1_2": member(45.0, 0.92, 0.88),
    "l1_3": member(30.0, 0.91, 0.84),   # lower L0, but Python falls short: skipped
    "l1_5": member(18.0, 0.86, 0.78),
}
NAMES = list(SWEEP)


def test_publishes_the_lowest_l0_that_meets_the_goal_on_every_source():
    choice = select(SWEEP, NAMES)
    assert choice.published == "l1_2" and choice.met_goal is True and choice.warning is None
    record = choice.record()
    assert record["members"]["l1_3"] == {"meets_goal": False, "shortfalls": ["CE-loss recovered on python 84.0% < 85%"]}
    assert record["members"]["l1_1"]["meets_goal"] and "85%" in record["rule"]


def test_dead_features_disqualify():
    sweep = dict(SWEEP, l1_2=member(45.0, 0.92, 0.88, dead=0.12))
    choice = select(sweep, NAMES)
    assert choice.published == "l1_1"
    assert choice.shortfalls["l1_2"] == ["dead 12.0% >= 10%"]


def test_none_meets_the_goal_publishes_the_best_worst_source_and_warns_by_name():
    sweep = {"l1_3": member(30.0, 0.91, 0.80), "l1_5": member(18.0, 0.86, 0.71),
             "l1_9": member(9.0, 0.95, float("nan"))}
    choice = select(sweep, list(sweep))
    assert choice.published == "l1_3" and choice.met_goal is False
    assert choice.warning.startswith("no SAE of the sweep meets the quality goal; published l1_3")
    assert "CE-loss recovered 80.0% on python (goal 85%)" in choice.warning and "--expansion" in choice.warning
    assert choice.shortfalls["l1_9"] == ["CE-loss recovered on python nan% < 85%"]  # NaN never meets the goal


def test_a_stricter_goal_moves_the_choice():
    assert select(SWEEP, NAMES, goal=Goal(ce_recovered=0.95)).published == "l1_1"
    assert select(SWEEP, NAMES, goal=Goal(ce_recovered=0.80)).published == "l1_3"


def test_without_ce_measurements_falls_back_to_the_target_then_the_first():
    bare = {n: {"l0": m["l0"], "dead_fraction": 0.0} for n, m in SWEEP.items()}
    nearest = select(bare, NAMES, target_l0=20)
    assert nearest.published == "l1_5" and "no CE-loss recovered was measured" in nearest.rule
    assert nearest.met_goal is None
    assert select(bare, NAMES).published == "l1_1"
    assert select(SWEEP, NAMES, rule="first").published == "l1_1"
    assert select(SWEEP, NAMES, rule="target_l0", target_l0=29).published == "l1_3"


def test_without_held_out_rows_the_first_is_published_and_the_rule_says_why():
    # --held-out 0: eval.json holds CE-loss recovered (measured on data's validation split)
    # but no held-out L0 or dead fraction, which both rules rank by.
    ce_only = {n: {k: m[k] for k in ("ce_loss_recovered", "ce_loss_recovered_by_source")} for n, m in SWEEP.items()}
    for rule in ("quality", "target_l0"):
        choice = select(ce_only, NAMES, rule=rule, target_l0=20)
        assert choice.published == "l1_1" and choice.met_goal is None
        assert choice.rule == (f"first: the sweep's first SAE ({rule}: no rows were held out to measure L0 and "
                               f"dead features)")
        assert choice.warning.startswith("no rows were held out, so the 4 SAEs of the sweep were not compared")
        assert f"--held-out N) to choose by {rule}" in choice.warning
    assert select({"l1_1": ce_only["l1_1"]}, ["l1_1"]).warning is None  # one SAE: nothing to compare


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="choose one of quality, target_l0, first"):
        select(SWEEP, NAMES, rule="best")
    assert math.isclose(Goal().ce_recovered, 0.85)


@pytest.mark.slow
def test_a_two_source_run_skips_the_member_that_fails_one_source(smoke_run, tmp_path):
    """The smoke run's SAE stage again with a sweep whose sparser member (λ 2) recovers less
    of the CE loss on one source than on the other. With the goal set between its two
    sources it fails on one only, has the lower L0, and must not be published."""
    import shutil

    from monofast import cli

    run = tmp_path / "run"
    shutil.copytree(smoke_run.run, run)
    config = smoke_run.args[smoke_run.args.index("--config") + 1]
    args = ["sae", "train", "--preset", "smoke", "--config", config, "--run", str(run), "--device", "cpu",
            "--compute-dtype", "float32", "--l1-coeff", "0.3,2", "--epochs", "40", "--lr", "0.01", "--goal-dead", "1"]

    def stage(goal: float) -> dict:
        assert cli.main(args + ["--goal-ce-recovered", f"{goal:.4f}"]) == 0
        return json.loads((run / "sae" / "eval.json").read_text())

    saes = stage(0.85)["saes"]
    dense, sparse = saes["l1_0.3"], saes["l1_2"]
    assert sparse["l0"] < dense["l0"]
    (low, low_rec), (_, high_rec) = sorted(sparse["ce_loss_recovered_by_source"].items(), key=lambda kv: kv[1])
    assert high_rec - low_rec > 0.02 and min(dense["ce_loss_recovered_by_source"].values()) > high_rec, saes
    goal = (low_rec + high_rec) / 2
    evaluation = stage(goal)
    chosen = evaluation["selection"]
    assert chosen["members"]["l1_2"]["shortfalls"] == [f"CE-loss recovered on {low} {low_rec:.1%} < {goal:.0%}"]
    assert chosen["published"] == "l1_0.3" and chosen["met_goal"] and chosen["warning"] is None
    assert json.loads((run / "sae" / "cfg.json").read_text())["sweep_member"] == "l1_0.3"
