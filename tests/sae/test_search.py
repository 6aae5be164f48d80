"""The --target-l0 lambda search (monofast.sae.search), alone and inside SAE training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from monofast.activations import store as activations
from monofast.common.errors import UserError
from monofast.sae import search as sae_search
from monofast.sae import train as sae_train
from monofast.sae.config import SAETrainConfig
from monofast.sae.search import LambdaSearch

TOLERANCE = 0.15
"""The search's promise on the synthetic store: the published SAE's held-out L0 is within
15% of the target."""


def test_the_slope_fit_recovers_a_power_law_and_ignores_silent_members():
    lambdas = [0.5, 1.0, 2.0, 4.0]
    l0s = [40 * lam ** -1.4 for lam in lambdas]
    assert sae_search.fit_slope(lambdas, l0s) == pytest.approx(-1.4)
    assert sae_search.fit_slope(lambdas + [50.0], l0s + [0.01]) == pytest.approx(-1.4)


def test_the_slope_is_clamped_and_one_point_uses_the_prior():
    low, high = sae_search.SLOPE_RANGE
    assert sae_search.fit_slope([1.0, 2.0], [10.0, 10.0]) == high  # L0 has not answered lambda yet
    assert sae_search.fit_slope([1.0, 1.1], [10.0, 1.0]) == low  # a cliff
    assert sae_search.fit_slope([2.0], [10.0], prior=-1.7) == -1.7


def test_aims_are_geometric_and_the_smallest_lambda_aims_highest():
    assert sae_search.aims(10.0, 3, math.log(1.5)) == pytest.approx([15.0, 10.0, 10.0 / 1.5])
    assert sae_search.aims(10.0, 1, 0.3) == [10.0]


def test_a_control_step_is_multiplicative_and_bounded():
    slope = -1.0
    gentle = sae_search.step_lambda(1.0, 12.0, 10.0, slope)
    assert gentle == pytest.approx(1.2 ** sae_search.GAIN)  # too dense: raise lambda
    assert sae_search.step_lambda(1.0, 1000.0, 10.0, slope) == sae_search.MAX_UP
    assert sae_search.step_lambda(1.0, 0.0, 10.0, slope) == 1 / sae_search.MAX_DOWN


class Plant:
    """A stand-in for SAE training: each member's L0 relaxes (by `lag` of the gap per step)
    toward 60 lambda^slope (step / steps)^-drift, so that it lags behind lambda and keeps
    falling at a fixed lambda, as in real runs; `drift` and `slope` need not match the
    search's assumptions."""

    def __init__(self, count: int, slope: float = -1.3, drift: float = 0.6, lag: float = 0.05):
        self.slope, self.drift, self.lag = slope, drift, lag
        self.l0 = [400.0] * count  # a fresh SAE fires densely

    def step(self, lambdas: list[float], step: int, steps: int) -> list[float]:
        settled = [60 * lam ** self.slope * ((step + 1) / steps) ** -self.drift for lam in lambdas]
        self.l0 = [l0 + self.lag * (goal - l0) for l0, goal in zip(self.l0, settled)]
        return self.l0


def drive(search: LambdaSearch, plant: Plant, steps: int) -> list[float]:
    """Run the search against `plant`; each member's L0 at the end."""
    l0s = plant.l0
    for step in range(steps):
        l0s = plant.step(search.lambdas, step, steps)
        if search.due(step + 1):
            search.control(step + 1, l0s)
    return l0s


@pytest.mark.parametrize("start", [(0.1, 0.2, 0.4), (3.0, 30.0), (1.0, 1.5)], ids=["far-below", "wide-above", "close"])
@pytest.mark.parametrize("slope,drift", [(-1.3, 0.6), (-0.8, 0.4), (-2.0, 0.8), (-1.3, 0.3), (-1.3, 0.9)],
                         ids=["as-modelled", "flat-slow", "steep-fast", "slow-drift", "fast-drift"])
def test_the_sweep_brackets_the_target(start, slope, drift):
    steps, target = 1000, 12.0
    search = LambdaSearch(target, start, steps)
    final = drive(search, Plant(len(start), slope, drift), steps)
    assert min(abs(l0 / target - 1) for l0 in final) < 0.10, final
    assert len(search.history) == 8  # control at 10%, 20%, ... 80% of the steps


@pytest.mark.parametrize("start", [0.3, 1.0, 20.0])
def test_one_member_is_a_plain_controller(start):
    # The answer is lambda ~3.5; eight control points reach 1.5^8 ~ 25x up, 2^8 down.
    steps, target = 1000, 12.0
    search = LambdaSearch(target, [start], steps)
    final = drive(search, Plant(1), steps)
    assert abs(final[0] / target - 1) < TOLERANCE, final


