"""The SAE stage's metrics (monofast.sae.evaluate): held-out reconstruction metrics, and
CE-loss recovered against explicit computations on a tiny random GPT."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_small_data
from monofast.activations import store as activations
from monofast.activations.harvest import HarvestConfig, harvest
from monofast.common.errors import DataError
from monofast.data.splits import load_meta, load_split
from monofast.gpt.model import GPT, GPTConfig
from monofast.gpt.weights import save_model
from monofast.sae import evaluate as sae_eval
from monofast.sae import train as sae_train
from monofast.sae.model import SAEConfig, SparseAutoencoder
from monofast.sae.resume import CHECKPOINT_FILE
from monofast.sae.sweep import build_sweep

LAYER = 1
LENGTH = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """data/ from two local sources and a random 2-layer GPT whose MLPs matter (c_proj scaled up)."""
    root = tmp_path_factory.mktemp("ce")
    build_small_data(root)
    torch.manual_seed(0)
    meta = load_meta(root / "data")
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=LENGTH, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():
        for block in model.h:
            block.mlp.c_proj.weight.mul_(40)
    model.eval()
    return root, model


def explicit_losses(model, tokens, hook=None):
    """(N * T,) per-token losses, the obvious way: one forward over every window."""
    with torch.no_grad():
        if hook is None:
            logits = model(tokens.idx).logits
        else:
            with model.hook_mlp(LAYER, hook):
                logits = model(tokens.idx).logits  # (N, T, V)
    return F.cross_entropy(logits.flatten(0, 1), tokens.targets.flatten(), reduction="none").double()


def test_held_out_windows_are_shifted_spread_and_labelled(tiny):
    root, _ = tiny
    split = load_split(root / "data", "val")
    tokens = sae_eval.held_out_tokens(root / "data", LENGTH, 500)
    n = tokens.idx.shape[0]
    assert tokens.idx.shape == tokens.targets.shape == tokens.sources.shape == (math.ceil(500 / LENGTH), LENGTH)
    assert torch.equal(tokens.idx[:, 1:], tokens.targets[:, :-1])
    starts = [int(np.flatnonzero(np.lib.stride_tricks.sliding_window_view(split.tokens, LENGTH)
                                 .__eq__(tokens.idx[i].numpy()).all(1))[0]) for i in (0, n - 1)]
    assert starts[0] == 0 and starts[1] > len(split.tokens) // 2  # spread over the whole split
    assert set(tokens.sources.unique().tolist()) == {0, 1}  # both sources are in
    assert tokens.source_names == ("verse", "code")
    whole = sae_eval.held_out_tokens(root / "data", LENGTH, 10**9)  # a budget past the split: all of it
    assert whole.idx.shape[0] == (len(split.tokens) - 1) // LENGTH


def test_identity_recovers_one_and_zero_recovers_nothing(tiny):
    root, model = tiny
    tokens = sae_eval.held_out_tokens(root / "data", LENGTH, 600)
    result = sae_eval.evaluate_hooks(model, LAYER, {"identity": lambda act: act, "zero": sae_eval.zero_hook,
                                                    "half": lambda act: act * 0.5}, tokens)
    clean, zero = explicit_losses(model, tokens), explicit_losses(model, tokens, torch.zeros_like)
    half = explicit_losses(model, tokens, lambda act: act * 0.5)
    assert result.tokens == tokens.targets.numel()
    assert result.clean.overall == pytest.approx(float(clean.mean()), rel=1e-6)
    assert result.zero.overall == pytest.approx(float(zero.mean()), rel=1e-6)
    assert result.zero.overall > result.clean.overall + 1e-3  # the ablation matters in this model
    sources = tokens.sources.flatten()
    for i, name in enumerate(tokens.source_names):
        mask = sources == i
        assert result.clean.by_source[name] == pytest.approx(float(clean[mask].mean()), rel=1e-6)
        assert result.zero.by_source[name] == pytest.approx(float(zero[mask].mean()), rel=1e-6)
        expected = float((zero[mask].mean() - half[mask].mean()) / (zero[mask].mean() - clean[mask].mean()))
        assert result.recovered["half"].by_source[name] == pytest.approx(expected, rel=1e-5)
        assert result.recovered["identity"].by_source[name] == pytest.approx(1.0)
        assert result.recovered["zero"].by_source[name] == pytest.approx(0.0, abs=1e-12)
    assert result.recovered["identity"].overall == pytest.approx(1.0)
    assert result.recovered["zero"].overall == pytest.approx(0.0, abs=1e-12)
    expected = float((zero.mean() - half.mean()) / (zero.mean() - clean.mean()))
    assert result.recovered["half"].overall == pytest.approx(expected, rel=1e-5)


def test_kl_to_the_clean_model_per_source_and_the_gap(tiny):
    root, model = tiny
    tokens = sae_eval.held_out_tokens(root / "data", LENGTH, 600)
    half = lambda act: act * 0.5  # noqa: E731
    result = sae_eval.evaluate_hooks(model, LAYER, {"identity": lambda act: act, "half": half}, tokens)
    with torch.no_grad():
        clean = F.log_softmax(model(tokens.idx).logits.flatten(0, 1).double(), -1)  # (N * T, V)
        with model.hook_mlp(LAYER, half):
            halved = F.log_softmax(model(tokens.idx).logits.flatten(0, 1).double(), -1)
        with model.hook_mlp(LAYER, torch.zeros_like):
            zeroed = F.log_softmax(model(tokens.idx).logits.flatten(0, 1).double(), -1)
    kl_half = (clean.exp() * (clean - halved)).sum(-1)  # (N * T,)
    kl_zero = (clean.exp() * (clean - zeroed)).sum(-1)
    sources = tokens.sources.flatten()
    assert result.kl["identity"].overall == pytest.approx(0.0, abs=1e-9)
    assert 0 < result.kl["half"].overall < result.kl_zero.overall
    for i, name in enumerate(tokens.source_names):
        mask = sources == i
        assert result.kl["half"].by_source[name] == pytest.approx(float(kl_half[mask].mean()), rel=1e-4)
        assert result.kl_zero.by_source[name] == pytest.approx(float(kl_zero[mask].mean()), rel=1e-4)
    top = sae_eval.summary(result)
    for name in tokens.source_names:
        assert top["ce_loss_gap_by_source"][name] == pytest.approx(
            result.zero.by_source[name] - result.clean.by_source[name])
    assert top["kl_div_zero_ablated"] == result.kl_zero.overall
    entry = sae_eval.per_sae(result, "half")
    assert entry["kl_div"] == result.kl["half"].overall and set(entry["kl_div_by_source"]) == set(tokens.source_names)


def test_spliced_sae_matches_an_explicit_reconstruction_before_and_after_saving(tiny, tmp_path):
    root, model = tiny
    tokens = sae_eval.held_out_tokens(root / "data", LENGTH, 400)
    d_mlp = model.config.d_mlp
    sae = SparseAutoencoder(SAEConfig(d_in=d_mlp, d_sae=2 * d_mlp, compute_dtype="float32"),
                            generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        acts = model.mlp_activations(tokens.idx, LAYER).reshape(-1, d_mlp)  # (N * T, d_mlp)
        sae.set_input_scale(acts)  # an input scale far from 1, kept beside the weights
        sae.b_dec.copy_(acts.mean(0) * sae.input_scale)
        sae.b_enc.fill_(-0.1)
    s = float(sae.input_scale)
    assert abs(s - 1) > 0.1

    def by_hand(act):  # (B, T, d_mlp): f = ReLU((x s - b_dec) W_enc + b_enc), x_hat = (f W_dec + b_dec) / s
        f = torch.relu((act * s - sae.b_dec) @ sae.W_enc + sae.b_enc)
        return (f @ sae.W_dec + sae.b_dec) / s

    spliced = explicit_losses(model, tokens, by_hand)
    in_memory = sae_eval.evaluate_saes(model, LAYER, {"sae": sae}, tokens)
    assert in_memory.spliced["sae"].overall == pytest.approx(float(spliced.mean()), rel=1e-5)
    assert in_memory.clean.overall < in_memory.spliced["sae"].overall
    sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")  # the scale folded into the weights
    from_file = sae_eval.evaluate_saes(model, LAYER, {"sae": loaded}, tokens)
    assert from_file.spliced["sae"].overall == pytest.approx(in_memory.spliced["sae"].overall, rel=1e-5)
    for name, value in in_memory.recovered["sae"].by_source.items():
        assert from_file.recovered["sae"].by_source[name] == pytest.approx(value, rel=1e-4, abs=1e-6)
    assert sae.training  # evaluate_saes puts the modes back


def test_summary_and_per_sae_entries_are_json_ready(tiny):
    root, model = tiny
    tokens = sae_eval.held_out_tokens(root / "data", LENGTH, 200)
    result = sae_eval.evaluate_hooks(model, LAYER, {"a": lambda act: act}, tokens)
    top, entry = sae_eval.summary(result), sae_eval.per_sae(result, "a")
    assert top["ce_eval_tokens"] == tokens.targets.numel()
    assert set(top["ce_loss_clean_by_source"]) == {"verse", "code"}
    assert entry["ce_loss_recovered"] == pytest.approx(1.0)
    assert set(entry["ce_loss_recovered_by_source"]) == {"verse", "code"}


def test_recovered_fraction_without_a_gap_is_nan():
    assert math.isnan(sae_eval.recovered_fraction(2.0, 2.5, 2.0))
    assert sae_eval.recovered_fraction(2.0, 2.5, 3.0) == pytest.approx(0.5)


def test_prepare_names_a_mismatched_store(tiny, tmp_path):
    root, model = tiny
    save_model(tmp_path, model)
    with pytest.raises(DataError, match="MLP width 64"):
        sae_eval.prepare(tmp_path, root / "data", LAYER, 100, 256, torch.device("cpu"))
    with pytest.raises(DataError, match="layer 5"):
        sae_eval.prepare(tmp_path, root / "data", 5, 64, 256, torch.device("cpu"))
    ready = sae_eval.prepare(tmp_path, root / "data", LAYER, 64, 256, torch.device("cpu"), length=8)
    assert ready.tokens.idx.shape == (32, 8)


# ---------------------------------------------------------------------------------------
# Held-out rows


def test_an_sae_that_reconstructs_the_mean_explains_no_variance(store_dir, small):
    store = activations.open_store(store_dir)
    cutoff = 2700
    held = store.take(np.arange(cutoff, store.rows), to_float32=True).tensor().double()  # (300, d_in)
    (member,) = build_sweep(small(l1_coeff=(1.0,)), store.dim, held.float(), 10, torch.device("cpu"))
    with torch.no_grad():  # no feature ever fires; x_hat is the held-out mean
        member.sae.b_enc.fill_(-1e6)
        member.sae.b_dec.copy_(held.mean(0).float() * member.sae.input_scale)
    result = sae_eval.held_out_metrics([member], store, cutoff, 128, torch.device("cpu"))
    entry = result["saes"]["l1_1"]
    assert result["rows"] == 300
    assert entry["mse"] == pytest.approx(float((held - held.mean(0)).square().sum(1).mean()), rel=1e-5)
    assert entry["fvu"] == pytest.approx(1.0, rel=1e-5)
    assert entry["l0"] == 0 and entry["dead_fraction"] == 1 and entry["dense_fraction"] == 0
    assert entry["log10_density_histogram"]["counts"][0] == member.sae.cfg.d_sae  # all in the dead bin
    assert member.sae.training  # put back in training mode


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


def test_eval_json_carries_ce_loss_recovered_overall_and_per_source(harvested, small, tmp_path):
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
    assert not (out / CHECKPOINT_FILE).exists()  # only the finished files remain
