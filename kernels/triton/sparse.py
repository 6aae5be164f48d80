"""The SAE step over the firing features only, on Triton: the two primitives of
`monofast.kernels.sparse` as kernels, and `sparse_step`, the Triton backend's sparse form
of `sae_step`.

`gather_sum` (`_gather_sum_kernel`): segment sums of weighted gathered rows,
out[s] = sum over j in ptr[s]:ptr[s+1] of weights[j] * table[index[j]]. One program per
(segment, D-block); it walks its segment BLOCK_J entries at a time (bounds read from ptr),
so every output element is written by exactly one program: no atomics, no zero-fill, and
the result does not depend on the launch order. With `transpose` the [D, S] result is
stored directly, down a column per program.

`sampled_dot` (`_sampled_dot_kernel`): a @ b^T at the entries of a CSR pattern. One program
per row of a; it walks the row's entries BLOCK_J at a time and, for each block, D in
BLOCK_D chunks, reading the row's chunk of a once for BLOCK_J gathered rows of b.

Both are gathers of whole rows followed by elementwise products and one reduction, so they
are bound by memory traffic (nnz x D elements read) and use no `tl.dot`: there is no
shared operand tile for the tensor cores to reuse. Every sum is in float32.

`sparse_step` keeps the dense fused encoder (`encode.encode_forward`, the one product that
needs every feature) and replaces the other four products by these two kernels, with the
algebra of `monofast.kernels.sparse.SparseStep`:

    x_hat        = gather_sum(w_dec, col, row_ptr, val) + b_dec       by row
    d_w_dec      = gather_sum(g, row, feat_ptr, val)                  by feature
    d_pre        = sampled_dot(g, w_dec) at the active entries (+ L1 and g_feats terms)
    d_w_enc^T    = gather_sum(x - b_dec, row, feat_ptr, d_pre)        by feature, stored [D, F]
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl

from ..reference import StepOut, norm_pull, penalties
from ..select import top_k
from ..sparse import Active, relu_active, topk_active
from .common import autotune, block_sum, interpreting
from .encode import encode_forward
from .step import DTYPES, prepared

SPARSE_INTERPRET_META: dict[str, int] = {"BLOCK_J": 4, "BLOCK_D": 16}
"""Block sizes under the interpreter: small enough that the tests' short segments and odd
widths span several blocks and exercise every mask."""


def sparse_configs() -> list[triton.Config]:
    """A short list of (BLOCK_D, BLOCK_J, warps) for the gather kernels: a [BLOCK_J, BLOCK_D]
    float32 tile per program, 2K to 8K elements, with more warps for the larger ones so each
    thread keeps 32 to 64 accumulators. Not yet swept on a GPU."""
    shapes = [
        # BLOCK_D, BLOCK_J, warps
        (64, 16, 4),
        (128, 16, 4),
        (128, 32, 4),
        (128, 32, 8),
        (256, 16, 8),
        (256, 32, 8),
    ]
    return [triton.Config({"BLOCK_D": d, "BLOCK_J": j}, num_warps=w) for d, j, w in shapes]


def sparse_meta() -> dict[str, int]:
    """Extra launch arguments: the fixed blocks under the interpreter, none when autotuned."""
    return dict(SPARSE_INTERPRET_META) if interpreting() else {}


# Keyed on the segment count and width, which are fixed for a run (B rows or F features,
# D), not on nnz, which changes every step under ReLU and would retune each time.
@autotune(sparse_configs(), key=["n_seg", "d"])
@triton.jit
def _gather_sum_kernel(
    table_ptr,  # [N, D]
    index_ptr,  # [nnz] int64: the table row of each entry
    seg_ptr,  # [S + 1] int64: segment s is entries seg_ptr[s]:seg_ptr[s + 1]
    weights_ptr,  # [nnz]
    out_ptr,  # [S, D] float32 written, out[s, d] at out_ptr + s * stride_os + d * stride_od
    n_seg, d,
    stride_os, stride_od,  # (D, 1), or (1, S) for the transposed [D, S] result
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_s = tl.program_id(0)
    i_d = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < d
    start = tl.load(seg_ptr + i_s)
    end = tl.load(seg_ptr + i_s + 1)
    # Partial sums per entry slot, reduced over J once at the end rather than every block.
    acc = tl.full((BLOCK_J, BLOCK_D), 0.0, dtype=tl.float32)
    for j0 in range(start, end, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = o_j < end
        b_index = tl.load(index_ptr + o_j, mask=m_j, other=0)
        b_w = tl.load(weights_ptr + o_j, mask=m_j, other=0.0).to(tl.float32)
        p_t = table_ptr + b_index[:, None] * d + o_d[None, :]  # int64 offsets: index is int64
        b_t = tl.load(p_t, mask=m_j[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        acc += b_t * b_w[:, None]
    p_out = out_ptr + i_s.to(tl.int64) * stride_os + o_d.to(tl.int64) * stride_od
    tl.store(p_out, block_sum(acc, 0).to(out_ptr.dtype.element_ty), mask=m_d)


@autotune(sparse_configs(), key=["n_rows", "d"])
@triton.jit
def _sampled_dot_kernel(
    a_ptr,  # [B, D]
    b_ptr,  # [F, D]
    row_ptr_ptr,  # [B + 1] int64: row r's entries are row_ptr[r]:row_ptr[r + 1]
    col_ptr,  # [nnz] int64: the row of b of each entry
    out_ptr,  # [nnz] float32 written: a[r] . b[col[j]]
    n_rows, d,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_r = tl.program_id(0)
    start = tl.load(row_ptr_ptr + i_r)
    end = tl.load(row_ptr_ptr + i_r + 1)
    p_a = a_ptr + i_r.to(tl.int64) * d
    for j0 in range(start, end, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = o_j < end
        b_col = tl.load(col_ptr + o_j, mask=m_j, other=0)
        acc = tl.full((BLOCK_J, BLOCK_D), 0.0, dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < d
            b_a = tl.load(p_a + o_d, mask=m_d, other=0.0).to(tl.float32)
            p_b = b_ptr + b_col[:, None] * d + o_d[None, :]  # int64 offsets: col is int64
            b_b = tl.load(p_b, mask=m_j[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            acc += b_b * b_a[None, :]
        tl.store(out_ptr + o_j, block_sum(acc, 1), mask=m_j)


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other inputs on {device}")


def _check_segments(caller: str, ptr_name: str, ptr: torch.Tensor, entries: dict[str, torch.Tensor],
                    device: torch.device) -> None:
    """ptr [S + 1] and every entry array [nnz] int64 (weights: floating) on `device`."""
    if ptr.dim() != 1 or ptr.shape[0] < 1 or ptr.dtype != torch.int64:
        raise ValueError(f"{caller}: {ptr_name} must be a 1-D int64 tensor of S + 1 segment starts, "
                         f"got {ptr.dtype} of shape {tuple(ptr.shape)}")
    _check_device(ptr_name, ptr, device)
    nnz = None
    for name, t in entries.items():
        if t.dim() != 1:
            raise ValueError(f"{caller}: {name} must be 1-D [nnz], got shape {tuple(t.shape)}")
        if nnz is not None and t.shape[0] != nnz:
            raise ValueError(f"{caller}: {name} has {t.shape[0]} entries, expected {nnz}")
        nnz = t.shape[0]
        _check_device(name, t, device)
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{caller}: the Triton kernels run on CUDA devices (or with TRITON_INTERPRET=1); "
                         f"got tensors on {device}")


def _check_table(caller: str, name: str, t: torch.Tensor) -> None:
    if t.dim() != 2 or t.dtype not in DTYPES:
        raise ValueError(f"{caller}: {name} must be a 2-D float32, float16 or bfloat16 tensor, "
                         f"got {t.dtype} of shape {tuple(t.shape)}")


def _grid(n: int, d: int) -> Callable[[dict[str, Any]], tuple[int, int]]:
    return lambda meta: (n, triton.cdiv(d, meta["BLOCK_D"]))


def gather_sum(table: torch.Tensor, index: torch.Tensor, ptr: torch.Tensor, weights: torch.Tensor,
               transpose: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Segment sums out[s] = sum over j in ptr[s]:ptr[s+1] of weights[j] * table[index[j]].

    table [N, D] float32, float16 or bfloat16; index int64 [nnz] (each in 0..N-1, unchecked:
    that would be a host-device sync); ptr int64 [S + 1], non-decreasing from 0 to nnz;
    weights [nnz], any of the three float dtypes. Summed in float32; returns [S, D], or its
    transpose as a contiguous [D, S] tensor when `transpose` (stored so by the kernel, no
    copy), in `out_dtype` (float32 unless asked). An empty segment gives zeros.
    """
    _check_table("gather_sum", "table", table)
    _check_segments("gather_sum", "ptr", ptr, {"index": index, "weights": weights}, table.device)
    if index.dtype != torch.int64 or weights.dtype not in DTYPES:
        raise ValueError(f"gather_sum: index must be int64 and weights float32, float16 or bfloat16, "
                         f"got {index.dtype} and {weights.dtype}")
    n_seg, d = ptr.shape[0] - 1, table.shape[1]
    shape = (d, n_seg) if transpose else (n_seg, d)
    if index.shape[0] == 0 or n_seg == 0 or d == 0:
        return torch.zeros(shape, dtype=out_dtype, device=table.device)
    table, index, ptr, weights = (t.contiguous() for t in (table, index, ptr, weights))
    out = torch.empty(shape, dtype=out_dtype, device=table.device)
    stride_os, stride_od = (1, n_seg) if transpose else (d, 1)
    _gather_sum_kernel[_grid(n_seg, d)](
        table, index, ptr, weights, out, n_seg, d, stride_os, stride_od, **sparse_meta(),
    )
    return out


