"""The eager PyTorch oracle of the fused sparse-autoencoder step, forward and backward.

Every backend (`eager.py` on the CPU, `triton/` on CUDA, `metal/` on MPS) implements the
contract below and is tested against these functions. They are written for clarity, not
speed: one line per equation, in the inputs' dtype, sums in at least float32.

Layout (SAELens names and shapes):

    x      [B, D]   input activations
    w_enc  [D, F]   encoder      b_enc [F]
    w_dec  [F, D]   decoder      b_dec [D]

Forward:

    pre    = (x - b_dec) @ w_enc + b_enc                      [B, F]
    feats  = relu(pre)             or   relu(top-k of pre per row, zero elsewhere)
    x_hat  = feats @ w_dec + b_dec                            [B, D]
    mse    = sum((x_hat - x)^2) / B     squared error summed over D, mean over the batch
    l1     = sum(feats * w) / B         w = 1, or the decoder row norms |w_dec[i]| (April 2024)
    l0     = count(feats > 0) / B
    fired  = count over the batch of feats > 0, per feature   [F]

The L1, L0 and firing counts need only two per-feature column reductions of `feats`
(`col_sum`, `fired`), which is what the fused kernels compute in the encoder epilogue.

Backward, with upstream gradients g_x_hat [B, D], g_feats [B, F], g_mse and g_l1 (scalars):

    err    = g_mse * 2 (x_hat - x) / B                        [B, D]
    g      = err + g_x_hat                                    [B, D]   d loss / d x_hat
    d_wdec = feats^T @ g   (+ the L1 term's pull on the row norms)       product 1
    d_pre  = (g @ w_dec^T + g_l1 * w / B + g_feats) * [feats > 0]        product 2
    d_wenc = (x - b_dec)^T @ d_pre                                       product 3
    d_benc = column sums of d_pre
    d_bdec = column sums of g - d_benc @ w_enc^T

With the two forward products that is five large matrix products per step. The sixth,
d_pre @ w_enc^T (the gradient of the centred input), is needed only for its column sums
when x itself needs no gradient, and a column sum of a product is the product of the
column sums: a [F] x [F, D] vector-matrix product instead of a [B, F] x [F, D] one.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class EncodeOut(NamedTuple):
    """What the fused encoder returns."""

    feats: Tensor
    """[B, F] feature activations after ReLU (and top-k)."""
    col_sum: Tensor
    """[F] float32 (float64 for float64 inputs): sum of `feats` over the batch (gives L1, and
    the decoder-norm gradient)."""
    fired: Tensor
    """[F] int32: how many rows of the batch fire each feature (gives L0, and dead features)."""


class DecodeOut(NamedTuple):
    """What the fused decoder returns."""

    x_hat: Tensor
    """[B, D] reconstruction."""
    sq_err: Tensor
    """Scalar float32 (float64 for float64 inputs): sum over the batch and D of (x_hat - x)^2."""


class StepOut(NamedTuple):
    """One forward pass of the SAE step; `mse` and `l1` carry gradients, the rest are statistics.

    The training loss is `mse + l1_coeff * l1` (plus any auxiliary term).
    """

    x_hat: Tensor
    """[B, D] reconstruction (differentiable)."""
    feats: Tensor
    """[B, F] feature activations (differentiable)."""
    mse: Tensor
    """Scalar: squared error summed over D, averaged over the batch (differentiable)."""
    l1: Tensor
    """Scalar: sum of feats (times decoder row norms when weighted), averaged over the batch
    (differentiable)."""
    l0: Tensor
    """Scalar: mean number of firing features per row (no gradient)."""
    fired: Tensor
    """[F] int32: per-feature firing counts over the batch (no gradient)."""


class StepGrads(NamedTuple):
    """Gradients of the step's inputs; None where not requested."""

    x: Optional[Tensor]
    w_enc: Tensor
    b_enc: Tensor
    w_dec: Tensor
    b_dec: Tensor


