"""Fused encoder: (x - b_dec) @ w_enc + b_enc -> ReLU, with the L1 / L0 / firing statistics.

Forward (`_encode_kernel`): one [BLOCK_M, BLOCK_N] tile of the pre-activations per
program. The decoder bias is subtracted as each block of x is loaded, and the epilogue
adds b_enc, applies the ReLU, stores the features and adds the tile's per-feature column
sums and firing counts into two [F] vectors, so the [B, F] features are never read back
for statistics. TopK cannot finish inside a tile (it needs the whole row), so for it the
kernel stores the pre-activations and the launcher selects with `select.top_k`.

Backward (`_encode_grad_kernel`): d_pre = (g @ w_dec^T + g_l1 * w / B + g_feats) masked
where the feature fired, one tile per program, with d_b_enc's column sums in the epilogue.
It reads g (the gradient of x_hat) and w_dec, so the decoder's input gradient is never
stored: it is consumed in registers by the ReLU mask.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..select import top_k
from .common import GROUP_M, autotune, block_sum, gemm_configs, gemm_tile, grid_1d, launch_meta, tile_offsets
from .wgrad import weight_grad


@autotune(gemm_configs(small_k=True), key=["n_rows", "d_in", "d_sae"],
          reset_to_zero=["col_sum_ptr", "fired_ptr"])
@triton.jit
def _encode_kernel(
    x_ptr,  # [B, D]
    b_dec_ptr,  # [D]
    w_enc_ptr,  # [D, F]
    b_enc_ptr,  # [F]
    feats_ptr,  # [B, F] written: ReLU(pre), or pre itself when not RELU
    col_sum_ptr,  # [F] float32, added to: sum over the batch of feats (when RELU)
    fired_ptr,  # [F] int32, added to: rows of the batch where feats > 0 (when RELU)
    n_rows, d_in, d_sae,
    RELU: tl.constexpr,
    UPCAST: tl.constexpr,  # multiply in float32 (the interpreter's bf16 dot is wrong)
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    o_m, o_n, m_m, m_n = tile_offsets(n_rows, d_sae, BLOCK_M, BLOCK_N, GROUP)
    # (x - b_dec) @ w_enc, both row-major.
    acc = gemm_tile(x_ptr, w_enc_ptr, b_dec_ptr, o_m, o_n, m_m, m_n, d_in,
                    stride_am=d_in, stride_ak=1, stride_bk=d_sae, stride_bn=1, BIAS="k", UPCAST=UPCAST,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    m_out = m_m[:, None] & m_n[None, :]
    b_pre = acc + tl.load(b_enc_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    if RELU:
        b_f = tl.maximum(b_pre, 0.0).to(feats_ptr.dtype.element_ty)
        # Statistics of the stored (rounded) values, so they agree with what backward reads;
        # padded rows would fire on b_enc alone and are masked out.
        b_live = tl.where(m_out, b_f.to(tl.float32), 0.0)
        tl.atomic_add(col_sum_ptr + o_n, block_sum(b_live, 0), mask=m_n)
        tl.atomic_add(fired_ptr + o_n, block_sum((b_live > 0).to(tl.int32), 0), mask=m_n)
    else:
        b_f = b_pre.to(feats_ptr.dtype.element_ty)
    tl.store(feats_ptr + o_m[:, None] * d_sae + o_n[None, :], b_f, mask=m_out)


@autotune(gemm_configs(small_k=True), key=["n_rows", "d_in", "d_sae"], reset_to_zero=["d_b_enc_ptr"])
@triton.jit
def _encode_grad_kernel(
    g_ptr,  # [B, D] gradient of x_hat
    w_dec_ptr,  # [F, D]
    feats_ptr,  # [B, F]
    l1_w_ptr,  # [F] float32: g_l1 * w / B, the L1 term's gradient per feature
    g_feats_ptr,  # [B, F] upstream gradient of feats (when HAS_G_FEATS)
    d_pre_ptr,  # [B, F] written
    d_b_enc_ptr,  # [F] float32, added to: column sums of d_pre
    n_rows, d_in, d_sae,
    HAS_G_FEATS: tl.constexpr,
    UPCAST: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    o_m, o_n, m_m, m_n = tile_offsets(n_rows, d_sae, BLOCK_M, BLOCK_N, GROUP)
    # g @ w_dec^T: the [D, F] transpose read in place, across the rows of w_dec.
    acc = gemm_tile(g_ptr, w_dec_ptr, g_ptr, o_m, o_n, m_m, m_n, d_in,
                    stride_am=d_in, stride_ak=1, stride_bk=1, stride_bn=d_in, BIAS=None, UPCAST=UPCAST,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    m_out = m_m[:, None] & m_n[None, :]
    acc += tl.load(l1_w_ptr + o_n, mask=m_n, other=0.0)[None, :]
    if HAS_G_FEATS:
        acc += tl.load(g_feats_ptr + o_m[:, None] * d_sae + o_n[None, :], mask=m_out, other=0.0).to(tl.float32)
    b_f = tl.load(feats_ptr + o_m[:, None] * d_sae + o_n[None, :], mask=m_out, other=0.0)
    b_d = tl.where(b_f > 0, acc, 0.0).to(d_pre_ptr.dtype.element_ty)
    tl.store(d_pre_ptr + o_m[:, None] * d_sae + o_n[None, :], b_d, mask=m_out)
    tl.atomic_add(d_b_enc_ptr + o_n, block_sum(b_d.to(tl.float32), 0), mask=m_n)


class EncodeOut(NamedTuple):
    """The fused encoder's results (see `reference.EncodeOut`)."""

    feats: torch.Tensor
    """[B, F] features."""
    col_sum: torch.Tensor
    """[F] float32 column sums of feats."""
    fired: torch.Tensor
    """[F] int32 firing counts."""


