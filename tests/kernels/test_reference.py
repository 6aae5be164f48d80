"""The eager oracle (kernels/reference.py): its hand-written backward equals autograd of the
obvious formula, and its statistics count what they say."""

from __future__ import annotations

import zlib

import pytest
import torch
from monofast.kernels import reference

SHAPES = [(37, 24, 50), (16, 8, 8), (5, 3, 70)]
CASES = [(shape, k, dec_norm) for shape in SHAPES for k in (None, 4) for dec_norm in (False, True)]


def case_id(case) -> str:
    (n_rows, d_in, d_sae), k, dec_norm = case
    return f"B{n_rows}-D{d_in}-F{d_sae}-{'relu' if k is None else f'top{k}'}{'-l1norm' if dec_norm else ''}"


def make_inputs(n_rows, d_in, d_sae, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = randn(n_rows, d_in)
    params = [randn(d_in, d_sae, scale=0.3), randn(d_sae, scale=0.1), randn(d_sae, d_in, scale=0.3),
              randn(d_in, scale=0.1)]
    upstream = {"x_hat": randn(n_rows, d_in), "feats": randn(n_rows, d_sae), "mse": 1.3, "l1": 0.7}
    return x, params, upstream


def weighted_loss(x_hat, feats, mse, l1, upstream):
    return ((x_hat * upstream["x_hat"]).sum() + (feats * upstream["feats"]).sum()
            + upstream["mse"] * mse + upstream["l1"] * l1)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_autograd(case):
    (n_rows, d_in, d_sae), k, dec_norm = case
    x, params, upstream = make_inputs(n_rows, d_in, d_sae, seed=zlib.crc32(case_id(case).encode()))
    leaves = [t.clone().requires_grad_() for t in [x, *params]]
    out = reference.sae_step(*leaves, k=k, dec_norm=dec_norm)
    ours = torch.autograd.grad(weighted_loss(out.x_hat, out.feats, out.mse, out.l1, upstream), leaves)

    naive_leaves = [t.clone().requires_grad_() for t in [x, *params]]
    x_hat, feats, mse, l1 = reference.naive_loss_terms(*naive_leaves, k=k, dec_norm=dec_norm)
    expected = torch.autograd.grad(weighted_loss(x_hat, feats, mse, l1, upstream), naive_leaves)

    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.feats, feats)
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.l1, l1)
    for name, got, want in zip(("x", "w_enc", "b_enc", "w_dec", "b_dec"), ours, expected):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_statistics_count_what_they_say(case):
    (n_rows, d_in, d_sae), k, dec_norm = case
    x, params, _ = make_inputs(n_rows, d_in, d_sae, seed=3)
    out = reference.sae_step(x, *params, k=k, dec_norm=dec_norm)
    firing = out.feats > 0
    assert out.fired.dtype == torch.int32
    assert torch.equal(out.fired, firing.sum(0, dtype=torch.int32))
    torch.testing.assert_close(out.l0, firing.sum(1).double().mean())
    weights = torch.linalg.vector_norm(params[2], dim=1) if dec_norm else torch.ones(d_sae, dtype=x.dtype)
    torch.testing.assert_close(out.l1, (out.feats * weights).sum(1).mean())
    if k is not None:
        assert int(firing.sum(1).max()) <= k


def test_topk_keeps_the_k_largest_and_clips_negatives():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-3.0, -2.0, -1.0, 4.0]])
    feats = reference.activate(pre, 2)
    assert torch.equal(feats, torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 4.0]]))


def test_unused_outputs_need_no_gradient():
    x, params, _ = make_inputs(9, 4, 6)
    leaves = [t.clone().requires_grad_() for t in params]
    out = reference.sae_step(x, *leaves)
    grads = torch.autograd.grad(out.mse, leaves)
    naive = [t.clone().requires_grad_() for t in params]
    _, _, mse, _ = reference.naive_loss_terms(x, *naive)
    for got, want in zip(grads, torch.autograd.grad(mse, naive)):
        torch.testing.assert_close(got, want)
    assert not out.l0.requires_grad and not out.fired.requires_grad
