"""SAE training (monofast.sae_train) on small synthetic activation stores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import build_small_data
from monofast.activations import store as activations
from monofast.common import config
from monofast.data.splits import load_meta
from monofast.sae import train as sae_train
from monofast.common.errors import DataError, UserError
from monofast.gpt.weights import save_model
from monofast.activations.harvest import HarvestConfig, harvest
from monofast.gpt.model import GPT, GPTConfig
from monofast.sae.model import SparseAutoencoder
from monofast.sae.train import SAETrainConfig

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
    evaluation = sae_train.train(small(), store_dir, out, {"hook_name": "blocks.0.mlp.hook_post"})

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
    assert evaluation["training"] == {"cuda_graph": False}  # no CUDA here: plain steps

    top = json.loads((out / "cfg.json").read_text())  # without --target-l0, the first is published
    assert top["sweep_member"] == "l1_0.3" and top["hook_name"] == "blocks.0.mlp.hook_post"
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


# ---------------------------------------------------------------------------------------
# CE-loss recovered in eval.json


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """data/, a random GPT and a smoke-sized store harvested from it."""
    root = tmp_path_factory.mktemp("run")
    build_small_data(root)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=load_meta(root / "data")["vocab_size"], block_size=16, n_layer=1,
                          n_head=2, n_embd=16))
    (root / "gpt").mkdir()
    save_model(root / "gpt", model)
    harvest(HarvestConfig(contexts=64, positions_per_context=15, shard_mb=1, device="cpu"), root / "data",
            root / "gpt", root / "activations")
    return root


def test_eval_json_carries_ce_loss_recovered_overall_and_per_source(harvested, tmp_path):
    cfg = small(held_out=96, batch_size=64, epochs=1, ce_eval_tokens=256, checkpoint_every=3)
    out = tmp_path / "sae"
    evaluation = sae_train.train(cfg, harvested / "activations", out, gpt_dir=harvested / "gpt",
                                 data_dir=harvested / "data")
    written = json.loads((out / "eval.json").read_text())
    assert written == json.loads(json.dumps(evaluation))
    assert written["ce_eval_tokens"] == 256
    for key in ("ce_loss_clean", "ce_loss_zero_ablated"):
        assert math.isfinite(written[key]) and set(written[f"{key}_by_source"]) == {"verse", "code"}
    for name in ("l1_0.3", "l1_3"):
        entry = written["saes"][name]
        assert math.isfinite(entry["ce_loss_spliced"]) and math.isfinite(entry["ce_loss_recovered"])
        assert set(entry["ce_loss_recovered_by_source"]) == {"verse", "code"}
        expected = ((written["ce_loss_zero_ablated"] - entry["ce_loss_spliced"])
                    / (written["ce_loss_zero_ablated"] - written["ce_loss_clean"]))
        assert entry["ce_loss_recovered"] == pytest.approx(expected)
    assert not (out / sae_train.CHECKPOINT_FILE).exists()  # only the finished files remain


# ---------------------------------------------------------------------------------------
# Checkpoints and --resume


class Interrupted(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def interrupt_after_checkpoint(monkeypatch, which: int) -> None:
    real = sae_train.save_checkpoint
    calls = []

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(args[-1].step)
        if len(calls) == which:
            raise Interrupted(f"after the checkpoint of step {calls[-1]}")

    monkeypatch.setattr(sae_train, "save_checkpoint", save_then_stop)


def without_timing(metrics_text: str) -> list[dict]:
    lines = [json.loads(line) for line in metrics_text.splitlines()]
    for line in lines:
        del line["seconds"], line["rows_per_s"]
    return lines


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(store_dir, tmp_path, monkeypatch):
    # 42 steps over two epochs, resampling after 10, 20 and 30; killed after the checkpoint of
    # step 14, mid-epoch with rows carried over, before the epoch boundary and two resamplings.
    cfg = small(checkpoint_every=7, resample_every=10)
    whole = sae_train.train(cfg, store_dir, tmp_path / "whole")

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, which=2)
        with pytest.raises(Interrupted, match="step 14"):
            sae_train.train(cfg, store_dir, out)
    assert (out / sae_train.CHECKPOINT_FILE).is_file()
    assert not (out / "sae.safetensors").exists() and not (out / "eval.json").exists()
    resumed = sae_train.train(small(checkpoint_every=7, resample_every=10, resume=True), store_dir, out)

    assert resumed == whole
    for name in ("l1_0.3", "l1_3"):
        a, b = SparseAutoencoder.load(tmp_path / "whole" / name), SparseAutoencoder.load(out / name)
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert without_timing((out / "metrics.jsonl").read_text()) == \
        without_timing((tmp_path / "whole" / "metrics.jsonl").read_text())
    assert not (out / sae_train.CHECKPOINT_FILE).exists()


def test_a_checkpoint_from_other_options_is_refused(store_dir, tmp_path, monkeypatch):
    out = tmp_path / "sae"
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, which=1)
        with pytest.raises(Interrupted):
            sae_train.train(small(checkpoint_every=5, epochs=1), store_dir, out)
    with pytest.raises(UserError, match=r"lr=0.01 \(now 0.02\).*drop --resume to start over"):
        sae_train.train(small(checkpoint_every=5, epochs=1, lr=2e-2, resume=True), store_dir, out)
    other_store = write_store(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="activation_store="):
        sae_train.train(small(checkpoint_every=5, epochs=1, resume=True), other_store, out)
    # Without --resume the stale checkpoint is dropped and the run starts over.
    sae_train.train(small(checkpoint_every=5, epochs=1, lr=2e-2), store_dir, out)
    assert not (out / sae_train.CHECKPOINT_FILE).exists()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 5


def test_runtime_fields_do_not_change_the_identity():
    assert SAETrainConfig.RUNTIME == frozenset({"device", "resume", "cuda_graphs"})
    same = [config.identity(SAETrainConfig(device=d, resume=r)) for d, r in (("cpu", False), ("auto", True))]
    assert same[0] == same[1] and "device" not in same[0] and "resume" not in same[0]
    assert config.identity(SAETrainConfig(checkpoint_every=7)) != config.identity(SAETrainConfig())


@pytest.mark.parametrize("fields", [{"ce_eval_tokens": -1}, {"checkpoint_every": -1}], ids=["ce", "checkpoint"])
def test_negative_budgets_are_refused(fields):
    with pytest.raises(ValueError, match="0 turns them off"):
        SAETrainConfig(**fields)
