"""The SAE step over the firing features only (the `sparse` form of every backend's step).

A trained SAE fires a few dozen of thousands of features per row. Only the encoder product
needs every feature; the other four products of the step (`reference.py` numbers them)
touch a feature of a row only where it fired, since ReLU and TopK both zero the gradient
of the rest:

    x_hat        = feats @ w_dec + b_dec           per row, a sum of its active decoder rows
    d_w_dec[i]   = sum over rows b firing i of feats[b, i] * g[b]
    d_pre[b, i]  = g[b] . w_dec[i] + l1 term       only at the active (b, i): a sampled product
    d_w_enc[:,i] = sum over rows b firing i of d_pre[b, i] * (x[b] - b_dec)

So a step costs one dense product plus work in proportion to the active entries
(B x L0 x D instead of B x F x D for each of four products). The active entries are kept
twice: by row (CSR: `row_ptr`, `col`, `val`), for the decoder and the sampled product, and
by feature (the permutation `by_feature` with `feat_ptr`), for the two weight gradients;
both are segment sums (`gather_sum`, one `embedding_bag`). The results are the dense
step's: the same outputs and gradients, summed in another order (tested against the
oracle, ties and empty rows included).

This module is plain PyTorch and runs on any device; on CPUs two native kernels
(`native_sparse`: finding the firing entries, the sampled product) replace the torch ops
where built, and TopK selects by `select.top_k`. `monofast.kernels.triton.sparse` provides
the same primitives as Triton kernels for CUDA. Which form is faster depends on
the firing density and the machine: the trainer measures the crossover
(`monofast.sae.crossover`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import native_sparse
from .eager import finish_forward, linear
from .reference import StepOut, norm_pull
from .select import top_k

_NATIVE = native_sparse.available()
"""Whether the Rust CPU kernels are built (they serve CPU tensors; torch ops otherwise)."""


def _native(*tensors: Tensor) -> bool:
    return _NATIVE and all(t.device.type == "cpu" for t in tensors)


class Active(NamedTuple):
    """The firing entries of a [B, F] feature matrix, by row and by feature."""

    row_ptr: Tensor
    """[B + 1] int64: row b's entries are col[row_ptr[b]:row_ptr[b + 1]]."""
    row: Tensor
    """[nnz] int64: the row of each entry (row-major order)."""
    col: Tensor
    """[nnz] int64: the feature of each entry, increasing within a row."""
    val: Tensor
    """[nnz]: the activation of each entry (may be 0 for TopK entries ReLU zeroed; those
    carry no gradient)."""
    by_feature: Tensor
    """[nnz] int64: the entries in feature-major order (rows increasing within a feature)."""
    feat_ptr: Tensor
    """[F + 1] int64: feature i's entries are by_feature[feat_ptr[i]:feat_ptr[i + 1]]."""


def _pointers(index: Tensor, n: int) -> Tensor:
    """[n + 1] int64 segment starts of `index` values 0..n-1 counted (then summed)."""
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(torch.bincount(index, minlength=n), 0, out=ptr[1:])
    return ptr


def active_entries(row: Tensor, col: Tensor, val: Tensor, n_rows: int, d_sae: int,
                   row_ptr: Optional[Tensor] = None) -> Active:
    """Both orders of the entries (row, col, val), given in row-major order (`row_ptr`
    counted from `row` unless given)."""
    by_feature = torch.argsort(col, stable=True)
    row_ptr = _pointers(row, n_rows) if row_ptr is None else row_ptr
    return Active(row_ptr, row, col, val, by_feature, _pointers(col, d_sae))


def relu_active(feats: Tensor) -> Active:
    """The positive entries of ReLU features feats [B, F]."""
    n_rows, d_sae = feats.shape
    if _native(feats) and feats.dtype in (torch.float32, torch.bfloat16) and feats.is_contiguous():
        row_ptr, col, val = native_sparse.positive_entries(feats)
        row = torch.repeat_interleave(torch.arange(n_rows), row_ptr.diff(), output_size=col.shape[0])
        return active_entries(row, col, val, n_rows, d_sae, row_ptr)
    row, col = feats.nonzero().unbind(1)
    return active_entries(row, col, feats[row, col], n_rows, d_sae)


def topk_active(indices: Tensor, values: Tensor, d_sae: int) -> Active:
    """The kept entries of TopK (indices [B, k] increasing within a row, as `select.top_k`
    gives them; values after ReLU), zeros included."""
    n_rows, k = indices.shape
    row = torch.arange(n_rows, device=indices.device).repeat_interleave(k)
    return active_entries(row, indices.reshape(-1), values.reshape(-1), n_rows, d_sae)