def _acc(t: Tensor) -> Tensor:
    """`t` in its accumulation dtype: float32, or float64 when it already is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def l1_weights(w_dec: Tensor, dec_norm: bool) -> Tensor:
    """[F] per-feature L1 weights: the decoder row norms, or ones."""
    if dec_norm:
        return torch.linalg.vector_norm(_acc(w_dec), dim=1)
    return torch.ones(w_dec.shape[0], dtype=_acc(w_dec).dtype, device=w_dec.device)


def penalties(col_sum: Tensor, fired: Tensor, w_dec: Tensor, dec_norm: bool,
              n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(w, l1, l0) of a batch of `n_rows` from its per-feature column sums and firing
    counts: the L1 weights [F], the L1 term and the mean firing count per row."""
    w = l1_weights(w_dec, dec_norm).to(col_sum.dtype)
    return w, col_sum @ w / n_rows, fired.sum().to(col_sum.dtype) / n_rows


def norm_pull(g_l1: Tensor, col_sum: Tensor, w: Tensor, n_rows: int) -> Tensor:
    """[F] per-row scale of the decoder-norm L1's gradient on the decoder:
    d (col_sum . |w_dec[i]|) / d w_dec[i] = col_sum[i] * w_dec[i] / |w_dec[i]|, over the batch,
    times the upstream g_l1; a zero row has no direction and gets 0."""
    return torch.where(w > 0, g_l1.to(col_sum.dtype) * col_sum / n_rows / w.clamp_min(1e-30), 0.0)


