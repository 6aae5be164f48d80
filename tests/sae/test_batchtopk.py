"""The BatchTopK variants (monofast.sae.model: batchtopk, matryoshka): the batch-wide top-k
and its ties, the inference threshold, files, the nested-prefix loss, training end to end."""

from __future__ import annotations

import json

import pytest
import torch
from monofast.analysis.forward import Encoder
from monofast.kernels.reference import batch_topk, jump_relu
from monofast.sae import train as sae_train
from monofast.sae.batchtopk import THRESHOLD_RATE
from monofast.sae.config import SAETrainConfig
from monofast.sae.model import SAEConfig, SparseAutoencoder
from monofast.sae.steer import feature_acts

from .test_model import sparse_data

D_IN, D_SAE = 16, 48


def make(variant="batchtopk", k=4, **overrides) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, variant=variant, k=k, compute_dtype="float32",
                    scale_inputs=False, **overrides)
    return SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------- batch top-k

def test_keeps_the_k_times_b_largest_of_the_batch():
    pre = torch.tensor([[9.0, 8.0, 7.0, 1.0],
                        [0.5, 6.0, 0.2, 0.1],
                        [-1.0, -2.0, -3.0, -4.0]])  # k=2, B=3: the 6 largest of the batch
    got = batch_topk(pre, 2)
    expected = torch.tensor([[9.0, 8.0, 7.0, 1.0],  # a row keeps 4 > k
                             [0.5, 6.0, 0.0, 0.0],  # k
                             [0.0, 0.0, 0.0, 0.0]])  # an empty row keeps nothing
    torch.testing.assert_close(got, expected)


def test_exactly_k_times_b_distinct_values_survive():
    gen = torch.Generator().manual_seed(1)
    pre = torch.randperm(32 * 20, generator=gen).float().view(32, 20) + 1.0  # distinct, positive
    got = batch_topk(pre, 3)
    assert int((got > 0).sum()) == 3 * 32
    assert float(got[got > 0].min()) == 32 * 20 - 3 * 32 + 1  # the largest ones
    per_row = (got > 0).sum(1)
    assert int(per_row.min()) < 3 < int(per_row.max())  # rows share the budget unevenly


def test_ties_at_the_cut_go_to_the_earliest_positions():
    pre = torch.tensor([[1.0, 2.0, 1.0],
                        [1.0, 1.0, 3.0]])  # k=1, B=2: 3 and 2, then no room for the tied ones
    assert batch_topk(pre, 1).tolist() == [[0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]
    pre = torch.ones(2, 3)  # all tied: the first k x B in row-major order
    assert batch_topk(pre, 2).tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    assert torch.equal(batch_topk(pre, 2), batch_topk(pre.clone(), 2))


def test_fewer_positives_than_the_budget_keep_them_all():
    pre = torch.tensor([[0.5, -1.0], [-1.0, -2.0]])
    assert batch_topk(pre, 2).tolist() == [[0.5, 0.0], [0.0, 0.0]]


def test_jump_relu_keeps_values_strictly_above_the_threshold():
    pre = torch.tensor([[0.5, 1.0, 1.5, -2.0]])
    assert jump_relu(pre, torch.full((4,), 1.0)).tolist() == [[0.0, 0.0, 1.5, 0.0]]
    assert jump_relu(pre, torch.zeros(4)).tolist() == [[0.5, 1.0, 1.5, 0.0]]  # 0: ReLU


# ------------------------------------------------------------------------- the threshold

def test_threshold_is_the_running_mean_of_the_smallest_kept_activation():
    sae = make()
    x = sparse_data(64)
    mins = []
    for i in range(3):
        out = sae(x[i * 16:(i + 1) * 16])
        mins.append(float(out.feats.detach()[out.feats > 0].min()))
        assert float(out.l0) == pytest.approx(4.0)  # k per row on average
    assert int(sae.threshold_batches) == 3
    assert torch.allclose(sae.threshold, torch.full((D_SAE,), sum(mins) / 3))


def test_threshold_becomes_an_exponential_moving_average():
    sae = make()
    with torch.no_grad():
        sae.threshold.fill_(2.0)
        sae.threshold_batches.fill_(10 ** 6)
    out = sae(sparse_data(16))
    smallest = float(out.feats.detach()[out.feats > 0].min())
    expected = 2.0 + THRESHOLD_RATE * (smallest - 2.0)
    assert torch.allclose(sae.threshold, torch.full((D_SAE,), expected))


def test_a_batch_with_nothing_positive_leaves_the_threshold_alone():
    sae = make()
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)
    sae(sparse_data(16))
    assert int(sae.threshold_batches) == 0 and float(sae.threshold.max()) == 0.0


def test_eval_mode_and_encode_apply_the_threshold():
    sae = make()
    x = sparse_data(32)
    with torch.no_grad():
        sae.threshold.fill_(0.7)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = torch.where(pre > 0.7, pre, torch.zeros_like(pre))
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.encode(x[:1]), expected[:1])  # independent of the batch
    sae.eval()
    out = sae(x)
    torch.testing.assert_close(out.feats, expected)
    torch.testing.assert_close(out.x_hat, sae.decode(expected))
    assert int(sae.threshold_batches) == 0  # eval mode does not update it
    encoder = Encoder(sae, torch.float32)
    torch.testing.assert_close(encoder(x), expected)
    features = torch.tensor([3, 7, 11])
    torch.testing.assert_close(feature_acts(sae, x, features), expected[:, features])
    one = encoder.one(x.view(2, 16, D_IN), torch.tensor([5, 9]))  # (B, T)
    torch.testing.assert_close(one, torch.stack([expected[:16, 5], expected[16:, 9]]))


