"""Fused decoder: feats @ w_dec + b_dec, with the squared error against x in the epilogue.

Forward (`_decode_kernel`): one [BLOCK_M, BLOCK_N] tile of x_hat per program; the epilogue
adds b_dec, stores x_hat and adds the tile's squared error against x into one float32
scalar, so the error is never materialised in the forward pass.

Backward: d_w_dec = feats^T @ g (+ the April-2024 L1's pull along each decoder row,
folded into the same kernel's epilogue, see `wgrad.py`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import GROUP_M, autotune, block_sum, gemm_configs, gemm_tile, grid_1d, launch_meta, tile_offsets
from .wgrad import weight_grad


@autotune(gemm_configs(), key=["n_rows", "d_sae", "d_in"], reset_to_zero=["sq_err_ptr"])
@triton.jit
def _decode_kernel(
    feats_ptr,  # [B, F]
    w_dec_ptr,  # [F, D]
    b_dec_ptr,  # [D]
    x_ptr,  # [B, D]
    x_hat_ptr,  # [B, D] written
    sq_err_ptr,  # [1] float32, added to: sum of (x_hat - x)^2
    n_rows, d_sae, d_in,
    UPCAST: tl.constexpr,  # multiply in float32 (the interpreter's bf16 dot is wrong)
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    o_m, o_n, m_m, m_n = tile_offsets(n_rows, d_in, BLOCK_M, BLOCK_N, GROUP)
    # feats @ w_dec, both row-major.
    acc = gemm_tile(feats_ptr, w_dec_ptr, feats_ptr, o_m, o_n, m_m, m_n, d_sae,
                    stride_am=d_sae, stride_ak=1, stride_bk=d_in, stride_bn=1, BIAS=None, UPCAST=UPCAST,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    m_out = m_m[:, None] & m_n[None, :]
    acc += tl.load(b_dec_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    b_xh = acc.to(x_hat_ptr.dtype.element_ty)
    tl.store(x_hat_ptr + o_m[:, None] * d_in + o_n[None, :], b_xh, mask=m_out)
    b_x = tl.load(x_ptr + o_m[:, None] * d_in + o_n[None, :], mask=m_out, other=0.0)
    b_e = tl.where(m_out, b_xh.to(tl.float32) - b_x.to(tl.float32), 0.0)
    tl.atomic_add(sq_err_ptr, block_sum(block_sum(b_e * b_e, 1), 0))


class DecodeOut(NamedTuple):
    """The fused decoder's results (see `reference.DecodeOut`)."""

    x_hat: torch.Tensor
    """[B, D] reconstruction."""
    sq_err: torch.Tensor
    """Scalar float32 sum of squared errors."""


def decode_forward(feats: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor, x: torch.Tensor,
                   upcast: bool = False) -> DecodeOut:
    n_rows, d_sae = feats.shape
    d_in = w_dec.shape[1]
    x_hat = torch.empty((n_rows, d_in), dtype=x.dtype, device=x.device)
    sq_err = torch.zeros(1, dtype=torch.float32, device=x.device)
    grid = grid_1d(n_rows, d_in)
    _decode_kernel[grid](
        feats, w_dec, b_dec, x, x_hat, sq_err, n_rows, d_sae, d_in,
        UPCAST=upcast, GROUP=GROUP_M, **launch_meta(),
    )
    return DecodeOut(x_hat, sq_err[0])


def decode_backward(feats: torch.Tensor, w_dec: torch.Tensor, g: torch.Tensor,
                    row_scale: Optional[torch.Tensor] = None, upcast: bool = False) -> torch.Tensor:
    """d_w_dec [F, D] = feats^T @ g (+ row_scale[:, None] * w_dec)."""
    return weight_grad(feats, g, w_dec.dtype, row_scale=row_scale,
                       rows=w_dec if row_scale is not None else None, upcast=upcast)
