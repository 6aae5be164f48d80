"""The steering experiment: feature choice, prompts, and the report on a tiny random run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_run
from monofast.common.errors import DataError
from monofast.data import tokenizer
from monofast.data.splits import Split
from monofast.findings.steering import (SteeringConfig, experiment, null_features, prompt_windows, pure_features,
                                        run_steering)
from monofast.gpt.weights import load_model
from monofast.sae.model import SparseAutoencoder

F = 48


def feature_arrays() -> dict[str, np.ndarray]:
    """Hand-made analysis arrays for the 48 features of `make_run`'s SAE: 0 dead; 1-6 pure
    for source 0 and 7-12 for source 1 at known purities; 13-20 mixed; the rest in between."""
    density = np.full(F, 0.01)
    density[0] = 0.0
    purity = np.full(F, 0.8, dtype=np.float32)
    dominant = np.zeros(F, dtype=np.int16)
    dominant[1::2] = 1
    purity[1:7], dominant[1:7] = [0.96, 0.999, 0.97, 0.999, 0.90, 0.99], 0
    density[[2, 4]] = [0.002, 0.05]  # equally pure: 4 is commoner, so it comes first
    density[6] = 1e-6  # too rare
    purity[7:13], dominant[7:13] = [0.95, 0.98, 0.999, 0.9, 0.97, 0.96], 1
    purity[13:21] = np.linspace(0.5, 0.65, 8)
    dominant[0] = -1
    max_act = np.linspace(1.0, 5.0, F).astype(np.float32)
    return {"density": density, "purity": purity, "dominant": dominant, "max_act": max_act}


def test_pure_features_are_the_purest_alive_common_ones():
    cfg = SteeringConfig(per_source=3)
    assert pure_features(feature_arrays(), 2, cfg) == [[4, 2, 3], [9, 8, 11]]
    assert pure_features(feature_arrays(), 2, SteeringConfig(per_source=9)) == [[4, 2, 3, 1], [9, 8, 11, 12, 7]]
    assert pure_features(feature_arrays(), 2, SteeringConfig(min_purity=0.9995)) == [[], []]


def test_null_features_are_mixed_and_seeded():
    cfg = SteeringConfig(null_per_source=3)
    first = null_features(feature_arrays(), 2, cfg, np.random.default_rng(0))
    assert first == null_features(feature_arrays(), 2, cfg, np.random.default_rng(0))
    assert all(len(group) == 3 and set(group) <= set(range(13, 21)) for group in first)
    assert null_features(feature_arrays(), 2, SteeringConfig(null_per_source=20), np.random.default_rng(0))[0] \
        == list(range(13, 21))


def test_prompts_come_from_the_other_sources_whole():
    sources = np.array([0] * 10 + [1] * 7 + [0] * 5 + [2] * 4, dtype=np.uint8)
    split = Split(np.arange(len(sources), dtype=np.uint16), sources)
    windows, of = prompt_windows(split, 0, 50, 4, np.random.default_rng(1))
    assert windows.shape == (50, 4) and set(of.tolist()) == {1, 2}
    for row, src in zip(windows, of):
        assert (sources[row] == src).all() and (np.diff(row) == 1).all()  # consecutive, inside one run
    starts = set(windows[:, 0].tolist())
    assert starts <= {10, 11, 12, 13, 22} and len(starts) == 5  # every valid start, drawn with replacement
    with pytest.raises(DataError, match="no window of 8 tokens outside source 0"):
        prompt_windows(split, 0, 1, 8, np.random.default_rng(1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = make_run(tmp_path_factory.mktemp("steer"))
    return SimpleNamespace(model=load_model(paths["gpt"]), sae=SparseAutoencoder.load(paths["sae"]),
                           tok=tokenizer.load(paths["data"]), data=paths["data"])


SMALL = SteeringConfig(per_source=2, prompts=4, prompt_tokens=8, tokens=12, examples=2, null_per_source=1,
                       multiple=3.0, seed=5)


def test_the_experiment_reports_every_feature(tiny):
    report = run_steering(tiny.model, tiny.sae, 1, tiny.data, tiny.tok, feature_arrays(), "cpu", SMALL)
    json.dumps(report, allow_nan=False)
    assert report["sources"] == ["verse", "code"] and report["layer"] == 1
    assert [(r["feature"], r["source"]) for r in report["features"]] == [(4, "verse"), (2, "verse"),
                                                                         (9, "code"), (8, "code")]
    for r in report["features"] + report["null"]["features"]:
        assert 0.0 <= r["share_clean"] <= 1.0 and 0.0 <= r["share_clamped"] <= 1.0
        assert r["clamp"] == pytest.approx(3.0 * feature_arrays()["max_act"][r["feature"]])
        assert r["source"] not in r["prompt_sources"] and sum(r["prompt_sources"].values()) == 4
        assert len(r["examples"]) == 2 and all(isinstance(t, str) for e in r["examples"] for t in e.values())
        assert r["logprob_clamped"] < 0 and r["logprob_clean"] < 0
    assert [r["source"] for r in report["null"]["features"]] == ["verse", "code"]
    assert {r["feature"] for r in report["null"]["features"]} <= set(range(13, 21))
    shares = [r["share_clamped"] for r in report["features"]]
    assert report["steered"] == {"median": float(np.median(shares)), "min": min(shares), "max": max(shares),
                                 "mean": float(np.mean(shares))}
    assert 0.0 <= report["baseline"]["share_clean"] <= 1.0 and set(report["baseline"]["by_source"]) == {"verse", "code"}
    assert report["classifier"]["chunk_tokens"] == 12 and report["classifier"]["val_accuracy"] >= 0.9
    assert report["work"] == {"sampling_runs": 2 * (1 + 2 + 1), "prompts_per_run": 4, "tokens_generated": 8 * 4 * 12}


def test_the_same_seed_gives_the_same_report_and_clean_runs_are_shared(tiny):
    one = run_steering(tiny.model, tiny.sae, 1, tiny.data, tiny.tok, feature_arrays(), cfg=SMALL)
    two = run_steering(tiny.model, tiny.sae, 1, tiny.data, tiny.tok, feature_arrays(), cfg=SMALL)
    assert one["features"] == two["features"] and one["null"] == two["null"]
    verse = [r for r in one["features"] if r["source"] == "verse"]
    assert verse[0]["examples"][0]["clean"] == verse[1]["examples"][0]["clean"]  # one clean batch per source
    zero = run_steering(tiny.model, tiny.sae, 1, tiny.data, tiny.tok, feature_arrays(),
                        cfg=SteeringConfig(**{**SMALL.__dict__, "multiple": 0.0}))
    assert all(r["clamp"] == 0.0 for r in zero["features"])


def test_the_stage_entry_point_and_bad_inputs(tiny):
    options = SimpleNamespace(steer_features=1, steer_prompts=2, steer_tokens=6, steer_multiple=0.0, seed=3)
    report = experiment(options, tiny.data, tiny.model, tiny.sae, 1, feature_arrays(), ["verse", "code"])
    assert report["config"]["multiple"] == SteeringConfig.multiple and len(report["features"]) == 2
    with pytest.raises(DataError, match="holds"):
        experiment(options, tiny.data, tiny.model, tiny.sae, 1, feature_arrays(), ["a", "b"])
    short = {k: v[:10] for k, v in feature_arrays().items()}
    with pytest.raises(DataError, match="analysis --force"):
        run_steering(tiny.model, tiny.sae, 1, tiny.data, tiny.tok, short, cfg=SMALL)
    with pytest.raises(ValueError, match="lack"):
        run_steering(tiny.model, tiny.sae, 1, tiny.data, tiny.tok, {"max_act": np.ones(F)}, cfg=SMALL)
    with pytest.raises(ValueError, match="multiple"):
        SteeringConfig(multiple=float("inf"))
