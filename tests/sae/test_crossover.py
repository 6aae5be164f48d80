"""The measured crossover between the dense and sparse steps, its cache, and the trainer's
switch: when it switches, that it says so, and that switching changes nothing but speed."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from monofast.common import files
from monofast.sae import crossover, train as sae_train
from monofast.sae.crossover import Crossover, SparseSwitch
from monofast.sae.model import SAEConfig, SparseAutoencoder


def _sae(variant="anthropic2023", d_sae=64, k=8):
    return SparseAutoencoder(SAEConfig(d_in=16, d_sae=d_sae, variant=variant, k=k, compute_dtype="float32"),
                             generator=torch.Generator().manual_seed(0))


def test_measure_times_both_steps_and_fits_a_density():
    c = crossover.measure(_sae(d_sae=256), batch_size=256)
    assert c.dense_ms > 0 and set(c.sparse_ms) == {"0.01", "0.08"} and all(v > 0 for v in c.sparse_ms.values())
    assert 0.0 <= c.density <= 1.0
    topk = crossover.measure(_sae("topk", d_sae=256, k=4), batch_size=256)
    assert topk.k == 4 and list(topk.sparse_ms) == ["0.01562"] and topk.density in (0.0, 1.0)


def test_the_bias_sets_the_firing_density():
    sae = _sae(d_sae=128)
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(2))
    crossover._fire_at(sae, x, 0.05)
    with torch.no_grad():
        fired = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc > 0).float().mean()
    assert 0.04 <= float(fired) <= 0.06


def test_a_measurement_is_cached_per_machine_and_shape(monkeypatch):
    calls = []

    def fake(sae, batch_size):
        calls.append(sae.cfg.d_sae)
        return Crossover(sae.cfg.d_sae, None, 10.0, {"0.01": 2.0, "0.08": 6.0}, 0.12)

    monkeypatch.setattr(crossover, "measure", fake)
    path = files.cache_dir() / crossover.CACHE_FILE
    path.unlink(missing_ok=True)
    assert crossover.measured(_sae(d_sae=64), 128).density == 0.12
    assert crossover.measured(_sae(d_sae=64), 128).density == 0.12
    assert calls == [64]  # the second read the cache
    crossover.measured(_sae(d_sae=96), 128)
    crossover.measured(_sae(d_sae=64), 256)  # another batch is another shape
    assert calls == [64, 96, 64] and len(json.loads(path.read_text())) == 3
    path.write_text("{ not json")  # a damaged cache is measured again and rewritten
    assert crossover.measured(_sae(d_sae=64), 128).density == 0.12 and calls[-1] == 64
    assert len(json.loads(path.read_text())) == 1


def test_a_disturbed_measurement_is_tried_again_then_kept(monkeypatch, caplog):
    calls = []

    def busy(sae, batch_size):
        calls.append(1)
        return Crossover(sae.cfg.d_sae, None, 10.0, {}, 0.1 * len(calls), steady=len(calls) == 2)

    monkeypatch.setattr(crossover, "measure", busy)
    (files.cache_dir() / crossover.CACHE_FILE).unlink(missing_ok=True)
    assert crossover.measured(_sae(d_sae=80), 128).density == 0.2  # the second try was steady
    calls.clear()
    monkeypatch.setattr(crossover, "measure", lambda sae, b: (calls.append(1), Crossover(
        sae.cfg.d_sae, None, 10.0, {}, 0.5, steady=False))[1])
    with caplog.at_level(logging.WARNING, logger="monofast"):
        assert crossover.measured(_sae(d_sae=88), 128).density == 0.5
    assert len(calls) == crossover.ATTEMPTS and "it is kept all the same" in caplog.text
    assert crossover.measured(_sae(d_sae=88), 128).density == 0.5 and len(calls) == crossover.ATTEMPTS


def _switch(monkeypatch, density=0.1, **kw):
    monkeypatch.setattr(crossover, "measured",
                        lambda sae, b: Crossover(sae.cfg.d_sae, sae.cfg.top_k, 10.0, {}, density))
    saes = kw.pop("saes", None) or [_sae(), _sae()]
    return saes, SparseSwitch(kw.pop("mode", "auto"), saes, ["a", "b"][:len(saes)], 128, **kw)


def test_the_switch_follows_the_density_with_a_margin(monkeypatch, caplog):
    saes, switch = _switch(monkeypatch, density=0.1)  # 6.4 of 64 features
    assert not any(s.sparse_step for s in saes)
    switch.update(10, [40.0, 6.0])  # 62% and 9.4%: inside the margin, stay dense
    assert not any(s.sparse_step for s in saes)
    with caplog.at_level(logging.INFO, logger="monofast"):
        switch.update(20, [40.0, 5.0])  # 7.8% < 0.85 x 10%
    assert [s.sparse_step for s in saes] == [False, True]
    assert "sae b: the sparse step from step 20 (firing density 7.81%, crossover 10.00% measured here)" in caplog.text
    switch.update(30, [40.0, 6.9])  # 10.8%: inside the margin, stay sparse
    assert saes[1].sparse_step
    switch.update(40, [40.0, 8.0])  # 12.5% > 1.15 x 10%: back to dense
    assert not saes[1].sparse_step
    report = switch.report()
    assert report["crossover_density"] == {"64": 0.1}
    assert report["saes"]["b"] == {"switches": [[20, "sparse", 0.078125], [40, "dense", 0.125]],
                                   "steps": {"dense": 20, "sparse": 20}}  # steps 21-40 sparse
    assert report["saes"]["a"] == {"switches": [], "steps": {"dense": 40, "sparse": 0}}


def test_a_resumed_switch_continues_where_the_checkpoint_stood(monkeypatch):
    saes, switch = _switch(monkeypatch)
    switch.update(20, [40.0, 5.0])
    saved = json.loads(json.dumps(switch.state()))  # through a checkpoint
    fresh, resumed = _switch(monkeypatch, saes=[_sae(), _sae()], start=20, resumed=saved)
    assert [s.sparse_step for s in fresh] == [False, True]
    resumed.update(30, [40.0, 5.0])
    assert resumed.report()["saes"]["b"]["steps"] == {"dense": 20, "sparse": 10}


def test_modes_and_variants_without_a_sparse_form(monkeypatch):
    saes, on = _switch(monkeypatch, mode="on")
    assert all(s.sparse_step for s in saes) and "crossover_density" not in on.report()
    saes, off = _switch(monkeypatch, mode="off")
    off.update(10, [1.0, 1.0])
    assert not any(s.sparse_step for s in saes) and off.report()["unavailable"].startswith("turned off")
    saes, batch = _switch(monkeypatch, saes=[_sae("batchtopk")])
    assert batch.report() == {"mode": "auto", "unavailable": "the batchtopk variant's step ranks the whole "
                                                              "batch (no sparse form)"}
    saes, topk = _switch(monkeypatch, density=1.0, saes=[_sae("topk")])  # measured faster at its k
    assert saes[0].sparse_step and topk.report()["saes"]["a"]["switches"] == [[0, "sparse", 0.125]]
    with pytest.raises(ValueError, match="choose one of auto, on, off"):
        SparseSwitch("sometimes", [], [], 128)


def test_training_with_the_sparse_step_gives_the_dense_result(store_dir, small, tmp_path):
    dense = sae_train.train(small(sparse_step="off"), store_dir, tmp_path / "dense")
    sparse = sae_train.train(small(sparse_step="on"), store_dir, tmp_path / "sparse")
    assert sparse["training"]["sparse_step"]["saes"]["l1_3"]["steps"]["sparse"] > 0
    for name in ("l1_0.3", "l1_3"):
        a = SparseAutoencoder.load(tmp_path / "dense" / name)
        b = SparseAutoencoder.load(tmp_path / "sparse" / name)
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=2e-4, atol=2e-5)
        assert sparse["saes"][name]["l0"] == pytest.approx(dense["saes"][name]["l0"], rel=1e-3)
