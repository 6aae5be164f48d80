"""The dispatch point (monofast.sae.backend) and the `torch` backend it picks on CPUs
(kernels/eager.py), which must compute what the oracle computes."""

from __future__ import annotations

import json
import logging
import sys
import time
import types
import zlib

import pytest
import torch
from monofast.kernels import eager, reference
from monofast.sae import backend


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)
    monkeypatch.setattr(backend, "_fallen_back", {})


def make_inputs(n_rows, d_in, d_sae, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d_in, generator=gen)
    params = [torch.randn(d_in, d_sae, generator=gen) * 0.3, torch.randn(d_sae, generator=gen) * 0.1,
              torch.randn(d_sae, d_in, generator=gen) * 0.3, torch.randn(d_in, generator=gen) * 0.1]
    return x, params


def make_upstream(n_rows, d_in, d_sae, seed=0):
    """Upstream gradients for x_hat and feats."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n_rows, d_in, generator=gen), torch.randn(n_rows, d_sae, generator=gen)


# ------------------------------------------------------------------------- choosing

def test_cpu_gets_torch_and_accelerators_get_their_kernels():
    assert backend.resolve("cpu").name == "torch"
    assert backend._AUTOMATIC == {"cuda": "triton", "mps": "metal"}


def test_env_forces_a_backend(monkeypatch):
    monkeypatch.setenv(backend.ENV, "torch")
    assert backend.resolve("cpu").name == "torch"


@pytest.mark.parametrize("name", ["triton", "metal"])
def test_forced_backend_that_cannot_run_raises(monkeypatch, name):
    monkeypatch.setenv(backend.ENV, name)
    with pytest.raises(backend.BackendError, match=f"{backend.ENV}={name} was requested but"):
        backend.resolve("cpu")
    x, params = make_inputs(4, 3, 5)
    with pytest.raises(backend.BackendError, match="cpu"):
        backend.sae_step(x, *params)


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv(backend.ENV, "cuda")
    with pytest.raises(backend.BackendError, match="not a backend; choose one of torch, triton, metal"):
        backend.resolve("cpu")
    x, params = make_inputs(4, 3, 5)
    with pytest.raises(backend.BackendError, match="no backend 'tpu'"):
        backend.sae_step(x, *params, backend="tpu")


@pytest.fixture
def broken_backend(monkeypatch):
    """An automatic backend for CPU tensors whose kernels fail at launch, as a driver error would."""
    module = types.ModuleType("monofast_test_broken_backend")

    def sae_step(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    module.sae_step = sae_step
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(backend.BACKENDS, "broken",
                        backend.Backend("broken", module.__name__, ("cpu",), casts_inputs=True))
    monkeypatch.setattr(backend, "_AUTOMATIC", {"cpu": "broken"})
    return "broken"


def test_automatic_choice_that_fails_falls_back_and_logs_once(broken_backend, caplog):
    x, params = make_inputs(6, 4, 5)
    expected = reference.sae_step(x, *params)
    with caplog.at_level(logging.WARNING, logger="monofast"):
        for _ in range(3):
            out = backend.sae_step(x, *params)
            torch.testing.assert_close(out.x_hat, expected.x_hat)
    warnings = [r for r in caplog.records if "using the torch backend instead" in r.getMessage()]
    assert len(warnings) == 1
    assert "no kernel image" in warnings[0].getMessage()
    assert backend.resolve("cpu").name == "torch"  # remembered: no second attempt


def test_explicit_choice_that_fails_raises(broken_backend, monkeypatch):
    x, params = make_inputs(6, 4, 5)
    with pytest.raises(RuntimeError, match="no kernel image"):
        backend.sae_step(x, *params, backend=broken_backend)
    monkeypatch.setenv(backend.ENV, broken_backend)
    with pytest.raises(RuntimeError, match="no kernel image"):
        backend.sae_step(x, *params)


def test_bad_inputs_are_not_a_reason_to_fall_back(broken_backend):
    x, params = make_inputs(6, 4, 5)
    with pytest.raises(ValueError, match="k must be between 1 and d_sae=5"):
        backend.sae_step(x, *params, k=9, backend="torch")


# ------------------------------------------------------------------------- the torch backend

CASES = [((37, 24, 50), None, False), ((37, 24, 50), None, True), ((16, 8, 8), 3, False),
         ((5, 3, 70), 4, True), ((130, 12, 20), None, False), ((67, 20, 300), 9, False), ((67, 20, 300), 9, True)]
"""The TopK cases with d_sae >= 8 k (5-3-70-top4, 67-20-300-top9) decode by gathering k rows."""


def case_id(case):
    (n_rows, d_in, d_sae), k, dec_norm = case
    return f"B{n_rows}-D{d_in}-F{d_sae}-{'relu' if k is None else f'top{k}'}{'-l1norm' if dec_norm else ''}"


def gradients(step, x, params, upstream, k, dec_norm):
    leaves = [t.clone().requires_grad_() for t in [x, *params]]
    out = step(*leaves, k=k, dec_norm=dec_norm)
    loss = ((out.x_hat.float() * upstream[0]).sum() + (out.feats.float() * upstream[1]).sum()
            + 1.3 * out.mse + 0.7 * out.l1)
    return out, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_backend_matches_reference_fp32(case):
    (n_rows, d_in, d_sae), k, dec_norm = case
    seed = zlib.crc32(case_id(case).encode())
    x, params = make_inputs(n_rows, d_in, d_sae, seed)
    upstream = make_upstream(n_rows, d_in, d_sae, seed)
    out, grads = gradients(eager.sae_step, x, params, upstream, k, dec_norm)
    ref, ref_grads = gradients(reference.sae_step, x, params, upstream, k, dec_norm)
    for field in ("x_hat", "feats", "mse", "l1", "l0"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field))
    assert torch.equal(out.fired, ref.fired)
    for name, got, want in zip(("x", "w_enc", "b_enc", "w_dec", "b_dec"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4], CASES[6]], ids=case_id)
def test_torch_backend_bf16_products_stay_close(case):
    """Products in bfloat16, float32 parameters and gradients (what CPU training uses)."""
    (n_rows, d_in, d_sae), k, dec_norm = case
    seed = zlib.crc32(case_id(case).encode())
    x, params = make_inputs(n_rows, d_in, d_sae, seed)
    bf16 = [p.to(torch.bfloat16).float() for p in params]  # the oracle sees the same rounding
    upstream = make_upstream(n_rows, d_in, d_sae, seed)

    def step(*args, **kwargs):
        return eager.sae_step(*args, **kwargs, compute_dtype=torch.bfloat16)

    out, grads = gradients(step, x, bf16, upstream, k, dec_norm)
    ref, ref_grads = gradients(reference.sae_step, x.to(torch.bfloat16).float(), bf16, upstream, k, dec_norm)
    assert out.feats.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(out.mse, ref.mse, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.l1, ref.l1, rtol=3e-2, atol=3e-2)
    for name, got, want in zip(("x", "w_enc", "b_enc", "w_dec", "b_dec"), grads, ref_grads):
        # Relative error of the whole tensor. bfloat16 keeps 8 bits, and a pre-activation within
        # rounding of zero (a fraction p ~ 0.3% of them) fires in one and not the other, which
        # alone moves d_pre by ~sqrt(p) ~ 5% of its norm: measured up to 7% over 8 seeds here.
        # TopK adds ties at its cut (8 bits make equal values common) that bfloat16 breaks by
        # index and float32 by value: 12.3% for one case here.
        error = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
        assert error < 0.15, f"gradient of {name}: relative error {error:.3g}"


def test_fired_counts_exact_for_any_batch():
    gen = torch.Generator().manual_seed(0)
    for n_rows in (1, 127, 128, 300):
        feats = torch.relu(torch.randn(n_rows, 33, generator=gen)).to(torch.bfloat16)
        assert torch.equal(eager.fired_counts(feats), (feats > 0).sum(0, dtype=torch.int32))


def test_dispatch_casts_for_single_dtype_backends(monkeypatch):
    """Backends that take one dtype get their inputs cast; gradients flow back to float32."""
    seen = {}

    def fake_step(x, w_enc, b_enc, w_dec, b_dec, k=None, dec_norm=False):
        seen["dtypes"] = {t.dtype for t in (x, w_enc, b_enc, w_dec, b_dec)}
        return reference.sae_step(*(t.float() for t in (x, w_enc, b_enc, w_dec, b_dec)), k, dec_norm)

    module = types.ModuleType("monofast_test_fake_backend")
    module.sae_step = fake_step
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(backend.BACKENDS, "fake", backend.Backend("fake", module.__name__, (), True))
    x, params = make_inputs(6, 4, 5)
    leaves = [p.clone().requires_grad_() for p in params]
    out = backend.sae_step(x, *leaves, compute_dtype=torch.float16, backend="fake")
    out.mse.backward()
    assert seen["dtypes"] == {torch.float16}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in leaves)


needs_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
    reason="needs oneDNN's fused linear (torch.ops.mkldnn._linear_pointwise)")


@pytest.fixture
def fused_calls(monkeypatch) -> list[torch.dtype]:
    """The input dtype of every call to oneDNN's fused linear in the test, nothing refused yet."""
    calls: list[torch.dtype] = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(eager.torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[0].dtype) or real(*a))
    monkeypatch.setattr(eager, "_fused_linear_refused", set())
    return calls


