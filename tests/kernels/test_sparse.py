"""The sparse form of the SAE step against the dense oracle: every output and every
gradient, for ReLU (plain and decoder-norm-weighted L1) and TopK, with rows that fire
nothing, ties at TopK's cut, upstream gradients on x_hat and feats, and the input's
gradient; and its two primitives against plain products."""

from __future__ import annotations

import pytest
import torch

from monofast.kernels import reference, sparse


def _inputs(n_rows, d_in, d_sae, dtype=torch.float64, seed=0, bias=-1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d_in, generator=gen, dtype=dtype)
    x[3] = 0  # with every encoder bias negative, row 3 fires nothing
    params = [torch.randn(d_in, d_sae, generator=gen, dtype=dtype),
              torch.rand(d_sae, generator=gen, dtype=dtype) * 0.5 + bias,
              torch.randn(d_sae, d_in, generator=gen, dtype=dtype),
              torch.randn(d_in, generator=gen, dtype=dtype) * 0.1]
    params[3][:] = 0 if bias < 0 else params[3]  # b_dec 0 keeps row 3 at x - b_dec = 0
    return x, [p.requires_grad_() for p in params]


def _everything(step, x, params, k, dec_norm, need_x=False):
    """Outputs and the gradients of a loss that sends gradient through every output."""
    x = x.clone().requires_grad_(need_x)
    out = step(x, *params, k=k, dec_norm=dec_norm)
    n_rows, d_sae = out.feats.shape
    feat_w = torch.linspace(-1, 1, d_sae, dtype=out.feats.dtype)
    loss = out.mse + 0.3 * out.l1 + 0.01 * (out.feats * feat_w).sum() + 0.1 * (out.x_hat * x.detach()).sum()
    inputs = params + ([x] if need_x else [])
    return out, torch.autograd.grad(loss, inputs)


CASES = [(None, False), (None, True), (3, False), (3, True)]


@pytest.mark.parametrize("k,dec_norm", CASES, ids=["relu", "relu-l1norm", "top3", "top3-l1norm"])
@pytest.mark.parametrize("shape", [(37, 12, 29), (8, 5, 64)], ids=lambda s: "B{}-D{}-F{}".format(*s))
def test_matches_the_dense_oracle_in_float64(shape, k, dec_norm):
    x, params = _inputs(*shape)
    got, got_grads = _everything(sparse.sparse_step, x, params, k, dec_norm, need_x=True)
    want, want_grads = _everything(reference.sae_step, x, params, k, dec_norm, need_x=True)
    assert int((got.feats[3] > 0).sum()) == 0 and float(got.fired.sum()) > 0  # an empty row, and firing ones
    for name, a, b in zip(want._fields, got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    for name, a, b in zip(["w_enc", "b_enc", "w_dec", "b_dec", "x"], got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d {name}")


def test_topk_ties_and_relu_zeroed_entries_match():
    # Integer weights make exact ties among the pre-activations; with a bias of -2 some of a
    # row's top 4 are negative and ReLU zeroes them: kept entries that carry no gradient.
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-1, 2, (40, 6), generator=gen).double()
    params = [torch.randint(-1, 2, (6, 20), generator=gen).double(), torch.full((20,), -2.0, dtype=torch.float64),
              torch.randn(20, 6, generator=gen, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)]
    params = [p.requires_grad_() for p in params]
    got, got_grads = _everything(sparse.sparse_step, x, params, 4, False)
    want, want_grads = _everything(reference.sae_step, x, params, 4, False)
    pre = (x - params[3]) @ params[0] + params[1]
    assert bool((pre.detach().sort(dim=1, descending=True).values[:, 3:5].diff(dim=1) == 0).any())  # ties at the cut
    assert int((got.feats > 0).sum()) < 4 * 40  # some kept entries are zero
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [None, 5], ids=["relu", "top5"])
def test_float32_and_bfloat16_products_match_the_dense_step(k):
    from monofast.kernels import eager

    x, params = _inputs(64, 24, 96, dtype=torch.float32, bias=-0.5)
    for compute_dtype, tol in ((None, 1e-5), (torch.bfloat16, 2e-2)):
        def step(*args, compute_dtype=compute_dtype, **kw):
            return eager.sae_step(*args, compute_dtype=compute_dtype, **kw)

        def sparse_step(*args, compute_dtype=compute_dtype, **kw):
            return sparse.sparse_step(*args, compute_dtype=compute_dtype, **kw)

        got, got_grads = _everything(sparse_step, x, params, k, False)
        want, want_grads = _everything(step, x, params, k, False)
        torch.testing.assert_close(got.feats, want.feats, rtol=0, atol=0)  # the same encoder product
        assert torch.equal(got.fired, want.fired)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


