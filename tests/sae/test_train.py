"""The SAE stage end to end (monofast.sae.train) on small synthetic activation stores."""

from __future__ import annotations

import json

import pytest
from monofast.activations import store as activations
from monofast.common.errors import DataError, UserError
from monofast.sae import train as sae_train
from monofast.sae.model import SparseAutoencoder


def test_sweep_trains_side_by_side_and_writes_everything(store_dir, small, tmp_path):
    dim = activations.open_store(store_dir).dim
    out = tmp_path / "sae"
    evaluation = sae_train.train(small(), store_dir, out, {"hook_name": "blocks.0.mlp.hook_post"})

    assert evaluation["rows"] == 300
    results = evaluation["saes"]
    assert set(results) == {"l1_0.3", "l1_3"}
    assert results["l1_0.3"]["fvu"] < 0.3
    for name, r in results.items():
        assert 0 < r["l0"] < 3 * dim, name
        assert 0 <= r["dead_fraction"] <= 1 and 0 <= r["dense_fraction"] <= 1
        assert sum(r["log10_density_histogram"]["counts"]) == 3 * dim
    assert results["l1_3"]["l0"] < results["l1_0.3"]["l0"]  # more L1, sparser

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = (3000 - 300) * 2 // 128
    assert lines[-1]["step"] == steps and lines[0]["step"] == 5
    assert set(lines[-1]["saes"]) == {"l1_0.3", "l1_3"}
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(evaluation))
    # The precision the products ran in, and no CUDA here: plain steps.
    training = evaluation["training"]
    assert {k: training[k] for k in ("compute_dtype", "cuda_graph")} == {"compute_dtype": "float32",
                                                                         "cuda_graph": False}
    sparse = training["sparse_step"]
    assert sparse["mode"] == "auto" and set(sparse["saes"]) == {"l1_0.3", "l1_3"}
    for record in sparse["saes"].values():  # every step counted, in one form or the other
        assert sum(record["steps"].values()) == steps

    top = json.loads((out / "cfg.json").read_text())  # without --target-l0, the first is published
    assert top["sweep_member"] == "l1_0.3" and top["hook_name"] == "blocks.0.mlp.hook_post"
    for name in results:
        sae = SparseAutoencoder.load(out / name)
        assert sae.cfg.d_in == dim and sae.cfg.d_sae == 3 * dim


def test_topk_sweep_keeps_k(store_dir, small, tmp_path):
    evaluation = sae_train.train(small(variant="topk", k=(2, 4), epochs=1), store_dir, tmp_path / "sae")
    assert evaluation["saes"]["k2"]["l0"] <= 2 + 1e-9
    assert evaluation["saes"]["k4"]["l0"] <= 4 + 1e-9
    assert evaluation["saes"]["k4"]["fvu"] < evaluation["saes"]["k2"]["fvu"]


def test_nan_activations_stop_training_with_a_clear_error(make_store, small, tmp_path):
    store_dir = make_store(tmp_path / "bad", rows=600, poison_row=5)
    with pytest.raises(DataError, match="NaN or Inf"):
        sae_train.train(small(held_out=0, batch_size=64), store_dir, tmp_path / "sae")
    assert not (tmp_path / "sae" / "sae_weights.safetensors").exists()


def test_a_sweep_too_large_for_the_memory_is_refused_before_anything_is_allocated(store_dir, small, tmp_path):
    with pytest.raises(UserError, match=r"need at least .* GiB .* free; lower the width \(--expansion"):
        sae_train.train(small(expansion=10**9), store_dir, tmp_path / "sae")
    assert not (tmp_path / "sae" / "metrics.jsonl").exists()


def test_too_little_data_is_named(make_store, small, tmp_path):
    store_dir = make_store(tmp_path / "tiny", rows=50)
    with pytest.raises(DataError, match="fewer than one batch of 128"):
        sae_train.train(small(), store_dir, tmp_path / "sae")


def test_k_larger_than_the_dictionary_is_a_user_error(store_dir, small, tmp_path):
    with pytest.raises(UserError, match="k=100 must be between 1 and d_sae=48"):
        sae_train.train(small(variant="topk", k=(100,)), store_dir, tmp_path / "sae")