# ------------------------------------------------------------------------- files

@pytest.mark.parametrize("variant", ["batchtopk", "matryoshka"])
def test_save_and_load_keep_the_threshold(variant, tmp_path):
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, variant=variant, k=4, compute_dtype="float32")
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(0))
    x = sparse_data(64)
    sae.set_input_scale(x)
    for _ in range(3):
        sae(x)
    sae.save(tmp_path, hook_name="blocks.0.mlp.hook_post")
    raw = json.loads((tmp_path / "cfg.json").read_text())
    assert raw["architecture"] == "jumprelu"  # what SAELens loads a BatchTopK SAE as
    assert raw["k"] == 4 and raw["topk_threshold"] == pytest.approx(float(sae.threshold[0]))
    loaded = SparseAutoencoder.load(tmp_path)
    assert loaded.cfg.variant == variant and loaded.cfg.matryoshka_prefixes == cfg.matryoshka_prefixes
    torch.testing.assert_close(loaded.threshold, sae.threshold)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-4, atol=1e-4)


def test_a_sae_lens_batchtopk_file_loads(tmp_path):
    sae = make()
    with torch.no_grad():
        sae.threshold.fill_(0.25)
    sae.save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    del raw["monofast"]
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    loaded = SparseAutoencoder.load(tmp_path)
    assert loaded.cfg.variant == "batchtopk" and loaded.cfg.k == 4
    assert float(loaded.threshold[0]) == 0.25


# ------------------------------------------------------------------------- matryoshka

def test_matryoshka_loss_sums_the_prefix_errors():
    cfg = SAEConfig(d_in=2, d_sae=4, variant="matryoshka", k=1, scale_inputs=False,
                    compute_dtype="float32", matryoshka_prefixes=(0.25, 0.5, 1.0), aux_k=0)
    sae = SparseAutoencoder(cfg)
    assert cfg.prefix_sizes == [1, 2, 4]
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2, 4) + torch.eye(2, 4).roll(2, 1))  # f = (x0, x1, x0, x1)
        sae.W_dec.copy_(torch.eye(4, 2) + torch.eye(4, 2).roll(2, 0))  # row i is e_{i mod 2}
    x = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # pre-activations (3, 0, 3, 0) and (0, 2, 0, 2)
    out = sae(x)
    # k x B = 2 survive: row 0's two 3s; row 1 keeps nothing.
    assert out.feats.tolist() == [[3.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    # Prefix 1 (feature 0): row 0 -> (3, 0), error 0; row 1 -> (0, 0), error 4.   sum 4 / 2 = 2
    # Prefix 2 (features 0, 1): the same.                                              2
    # Prefix 4: row 0 -> (6, 0), error 9; row 1 -> (0, 0), error 4.               sum 13 / 2 = 6.5
    assert float(out.mse.detach()) == pytest.approx(2 + 2 + 6.5)
    assert out.x_hat.tolist() == [[6.0, 0.0], [0.0, 0.0]]
    plain = SparseAutoencoder(SAEConfig(d_in=2, d_sae=4, variant="batchtopk", k=1, scale_inputs=False,
                                        compute_dtype="float32", aux_k=0))
    plain.load_state_dict(sae.state_dict())
    assert float(plain(x).mse.detach()) == pytest.approx(6.5)  # batchtopk: the full reconstruction only


@pytest.mark.parametrize("fractions", [(), (0.5,), (0.5, 0.25, 1.0), (0.0, 1.0), (0.5, 1.5)])
def test_bad_prefixes_name_the_fix(fractions):
    with pytest.raises(ValueError, match="increasing fractions of d_sae"):
        SAEConfig(variant="matryoshka", matryoshka_prefixes=fractions)


def test_k_is_checked_for_the_batch_variants():
    with pytest.raises(ValueError, match="set --k"):
        SAEConfig(d_sae=10, variant="batchtopk", k=11)
    with pytest.raises(ValueError, match="choose one of"):
        SAETrainConfig(variant="batch-topk")


# ------------------------------------------------------------------------- training

@pytest.mark.parametrize("variant", ["batchtopk", "matryoshka"])
def test_training_reduces_the_loss(variant):
    torch.manual_seed(0)
    sae = make(variant, dead_tokens=256)
    x = sparse_data(256)
    sae.init_b_dec(x, "mean")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    first = last = None
    for _ in range(60):
        out = sae(x)
        loss = out.mse + out.aux / 32
        first = float(loss.detach()) if first is None else first
        last = float(out.mse.detach())
        loss.backward()
        assert sae.W_enc.grad is not None and float(sae.W_enc.grad.abs().sum()) > 0
        sae.optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
    assert last < 0.5 * first
    assert float(sae.threshold[0]) > 0


def test_sweep_over_k_is_named_by_k():
    cfg = SAETrainConfig(variant="matryoshka", k=(8, 16))
    assert cfg.sweep() == [("k8", 0.0, 8), ("k16", 0.0, 16)]


def test_batchtopk_trains_end_to_end_with_l0_near_k(store_dir, small, tmp_path):
    out = tmp_path / "sae"
    evaluation = sae_train.train(small(variant="batchtopk", k=(4,)), store_dir, out)  # 42 steps
    result = evaluation["saes"]["k4"]
    assert result["k"] == 4
    assert 3 < result["l0"] < 5  # the threshold keeps about k per row on held-out rows (3.82)
    assert result["fvu"] < 0.5
    assert json.loads((out / "eval.json").read_text())["saes"]["k4"]["l0"] == result["l0"]
    loaded = SparseAutoencoder.load(out / "k4")
    assert loaded.cfg.variant == "batchtopk" and float(loaded.threshold[0]) > 0
