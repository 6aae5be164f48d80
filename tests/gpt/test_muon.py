"""monofast's Muon against torch.optim.Muon: the same update rule, state and rate adjustment;
only the Newton-Schulz precision (bf16 as torch, or fp32) and the batching differ."""

from __future__ import annotations

import pytest
import torch

from monofast.gpt.muon import Muon, orthogonalize

SHAPES = [(24, 8), (24, 8), (8, 24), (8, 8), (16, 40)]
"""Tall, wide and square, with a shared shape (one batched product serves two matrices)."""


def params_and_grads(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in SHAPES]
    grads = [[torch.randn(*shape, generator=gen) for shape in SHAPES] for _ in range(3)]
    return params, grads


def run(optimizer_class, ns_dtype=None, **kwargs) -> list[torch.Tensor]:
    params, grads = params_and_grads()
    extra = {} if ns_dtype is None else {"ns_dtype": ns_dtype}
    opt = optimizer_class([{"params": params}], lr=0.05, weight_decay=0.1, momentum=0.9, **extra, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def test_bf16_iterations_match_torch_muon():
    theirs = run(torch.optim.Muon)
    ours = run(Muon, ns_dtype=torch.bfloat16)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # bf16 rounding, batched or not


def test_fp32_iterations_stay_near_torch_muon_and_change_something():
    theirs, ours = run(torch.optim.Muon), run(Muon, ns_dtype=torch.float32)
    start, _ = params_and_grads()
    for a, b, p0 in zip(ours, theirs, start):
        assert (a - b).abs().max() < 0.02 * (b - p0).abs().max()  # within bf16's error of the update
        assert not torch.equal(a, b)  # fp32 really ran (bf16 would round differently)


def test_orthogonalize_flattens_the_spectrum():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 48, generator=gen) * torch.logspace(-2, 1, 48)  # badly conditioned
    sv = torch.linalg.svdvals(orthogonalize(x))
    assert sv.min() > 0.5 and sv.max() < 1.3  # every direction moves at about one rate


def test_state_loads_into_torch_muon_and_back():
    params, grads = params_and_grads()
    ours = Muon([{"params": params}], lr=0.05, ns_dtype=torch.float32)
    for p, g in zip(params, grads[0]):
        p.grad = g
    ours.step()
    theirs = torch.optim.Muon([{"params": params}], lr=0.05)
    theirs.load_state_dict(ours.state_dict())
    again = Muon([{"params": params}], lr=0.05, ns_dtype=torch.float32)
    again.load_state_dict(theirs.state_dict())
    for p in params:
        torch.testing.assert_close(again.state[p]["momentum_buffer"], ours.state[p]["momentum_buffer"])


def test_other_rate_adjustments_are_refused():
    params, _ = params_and_grads()
    with pytest.raises(ValueError, match="only the original adjustment"):
        Muon(params, adjust_lr_fn="match_rms_adamw")
