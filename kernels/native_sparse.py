"""CPU kernels of the sparse SAE step, in Rust (`rust/src/sparse.rs`).

`sparse.py` runs the step over the firing entries with torch ops; these are faster CPU
forms of its inner operations, with the same results up to float32 summation order:

- `positive_entries`: the CSR entries of a ReLU feature matrix (`feats.nonzero()` plus a
  gather),
- `sampled_dot`: a @ b.T at those entries (`torch.sparse.sampled_addmm`),
- `top_k`: the k largest pre-activations of each row for a TopK SAE (`torch.topk`, with
  its ties settled as a stable sort settles them and the indices sorted).

The step's segment sums stay on torch's `embedding_bag` (`sparse.gather_sum`): a native
segment sum measured no faster inside the step.

Each checks device, dtype, contiguity and shapes here, allocates its output with torch and
hands the kernel numpy views of the tensors (no copies; bfloat16 as its int16 bits). The
kernels release the GIL and run on `torch.get_num_threads()` threads. `available()` is
False when the built extension predates them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import _native

_FUNCTIONS = ("positive_entries", "sampled_dot", "top_k")
_FLOATS = (torch.float32, torch.bfloat16)


def available() -> bool:
    """Whether the built extension has the kernels (a stale build lacks them)."""
    return all(hasattr(_native, name) for name in _FUNCTIONS)


def _check(name: str, t: Tensor, dtypes: tuple[torch.dtype, ...], ndim: int) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (.contiguous())")


def _array(t: Tensor) -> np.ndarray:
    """A numpy view of t's memory; bfloat16 as its int16 bits (numpy has no bfloat16)."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _check_pointers(name: str, ptr: Tensor, segments: int) -> None:
    _check(name, ptr, (torch.int64,), 1)
    if ptr.shape[0] != segments + 1:
        raise ValueError(f"{name} must have {segments} + 1 entries, got {ptr.shape[0]}")


def positive_entries(feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row_ptr [B + 1] int64, col [nnz] int64, val [nnz] in feats' dtype) of the entries
    > 0 of ReLU features feats [B, F], row-major with columns increasing within a row:
    `feats.nonzero()` and the gathered values.

    NaN entries are kept (as entries), not dropped, so that a NaN reaches the step's
    finiteness checks; -0.0 is not > 0 and is left out. 4-6x faster than nonzero() plus
    the gather at B 2048, F 1536 and 4096, bfloat16, two threads.
    """
    _check("feats", feats, _FLOATS, 2)
    row_ptr, col, val = _native.positive_entries(_array(feats), torch.get_num_threads())
    val = torch.from_numpy(val)
    if feats.dtype == torch.bfloat16:
        val = val.view(torch.bfloat16)  # from its uint16 bits
    return torch.from_numpy(row_ptr), torch.from_numpy(col), val


def sampled_dot(a: Tensor, b: Tensor, row_ptr: Tensor, col: Tensor) -> Tensor:
    """[nnz] float32: out[j] = a[r] . b[col[j]] for each entry j of row r, the product
    a @ b.T sampled at the CSR entries (row_ptr, col).

    a [B, D] float32; b [F, D] float32 or bfloat16; row_ptr [B + 1] int64; col [nnz]
    int64. Sums in float32. Raises ValueError for a col outside 0..F or a row_ptr that
    does not rise from 0 to nnz.
    """
    _check("a", a, (torch.float32,), 2)
    _check("b", b, _FLOATS, 2)
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"b must have a's {a.shape[1]} columns, got shape {tuple(b.shape)}")
    _check_pointers("row_ptr", row_ptr, a.shape[0])
    _check("col", col, (torch.int64,), 1)
    out = torch.empty(col.shape[0], dtype=torch.float32)
    _native.sampled_dot(_array(a), _array(b), _array(row_ptr), _array(col), out.numpy(),
                        torch.get_num_threads())
    return out


class TopK(NamedTuple):
    """The k largest entries of each row of a [B, F] matrix, by increasing column."""

    values: Tensor
    """[B, k] in the input's dtype: the entries, bit for bit."""
    indices: Tensor
    """[B, k] int64: their columns, increasing along each row."""


def top_k(pre: Tensor, k: int) -> TopK:
    """The k largest entries of each row of pre [B, F] (float32 or bfloat16, CPU,
    contiguous), 1 <= k <= F, with their columns in increasing order.

    Exact and deterministic: the selected set is the first k of
    `torch.sort(pre, dim=1, descending=True, stable=True)`, so ties go to the lower column
    and NaN ranks above every number (lower column first among NaNs), as torch.sort and
    torch.topk rank it; -0.0 ties +0.0. One scan per row against the k-th largest so far.
    6-10x faster than torch.topk(sorted=False) at B 2048, F 1536-16384, k 32, both dtypes,
    two threads (1.6-2.0 ms against 14-20 ms at F 1536 and 4096).
    """
    _check("pre", pre, _FLOATS, 2)
    n_rows, d_sae = pre.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
        raise ValueError(f"k must be an int in 1..{d_sae} (the columns of pre), got {k!r}")
    values = torch.empty(n_rows, k, dtype=pre.dtype)
    indices = torch.empty(n_rows, k, dtype=torch.int64)
    _native.top_k(_array(pre), k, _array(values), indices.numpy(), torch.get_num_threads())
    return TopK(values, indices)