def test_a_batch_that_fires_nothing():
    x, params = _inputs(10, 4, 16, bias=-100.0)
    got, got_grads = _everything(sparse.sparse_step, x, params, None, False)
    want, want_grads = _everything(reference.sae_step, x, params, None, False)
    assert float(got.l0) == 0
    for a, b in zip(list(got) + list(got_grads), list(want) + list(want_grads)):
        torch.testing.assert_close(a, b)


def test_active_entries_in_both_orders():
    feats = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 4.0]])
    active = sparse.relu_active(feats)
    assert active.row_ptr.tolist() == [0, 2, 2, 4]
    assert active.col.tolist() == [1, 3, 0, 3] and active.val.tolist() == [2.0, 1.0, 3.0, 4.0]
    assert active.feat_ptr.tolist() == [0, 1, 2, 2, 4]
    assert active.row[active.by_feature].tolist() == [2, 0, 0, 2]  # feature 0: row 2; 1: row 0; 3: rows 0, 2


def test_the_primitives_against_plain_products():
    gen = torch.Generator().manual_seed(5)
    feats = torch.relu(torch.randn(13, 40, generator=gen, dtype=torch.float64) - 1.0)
    active = sparse.relu_active(feats)
    a = torch.randn(13, 7, generator=gen, dtype=torch.float64)
    b = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    dense = a @ b.T
    torch.testing.assert_close(sparse.sampled_dot(a, b, active), dense[active.row, active.col])
    torch.testing.assert_close(sparse.sampled_dot(a.bfloat16(), b.bfloat16(), active).double(),
                               (a.bfloat16().double() @ b.bfloat16().double().T)[active.row, active.col],
                               rtol=1e-2, atol=1e-2)  # the gathered path (bfloat16 on a CPU)
    torch.testing.assert_close(sparse.gather_sum(b, active.col, active.row_ptr, active.val), feats @ b)
    by_feature = sparse.gather_sum(a, active.row[active.by_feature], active.feat_ptr, active.val[active.by_feature])
    torch.testing.assert_close(by_feature, feats.T @ a)
    by_feature_t = sparse.gather_sum(a, active.row[active.by_feature], active.feat_ptr,
                                     active.val[active.by_feature], transpose=True, out_dtype=torch.float32)
    assert by_feature_t.dtype == torch.float32 and by_feature_t.is_contiguous()
    torch.testing.assert_close(by_feature_t, (feats.T @ a).T.float())
    # A parameter's table (requires grad) gives the same sums and no autograd graph.
    table = torch.nn.Parameter(b.clone())
    summed = sparse.gather_sum(table, active.col, active.row_ptr, active.val)
    assert not summed.requires_grad
    torch.testing.assert_close(summed, feats @ b)


@pytest.mark.parametrize("rows", [1, 511, 512, 1100])
def test_transposed_in_blocks(rows):
    a = torch.randn(rows, 9, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
    got = sparse.transposed(a, torch.float32)
    assert got.shape == (9, rows) and got.is_contiguous() and got.dtype == torch.float32
    assert torch.equal(got, a.T.float())
