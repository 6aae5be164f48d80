"""Weight gradients: out = (a - bias)^T @ b  [+ row_scale * rows], a reduction over the batch.

Both weight gradients of the SAE step have this shape:

    d_w_enc = (x - b_dec)^T @ d_pre                          a = x [B, D], b = d_pre [B, F]
    d_w_dec = feats^T @ g  + s[:, None] * w_dec              a = feats [B, F], b = g [B, D]

The centring `x - b_dec` happens as each block of x is loaded (no [B, D] temporary), and
the decoder-norm term of the April-2024 L1 (each row's pull along its own direction)
joins the accumulator in the epilogue instead of a second pass over [F, D].
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import GROUP_M, autotune, gemm_configs, gemm_tile, grid_1d, launch_meta, tile_offsets


@autotune(gemm_configs(), key=["n_rows", "m", "n"])
@triton.jit
def _weight_grad_kernel(
    a_ptr,  # [n_rows, m]
    a_bias_ptr,  # [m]; subtracted from every row of a when SUB_BIAS
    b_ptr,  # [n_rows, n]
    row_scale_ptr,  # [m]; when ADD_ROWS, out += row_scale[:, None] * rows
    rows_ptr,  # [m, n]
    out_ptr,  # [m, n] written
    n_rows, m, n,
    SUB_BIAS: tl.constexpr,
    ADD_ROWS: tl.constexpr,
    UPCAST: tl.constexpr,  # multiply in float32 (the interpreter's bf16 dot is wrong)
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    o_m, o_n, m_m, m_n = tile_offsets(m, n, BLOCK_M, BLOCK_N, GROUP)
    # (a - a_bias)^T @ b: the transpose of a read in place, down its columns; the bias
    # follows the rows of a^T.
    acc = gemm_tile(a_ptr, b_ptr, a_bias_ptr, o_m, o_n, m_m, m_n, n_rows,
                    stride_am=1, stride_ak=m, stride_bk=n, stride_bn=1, BIAS="m" if SUB_BIAS else None,
                    UPCAST=UPCAST, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    m_out = m_m[:, None] & m_n[None, :]
    if ADD_ROWS:
        b_scale = tl.load(row_scale_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_rows = tl.load(rows_ptr + o_m[:, None] * n + o_n[None, :], mask=m_out, other=0.0)
        acc += b_scale[:, None] * b_rows.to(tl.float32)
    tl.store(out_ptr + o_m[:, None] * n + o_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_out)


def weight_grad(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype,
                a_bias: Optional[torch.Tensor] = None,
                row_scale: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None,
                upcast: bool = False) -> torch.Tensor:
    """(a - a_bias)^T @ b (+ row_scale[:, None] * rows) as a new [m, n] tensor of `out_dtype`."""
    n_rows, m = a.shape
    n = b.shape[1]
    if b.shape[0] != n_rows:
        raise ValueError(f"weight_grad: a has {n_rows} rows but b has {b.shape[0]}")
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    dummy = out  # never read when its flag is off
    grid = grid_1d(m, n)
    _weight_grad_kernel[grid](
        a, a_bias if a_bias is not None else dummy, b,
        row_scale if row_scale is not None else dummy, rows if rows is not None else dummy,
        out, n_rows, m, n,
        SUB_BIAS=a_bias is not None, ADD_ROWS=row_scale is not None, UPCAST=upcast,
        GROUP=GROUP_M, **launch_meta(),
    )
    return out