def gather_sum(table: Tensor, index: Tensor, ptr: Tensor, weights: Tensor, transpose: bool = False,
               out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """[S, D] segment sums: out[s] = sum over j in ptr[s]:ptr[s+1] of weights[j] * table[index[j]]
    ([D, S] with `transpose`), in `out_dtype` (default table's).

    table [N, D]; index, weights [nnz] (weights in table's dtype); ptr [S + 1]. An empty
    segment gives a zero row. One `embedding_bag` (then the transpose and the cast in one
    blocked copy): on CPUs it matched a native segment sum inside the step, so there is none.
    The result carries no autograd graph: the sparse step computes its gradients itself.
    """
    # Detached: a table that requires grad (a parameter, even under no_grad) sends embedding_bag
    # down its training path, which also builds what its own backward would need: 11.3 against
    # 7.9 ms for the laptop shape's decoder rows. The sums here never carry autograd's gradients.
    out = torch.nn.functional.embedding_bag(index, table.detach(), ptr, per_sample_weights=weights, mode="sum",
                                            include_last_offset=True)
    if transpose:
        return transposed(out, out_dtype or out.dtype)
    return out if out_dtype is None else out.to(out_dtype)


_TRANSPOSE_BLOCK = 512
"""Rows of the source per block of `transposed` on CPUs."""


def transposed(a: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy of a.T [D, S] in `dtype`, from a [S, D]. On CPUs in blocks of source
    rows, whose strided reads stay in cache: at [3,072, 768] float32, 3.7 ms against 6.6 ms
    for one strided copy of the whole (2 threads, AVX2)."""
    out = torch.empty(a.shape[::-1], dtype=dtype, device=a.device)
    if a.device.type != "cpu":
        return out.copy_(a.T)
    for start in range(0, a.shape[0], _TRANSPOSE_BLOCK):
        out[:, start:start + _TRANSPOSE_BLOCK].copy_(a[start:start + _TRANSPOSE_BLOCK].T)
    return out


_SAMPLED_CHUNK = 1 << 14
"""Entries per chunk of the gathered fallback of `sampled_dot` (bounds its [chunk, D] copies)."""


def sampled_dot(a: Tensor, b: Tensor, active: Active) -> Tensor:
    """[nnz] a[row] . b[col] at the active entries: the product a @ b.T sampled there.

    a [B, D], b [F, D] (cast to a's dtype where the kernel needs one dtype). On CPUs a float32
    `a` runs the native kernel, float64 ATen's sampled_addmm over a CSR pattern (one pass,
    no copies); elsewhere rows are gathered in chunks.
    """
    if _native(a, b) and a.dtype == torch.float32 and b.dtype in (torch.float32, torch.bfloat16) \
            and a.is_contiguous() and b.is_contiguous():
        return native_sparse.sampled_dot(a, b, active.row_ptr, active.col)
    b = b.to(a.dtype)
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64):
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used is stable
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(active.row_ptr, active.col, torch.zeros_like(active.val, dtype=a.dtype),
                                              size=(a.shape[0], b.shape[0]), check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values()
    out = torch.empty(active.col.shape[0], dtype=a.dtype, device=a.device)
    for start in range(0, out.shape[0], _SAMPLED_CHUNK):
        end = start + _SAMPLED_CHUNK
        rows, cols = active.row[start:end], active.col[start:end]
        torch.linalg.vecdot(a[rows], b[cols], dim=1, out=out[start:end])
    return out


class SparseStep(torch.autograd.Function):
    """Forward and backward of the step over the active entries (dense encoder product)."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, w_dec, b_dec, k, dec_norm, compute_dtype):
        dt = compute_dtype or x.dtype
        d_sae = w_enc.shape[1]
        x_c = (x - b_dec).to(dt)  # [B, D]
        w_dec_c = w_dec.to(dt)  # [F, D]
        feats = linear(x_c, w_enc.to(dt).T, b_enc.to(dt), relu=k is None)  # [B, F] (TopK: pre-activations)
        if k is None:
            active = relu_active(feats)
        else:
            values, indices = top_k(feats, k)
            values.relu_()
            feats.zero_().scatter_(1, indices, values)
            active = topk_active(indices, values, d_sae)
        acc = torch.promote_types(dt, torch.float32)  # sums in float32 (float64 for float64)
        col_sum = torch.zeros(d_sae, dtype=acc, device=x.device).index_add_(0, active.col, active.val.to(acc))
        fired = torch.zeros(d_sae, dtype=torch.int32, device=x.device).index_add_(
            0, active.col, (active.val > 0).int())
        x_hat = gather_sum(w_dec_c, active.col, active.row_ptr, active.val).add_(b_dec.to(dt))  # [B, D]
        err, mse, w, l1, l0 = finish_forward(ctx, x, x_hat, col_sum, fired, w_dec, dec_norm,
                                             (b_enc.dtype, b_dec.dtype))  # w [F]
        ctx.save_for_backward(x_c, w_enc, w_dec, w_dec_c, err, col_sum, w, *active)
        return x_hat, feats, mse, l1, l0, fired

    @staticmethod
    def backward(ctx, g_x_hat, g_feats, g_mse, g_l1, _g_l0, _g_fired):
        x_c, w_enc, w_dec, w_dec_c, err, col_sum, w, *entries = ctx.saved_tensors
        active = Active(*entries)
        x_dtype, b_enc_dtype, b_dec_dtype = ctx.dtypes
        dt = x_c.dtype
        n_rows = x_c.shape[0]
        acc = torch.promote_types(err.dtype, torch.float32)
        scale = 2.0 * g_mse / n_rows if g_mse is not None else torch.zeros((), device=err.device)
        g = err.to(acc) * scale  # [B, D] d loss / d x_hat, summed in float32 (or float64)
        if g_x_hat is not None:
            g = g.add_(g_x_hat.to(acc))
        g_sum = g.sum(0)  # [D]
        rows_f = active.row[active.by_feature]  # [nnz] rows in feature-major order
        # The two weight gradients take their products' inputs in the compute dtype, as the
        # dense step's products do (the segment sums accumulate in float32).
        d_w_dec = gather_sum(g.to(dt), rows_f, active.feat_ptr, active.val[active.by_feature]).to(w_dec.dtype)
        if ctx.dec_norm and g_l1 is not None:
            row_scale = norm_pull(g_l1, col_sum, w, n_rows)
            d_w_dec.addcmul_(row_scale[:, None].to(d_w_dec.dtype), w_dec)

        d_val = sampled_dot(g, w_dec_c, active)  # [nnz] g @ w_dec.T at the active entries
        if g_l1 is not None:
            d_val += (g_l1 * w / n_rows).to(d_val.dtype)[active.col]
        if g_feats is not None:
            d_val += g_feats[active.row, active.col].to(d_val.dtype)
        d_val.mul_(active.val > 0)  # ReLU's mask (TopK entries ReLU zeroed)

        d_w_enc = gather_sum(x_c, rows_f, active.feat_ptr, d_val[active.by_feature].to(dt),
                             transpose=True, out_dtype=w_enc.dtype)  # [D, F]
        d_b_enc = torch.zeros(w_dec.shape[0], dtype=d_val.dtype, device=d_val.device).index_add_(
            0, active.col, d_val)  # [F]
        d_b_dec = g_sum - torch.mv(w_enc.to(d_b_enc.dtype), d_b_enc)  # [D]
        d_x = None
        if ctx.needs_input_grad[0]:  # not in training (x needs no gradient there): dense is fine
            d_pre = torch.zeros(n_rows, w_dec.shape[0], dtype=d_val.dtype, device=d_val.device)
            d_pre[active.row, active.col] = d_val
            d_x = (d_pre @ w_enc.to(acc).T - err.to(acc) * scale).to(x_dtype)
        return (d_x, d_w_enc, d_b_enc.to(b_enc_dtype), d_w_dec, d_b_dec.to(b_dec_dtype), None, None, None)


def sparse_step(x: Tensor, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, b_dec: Tensor, k: Optional[int] = None,
                dec_norm: bool = False, compute_dtype: Optional[torch.dtype] = None) -> StepOut:
    """The SAE step (contract in `reference.py`) over the active entries; products in
    `compute_dtype` when given. x_hat and feats come back in the compute dtype."""
    if k is not None and not 1 <= k <= w_enc.shape[1]:
        raise ValueError(f"k must be between 1 and d_sae={w_enc.shape[1]}, got {k}")
    return StepOut(*SparseStep.apply(x, w_enc, b_enc, w_dec, b_dec, k, dec_norm, compute_dtype))