def sampled_dot(a: torch.Tensor, b: torch.Tensor, row_ptr: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """[nnz] float32 a[r] . b[col[j]] for each entry j of row r: a @ b^T sampled at a CSR pattern.

    a [B, D], b [F, D], each float32, float16 or bfloat16 (they may differ); row_ptr int64
    [B + 1]; col int64 [nnz] (each in 0..F-1, unchecked). Products and sums in float32.
    """
    _check_table("sampled_dot", "a", a)
    _check_table("sampled_dot", "b", b)
    _check_device("b", b, a.device)
    _check_segments("sampled_dot", "row_ptr", row_ptr, {"col": col}, a.device)
    if col.dtype != torch.int64:
        raise ValueError(f"sampled_dot: col must be int64, got {col.dtype}")
    if a.shape[1] != b.shape[1] or row_ptr.shape[0] != a.shape[0] + 1:
        raise ValueError(f"sampled_dot: a {tuple(a.shape)} and b {tuple(b.shape)} need the same width, "
                         f"and row_ptr one entry more than a has rows (got {row_ptr.shape[0]})")
    n_rows, d = a.shape
    nnz = col.shape[0]
    if nnz == 0 or d == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=a.device)
    a, b, row_ptr, col = (t.contiguous() for t in (a, b, row_ptr, col))
    out = torch.empty(nnz, dtype=torch.float32, device=a.device)
    _sampled_dot_kernel[(n_rows,)](a, b, row_ptr, col, out, n_rows, d, **sparse_meta())
    return out