def top_k(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [B, k]: each row's k largest pre-activations, ties broken toward the
    lower feature index, NaN above every number (the first k of a stable descending sort),
    indices increasing. Every backend keeps exactly these (`monofast.kernels.select`)."""
    indices = torch.sort(pre, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
    return pre.gather(1, indices), indices


def activate(pre: Tensor, k: Optional[int]) -> Tensor:
    """ReLU, or ReLU of the k largest pre-activations of each row (`top_k`) with the rest
    set to zero."""
    if k is None:
        return torch.relu(pre)
    values, indices = top_k(pre, k)
    return torch.zeros_like(pre).scatter_(1, indices, torch.relu(values))


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """BatchTopK (Bussmann et al. 2024): ReLU, then keep the k x B largest activations of the
    whole batch pre [B, F] and zero the rest, so a row may keep more or fewer than k.

    Ties at the cut are broken by position (earlier rows, then lower features, first), so the
    result is the same on every run and every device; no host-device sync.
    """
    acts = torch.relu(pre)  # [B, F]
    flat = acts.reshape(-1)  # [B * F]
    n = min(k * pre.shape[0], flat.numel())
    cut = torch.topk(flat, n, sorted=False).values.min()  # the n-th largest activation
    above = flat > cut
    tied = flat == cut
    keep = above | (tied & (torch.cumsum(tied, 0) <= n - above.sum()))  # [B * F]
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(pre)


def jump_relu(pre: Tensor, threshold: Tensor) -> Tensor:
    """JumpReLU: pre where it exceeds `threshold` [F] (and 0), zero elsewhere; BatchTopK's
    inference rule, with the threshold estimated in training."""
    return torch.where(pre > threshold.clamp_min(0), pre, torch.zeros_like(pre))


def encode(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: Optional[int] = None) -> EncodeOut:
    pre = (x - b_dec) @ w_enc + b_enc  # [B, F]
    feats = activate(pre, k)
    col_sum = _acc(feats).sum(0)
    fired = (feats > 0).sum(0, dtype=torch.int32)
    return EncodeOut(feats, col_sum, fired)


def decode(feats: Tensor, w_dec: Tensor, b_dec: Tensor, x: Tensor) -> DecodeOut:
    x_hat = feats @ w_dec + b_dec  # [B, D]
    sq_err = (_acc(x_hat) - _acc(x)).square().sum()
    return DecodeOut(x_hat, sq_err)


def step_forward(x: Tensor, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, b_dec: Tensor,
                 k: Optional[int] = None, dec_norm: bool = False) -> StepOut:
    """The forward pass as the composition of the fused encoder and decoder."""
    batch = x.shape[0]
    enc = encode(x, w_enc, b_enc, b_dec, k)
    dec = decode(enc.feats, w_dec, b_dec, x)
    _, l1, l0 = penalties(enc.col_sum, enc.fired, w_dec, dec_norm, batch)
    return StepOut(dec.x_hat, enc.feats, dec.sq_err / batch, l1, l0, enc.fired)


def step_backward(x: Tensor, w_enc: Tensor, w_dec: Tensor, b_dec: Tensor, out: StepOut,
                  g_x_hat: Optional[Tensor], g_feats: Optional[Tensor], g_mse: Tensor, g_l1: Tensor,
                  dec_norm: bool = False, need_x: bool = False) -> StepGrads:
    """Every input gradient by the five-product algebra in the module docstring."""
    batch = x.shape[0]
    feats = out.feats
    g = (out.x_hat - x) * (2.0 * g_mse / batch)  # [B, D]
    err = g
    if g_x_hat is not None:
        g = g + g_x_hat
    w = l1_weights(w_dec, dec_norm).to(feats.dtype)  # [F]
    d_w_dec = feats.T @ g  # [F, D]
    if dec_norm:
        # d l1 / d w_dec[i] = col_sum[i] / B * w_dec[i] / |w_dec[i]|; a zero row has no direction.
        col_sum = _acc(feats).sum(0).to(feats.dtype)
        unit = torch.where(w[:, None] > 0, w_dec / w.clamp_min(1e-30)[:, None], torch.zeros_like(w_dec))
        d_w_dec = d_w_dec + (g_l1 * col_sum / batch)[:, None] * unit
    d_feats = g @ w_dec.T + g_l1 * w / batch  # [B, F]
    if g_feats is not None:
        d_feats = d_feats + g_feats
    d_pre = d_feats * (feats > 0)  # [B, F]
    d_w_enc = (x - b_dec).T @ d_pre  # [D, F]
    d_b_enc = d_pre.sum(0)  # [F]
    d_b_dec = g.sum(0) - d_b_enc @ w_enc.T  # [D]
    d_x = d_pre @ w_enc.T - err if need_x else None  # [B, D], the sixth product
    return StepGrads(d_x, d_w_enc, d_b_enc, d_w_dec, d_b_dec)


class ReferenceStep(torch.autograd.Function):
    """The reference step as an autograd function: forward and the hand-written backward."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, w_dec, b_dec, k, dec_norm):
        out = step_forward(x, w_enc, b_enc, w_dec, b_dec, k, dec_norm)
        ctx.save_for_backward(x, w_enc, w_dec, b_dec, out.x_hat, out.feats)
        ctx.k, ctx.dec_norm = k, dec_norm
        ctx.mark_non_differentiable(out.l0, out.fired)
        return tuple(out)

    @staticmethod
    def backward(ctx, g_x_hat, g_feats, g_mse, g_l1, _g_l0, _g_fired):
        x, w_enc, w_dec, b_dec, x_hat, feats = ctx.saved_tensors
        out = StepOut(x_hat, feats, None, None, None, None)  # type: ignore[arg-type]
        grads = step_backward(x, w_enc, w_dec, b_dec, out, g_x_hat, g_feats, g_mse, g_l1,
                              ctx.dec_norm, need_x=ctx.needs_input_grad[0])
        return grads.x, grads.w_enc, grads.b_enc, grads.w_dec, grads.b_dec, None, None


def sae_step(x: Tensor, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, b_dec: Tensor,
             k: Optional[int] = None, dec_norm: bool = False) -> StepOut:
    """The SAE step with the hand-written backward (the oracle every backend is tested against)."""
    return StepOut(*ReferenceStep.apply(x, w_enc, b_enc, w_dec, b_dec, k, dec_norm))


def naive_loss_terms(x: Tensor, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, b_dec: Tensor,
                     k: Optional[int] = None, dec_norm: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_hat, feats, mse, l1) written the obvious way, for autograd to differentiate.

    Used only to check `step_backward` against torch's own differentiation.
    """
    feats = activate((x - b_dec) @ w_enc + b_enc, k)
    x_hat = feats @ w_dec + b_dec
    mse = (x_hat - x).square().sum(1).mean()
    w = torch.linalg.vector_norm(w_dec, dim=1) if dec_norm else torch.ones_like(b_enc)
    l1 = (feats * w).sum(1).mean()
    return x_hat, feats, mse, l1
