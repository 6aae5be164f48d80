"""The Rust kernels of the sparse step (kernels/native_sparse.py) against plain torch: the
entries of nonzero() and float64 sampled dots, on odd shapes with empty rows, all-zero
input, a dense row, both dtypes, NaN and -0.0, bad inputs, and one and two threads."""

from __future__ import annotations

import pytest
import torch
from monofast.kernels import native_sparse as ns

pytestmark = pytest.mark.skipif(not ns.available(), reason="the built extension predates the sparse kernels")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (B, F, D): none a multiple of 16 or 64.
SHAPES = [(37, 203, 45), (5, 70, 1), (130, 1000, 77)]


def shape_id(shape) -> str:
    n_rows, d_sae, d_in = shape
    return f"B{n_rows}-F{d_sae}-D{d_in}"


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def relu_feats(n_rows, d_sae, dtype, density=0.05, seed=0) -> torch.Tensor:
    """[B, F] ReLU-like features, about `density` firing; row 1 empty, row 2 fully dense."""
    gen = torch.Generator().manual_seed(seed)
    pre = torch.rand(n_rows, d_sae, generator=gen, dtype=torch.float64)
    feats = torch.where(pre < density, pre + 0.01, 0.0)
    if n_rows > 2:
        feats[1] = 0.0
        feats[2] = torch.rand(d_sae, generator=gen, dtype=torch.float64) + 0.01
    return feats.to(dtype)


def nonzero_entries(feats: torch.Tensor):
    row, col = feats.nonzero().unbind(1)
    row_ptr = torch.zeros(feats.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(row, minlength=feats.shape[0]), 0, out=row_ptr[1:])
    return row_ptr, col, feats[row, col]


def assert_same_entries(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g.view(torch.int16) if g.dtype == torch.bfloat16 else g,
                           w.view(torch.int16) if w.dtype == torch.bfloat16 else w)


# ---------------------------------------------------------------------------------------
# positive_entries


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_positive_entries_equal_nonzero(shape, dtype, threads):
    feats = relu_feats(shape[0], shape[1], DTYPES[dtype])
    assert_same_entries(ns.positive_entries(feats), nonzero_entries(feats))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_positive_entries_of_all_zeros_and_empty(dtype):
    row_ptr, col, val = ns.positive_entries(torch.zeros(9, 130, dtype=DTYPES[dtype]))
    assert row_ptr.tolist() == [0] * 10 and col.numel() == 0 and val.dtype == DTYPES[dtype]
    row_ptr, col, _ = ns.positive_entries(torch.zeros(0, 7, dtype=DTYPES[dtype]))
    assert row_ptr.tolist() == [0] and col.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_positive_entries_keep_nan_and_skip_negative_zero(dtype):
    feats = torch.zeros(2, 100, dtype=DTYPES[dtype])
    feats[0, 63] = -0.0
    feats[0, 64] = float("nan")
    feats[1, 5] = 2.0
    feats[1, 99] = float("inf")
    row_ptr, col, val = ns.positive_entries(feats)
    assert row_ptr.tolist() == [0, 1, 3]
    assert col.tolist() == [64, 5, 99]
    assert val[0].isnan() and val[1:].tolist() == [2.0, float("inf")]


def test_positive_entries_rejects_bad_input():
    with pytest.raises(ValueError, match="feats must be"):
        ns.positive_entries(torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="feats must be 2-D"):
        ns.positive_entries(torch.ones(3))
    with pytest.raises(ValueError, match="feats must be contiguous"):
        ns.positive_entries(torch.ones(4, 3).T)


# ---------------------------------------------------------------------------------------
# sampled_dot


def dense_inputs(n_rows, d_sae, d_in, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, d_in, generator=gen), torch.randn(d_sae, d_in, generator=gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_sampled_dot_matches_float64(shape, dtype, threads):
    n_rows, d_sae, _ = shape
    a, b = dense_inputs(*shape)
    b = b.to(DTYPES[dtype])
    row_ptr, col, _ = nonzero_entries(relu_feats(n_rows, d_sae, torch.float32))
    row = torch.repeat_interleave(torch.arange(n_rows), row_ptr.diff())
    want = (a.double()[row] * b.double()[col]).sum(1)
    torch.testing.assert_close(ns.sampled_dot(a, b, row_ptr, col).double(), want, rtol=1e-5, atol=1e-5)


def test_sampled_dot_is_the_same_on_one_and_two_threads():
    a, b = dense_inputs(*SHAPES[2])
    row_ptr, col, _ = nonzero_entries(relu_feats(SHAPES[2][0], SHAPES[2][1], torch.float32))
    results = []
    for n in (1, 2):
        saved = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            results.append(ns.sampled_dot(a, b, row_ptr, col))
        finally:
            torch.set_num_threads(saved)
    assert torch.equal(*results)


def test_sampled_dot_rejects_bad_input():
    a, b = dense_inputs(3, 5, 4)
    row_ptr, col = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 4])
    assert ns.sampled_dot(a, b, row_ptr, col).shape == (2,)
    with pytest.raises(ValueError, match="a must be torch.float32"):
        ns.sampled_dot(a.double(), b, row_ptr, col)
    with pytest.raises(ValueError, match="b must have a's 4 columns"):
        ns.sampled_dot(a, b[:, :3].contiguous(), row_ptr, col)
    with pytest.raises(ValueError, match="col must be torch.int64"):
        ns.sampled_dot(a, b, row_ptr, col.int())
    with pytest.raises(ValueError, match=r"col\[1\] = 5 is outside 0..5"):
        ns.sampled_dot(a, b, row_ptr, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="outside"):
        ns.sampled_dot(a, b, row_ptr, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="row_ptr must have 3 \\+ 1 entries"):
        ns.sampled_dot(a, b, row_ptr[:3], col)
    with pytest.raises(ValueError, match="row_ptr decreases"):
        ns.sampled_dot(a, b, torch.tensor([0, 2, 1, 2]), col)
    with pytest.raises(ValueError, match="row_ptr runs from"):
        ns.sampled_dot(a, b, torch.tensor([0, 1, 1, 3]), col)