def active_entries(feats: torch.Tensor, k: Optional[int]) -> Active:
    """The firing entries of the encoder's dense features [B, F].

    TopK: the top-k of the features themselves. The encoder already zeroed all but each
    row's k selected entries, so these are its selection, except that a row with fewer than
    k positive values may swap some of its zeros for others; a zero entry adds nothing to
    any sum and carries no gradient, so the step is the same either way.
    """
    if k is None:
        return relu_active(feats)
    values, indices = top_k(feats, k)
    return topk_active(indices, values, feats.shape[1])


class TritonSparseStep(torch.autograd.Function):
    """Forward: the fused encoder, then the decoder as a gather. Backward: two gathers by
    feature and one sampled product (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, w_dec, b_dec, k, dec_norm):
        (x, w_enc, b_enc, w_dec, b_dec), upcast = prepared(x, w_enc, b_enc, w_dec, b_dec, k)
        n_rows = x.shape[0]
        enc = encode_forward(x, w_enc, b_enc, b_dec, k, upcast)
        active = active_entries(enc.feats, k)
        x_hat32 = gather_sum(w_dec, active.col, active.row_ptr, active.val)  # [B, D] float32
        x_hat = x_hat32.add_(b_dec.float()).to(x.dtype)
        # The error of the stored (rounded) reconstruction, as the dense step's decoder takes it.
        err = x_hat.float() - x.float()  # [B, D]
        flat = err.view(-1)
        mse = torch.dot(flat, flat) / n_rows
        w, l1, l0 = penalties(enc.col_sum, enc.fired, w_dec, dec_norm, n_rows)  # w [F] float32
        ctx.save_for_backward(x, w_enc, w_dec, b_dec, x_hat, enc.col_sum, w, *active)
        ctx.dec_norm = dec_norm
        ctx.mark_non_differentiable(l0, enc.fired)
        ctx.set_materialize_grads(False)
        return x_hat, enc.feats, mse, l1, l0, enc.fired

    @staticmethod
    def backward(ctx, g_x_hat, g_feats, g_mse, g_l1, _g_l0, _g_fired):
        x, w_enc, w_dec, b_dec, x_hat, col_sum, w, *entries = ctx.saved_tensors
        active = Active(*entries)
        n_rows, d_sae = x.shape[0], w_dec.shape[0]
        if g_mse is not None:
            err = (x_hat.float() - x.float()) * (2.0 * g_mse.float() / n_rows)  # [B, D]
        else:
            err = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        g = err if g_x_hat is None else err + g_x_hat.float()  # [B, D] float32 d loss / d x_hat
        rows_f = active.row[active.by_feature]  # [nnz] rows in feature-major order
        val_f = active.val[active.by_feature]  # [nnz]

        d_w_dec = gather_sum(g, rows_f, active.feat_ptr, val_f)  # [F, D] float32
        if ctx.dec_norm and g_l1 is not None:
            row_scale = norm_pull(g_l1, col_sum, w, n_rows)
            d_w_dec.addcmul_(row_scale[:, None], w_dec.float())

        d_val = sampled_dot(g, w_dec, active.row_ptr, active.col)  # [nnz] g @ w_dec^T at the entries
        if g_l1 is not None:
            d_val += (g_l1.float() * w / n_rows)[active.col]
        if g_feats is not None:
            d_val += g_feats[active.row, active.col].float()
        d_val.mul_(active.val > 0)  # ReLU's mask (TopK entries ReLU zeroed)

        x_c = x.float() - b_dec.float()  # [B, D]
        d_w_enc = gather_sum(x_c, rows_f, active.feat_ptr, d_val[active.by_feature],
                             transpose=True, out_dtype=w_enc.dtype)  # [D, F]
        d_b_enc = torch.zeros(d_sae, dtype=torch.float32, device=x.device).index_add_(0, active.col, d_val)
        d_b_dec = g.sum(0) - torch.mv(w_enc.float(), d_b_enc)  # [D]
        d_x = None
        if ctx.needs_input_grad[0]:  # not in training (x needs no gradient there): dense is fine
            d_pre = torch.zeros(n_rows, d_sae, dtype=torch.float32, device=x.device)
            d_pre[active.row, active.col] = d_val
            d_x = (d_pre @ w_enc.T.float() - err).to(x.dtype)
        return (d_x, d_w_enc, d_b_enc.to(x.dtype), d_w_dec.to(w_dec.dtype), d_b_dec.to(x.dtype), None, None)


def sparse_step(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor,
                b_dec: torch.Tensor, k: Optional[int] = None, dec_norm: bool = False) -> StepOut:
    """The SAE step (contract in `reference.py`) over the active entries, on Triton: the same
    outputs and gradients as `step.sae_step`, in as many products as there are firing
    entries instead of B x F."""
    return StepOut(*TritonSparseStep.apply(x, w_enc, b_enc, w_dec, b_dec, k, dec_norm))
