"""The sparse Triton kernels, run by Triton's CPU interpreter: the two primitives against
float64 sums of the same (rounded) values, and `sparse_step` against the eager oracle,
every output and every gradient under the same upstream gradients, with empty rows and
TopK ties.

Like test_triton.py, the `triton_sparse` fixture imports a private copy of
`monofast.kernels.triton` with TRITON_INTERPRET=1 set and restores the environment and the
previously imported copy afterwards. Under the interpreter the kernels take 4 entries and
16 columns per block (`SPARSE_INTERPRET_META`), so the segments below (0, 1, 2 and 9 long)
and widths (37) cover every mask and more than one block of both loops.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

from conftest import assert_loss_only_grads_match, assert_step_matches, interpreted_triton, run_step  # noqa: E402
from monofast.kernels import reference  # noqa: E402


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Step tolerances against the float32 oracle fed the same rounded inputs (as test_triton.py).
TOLERANCE = {"fp32": (1e-4, 1e-5), "fp16": (2e-2, 2e-2), "bf16": (6e-2, 6e-2)}
# The primitives sum in float32 what the float64 reference sums exactly.
PRIMITIVE_TOLERANCE = (1e-5, 1e-5)

SEGMENTS = [0, 1, 9, 0, 2, 5, 0]
"""Segment lengths: empty (first, inner and last), one entry, and longer than a block."""
D_IN = 37


@pytest.fixture(scope="module")
def triton_sparse():
    for module in interpreted_triton("sparse"):
        assert module.sparse_meta() == module.SPARSE_INTERPRET_META
        yield module


def segments(lengths, n_targets, gen):
    """(ptr [S + 1], index [nnz]): random targets in 0..n_targets-1, repeats allowed."""
    ptr = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    ptr[1:] = torch.tensor(lengths).cumsum(0)
    return ptr, torch.randint(0, n_targets, (int(ptr[-1]),), generator=gen)


def segment_of_entries(ptr):
    """[nnz] the segment of each entry."""
    return torch.repeat_interleave(torch.arange(ptr.shape[0] - 1), ptr.diff())


GATHER_CASES = [(dt, wdt, tr) for dt in DTYPES for wdt in ("w32", "wtab") for tr in (False, True)]


@pytest.mark.parametrize("dtype,weights,transpose", GATHER_CASES,
                         ids=[f"N11-D{D_IN}-{dt}-{w}" + ("-T" if tr else "") for dt, w, tr in GATHER_CASES])
def test_gather_sum(triton_sparse, dtype, weights, transpose):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{weights}{transpose}".encode()))
    table = torch.randn(11, D_IN, generator=gen).to(DTYPES[dtype])
    ptr, index = segments(SEGMENTS, 11, gen)
    w = torch.randn(index.shape[0], generator=gen).to(torch.float32 if weights == "w32" else DTYPES[dtype])
    got = triton_sparse.gather_sum(table, index, ptr, w, transpose=transpose)

    terms = table.double()[index] * w.double()[:, None]  # [nnz, D]
    want = torch.zeros(len(SEGMENTS), D_IN, dtype=torch.float64).index_add_(0, segment_of_entries(ptr), terms)
    if transpose:
        want = want.T
    assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=PRIMITIVE_TOLERANCE[0], atol=PRIMITIVE_TOLERANCE[1])
    assert got.abs().sum() > 0


SAMPLED_CASES = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "bf16")]


@pytest.mark.parametrize("a_dtype,b_dtype", SAMPLED_CASES,
                         ids=[f"B{len(SEGMENTS)}-D{D_IN}-F13-{a}-{b}" for a, b in SAMPLED_CASES])
def test_sampled_dot(triton_sparse, a_dtype, b_dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{a_dtype}{b_dtype}".encode()))
    a = torch.randn(len(SEGMENTS), D_IN, generator=gen).to(DTYPES[a_dtype])
    b = torch.randn(13, D_IN, generator=gen).to(DTYPES[b_dtype])
    row_ptr, col = segments(SEGMENTS, 13, gen)
    got = triton_sparse.sampled_dot(a, b, row_ptr, col)

    want = (a.double()[segment_of_entries(row_ptr)] * b.double()[col]).sum(1)
    assert got.dtype == torch.float32 and got.shape == col.shape
    torch.testing.assert_close(got.double(), want, rtol=PRIMITIVE_TOLERANCE[0], atol=PRIMITIVE_TOLERANCE[1])


def test_no_entries(triton_sparse):
    """No entries at all: zeros of the right shape, without a launch."""
    table, empty = torch.randn(4, 5), torch.zeros(0, dtype=torch.int64)
    ptr = torch.zeros(4, dtype=torch.int64)
    assert torch.equal(triton_sparse.gather_sum(table, empty, ptr, empty.float(), transpose=True),
                       torch.zeros(5, 3))
    assert triton_sparse.sampled_dot(torch.randn(3, 5), table, ptr, empty).shape == (0,)


def test_bad_primitive_inputs_name_the_problem(triton_sparse):
    table, ptr = torch.randn(4, 5), torch.tensor([0, 2, 3])
    index, w = torch.tensor([0, 1, 3]), torch.ones(3)
    with pytest.raises(ValueError, match="index must be int64"):
        triton_sparse.gather_sum(table, index.int(), ptr, w)
    with pytest.raises(ValueError, match="weights has 2 entries, expected 3"):
        triton_sparse.gather_sum(table, index, ptr, w[:2])
    with pytest.raises(ValueError, match="table must be a 2-D float32"):
        triton_sparse.gather_sum(table.double(), index, ptr, w)
    with pytest.raises(ValueError, match="row_ptr one entry more"):
        triton_sparse.sampled_dot(torch.randn(3, 5), table, ptr, index)


# ---- the step against the oracle ---------------------------------------------------------

# (B, D, F): partial blocks of the encoder (16) and the gathers (16 wide, 4 entries).
SHAPE = (11, 37, 29)
STEP_CASES = [
    # dtype, k, dec_norm, integer-valued inputs (TopK ties)
    ("fp32", None, False, False),
    ("fp32", None, True, False),
    ("fp32", 3, False, True),
    ("fp32", 3, True, True),
    ("bf16", None, True, False),
    ("fp16", 3, False, False),
]


def step_id(dtype, k, dec_norm, integer) -> str:
    n_rows, d_in, d_sae = SHAPE
    return (f"B{n_rows}-D{d_in}-F{d_sae}-{dtype}" + ("" if k is None else f"-top{k}")
            + ("-l1norm" if dec_norm else "") + ("-ties" if integer else ""))


def make_inputs(dtype, integer, seed):
    """Inputs rounded to `dtype` where row 0 of x equals b_dec and b_enc < 0, so row 0 fires
    nothing (under TopK too: its top k are all negative). With `integer`, every value is a
    small integer, so the pre-activations are exact and tie often. Upstream gradients in float32."""
    n_rows, d_in, d_sae = SHAPE
    gen = torch.Generator().manual_seed(seed)
    if integer:
        def draw(*size, scale):
            return torch.randint(-scale, scale + 1, size, generator=gen).float()

        x, w_enc = draw(n_rows, d_in, scale=2), draw(d_in, d_sae, scale=1)
        w_dec, b_dec = draw(d_sae, d_in, scale=1), draw(d_in, scale=1)
        b_enc = -torch.randint(1, 3, (d_sae,), generator=gen).float()
    else:
        def draw(*size, scale):
            return torch.randn(*size, generator=gen) * scale

        x, w_enc = draw(n_rows, d_in, scale=1.0), draw(d_in, d_sae, scale=0.3)
        w_dec, b_dec = draw(d_sae, d_in, scale=0.3), draw(d_in, scale=0.1)
        b_enc = -0.05 - draw(d_sae, scale=0.3).abs()
    x[0] = b_dec
    tensors = [t.to(dtype) for t in (x, w_enc, b_enc, w_dec, b_dec)]
    upstream = {"x_hat": torch.randn(n_rows, d_in, generator=gen),
                "feats": torch.randn(n_rows, d_sae, generator=gen), "mse": 1.3, "l1": 0.7}
    return tensors[0], tensors[1:], upstream


@pytest.mark.parametrize("dtype,k,dec_norm,integer", STEP_CASES, ids=[step_id(*c) for c in STEP_CASES])
def test_step_matches_reference(triton_sparse, dtype, k, dec_norm, integer):
    seed = zlib.crc32(step_id(dtype, k, dec_norm, integer).encode())
    x, params, upstream = make_inputs(DTYPES[dtype], integer, seed)
    out, grads = run_step(triton_sparse.sparse_step, x, params, upstream, k, dec_norm)
    ref, ref_grads = run_step(reference.sae_step, x.float(), [p.float() for p in params], upstream, k, dec_norm)
    rtol, atol = TOLERANCE[dtype]

    # The cases cover what they claim: an empty row, and rows of several entries.
    assert not (ref.feats[0] > 0).any()
    assert (ref.feats > 0).sum(1).max() > 1
    if integer:
        assert ref.feats.unique().numel() < ref.feats.numel() // 4  # many ties

    assert_step_matches(out, grads, ref, ref_grads, DTYPES[dtype], dtype != "fp32", rtol, atol)


def test_loss_only_gradients(triton_sparse):
    """The training call: x needs no gradient, only mse and l1 reach the loss."""
    x, params, _ = make_inputs(torch.float32, False, seed=7)
    assert_loss_only_grads_match(triton_sparse.sparse_step, x, params)


def test_bad_step_inputs_name_the_problem(triton_sparse):
    x, params, _ = make_inputs(torch.float32, False, seed=1)
    with pytest.raises(ValueError, match="w_dec has shape"):
        triton_sparse.sparse_step(x, params[0], params[1], params[2].T, params[3])
    with pytest.raises(ValueError, match="k must be between 1 and d_sae=29"):
        triton_sparse.sparse_step(x, *params, k=30)
