"""The analysis stage against brute force: one analysis of a tiny random GPT and SAE on a
tiny two-source corpus, every number recomputed the slow, obvious way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_run
from monofast.analysis import contexts, effects, examples, output
from monofast.analysis.config import AnalysisConfig
from monofast.analysis.forward import Encoder, resolve_layer
from monofast.analysis.run import analyze
from monofast.analysis.stats import log_edges
from monofast.analysis.streaming import CellReservoir, StreamingTopK
from monofast.common.errors import UserError
from monofast.data.splits import load_meta
from monofast.gpt.model import GPT, GPTConfig
from monofast.gpt.weights import load_model
from monofast.sae.model import SAEConfig, SparseAutoencoder

CPU = torch.device("cpu")
CFG = AnalysisConfig(tokens=6_000, batch_contexts=16, top_k=5, window_radius=3, quantile_bins=4,
                     quantile_samples=3, dtype="float32", device="cpu", rerun_examples=2)


# ---------------------------------------------------------------------------------------
# Streaming selections

@pytest.mark.parametrize("how", ["dense", "sparse"])
def test_streaming_topk_equals_brute_force(how):
    gen = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(700, 9, generator=gen) - 1.0)  # (n, F), ~16% nonzero
    acts[:, 8] = 0  # a feature that never fires keeps empty slots
    top = StreamingTopK(9, 6, {"copy": ((2,), torch.float32)}, CPU)
    for first in range(0, 700, 53):
        chunk = acts[first:first + 53]

        def payload(f, r, chunk=chunk):
            return {"copy": torch.stack([chunk[r, f], -chunk[r, f]], 1)}

        if how == "dense":
            top.update_dense(chunk, first, payload)
        else:
            rows, feats = chunk.nonzero().unbind(1)
            top.update_sparse(feats, chunk[rows, feats], rows, first, payload)
    values, rows = acts.topk(6, dim=0)
    assert torch.equal(top.values[:8], values.T[:8])
    assert torch.equal(top.ids[:8], rows.T[:8])
    assert torch.equal(top.payload["copy"][:8, :, 0], values.T[:8])
    assert (top.ids[8] == -1).all() and (top.values[8] == 0).all()
    assert torch.isnan(top.payload["copy"][8]).all()


def test_reservoir_keeps_the_smallest_keys_of_each_cell():
    gen = torch.Generator().manual_seed(1)
    n, n_cells, capacity = 2_000, 7, 4
    cells = torch.randint(0, n_cells, (n,), generator=gen)
    cells[cells == 6] = 5  # cell 6 stays empty
    keys = torch.randint(0, 2**24, (n,), generator=gen).float() * 2**-24  # as the scan draws them
    values = torch.rand(n, generator=gen)
    res = CellReservoir(n_cells, capacity, {"v": ((), torch.float32)}, CPU)
    for first in range(0, n, 128):
        part = slice(first, first + 128)
        rows = torch.arange(len(cells[part]))
        res.update(cells[part], keys[part], values[part], rows, first, cells[part],
                   lambda f, r, first=first: {"v": values[first + r]})
    for c in range(n_cells):
        members = (cells == c).nonzero().squeeze(1)
        expected = members[keys[members].argsort()[:capacity]]
        got = res.ids[c][res.ids[c] >= 0]
        assert torch.equal(got, expected)
        assert torch.equal(res.payload["v"][c][: len(expected)], values[expected])


def test_quantile_groups_split_the_mass_evenly():
    hist = torch.tensor([[0, 10, 10, 10, 10, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0], [100, 1, 1, 1, 0, 0, 0, 1]])
    groups = examples.quantile_groups(hist, 4)
    assert groups[0].tolist() == [-1, 0, 1, 2, 3, -1, -1, -1]
    assert (groups[1] == -1).all()
    assert groups[2].tolist()[:4] == [1, 3, 3, 3]  # one heavy bin cannot be split


def test_log_edges_are_log_spaced():
    edges = log_edges(4)
    ratios = edges[1:] / edges[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 10 ** 0.25))
    assert edges[0].item() == pytest.approx(1e-3) and edges[-1].item() == pytest.approx(1e3)


# ---------------------------------------------------------------------------------------
# A whole analysis of a tiny run

class Truth:
    """Brute force: every activation of every analysed token."""

    def __init__(self, paths: dict[str, Path], cfg: AnalysisConfig, layer: int):
        meta = load_meta(paths["data"])
        self.model = load_model(paths["gpt"])
        self.sae = SparseAutoencoder.load(paths["sae"])
        self.layer = layer
        plan = contexts.plan(paths["data"], cfg.splits, 32, cfg.tokens, len(meta["sources"]), cfg.seed)
        batches = list(contexts.batches(paths["data"], plan, 1000))
        self.idx = torch.from_numpy(np.concatenate([b.idx for b in batches]))  # (N_ctx, T)
        self.targets = torch.from_numpy(np.concatenate([b.targets for b in batches]))
        self.sources = torch.from_numpy(np.concatenate([b.sources for b in batches])).reshape(-1)
        with torch.no_grad():
            self.mlp = self.model.mlp_activations(self.idx, layer)  # (N_ctx, T, d_mlp)
            self.acts = self.sae.encode(self.mlp.reshape(-1, self.mlp.shape[-1]))  # (N, F)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    paths = make_run(root)
    summary = analyze(CFG, paths["data"], paths["gpt"], paths["sae"], paths["analysis"])
    return paths, summary, output.load(paths["analysis"]), Truth(paths, CFG, 1)


def test_density_mass_max_and_histogram_match_brute_force(analysed):
    _, summary, result, truth = analysed
    feats = result.features
    acts = truth.acts
    fires = (acts > 0).sum(0)
    assert summary["tokens"] == acts.shape[0]
    np.testing.assert_array_equal(feats["fires"], fires.numpy())
    np.testing.assert_allclose(feats["density"], fires.numpy() / acts.shape[0])
    np.testing.assert_allclose(feats["max_act"], acts.max(0).values.numpy(), rtol=1e-5, atol=1e-6)
    mass = acts.double().sum(0).numpy()
    np.testing.assert_allclose(feats["mass_by_source"].sum(1), mass, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(feats["hist"].sum(1), fires.numpy())
    edges = torch.from_numpy(feats["hist_edges"])
    f = int(fires.argmax())
    bins = torch.bucketize(acts[:, f][acts[:, f] > 0], edges, right=True)
    np.testing.assert_array_equal(feats["hist"][f], np.bincount(bins.numpy(), minlength=feats["hist"].shape[1]))
    assert feats["fires"][0] == 0 and summary["features"]["dead"] >= 1


def test_source_shares_sum_to_one_and_match_brute_force(analysed):
    _, _, result, truth = analysed
    feats, acts, src = result.features, truth.acts, truth.sources
    for s in range(2):
        on = src == s
        np.testing.assert_array_equal(feats["fires_by_source"][:, s], (acts[on] > 0).sum(0).numpy())
        np.testing.assert_allclose(feats["mass_by_source"][:, s], acts[on].double().sum(0).numpy(),
                                   rtol=1e-4, atol=1e-5)
    firing = feats["fires"] > 0
    np.testing.assert_allclose(feats["share_fires"][firing].sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(feats["share_mass"][firing].sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(feats["purity"][firing], feats["share_mass"][firing].max(1))
    assert (feats["dominant"][~firing] == -1).all()
    # the neurons too
    mlp = truth.mlp.reshape(-1, truth.mlp.shape[-1])
    neurons = result.neurons
    for s in range(2):
        np.testing.assert_array_equal(neurons["fires_by_source"][:, s], (mlp[src == s] > 0).sum(0).numpy())
    np.testing.assert_allclose(neurons["density"], (mlp > 0).double().mean(0).numpy())


def test_top_tokens_match_brute_force(analysed):
    _, _, result, truth = analysed
    f = int(result.features["fires"].argmax())
    tokens = truth.idx.reshape(-1)[truth.acts[:, f] > 0]
    counts = np.bincount(tokens.numpy(), minlength=truth.model.config.vocab_size)
    np.testing.assert_array_equal(np.sort(result.features["top_token_counts"][f])[::-1],
                                  np.sort(counts)[::-1][:CFG.top_tokens])


def test_top_k_windows_match_brute_force(analysed):
    _, _, result, truth = analysed
    ex = result.examples
    values, rows = truth.acts.topk(CFG.top_k, dim=0)  # (k, F)
    live = result.features["fires"] >= CFG.top_k
    np.testing.assert_allclose(ex["top_values"][live], values.T[live].numpy(), rtol=1e-6)
    # Ties (position-0 tokens with one token id activate alike) may pick other rows of equal value.
    f_idx = np.repeat(np.flatnonzero(live), CFG.top_k)
    np.testing.assert_array_equal(truth.acts[ex["top_rows"][live].ravel(), f_idx].numpy(),
                                  ex["top_values"][live].ravel())
    for f in np.flatnonzero(live):
        assert len(set(ex["top_rows"][f].tolist())) == CFG.top_k
    r, T = CFG.window_radius, 32
    flat = truth.idx.reshape(-1)
    for f in np.flatnonzero(live)[:5]:
        for j in range(CFG.top_k):
            row = int(ex["top_rows"][f, j])
            pos = row % T
            for w in range(-r, r + 1):
                inside = 0 <= pos + w < T
                token = int(ex["top_tokens"][f, j, w + r])
                act = ex["top_acts"][f, j, w + r]
                if inside:
                    assert token == int(flat[row + w])
                    assert act == pytest.approx(float(truth.acts[row + w, f]), rel=1e-6, abs=1e-7)
                else:
                    assert token == -1 and np.isnan(act)


def test_quantile_samples_come_from_their_bins(analysed):
    _, _, result, truth = analysed
    ex = result.examples
    present = ex["sample_rows"] >= 0
    f, q, s = np.nonzero(present)
    values = ex["sample_values"][f, q, s]
    assert (values >= ex["bin_low"][f, q]).all() and (values < ex["bin_high"][f, q]).all()
    np.testing.assert_allclose(values, truth.acts[ex["sample_rows"][f, q, s], f].numpy(), rtol=1e-6)
    centre = ex["sample_acts"][f, q, s, CFG.window_radius]
    # Windows are stored at float16: 2^-11 relative, and 2^-24 absolute below its normal range (6.1e-5).
    np.testing.assert_allclose(centre, values, rtol=1e-3, atol=2.0**-24)
    np.testing.assert_array_equal(ex["bin_count"].sum(1), result.features["fires"])
    # Each bin holds min(count, S) samples, no row twice.
    np.testing.assert_array_equal(present.sum(2), np.minimum(ex["bin_count"], CFG.quantile_samples))
    for feat in range(ex["sample_rows"].shape[0]):
        rows = ex["sample_rows"][feat][ex["sample_rows"][feat] >= 0]
        assert len(set(rows.tolist())) == len(rows)


def explicit_effect(truth: Truth, row: int, feature: int, T: int = 32) -> float:
    """log p(next) with feature `feature` removed from the hooked MLP at every position of
    the context, through a full forward with `hook_mlp`, minus the clean log p."""
    ctx, pos = divmod(row, T)
    idx = truth.idx[ctx:ctx + 1]
    w = truth.sae.W_dec[feature].detach()

    def remove(act):
        a = truth.sae.encode(act.reshape(-1, act.shape[-1]))[:, feature].view(act.shape[:-1])
        return act - a[..., None] * w

    with torch.no_grad():
        clean = F.log_softmax(truth.model(idx).logits[0, pos].double(), -1)
        with truth.model.hook_mlp(truth.layer, remove):
            ablated = F.log_softmax(truth.model(idx).logits[0, pos].double(), -1)
    target = int(truth.targets[ctx, pos])
    return float(ablated[target] - clean[target])


def test_analytic_ablation_equals_an_explicit_forward(analysed):
    _, _, result, truth = analysed
    ex = result.examples
    r = CFG.window_radius
    checked = 0
    for f in np.flatnonzero(result.features["fires"] >= CFG.top_k)[:6]:
        for j in range(2):
            for w in range(2 * r + 1):
                effect = ex["top_effects"][f, j, w]
                if ex["top_acts"][f, j, w] > 0:
                    row = int(ex["top_rows"][f, j]) + w - r
                    assert effect == pytest.approx(explicit_effect(truth, row, int(f)), abs=2e-5, rel=1e-3)
                    checked += 1
                else:
                    assert np.isnan(effect)
    assert checked > 10
    fs, qs, ss = np.nonzero(ex["sample_rows"] >= 0)
    for f, q, s in list(zip(fs, qs, ss))[:8]:
        expected = explicit_effect(truth, int(ex["sample_rows"][f, q, s]), int(f))
        assert ex["sample_effects"][f, q, s] == pytest.approx(expected, abs=2e-5, rel=1e-3)


def test_logit_weights_match_an_explicit_computation(analysed):
    _, _, result, truth = analysed
    model, sae = truth.model, truth.sae
    f = 7
    with torch.no_grad():
        direction = model.h[1].mlp.c_proj(sae.W_dec[f]).double()  # (C,) no bias in this model
        centred = (direction - direction.mean()) * model.ln_f.weight.double()
        weights = model.lm_head.weight.double() @ centred  # (V,)
        weights -= weights.median()
    order = torch.argsort(weights, descending=True)[:CFG.logit_tokens]
    np.testing.assert_array_equal(result.features["logit_top_ids"][f], order.numpy())
    np.testing.assert_allclose(result.features["logit_top_values"][f], weights[order].numpy(), rtol=1e-4,
                               atol=1e-6)
    bottom = torch.argsort(weights)[:CFG.logit_tokens]
    np.testing.assert_array_equal(result.features["logit_bottom_ids"][f], bottom.numpy())


def test_neighbours_are_the_most_similar_decoder_rows(analysed):
    _, _, result, truth = analysed
    unit = F.normalize(truth.sae.W_dec.detach(), dim=1)
    cos = unit @ unit.T
    cos.fill_diagonal_(-2)
    np.testing.assert_array_equal(result.features["neighbour_ids"], cos.topk(CFG.neighbours, dim=1).indices.numpy())


def test_summary_counts_and_files(analysed):
    paths, summary, result, _ = analysed
    on_disk = json.loads((paths["analysis"] / "summary.json").read_text())
    assert on_disk["features"] == summary["features"]
    f = summary["features"]
    assert f["alive"] + f["ultralow"] + f["dead"] == f["total"] == 48
    assert summary["neurons"]["total"] == 128
    assert set(summary["tokens_by_source"]) == {"verse", "code"}
    assert sum(summary["purity_histogram"]["features"]) == summary["purity"]["features"]["count"]
    assert "monosemantic" in summary["verdict"]
    assert len(result.tokens["bytes"]) == truth_vocab(paths)


def truth_vocab(paths):
    return load_meta(paths["data"])["vocab_size"]


def test_token_table_round_trips_multibyte_text(analysed):
    paths, _, result, _ = analysed
    from monofast.data import tokenizer

    tok = tokenizer.load(paths["data"])
    text = "café — ñame, 日本 😀 <tag a='1'> & done\n\tx"
    ids = tok.encode(text, add_special_tokens=False).ids
    raw = b"".join(bytes.fromhex(result.tokens["bytes"][i]) for i in ids)
    assert raw.decode("utf-8") == text
    assert tok.token_to_id("<|endoftext|>") in result.tokens["special"]


# ---------------------------------------------------------------------------------------
# Other layers, other SAEs, bad input

def test_earlier_layer_effects_come_from_a_rerun(tmp_path):
    paths = make_run(tmp_path, layer=0)
    cfg = AnalysisConfig(tokens=2_000, batch_contexts=16, top_k=3, window_radius=2, quantile_bins=2,
                         quantile_samples=2, dtype="float32", device="cpu", rerun_examples=1)
    summary = analyze(cfg, paths["data"], paths["gpt"], paths["sae"], paths["analysis"])
    assert summary["layer"] == 0
    ex = output.load(paths["analysis"]).examples
    truth = Truth(paths, cfg, 0)
    checked = 0
    for f in range(1, 48, 6):
        assert np.isnan(ex["top_effects"][f, 1:]).all()  # only the first window is re-run
        for w in range(5):
            if ex["top_acts"][f, 0, w] > 0:
                row = int(ex["top_rows"][f, 0]) + w - 2
                assert ex["top_effects"][f, 0, w] == pytest.approx(explicit_effect(truth, row, f), abs=2e-5,
                                                                   rel=1e-3)
                checked += 1
    assert checked > 3


@pytest.mark.parametrize("variant", ["anthropic2023", "topk"])
def test_encoder_equals_the_sae_encode(variant):
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=24, variant=variant, k=4),
                            generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(40, 16)
    enc = Encoder(sae, torch.float32)
    torch.testing.assert_close(enc(x), sae.encode(x), rtol=1e-5, atol=1e-6)
    feats = torch.tensor([3, 5])
    one = enc.one(x[:20].reshape(2, 10, 16), feats)
    torch.testing.assert_close(one, sae.encode(x[:20]).view(2, 10, 24)[torch.arange(2), :, feats],
                               rtol=1e-5, atol=1e-6)


def test_layer_conflicts_and_bad_options_are_user_errors(tmp_path):
    paths = make_run(tmp_path, layer=1)
    model = load_model(paths["gpt"])
    assert resolve_layer(-1, model, paths["sae"]) == 1
    with pytest.raises(UserError, match="trained on layer 1"):
        resolve_layer(0, model, paths["sae"])
    # An SAE that does not record its layer: the activation store's index says it.
    other = tmp_path / "sae_unlabelled"
    SparseAutoencoder(SAEConfig(d_in=128, d_sae=8)).save(other)
    assert resolve_layer(-1, model, other) == 1  # neither says: the last layer
    (tmp_path / "activations").mkdir()
    (tmp_path / "activations" / "index.json").write_text(json.dumps({"dim": 128, "gpt": {"layer": 0}}))
    assert resolve_layer(-1, model, other, tmp_path / "activations") == 0
    with pytest.raises(ValueError, match="splits"):
        AnalysisConfig(splits=("test",))
    with pytest.raises(ValueError, match="pure_share"):
        AnalysisConfig(pure_share=0.2)
    with pytest.raises(UserError, match="block_size"):
        analyze(AnalysisConfig(context_size=64, device="cpu"), paths["data"], paths["gpt"], paths["sae"],
                tmp_path / "out")


def test_windows_and_top_k_beyond_the_data_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="top_k=5000 is more windows per feature than the 4000 tokens analysed"):
        AnalysisConfig(tokens=4_000, top_k=5_000)
    with pytest.raises(ValueError, match="window_radius=16 is wider than the contexts of 16 tokens .* at most --window-radius 15"):
        AnalysisConfig(context_size=16, window_radius=16)
    AnalysisConfig(context_size=16, window_radius=15)
    # context_size 0 is the model's block size (32 here): known, and checked, once the model is loaded.
    paths = make_run(tmp_path, layer=1)
    with pytest.raises(UserError, match="window_radius=1000 is wider than the contexts of 32 tokens"):
        analyze(AnalysisConfig(tokens=2_000, window_radius=1_000, device="cpu"), paths["data"], paths["gpt"],
                paths["sae"], tmp_path / "out")
    # Selections whose buffers alone exceed the free memory are refused before they are allocated.
    from monofast.analysis import streaming

    monkeypatch.setattr(streaming, "available_memory", lambda device: 2**20)
    with pytest.raises(UserError, match=r"example windows need 1\.0 GiB but cpu has 0\.0 GiB free; lower --top-k"):
        StreamingTopK(2**14, 64, {"acts": ((256,), torch.float32)}, CPU)
    with pytest.raises(UserError, match="lower --quantile-samples"):
        CellReservoir(2**14, 64, {"acts": ((256,), torch.float32)}, CPU)


@pytest.mark.parametrize("bias", [False, True])
def test_last_layer_effects_equal_layer_norm_and_unembedding(bias):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8, bias=bias)).eval()
    with torch.no_grad():
        model.ln_f.weight.uniform_(0.5, 1.5)
        if bias:
            model.ln_f.bias.normal_()
    w_dec = torch.randn(5, 32)
    directions = effects.residual_directions(model, 0, w_dec)
    torch.testing.assert_close(directions, model.h[0].mlp.c_proj(w_dec) - (model.h[0].mlp.c_proj.bias
                                                                          if bias else 0))
    resid, targets = torch.randn(6, 8), torch.arange(6)
    rows, feats, acts = torch.tensor([0, 1, 2, 5, 5, 3]), torch.tensor([0, 1, 2, 3, 4, 0]), torch.rand(6) * 3
    out = effects.last_layer_effects(model, directions, resid, targets, rows, feats, acts)
    with torch.no_grad():
        x = resid[rows]
        clean = F.log_softmax(model.lm_head(model.ln_f(x)), -1)
        ablated = F.log_softmax(model.lm_head(model.ln_f(x - acts[:, None] * directions[feats])), -1)
    expected = (ablated - clean).gather(1, targets[rows][:, None]).squeeze(1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