# ---------------------------------------------------------------------------------------
# top_k


def stable_top_k(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of a stable descending sort of each row (NaN first), by column."""
    order = torch.sort(pre.float(), dim=1, descending=True, stable=True).indices[:, :k]
    indices = order.sort(dim=1).values
    return pre.gather(1, indices), indices


def assert_same_top_k(pre: torch.Tensor, k: int) -> None:
    values, indices = ns.top_k(pre, k)
    want_values, want_indices = stable_top_k(pre, k)
    assert values.dtype == pre.dtype and values.shape == (pre.shape[0], k)
    assert indices.dtype == torch.int64 and torch.equal(indices, want_indices)
    assert torch.equal(bits(values), bits(want_values))  # NaN payloads, -0.0


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def tied_rows(n_rows: int, d_sae: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[B, F] small integers (many ties, some across the k-th place) with +-NaN, +-inf and
    -0.0 sprinkled in; row 1 all equal, row 2 all negative, row 3 NaN from column 5 on."""
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randint(-2, 3, (n_rows, d_sae), generator=gen).float()
    nan = torch.tensor([float("nan")])
    specials = torch.cat([nan, -nan, torch.tensor([float("inf"), float("-inf"), -0.0])])
    where = torch.rand(n_rows, d_sae, generator=gen) < 0.03
    pre[where] = specials[torch.randint(0, 5, (int(where.sum()),), generator=gen)]
    pre[1] = 0.5
    pre[2] = -1.0 - pre[2].abs().nan_to_num(0.0, 0.0, 0.0)
    pre[3, 5:] = float("nan")
    return pre.to(dtype)


# (B, F, k): F a multiple of neither 8 nor 64; k of one AVX2 vector, several, the
# register limit, past it, F itself, 1.
TOP_K_SHAPES = [(37, 203, 32), (5, 70, 70), (6, 97, 1), (9, 300, 9), (4, 1000, 128), (5, 1000, 200)]


def top_k_id(shape) -> str:
    return "B{}-F{}-k{}".format(*shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TOP_K_SHAPES, ids=top_k_id)
def test_top_k_matches_a_stable_sort(shape, dtype, threads):
    n_rows, d_sae, k = shape
    gen = torch.Generator().manual_seed(2)
    assert_same_top_k(torch.randn(n_rows, d_sae, generator=gen).to(DTYPES[dtype]), k)
    assert_same_top_k(tied_rows(n_rows, d_sae, DTYPES[dtype]), k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_top_k_of_rows_unlike_their_neighbours(dtype, threads):
    """Each row's threshold helps the next; here it is far too high or too low."""
    gen = torch.Generator().manual_seed(3)
    scale = torch.tensor([1.0, 1e-3, 1e3, -1.0, 1.0, 0.0, 1e30, 1.0]).repeat(4)[:, None]
    pre = (torch.randn(32, 500, generator=gen) * scale).to(DTYPES[dtype])
    for k in (1, 8, 32, 64, 100, 500):
        assert_same_top_k(pre, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_top_k_ties_go_to_the_lower_column(dtype):
    pre = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 2.0],
                        [0.0, -0.0, 0.0, -0.0, -1.0, float("nan")],
                        [float("nan"), 1.0, float("nan"), float("inf"), float("nan"), 5.0]])
    values, indices = ns.top_k(pre.to(DTYPES[dtype]), 3)
    assert indices.tolist() == [[1, 2, 4], [0, 1, 5], [0, 2, 4]]
    assert values[1, :2].float().signbit().tolist() == [False, True] and values[1, 2].isnan()
    assert values[2].isnan().all()


def test_top_k_is_the_same_on_one_and_two_threads():
    pre = torch.randn(301, 777, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    results = []
    for n in (1, 2):
        saved = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            results.append(ns.top_k(pre, 32))
        finally:
            torch.set_num_threads(saved)
    assert torch.equal(results[0].indices, results[1].indices)
    assert torch.equal(results[0].values, results[1].values)


def test_top_k_of_no_rows():
    values, indices = ns.top_k(torch.zeros(0, 7), 3)
    assert values.shape == indices.shape == (0, 3)


def test_top_k_rejects_bad_input():
    pre = torch.randn(4, 10)
    for k in (0, 11, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"k must be an int in 1\.\.10"):
            ns.top_k(pre, k)
    with pytest.raises(ValueError, match="pre must be"):
        ns.top_k(pre.half(), 2)
    with pytest.raises(ValueError, match="pre must be 2-D"):
        ns.top_k(pre[0], 2)
    with pytest.raises(ValueError, match="pre must be contiguous"):
        ns.top_k(pre.T, 2)
    with pytest.raises(ValueError, match="pre must be on the CPU"):
        ns.top_k(pre.to("meta"), 2)
