"""The SAE step on Apple MPS: MPS matrix products with the Metal epilogues of `sae.metal`.

Layers as for Triton: the shader library (compiled once, lazily), host launchers that
check, allocate and launch (`encode_forward`, `decode_forward`, `encode_backward`,
`decode_backward`), and the autograd function. The algebra is `reference.py`'s, five large
products per step; the epilogues replace the eager [B, F] passes (bias, ReLU, statistics,
mask) with one pass each.

Not yet verified on Apple hardware: the tests run it wherever MPS is available, and run
these launchers here on the CPU against an emulation of the shaders (tests/kernels/test_metal.py).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any, NamedTuple, Optional

import torch

from ..reference import StepOut, l1_weights, norm_pull

ROWS = 64
"""Rows per thread in the column reductions; must match `ROWS` in sae.metal."""

_SUFFIX = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}


@functools.lru_cache(maxsize=1)
def library() -> Any:
    """The compiled shader library (compiled on first use, a fraction of a second)."""
    source = resources.files(__package__).joinpath("sae.metal").read_text(encoding="utf-8")
    return torch.mps.compile_shader(source)


def _kernel(name: str, dtype: torch.dtype) -> Any:
    return getattr(library(), f"{name}_{_SUFFIX[dtype]}")


def _chunks(n_rows: int) -> int:
    return (n_rows + ROWS - 1) // ROWS


def check_inputs(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor,
                 b_dec: torch.Tensor, k: Optional[int]) -> None:
    """Raise ValueError naming the problem when the Metal step cannot take these inputs."""
    tensors = (x, w_enc, b_enc, w_dec, b_dec)
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, d_in], got shape {tuple(x.shape)}")
    d_in, d_sae = x.shape[1], w_enc.shape[-1]
    shapes = [tuple(t.shape) for t in tensors[1:]]
    if shapes != [(d_in, d_sae), (d_sae,), (d_sae, d_in), (d_in,)]:
        raise ValueError(f"parameter shapes {shapes} do not fit x of shape {tuple(x.shape)}: expected "
                         f"w_enc (d_in, d_sae), b_enc (d_sae,), w_dec (d_sae, d_in), b_dec (d_in,)")
    if len({t.dtype for t in tensors}) != 1 or x.dtype not in _SUFFIX:
        raise ValueError("the Metal SAE step needs x and every parameter in one of float32, float16 or "
                         f"bfloat16; got {[str(t.dtype) for t in tensors]}")
    if any(t.device.type != "mps" for t in tensors):
        raise ValueError(f"the Metal kernels run on MPS tensors; got {sorted({str(t.device) for t in tensors})}")
    if k is not None and not 1 <= k <= d_sae:
        raise ValueError(f"k must be between 1 and d_sae={d_sae}, got {k}")


class EncodeOut(NamedTuple):
    feats: torch.Tensor
    """[B, F] features."""
    col_sum: torch.Tensor
    """[F] float32 column sums."""
    fired: torch.Tensor
    """[F] int32 firing counts."""


def encode_forward(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                   k: Optional[int] = None) -> EncodeOut:
    n_rows, d_sae = x.shape[0], w_enc.shape[1]
    feats = torch.mm(x - b_dec, w_enc)  # [B, F] pre-activations; the epilogue adds b_enc in place
    col_sum = torch.empty((_chunks(n_rows), d_sae), dtype=torch.float32, device=x.device)
    fired = torch.empty((_chunks(n_rows), d_sae), dtype=torch.int32, device=x.device)
    _kernel("encode_epilogue", x.dtype)(feats, b_enc, col_sum, fired, n_rows, d_sae, int(k is None),
                                        threads=(d_sae, _chunks(n_rows)))
    col_sum, fired = col_sum.sum(0), fired.sum(0, dtype=torch.int32)
    if k is not None:
        # As in the Triton launcher: the epilogue only added the bias; select whole rows here.
        values, indices = torch.topk(feats, k, dim=1, sorted=False)
        values = torch.relu(values)
        feats.zero_().scatter_(1, indices, values)
        col_sum = feats.float().sum(0)
        fired = (feats > 0).sum(0, dtype=torch.int32)
    return EncodeOut(feats, col_sum, fired)


def decode_forward(feats: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor,
                   x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat [B, D], scalar float32 sum of squared errors)."""
    n_rows, d_in = x.shape
    x_hat = torch.addmm(b_dec, feats, w_dec)  # [B, D]
    rows = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    _kernel("sq_err_rows", x.dtype)(x_hat, x, rows, n_rows, d_in, threads=(n_rows,))
    return x_hat, rows.sum()