@needs_onednn
def test_plain_products_give_the_same_step(monkeypatch, fused_calls):
    """Where oneDNN's fused linear is missing or refuses, the plain products compute the same
    (float32 takes the plain products by default; here both ways are forced)."""
    calls = fused_calls
    x, params = make_inputs(37, 24, 50)
    upstream = make_upstream(37, 24, 50)
    monkeypatch.setattr(eager, "FUSED_LINEAR_DTYPES", (torch.float32, torch.bfloat16))
    fused, fused_grads = gradients(eager.sae_step, x, params, upstream, None, True)
    monkeypatch.setattr(eager, "_fused_linear_refused", {torch.float32, torch.bfloat16})
    assert calls, "the fused linear was not taken"
    calls.clear()
    plain, plain_grads = gradients(eager.sae_step, x, params, upstream, None, True)
    assert not calls
    torch.testing.assert_close(plain.x_hat, fused.x_hat)
    for got, want in zip(plain_grads, fused_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_float32_products_take_addmm(fused_calls):
    """float32 steps run MKL's `addmm`, not oneDNN's fused linear (slower in float32, up to
    1.9x on an AVX2 CPU: benches/RESULTS.md)."""
    x, params = make_inputs(37, 24, 50)
    gradients(eager.sae_step, x, params, make_upstream(37, 24, 50), None, True)
    assert fused_calls == []
    assert torch.float32 not in eager.FUSED_LINEAR_DTYPES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_topk_gather_decode_matches_the_dense_product(monkeypatch, dtype):
    """The k-row gather and the dense [B, F] x [F, D] product decode alike, gradients included."""
    assert 300 >= 9 * eager.GATHER_MIN_RATIO  # this shape takes the gather
    x, params = make_inputs(67, 20, 300, seed=5)
    upstream = make_upstream(67, 20, 300, seed=5)

    def step(*args, **kwargs):
        return eager.sae_step(*args, **kwargs, compute_dtype=dtype)

    gathered, gathered_grads = gradients(step, x, params, upstream, 9, True)
    monkeypatch.setattr(eager, "GATHER_MIN_RATIO", 10**9)
    dense, dense_grads = gradients(step, x, params, upstream, 9, True)
    if dtype == torch.float32:
        torch.testing.assert_close(gathered.x_hat, dense.x_hat)
        torch.testing.assert_close(gathered.mse, dense.mse)
        for got, want in zip(gathered_grads, dense_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        return
    # bfloat16: the two sum the k terms in another order and round x_hat apart; compare
    # whole tensors by relative error, as the bf16 test above does.
    for got, want in [(gathered.x_hat.detach(), dense.x_hat.detach()), *zip(gathered_grads, dense_grads)]:
        error = float(torch.linalg.vector_norm((got - want).float()) / torch.linalg.vector_norm(want.float()))
        assert error < 0.02, error


# ------------------------------------------------------------------------- the race


def _kernels(monkeypatch, name, step):
    """An automatic backend for CPU tensors (a stand-in for an accelerator's kernels)."""
    module = types.ModuleType(f"monofast_test_{name}_backend")
    module.sae_step = step
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(backend.BACKENDS, name, backend.Backend(name, module.__name__, ("cpu",), casts_inputs=False))
    monkeypatch.setattr(backend, "_AUTOMATIC", {"cpu": name})
    monkeypatch.setattr(backend, "_raced", {})


def _slow(step):
    def slower(*args, **kwargs):
        time.sleep(0.02)
        return step(*args, **kwargs)
    return slower


def test_an_accelerators_kernels_race_torch_and_the_faster_runs(monkeypatch, caplog):
    from monofast.common import files

    x, params = make_inputs(16, 8, 24)
    _kernels(monkeypatch, "slowkernels", _slow(eager.sae_step))
    with caplog.at_level(logging.INFO, logger="monofast"):
        out = backend.sae_step(x, *params)
    torch.testing.assert_close(out.mse, reference.sae_step(x, *params).mse)
    assert "the torch backend takes the dense step of B 16 x D 8 -> F 24 here" in caplog.text
    kept = json.loads((files.cache_dir() / backend.RACE_FILE).read_text())
    (result,) = kept.values()
    assert result["backend"] == "torch" and result["ms"]["slowkernels"] > result["ms"]["torch"] + 10

    # A later run reads the winner instead of racing again.
    monkeypatch.setattr(backend, "_raced", {})
    monkeypatch.setattr(backend, "_race", lambda *args: pytest.fail("raced again"))
    calls = []
    monkeypatch.setattr(eager, "sae_step", lambda *a, **kw: (calls.append(1), reference.sae_step(*a[:5], k=kw["k"],
                                                                                               dec_norm=kw["dec_norm"]))[1])
    backend.sae_step(x, *params)
    assert calls == [1]


def test_faster_kernels_win_the_race(monkeypatch):
    fast = eager.sae_step
    _kernels(monkeypatch, "fastkernels", lambda *a, **kw: fast(*a, **kw))
    monkeypatch.setattr(eager, "sae_step", _slow(fast))
    x, params = make_inputs(16, 8, 24)
    backend.sae_step(x, *params, k=3)
    (winner,) = backend._raced.values()
    assert winner == "fastkernels"
    backend.sae_step(x, *params)  # another race key: ReLU, not TopK
    assert sorted(backend._raced.values()) == ["fastkernels", "fastkernels"]