def encode_forward(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                   k: Optional[int] = None, upcast: bool = False) -> EncodeOut:
    n_rows, d_in = x.shape
    d_sae = w_enc.shape[1]
    feats = torch.empty((n_rows, d_sae), dtype=x.dtype, device=x.device)
    col_sum = torch.zeros(d_sae, dtype=torch.float32, device=x.device)
    fired = torch.zeros(d_sae, dtype=torch.int32, device=x.device)
    grid = grid_1d(n_rows, d_sae)
    _encode_kernel[grid](
        x, b_dec, w_enc, b_enc, feats, col_sum, fired, n_rows, d_in, d_sae,
        RELU=k is None, UPCAST=upcast, GROUP=GROUP_M, **launch_meta(),
    )
    if k is not None:
        # The k-th largest value of a row is unknown to any one tile, so select here and
        # rebuild the dense features in the pre-activation buffer.
        values, indices = top_k(feats, k)
        values = torch.relu(values)
        feats.zero_().scatter_(1, indices, values)
        live = values > 0
        col_sum.index_add_(0, indices.flatten(), values.flatten().float())
        fired.index_add_(0, indices[live], torch.ones_like(indices[live], dtype=torch.int32))
    return EncodeOut(feats, col_sum, fired)


class EncodeGrads(NamedTuple):
    """Gradients of the encoder's inputs."""

    d_pre: torch.Tensor
    """[B, F] gradient of the pre-activations (kept for the optional x gradient)."""
    w_enc: torch.Tensor
    """[D, F]"""
    b_enc: torch.Tensor
    """[F] float32"""
    b_dec: torch.Tensor
    """[D] float32, the encoder's share only: -(column sums of d_pre) @ w_enc^T."""


def encode_backward(x: torch.Tensor, w_enc: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor,
                    feats: torch.Tensor, g: torch.Tensor, l1_w: torch.Tensor,
                    g_feats: Optional[torch.Tensor] = None, upcast: bool = False) -> EncodeGrads:
    """Gradients through the encoder, given g = d loss / d x_hat and l1_w = g_l1 * w / B."""
    n_rows, d_in = x.shape
    d_sae = w_enc.shape[1]
    d_pre = torch.empty_like(feats)
    d_b_enc = torch.zeros(d_sae, dtype=torch.float32, device=x.device)
    grid = grid_1d(n_rows, d_sae)
    _encode_grad_kernel[grid](
        g, w_dec, feats, l1_w, g_feats if g_feats is not None else feats, d_pre, d_b_enc,
        n_rows, d_in, d_sae,
        HAS_G_FEATS=g_feats is not None, UPCAST=upcast, GROUP=GROUP_M, **launch_meta(),
    )
    d_w_enc = weight_grad(x, d_pre, w_enc.dtype, a_bias=b_dec, upcast=upcast)
    # The column sums of d_pre @ w_enc^T without the [B, D] product (the sixth one).
    d_b_dec = -(d_b_enc @ w_enc.T.float())
    return EncodeGrads(d_pre, d_w_enc, d_b_enc, d_b_dec)