def test_the_state_round_trips():
    steps = 100
    search, plant = LambdaSearch(10.0, [1.0, 2.0], steps), Plant(2)
    for step in range(35):
        l0s = plant.step(search.lambdas, step, steps)
        if search.due(step + 1):
            search.control(step + 1, l0s)
    copy = LambdaSearch(10.0, [1.0, 2.0], steps)
    copy.restore(search.state())
    for step in range(35, steps):
        l0s = plant.step(search.lambdas, step, steps)
        for s in (search, copy):
            if s.due(step + 1):
                s.control(step + 1, l0s)
    assert copy.report() == search.report()


@pytest.mark.parametrize("target,lambdas,message", [
    (0.0, (1.0,), "out of range"),
    (48.0, (1.0,), "out of range"),
    (4.0, (0.0, 1.0), "must be > 0"),
], ids=["zero", "all-features", "zero-lambda"])
def test_bad_targets_are_user_errors(target, lambdas, message):
    with pytest.raises(UserError, match=message):
        sae_search.check_target(target, 48)
        LambdaSearch(target, lambdas, 100)


# ---------------------------------------------------------------------------------------
# Inside training, on a small synthetic store

DIM = 32


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """8,000 rows, each a sum of about 19 of 256 random directions of Zipf-like frequencies:
    more directions than the SAE has features, so its L0 answers lambda smoothly."""
    rng = np.random.default_rng(3)
    atoms = rng.standard_normal((256, DIM))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    rows = 8000
    frequency = 1.0 / np.arange(1, 257) ** 0.8
    fires = rng.random((rows, 256)) < 20 * frequency / frequency.sum()
    values = ((fires * rng.exponential(1.0, (rows, 256))) @ atoms * 3.0 + 0.5).astype(np.float32)
    folder = tmp_path_factory.mktemp("store") / "activations"
    r = np.arange(rows)
    with activations.ActivationWriter(folder, DIM, "fp32") as writer:
        writer.append(values, r % 50, r % 2, r // 10, r % 10)
        writer.finish(gpt={"layer": 0})
    return folder


def small(**overrides) -> SAETrainConfig:
    base = dict(expansion=4, batch_size=64, epochs=4, lr=1e-2, held_out=800, log_every=50, resample_rows=512,
                compute_dtype="float32", device="cpu", b_dec_init="mean", checkpoint_every=0)
    return SAETrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("variant,target,l1", [
    ("anthropic2023", 10.0, (0.3, 3.0)),
    ("april2024", 8.0, (0.5, 1.0, 2.0)),
], ids=["a2023-L0-10-two", "apr2024-L0-8-three"])
def test_training_hits_the_target_l0(store_dir, tmp_path, variant, target, l1):
    # 448 steps; the starting lambdas give L0 about 45 and 7 (a2023), 60 to 35 (april2024).
    out = tmp_path / "sae"
    evaluation = sae_train.train(small(variant=variant, target_l0=target, l1_coeff=l1), store_dir, out)
    search = evaluation["lambda_search"]
    assert search["target_l0"] == target and len(search["control_points"]) == 8
    published = json.loads((out / "cfg.json").read_text())["sweep_member"]
    l0 = evaluation["saes"][published]["l0"]
    assert abs(l0 / target - 1) < TOLERANCE, (l0, search)
    assert evaluation["saes"][published]["l1_coeff"] in search["l1_coeff"]  # the steered lambda


def test_a_target_beyond_the_dictionary_is_refused_before_training(store_dir, tmp_path):
    with pytest.raises(UserError, match="--target-l0 200 is out of range"):
        sae_train.train(small(target_l0=200.0), store_dir, tmp_path / "sae")
    with pytest.raises(ValueError, match="target_l0 must be >= 0"):
        small(target_l0=-1.0)


def test_topk_publishes_the_nearest_k_without_searching(store_dir, tmp_path):
    out = tmp_path / "sae"
    evaluation = sae_train.train(small(variant="topk", k=(4, 12), epochs=1, target_l0=10.0), store_dir, out)
    assert "lambda_search" not in evaluation
    assert json.loads((out / "cfg.json").read_text())["sweep_member"] == "k12"


class Interrupted(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def test_a_resumed_search_ends_where_an_uninterrupted_one_does(store_dir, tmp_path, monkeypatch):
    # 112 steps, control points every 11; killed after the checkpoint of step 40 (three controls in).
    cfg = dict(epochs=1, target_l0=10.0, l1_coeff=(0.3, 3.0), checkpoint_every=20)
    whole = sae_train.train(small(**cfg), store_dir, tmp_path / "whole")
    real = sae_train.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        if args[-1].step == 40:
            raise Interrupted

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(sae_train, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            sae_train.train(small(**cfg), store_dir, out)
    resumed = sae_train.train(small(**cfg, resume=True), store_dir, out)
    assert len(resumed["lambda_search"]["control_points"]) == 8
    assert resumed == whole
