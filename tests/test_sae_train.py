"""SAE training (monofast.sae_train) on small synthetic activation stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monofast import activations, sae_train
from monofast.errors import DataError, UserError
from monofast.sae import SparseAutoencoder
from monofast.sae_train import SAETrainConfig

DIM = 16


def write_store(folder, rows=3000, dim=DIM, poison_row=None, seed=0):
    """Rows that are sums of a few of 24 random directions, as a real store would hold them."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((24, dim))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((rows, 24))
    for r in range(rows):
        codes[r, rng.choice(24, 3, replace=False)] = rng.uniform(0.5, 2.5, 3)
    values = (codes @ atoms * 3.0 + 0.5).astype(np.float32)
    if poison_row is not None:
        values[poison_row, 2] = np.nan
    r = np.arange(rows)
    with activations.ActivationWriter(folder, dim, "fp32") as writer:
        writer.append(values, r % 50, r % 2, r // 10, r % 10)
        writer.finish(gpt={"layer": 0})
    return folder


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("store") / "activations")


def small(**overrides) -> SAETrainConfig:
    base = dict(expansion=3, batch_size=128, epochs=2, l1_coeff=(0.3, 3.0), lr=1e-2, held_out=300, log_every=5,
                resample_rows=512, compute_dtype="float32", device="cpu", b_dec_init="mean")
    return SAETrainConfig(**{**base, **overrides})


def test_sweep_trains_side_by_side_and_writes_everything(store_dir, tmp_path):
    out = tmp_path / "sae"
    evaluation = sae_train.train(small(target_l0=4.0), store_dir, out, {"hook_name": "blocks.0.mlp.hook_post"})

    assert evaluation["rows"] == 300
    results = evaluation["saes"]
    assert set(results) == {"l1_0.3", "l1_3"}
    assert results["l1_0.3"]["fvu"] < 0.3
    for name, r in results.items():
        assert 0 < r["l0"] < 3 * DIM, name
        assert 0 <= r["dead_fraction"] <= 1 and 0 <= r["dense_fraction"] <= 1
        assert sum(r["log10_density_histogram"]["counts"]) == 3 * DIM
    assert results["l1_3"]["l0"] < results["l1_0.3"]["l0"]  # more L1, sparser

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = (3000 - 300) * 2 // 128
    assert lines[-1]["step"] == steps and lines[0]["step"] == 5
    assert set(lines[-1]["saes"]) == {"l1_0.3", "l1_3"}
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(evaluation))

    chosen = min(results, key=lambda n: abs(results[n]["l0"] - 4.0))
    top = json.loads((out / "cfg.json").read_text())
    assert top["sweep_member"] == chosen and top["hook_name"] == "blocks.0.mlp.hook_post"
    for name in results:
        sae = SparseAutoencoder.load(out / name)
        assert sae.cfg.d_in == DIM and sae.cfg.d_sae == 3 * DIM


def test_topk_sweep_keeps_k(store_dir, tmp_path):
    evaluation = sae_train.train(small(variant="topk", k=(2, 4), epochs=1), store_dir, tmp_path / "sae")
    assert evaluation["saes"]["k2"]["l0"] <= 2 + 1e-9
    assert evaluation["saes"]["k4"]["l0"] <= 4 + 1e-9
    assert evaluation["saes"]["k4"]["fvu"] < evaluation["saes"]["k2"]["fvu"]


def test_schedules_warm_up_lambda_and_decay_lr():
    cfg = small(variant="april2024", lr=1.0)
    assert sae_train.schedules(cfg, 0, 100) == (pytest.approx(1 / 5), 1.0)
    assert sae_train.schedules(cfg, 50, 100) == (1.0, 1.0)
    assert sae_train.schedules(cfg, 90, 100)[1] == pytest.approx(0.5)
    assert sae_train.schedules(small(lr=1.0), 99, 100) == (1.0, 1.0)  # anthropic2023: neither
    assert sae_train.resample_steps(small(), 100) == [25, 50, 75]
    assert sae_train.resample_steps(small(), 40) == []  # too short to call a feature dead
    assert sae_train.resample_steps(small(resample_every=10), 40) == [10, 20, 30]
    assert sae_train.resample_steps(small(resample_every=-1), 100) == []
    assert sae_train.resample_steps(small(variant="april2024"), 100) == []


def test_resampling_revives_dead_features(store_dir):
    cfg = small(l1_coeff=(1.0,))
    store = activations.open_store(store_dir)
    sample = sae_train.sample_rows(store, 512, 2700, np.random.default_rng(0))
    (member,) = sae_train.build_sweep(cfg, DIM, sample, steps=10, device=torch.device("cpu"))
    member.sae(sample[:128]).mse.backward()
    member.sae.optimizer_step(member.optimizer)  # Adam now has state to reset
    member.sae.tokens_since_fired[:5] = 10_000  # five features "have not fired" for a long time
    revived = sae_train.resample(member, store, 2700, 5_000, cfg, np.random.default_rng(1), torch.device("cpu"))
    assert revived == 5
    assert int(member.sae.tokens_since_fired[:5].sum()) == 0
    assert torch.all(member.optimizer.state[member.sae.W_dec]["exp_avg"][:5] == 0)


def test_nan_activations_stop_training_with_a_clear_error(tmp_path):
    store_dir = write_store(tmp_path / "bad", rows=600, poison_row=5)
    with pytest.raises(DataError, match="NaN or Inf"):
        sae_train.train(small(held_out=0, batch_size=64), store_dir, tmp_path / "sae")
    assert not (tmp_path / "sae" / "sae.safetensors").exists()


def test_too_little_data_is_named(tmp_path):
    store_dir = write_store(tmp_path / "tiny", rows=50)
    with pytest.raises(DataError, match="fewer than one batch of 128"):
        sae_train.train(small(), store_dir, tmp_path / "sae")


@pytest.mark.parametrize("fields,message", [
    ({"variant": "gated"}, "choose one of"),
    ({"l1_coeff": ()}, "--l1-coeff 1,3,10"),
    ({"l1_coeff": (-1.0,)}, "finite values >= 0"),
    ({"k": (0,)}, "--k 16,32"),
    ({"l1_warmup": 2.0}, "between 0 and 1"),
    ({"b_dec_init": "median"}, "geometric_median, mean or zeros"),
], ids=["variant", "no-l1", "negative-l1", "k0", "warmup", "b_dec"])
def test_config_errors_name_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        SAETrainConfig(**fields)


def test_k_larger_than_the_dictionary_is_a_user_error(store_dir, tmp_path):
    with pytest.raises(UserError, match="k=100 must be between 1 and d_sae=48"):
        sae_train.train(small(variant="topk", k=(100,)), store_dir, tmp_path / "sae")
