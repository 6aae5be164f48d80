"""The SAE step on Triton: checks, the autograd function, and `sae_step`.

Forward is two fused kernels (encode, decode); backward is two products fused with their
epilogues (`_encode_grad_kernel`, whose output feeds d_w_enc) plus d_w_dec, five large
products in all, as in `reference.py`. Everything else is [F]- or [D]-sized.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import StepOut, norm_pull, penalties
from .common import interpreting
from .decode import decode_backward, decode_forward
from .encode import encode_backward, encode_forward

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor,
                 b_dec: torch.Tensor, k: Optional[int]) -> None:
    """Raise ValueError naming the problem when the kernels cannot take these inputs."""
    tensors = {"x": x, "w_enc": w_enc, "b_enc": b_enc, "w_dec": w_dec, "b_dec": b_dec}
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, d_in], got shape {tuple(x.shape)}")
    n_rows, d_in = x.shape
    d_sae = w_enc.shape[-1]
    expected = {"w_enc": (d_in, d_sae), "b_enc": (d_sae,), "w_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                             f"for x of shape {tuple(x.shape)} and d_sae {d_sae}")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or x.dtype not in DTYPES:
        raise ValueError(f"the Triton SAE step needs x and every parameter in one of float32, float16 "
                         f"or bfloat16; got {', '.join(f'{n}={t.dtype}' for n, t in tensors.items())}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"x and the parameters are on different devices: {sorted(map(str, devices))}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton kernels run on CUDA devices (or with TRITON_INTERPRET=1); "
                         f"got tensors on {x.device}")
    if max(n_rows, d_in) * d_sae >= 2**31:
        raise ValueError(f"batch {n_rows} x d_sae {d_sae} overflows the kernels' 32-bit offsets; "
                         f"use a smaller batch")
    if k is not None and not 1 <= k <= d_sae:
        raise ValueError(f"k must be between 1 and d_sae={d_sae}, got {k}")


def prepared(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor,
             k: Optional[int]) -> tuple[tuple[torch.Tensor, ...], bool]:
    """The checked inputs made contiguous, and whether bfloat16 must be upcast (the
    interpreter's dot products take no bfloat16)."""
    check_inputs(x, w_enc, b_enc, w_dec, b_dec, k)
    tensors = tuple(t.contiguous() for t in (x, w_enc, b_enc, w_dec, b_dec))
    return tensors, interpreting() and x.dtype == torch.bfloat16


class TritonStep(torch.autograd.Function):
    """Forward: encode + decode kernels. Backward: the five-product gradients."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, w_dec, b_dec, k, dec_norm):
        (x, w_enc, b_enc, w_dec, b_dec), upcast = prepared(x, w_enc, b_enc, w_dec, b_dec, k)
        n_rows = x.shape[0]
        enc = encode_forward(x, w_enc, b_enc, b_dec, k, upcast)
        dec = decode_forward(enc.feats, w_dec, b_dec, x, upcast)
        w, l1, l0 = penalties(enc.col_sum, enc.fired, w_dec, dec_norm, n_rows)  # w [F] float32
        ctx.save_for_backward(x, w_enc, w_dec, b_dec, dec.x_hat, enc.feats, enc.col_sum, w)
        ctx.dec_norm, ctx.upcast = dec_norm, upcast
        ctx.mark_non_differentiable(l0, enc.fired)
        ctx.set_materialize_grads(False)
        return dec.x_hat, enc.feats, dec.sq_err / n_rows, l1, l0, enc.fired

    @staticmethod
    def backward(ctx, g_x_hat, g_feats, g_mse, g_l1, _g_l0, _g_fired):
        x, w_enc, w_dec, b_dec, x_hat, feats, col_sum, w = ctx.saved_tensors
        n_rows = x.shape[0]
        if g_mse is not None:
            err = (x_hat.float() - x.float()) * (2.0 * g_mse.float() / n_rows)  # [B, D]
        else:
            err = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        g = err if g_x_hat is None else err + g_x_hat.float()
        g = g.to(x.dtype).contiguous()  # [B, D] d loss / d x_hat, in the products' dtype
        l1_w = (g_l1.float() * w / n_rows) if g_l1 is not None else torch.zeros_like(w)
        if g_feats is not None:
            g_feats = g_feats.contiguous()
        enc = encode_backward(x, w_enc, w_dec, b_dec, feats, g, l1_w, g_feats, ctx.upcast)
        row_scale = None
        if ctx.dec_norm and g_l1 is not None:
            row_scale = norm_pull(g_l1, col_sum, w, n_rows)
        d_w_dec = decode_backward(feats, w_dec, g, row_scale, ctx.upcast)
        d_b_dec = g.float().sum(0) + enc.b_dec
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = (enc.d_pre.float() @ w_enc.T.float() - err).to(x.dtype)
        return d_x, enc.w_enc, enc.b_enc.to(x.dtype), d_w_dec, d_b_dec.to(x.dtype), None, None


def sae_step(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor,
             b_dec: torch.Tensor, k: Optional[int] = None, dec_norm: bool = False) -> StepOut:
    """The fused SAE step (see `reference.py` for the contract)."""
    return StepOut(*TritonStep.apply(x, w_enc, b_enc, w_dec, b_dec, k, dec_norm))