def encode_backward(x: torch.Tensor, w_enc: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor,
                    feats: torch.Tensor, g: torch.Tensor, l1_w: torch.Tensor,
                    g_feats: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """(d_pre, d_w_enc, d_b_enc float32, the encoder's share of d_b_dec float32)."""
    n_rows, d_sae = feats.shape
    d_pre = torch.mm(g, w_dec.T)  # [B, F]
    if g_feats is not None:
        d_pre.add_(g_feats)
    d_b_enc = torch.empty((_chunks(n_rows), d_sae), dtype=torch.float32, device=x.device)
    _kernel("encode_grad_epilogue", feats.dtype)(d_pre, feats, l1_w.float().contiguous(), d_b_enc,
                                                 n_rows, d_sae, threads=(d_sae, _chunks(n_rows)))
    d_b_enc = d_b_enc.sum(0)
    d_w_enc = torch.mm((x - b_dec).T, d_pre)  # [D, F]
    return d_pre, d_w_enc, d_b_enc, -(w_enc.float() @ d_b_enc)


def decode_backward(feats: torch.Tensor, w_dec: torch.Tensor, g: torch.Tensor,
                    row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d_w_dec [F, D] = feats^T @ g (+ row_scale[:, None] * w_dec)."""
    d_w_dec = torch.mm(feats.T, g)
    if row_scale is not None:
        d_w_dec.addcmul_(row_scale[:, None].to(w_dec.dtype), w_dec)
    return d_w_dec


class MetalStep(torch.autograd.Function):
    """Forward: product + encode epilogue, product + squared error. Backward: five products."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, w_dec, b_dec, k, dec_norm):
        check_inputs(x, w_enc, b_enc, w_dec, b_dec, k)
        x, w_enc, b_enc, w_dec, b_dec = (t.contiguous() for t in (x, w_enc, b_enc, w_dec, b_dec))
        n_rows = x.shape[0]
        enc = encode_forward(x, w_enc, b_enc, b_dec, k)
        x_hat, sq_err = decode_forward(enc.feats, w_dec, b_dec, x)
        w = l1_weights(w_dec, dec_norm)  # [F] float32
        l1 = enc.col_sum @ w / n_rows
        l0 = enc.fired.sum().float() / n_rows
        ctx.save_for_backward(x, w_enc, w_dec, b_dec, x_hat, enc.feats, enc.col_sum, w)
        ctx.dec_norm = dec_norm
        ctx.mark_non_differentiable(l0, enc.fired)
        ctx.set_materialize_grads(False)
        return x_hat, enc.feats, sq_err / n_rows, l1, l0, enc.fired

    @staticmethod
    def backward(ctx, g_x_hat, g_feats, g_mse, g_l1, _g_l0, _g_fired):
        x, w_enc, w_dec, b_dec, x_hat, feats, col_sum, w = ctx.saved_tensors
        n_rows = x.shape[0]
        err = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if g_mse is not None:
            err = (x_hat.float() - x.float()) * (2.0 * g_mse.float() / n_rows)  # [B, D]
        g32 = err if g_x_hat is None else err + g_x_hat.float()
        g = g32.to(x.dtype)
        l1_w = g_l1.float() * w / n_rows if g_l1 is not None else torch.zeros_like(w)
        d_pre, d_w_enc, d_b_enc, d_b_dec_enc = encode_backward(
            x, w_enc, w_dec, b_dec, feats, g, l1_w, g_feats.contiguous() if g_feats is not None else None)
        row_scale = None
        if ctx.dec_norm and g_l1 is not None:
            row_scale = norm_pull(g_l1, col_sum, w, n_rows)
        d_w_dec = decode_backward(feats, w_dec, g, row_scale)
        d_b_dec = g32.sum(0) + d_b_dec_enc
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = (d_pre.float() @ w_enc.T.float() - err).to(x.dtype)
        return d_x, d_w_enc, d_b_enc.to(x.dtype), d_w_dec, d_b_dec.to(x.dtype), None, None


def sae_step(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor,
             b_dec: torch.Tensor, k: Optional[int] = None, dec_norm: bool = False) -> StepOut:
    """The SAE step on MPS (contract in `reference.py`)."""
    return StepOut(*MetalStep.apply(x, w_enc, b_enc, w_dec, b_dec, k, dec_norm))
