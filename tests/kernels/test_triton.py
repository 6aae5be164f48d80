"""The Triton kernels, run by Triton's CPU interpreter, against the eager oracle: forward
outputs, statistics and every gradient under the same upstream gradients, on odd shapes
that leave partial tiles in every dimension.

Triton decides whether a kernel is interpreted when `@triton.jit` decorates it, so the
`triton_step` fixture imports a private copy of `monofast.kernels.triton` with
TRITON_INTERPRET=1 set, and afterwards restores the environment and whatever copy of the
package other tests had imported: the interpreter does not leak out of this module.
"""

from __future__ import annotations

import sys
import zlib

import pytest
import torch

pytest.importorskip("triton")

from conftest import assert_loss_only_grads_match, assert_step_matches, interpreted_triton, run_step  # noqa: E402
from monofast.kernels import reference  # noqa: E402

PACKAGE = "monofast.kernels.triton"

# (B, D, F): none a multiple of the interpreter's 16-wide blocks except where noted.
SHAPES = [(37, 24, 50), (16, 16, 32), (5, 40, 19)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Tolerances against the float32 oracle fed the same rounded inputs.
TOLERANCE = {"fp32": (1e-4, 1e-5), "fp16": (2e-2, 2e-2), "bf16": (6e-2, 6e-2)}


@pytest.fixture(scope="module")
def triton_step():
    yield from interpreted_triton("step")


def case_id(shape, dtype, k=None, dec_norm=False) -> str:
    n_rows, d_in, d_sae = shape
    return (f"B{n_rows}-D{d_in}-F{d_sae}-{dtype}" + ("" if k is None else f"-top{k}")
            + ("-l1norm" if dec_norm else ""))


CASES = (
    [(shape, dtype, None, False) for shape in SHAPES for dtype in DTYPES]
    + [(shape, "fp32", None, True) for shape in SHAPES[:2]]
    + [(SHAPES[0], "fp32", 6, False), (SHAPES[2], "fp16", 3, True)]
    # 10 row tiles: more than one group of the launch order (GROUP_M = 8).
    + [((150, 16, 20), "fp32", None, False)]
)


def make_inputs(shape, dtype, seed):
    """Fresh random inputs per case, rounded to `dtype`; upstream gradients in float32."""
    n_rows, d_in, d_sae = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(dtype)

    x = randn(n_rows, d_in)
    params = [randn(d_in, d_sae, scale=0.3), randn(d_sae, scale=0.1), randn(d_sae, d_in, scale=0.3),
              randn(d_in, scale=0.1)]
    upstream = {"x_hat": torch.randn(n_rows, d_in, generator=gen),
                "feats": torch.randn(n_rows, d_sae, generator=gen), "mse": 1.3, "l1": 0.7}
    return x, params, upstream


def reference_in_fp32(x, params, upstream, k, dec_norm, with_feats_grad=True):
    """The oracle on the same (rounded) values, computed in float32."""
    return run_step(reference.sae_step, x.float(), [p.float() for p in params], upstream, k, dec_norm,
                    with_feats_grad)


@pytest.mark.parametrize("shape,dtype,k,dec_norm", CASES, ids=[case_id(*c) for c in CASES])
def test_step_matches_reference(triton_step, shape, dtype, k, dec_norm):
    seed = zlib.crc32(case_id(shape, dtype, k, dec_norm).encode())
    x, params, upstream = make_inputs(shape, DTYPES[dtype], seed)
    out, grads = run_step(triton_step.sae_step, x, params, upstream, k, dec_norm)
    ref, ref_grads = reference_in_fp32(x, params, upstream, k, dec_norm)
    assert_step_matches(out, grads, ref, ref_grads, DTYPES[dtype], dtype != "fp32", *TOLERANCE[dtype])


def test_loss_only_gradients(triton_step):
    """The usual training call: only mse and l1 reach the loss (the other upstream gradients are None)."""
    x, params, _ = make_inputs((29, 20, 33), torch.float32, seed=7)
    assert_loss_only_grads_match(triton_step.sae_step, x, params)


def test_bad_inputs_name_the_problem(triton_step):
    x, params, _ = make_inputs((8, 4, 6), torch.float32, seed=1)
    with pytest.raises(ValueError, match="w_dec has shape"):
        triton_step.sae_step(x, params[0], params[1], params[2].T, params[3])
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        triton_step.sae_step(x.double(), *params)
    with pytest.raises(ValueError, match="k must be between 1 and d_sae=6"):
        triton_step.sae_step(x, *params, k=7)


def test_autotune_steps_aside_under_the_interpreter(triton_step):
    tuning = sys.modules[f"{PACKAGE}.common"]
    assert tuning.interpreting()
    assert tuning.launch_meta() == tuning.INTERPRET_META

    def kernel():
        pass

    assert tuning.autotune(tuning.gemm_configs(), key=["n"])(kernel) is kernel
    assert all(cfg.kwargs["BLOCK_K"] <= 64 for cfg in tuning.gemm_configs(small_k=True))
