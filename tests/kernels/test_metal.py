"""The Metal backend (kernels/metal/).

On a machine with MPS the real shaders run against the oracle. Everywhere else the host
code (launchers, argument order, thread grids, the autograd function) runs on the CPU
against `EmulatedShaders`, a line-by-line torch transcription of sae.metal, and the
shader source is checked for the names and constants the host relies on.
"""

from __future__ import annotations

import re
from importlib import resources

import pytest
import torch
from monofast.kernels import reference
from monofast.kernels.metal import step as metal

SOURCE = resources.files("monofast.kernels.metal").joinpath("sae.metal").read_text(encoding="utf-8")
HAS_MPS = torch.backends.mps.is_available() and hasattr(torch.mps, "compile_shader")

CASES = [((37, 24, 50), None, False), ((70, 16, 33), None, True), ((64, 8, 20), 3, False),
         ((130, 12, 20), 5, True)]


def case_id(case):
    (n_rows, d_in, d_sae), k, dec_norm = case
    return f"B{n_rows}-D{d_in}-F{d_sae}-{'relu' if k is None else f'top{k}'}{'-l1norm' if dec_norm else ''}"


class EmulatedShaders:
    """The kernels of sae.metal in torch, one thread's loop per (feature, chunk) vectorised."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        kernel, _, suffix = name.rpartition("_")
        assert suffix in ("float", "half", "bfloat"), name
        return lambda *args, **kwargs: self._run(kernel, suffix, *args, **kwargs)

    def _run(self, kernel, suffix, *args, threads):
        self.calls.append(kernel)
        getattr(self, f"_{kernel}")(*args, threads=threads)

    @staticmethod
    def _chunked(t, n_rows):
        """[chunks, ROWS, F] view of t's rows, zero-padded like the threads' bounds checks."""
        chunks = (n_rows + metal.ROWS - 1) // metal.ROWS
        padded = torch.zeros(chunks * metal.ROWS, t.shape[1], dtype=torch.float32)
        padded[:n_rows] = t.float()
        return padded.view(chunks, metal.ROWS, t.shape[1])

    def _encode_epilogue(self, feats, b_enc, col_sum, fired, n_rows, d_sae, relu, threads):
        assert threads == (d_sae, (n_rows + metal.ROWS - 1) // metal.ROWS)
        v = feats.float() + b_enc.float()
        if relu:
            v = v.clamp_min(0.0)
        feats.copy_(v.to(feats.dtype))
        stored = self._chunked(feats, n_rows)
        col_sum.copy_(stored.sum(1))
        fired.copy_((stored > 0).sum(1, dtype=torch.int32))

    def _encode_grad_epilogue(self, d_pre, feats, l1_w, d_b_enc, n_rows, d_sae, threads):
        assert threads == (d_sae, (n_rows + metal.ROWS - 1) // metal.ROWS)
        assert l1_w.dtype == torch.float32
        v = torch.where(feats.float() > 0, d_pre.float() + l1_w, 0.0)
        d_pre.copy_(v.to(d_pre.dtype))
        d_b_enc.copy_(self._chunked(d_pre, n_rows).sum(1))

    def _sq_err_rows(self, x_hat, x, out, n_rows, d_in, threads):
        assert threads == (n_rows,)
        out.copy_((x_hat.float() - x.float()).square().sum(1))


@pytest.fixture
def emulated(monkeypatch):
    shaders = EmulatedShaders()
    monkeypatch.setattr(metal, "library", lambda: shaders)
    monkeypatch.setattr(metal, "check_inputs", lambda *args: None)  # it insists on MPS tensors
    return shaders


def make_inputs(n_rows, d_in, d_sae, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d_in, generator=gen)
    params = [torch.randn(d_in, d_sae, generator=gen) * 0.3, torch.randn(d_sae, generator=gen) * 0.1,
              torch.randn(d_sae, d_in, generator=gen) * 0.3, torch.randn(d_in, generator=gen) * 0.1]
    upstream = (torch.randn(n_rows, d_in, generator=gen), torch.randn(n_rows, d_sae, generator=gen))
    return x.to(device), [p.to(device) for p in params], [u.to(device) for u in upstream]


def run(step_fn, x, params, upstream, k, dec_norm):
    leaves = [t.clone().requires_grad_() for t in [x, *params]]
    out = step_fn(*leaves, k=k, dec_norm=dec_norm)
    loss = ((out.x_hat.float() * upstream[0]).sum() + (out.feats.float() * upstream[1]).sum()
            + 1.3 * out.mse + 0.7 * out.l1)
    return out, torch.autograd.grad(loss, leaves)


def assert_matches_reference(step_fn, case, device="cpu"):
    (n_rows, d_in, d_sae), k, dec_norm = case
    x, params, upstream = make_inputs(n_rows, d_in, d_sae, device)
    out, grads = run(step_fn, x, params, upstream, k, dec_norm)
    ref, ref_grads = run(reference.sae_step, x.cpu(), [p.cpu() for p in params],
                         [u.cpu() for u in upstream], k, dec_norm)
    for field in ("x_hat", "feats", "mse", "l1", "l0"):
        torch.testing.assert_close(getattr(out, field).cpu(), getattr(ref, field), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.fired.cpu(), ref.fired)
    for name, got, want in zip(("x", "w_enc", "b_enc", "w_dec", "b_dec"), grads, ref_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_host_code_against_emulated_shaders(emulated, case):
    assert_matches_reference(metal.sae_step, case)
    assert emulated.calls == ["encode_epilogue", "sq_err_rows", "encode_grad_epilogue"]


@pytest.mark.skipif(not HAS_MPS, reason="needs Apple MPS with torch.mps.compile_shader")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_metal_step_matches_reference_on_mps(case):
    assert_matches_reference(metal.sae_step, case, device="mps")


def test_shader_source_defines_what_the_host_calls():
    host = resources.files("monofast.kernels.metal").joinpath("step.py").read_text(encoding="utf-8")
    called = set(re.findall(r'_kernel\("(\w+)"', host))
    defined = set(re.findall(r'host_name\("(\w+)_" #SUFFIX\)', SOURCE))
    assert called and called == defined
    assert re.search(r"constant long ROWS = (\d+);", SOURCE).group(1) == str(metal.ROWS)
    for suffix in ("float", "half", "bfloat"):
        assert f"INSTANTIATE({suffix}, {suffix})" in SOURCE


def test_inputs_off_mps_are_refused_with_a_reason():
    x, params, _ = make_inputs(4, 3, 5)
    with pytest.raises(ValueError, match="MPS tensors"):
        metal.sae_step(x, *params)
    with pytest.raises(ValueError, match="do not fit x"):
        metal.check_inputs(x, params[0], params[1], params[2].T, params[3], None)
