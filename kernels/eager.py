"""The SAE step in plain PyTorch, tuned for CPUs (the `torch` backend; runs on any device).

Same contract and algebra as `reference.py`, written for speed instead of clarity. The
products run in `compute_dtype` (bfloat16 on CPUs with AVX-512 BF16 or AMX) while the
parameters and their gradients stay in their own dtype (float32 master weights), and
every pass over a [B, F] tensor is either folded into a product or done by the fastest
single ATen kernel for the job. Measured on a 2-core Zen 4, B 2,048 x D 768 x F 1,536 in
bfloat16, one thread (a bfloat16 product of these shapes takes ~22 ms there):

- bias + ReLU after the encoder product, the decoder bias, and the L1 term added to the
  feature gradient all run inside oneDNN's product as its bias / post-op
  (`mkldnn._linear_pointwise`): free, against 0.7 ms for `add_` + 0.6 ms for `relu_`
  and ~1.5 ms for `addmm`'s bias (it copies the bias into the output first). Only in
  bfloat16: in float32 MKL's `addmm` is the faster product (`FUSED_LINEAR_DTYPES`);
- column sums as a vector-matrix product with ones: 0.13 ms, against 0.8 ms for
  `sum(0, dtype=float32)` (which first casts the whole [B, F] tensor) and, at F 4,096,
  3 ms for a plain `sum(0)`;
- firing counts from the bool tensor's bytes summed in blocks of 128 rows as uint8 (no
  widening copy): 0.33 ms, against 0.85 ms summing as int16, 1.4 ms for one int32 sum and
  6.3 ms for `count_nonzero` (1.3 ms against 3.7 ms for int16 at F 4,096);
- the ReLU mask of the gradient with `threshold_backward` in place: 0.6 ms, against
  ~7 ms for `d * (feats > 0)` (the comparison alone makes a bool tensor the slow way);
- no operation mixes dtypes in one pass (casting inside an arithmetic kernel is ~1.4x
  slower than a separate vectorised cast); the squared error is one dot product;
- TopK with k small against F decodes by gathering each row's k decoder rows
  (`embedding_bag`, weighted sum, no [B, k, D] copy) instead of the dense [B, F] x [F, D]
  product: B 2,048 x D 512, k 32, bfloat16, two threads: 1.0 ms against 11 ms at F 2,048,
  1.4 ms against 89 ms at F 16,384; 1.9x at F/k = 8, and even at F/k = 4
  (hence `GATHER_MIN_RATIO`).
  The backward keeps its dense products: gathered versions of them materialise [B*k, D]
  tensors and measured 1.5-4x slower below F 16,384.
"""

from __future__ import annotations

from typing import Optional

import torch

from .reference import StepOut, norm_pull, penalties
from .select import top_k

_relu_mask = torch.ops.aten.threshold_backward.grad_input

GATHER_MIN_RATIO = 8
"""TopK decodes by gathering k decoder rows per row when d_sae >= this x k (see above)."""

_FIRED_BLOCK = 128
"""Rows counted per uint8 block when counting firings (<= 255 keeps uint8 exact)."""


_fused_linear_refused: set[torch.dtype] = set()
"""Dtypes whose call oneDNN's private fused linear refused (a PyTorch that changed it, a CPU
without bf16 support): from then on their products run plain, slower by the bias and ReLU
passes but the same. Per dtype, so a bfloat16 refusal leaves float32 alone."""


FUSED_LINEAR_DTYPES = (torch.bfloat16,)
"""Dtypes whose CPU products take oneDNN's fused linear. In float32 MKL's `addmm` (+ `relu_`)
is faster: on a 2-core AVX2 EPYC, two threads, 1.08-1.88x over the step's three products at
four SAE shapes (B 2,048 x D 768 x F 3,072: the encoder's, its weight a transposed view,
54.5 against 102.6 ms; the decoder's 52.0 against 79.4). Where the fused linear was chosen
(Zen 4, bfloat16, above) its epilogue saved the ~2 ms of the bias and ReLU passes; float32
there is untimed (`benches/bench_sae.py` times `onednn-fp32` beside `monofast-fp32`)."""


def _fused_linear_ok(a: torch.Tensor) -> bool:
    """oneDNN's fused linear serves CPU products in `FUSED_LINEAR_DTYPES`."""
    return (a.device.type == "cpu" and a.dtype in FUSED_LINEAR_DTYPES and a.dtype not in _fused_linear_refused
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def linear(a: torch.Tensor, w_t: torch.Tensor, bias: Optional[torch.Tensor], relu: bool = False) -> torch.Tensor:
    """a @ w_t.T + bias, then ReLU when asked: one product with a fused epilogue on CPUs.

    a [M, K], w_t [N, K] (any strides: a transposed view reads as fast), bias [N] or None.
    """
    if _fused_linear_ok(a):
        try:
            return torch.ops.mkldnn._linear_pointwise(a, w_t, bias, "relu" if relu else "none", [], "")
        except (RuntimeError, TypeError):
            _fused_linear_refused.add(a.dtype)
    out = torch.mm(a, w_t.T) if bias is None else torch.addmm(bias, a, w_t.T)
    return out.relu_() if relu else out


def column_sums(t: torch.Tensor) -> torch.Tensor:
    """[N] float32 sums over the rows of t [M, N], as a vector-matrix product (see above)."""
    ones = torch.ones(t.shape[0], dtype=t.dtype, device=t.device)
    return torch.mv(t.T, ones).float()


def fired_counts(feats: torch.Tensor) -> torch.Tensor:
    """[F] int32: rows where feats > 0 (feats is non-negative), exact."""
    flags = feats.bool().view(torch.uint8)  # [B, F]
    n_rows, d_sae = flags.shape
    main = n_rows - n_rows % _FIRED_BLOCK
    counts = torch.zeros(d_sae, dtype=torch.int32, device=feats.device)
    if main:
        blocks = flags[:main].view(main // _FIRED_BLOCK, _FIRED_BLOCK, d_sae)
        counts += blocks.sum(1, dtype=torch.uint8).sum(0, dtype=torch.int32)
    if main < n_rows:
        counts += flags[main:].sum(0, dtype=torch.int32)
    return counts


def gather_decode(indices: torch.Tensor, values: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """[B, D] sum over j of values[b, j] * w_dec[indices[b, j]], plus b_dec: the decoder
    product when each row has only k non-zero features.

    indices [B, k] int64, values [B, k] (the kept activations, after ReLU), w_dec [F, D],
    b_dec [D], all but indices in one dtype.
    """
    return torch.nn.functional.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum").add_(b_dec)


def finish_forward(ctx, x: torch.Tensor, x_hat: torch.Tensor, col_sum: torch.Tensor, fired: torch.Tensor,
                   w_dec: torch.Tensor, dec_norm: bool, bias_dtypes: tuple[torch.dtype, torch.dtype]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tail the torch backend's dense (`EagerStep`) and sparse (`SparseStep`) forwards
    share. Returns (err, mse, w, l1, l0): the reconstruction error x_hat - x [B, D] (float32
    where x_hat's dtype differs from x's, else x's dtype), its square summed over D and
    averaged over the rows, and the penalties' (w, l1, l0). On `ctx` it sets `dtypes` and
    `dec_norm`, marks l0 and fired non-differentiable and turns off grad materialisation;
    saving the tensors is left to the caller."""
    n_rows = x.shape[0]
    err = x_hat - x if x_hat.dtype == x.dtype else x_hat.float().sub_(x)  # [B, D]
    flat = err.view(-1)
    mse = torch.dot(flat, flat) / n_rows
    w, l1, l0 = penalties(col_sum, fired, w_dec, dec_norm, n_rows)  # w [F]
    ctx.dtypes = (x.dtype, *bias_dtypes)
    ctx.dec_norm = dec_norm
    ctx.mark_non_differentiable(l0, fired)
    ctx.set_materialize_grads(False)
    return err, mse, w, l1, l0


class EagerStep(torch.autograd.Function):
    """Forward and the hand-written five-product backward in ATen operations."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, w_dec, b_dec, k, dec_norm, compute_dtype):
        dt = compute_dtype or x.dtype
        x_c = (x - b_dec).to(dt)  # [B, D]
        w_enc_c = w_enc.to(dt)  # [D, F]
        w_dec_c = w_dec.to(dt)  # [F, D]
        if k is None:
            feats = linear(x_c, w_enc_c.T, b_enc.to(dt), relu=True)  # [B, F]
        else:
            feats = linear(x_c, w_enc_c.T, b_enc.to(dt))  # [B, F] pre-activations
            values, indices = top_k(feats, k)
            feats.zero_().scatter_(1, indices, values.relu_())
        col_sum = column_sums(feats)  # [F]
        fired = fired_counts(feats)  # [F]
        if k is not None and k * GATHER_MIN_RATIO <= w_dec.shape[0]:
            x_hat = gather_decode(indices, values, w_dec_c, b_dec.to(dt))  # [B, D]
        else:
            x_hat = linear(feats, w_dec_c.T, b_dec.to(dt))  # [B, D]
        err, mse, w, l1, l0 = finish_forward(ctx, x, x_hat, col_sum, fired, w_dec, dec_norm,
                                             (b_enc.dtype, b_dec.dtype))  # w [F] float32
        ctx.save_for_backward(x_c, w_enc, w_dec, w_dec_c, w_enc_c, feats, err, col_sum, w)
        return x_hat, feats, mse, l1, l0, fired

    @staticmethod
    def backward(ctx, g_x_hat, g_feats, g_mse, g_l1, _g_l0, _g_fired):
        x_c, w_enc, w_dec, w_dec_c, w_enc_c, feats, err, col_sum, w = ctx.saved_tensors
        x_dtype, b_enc_dtype, b_dec_dtype = ctx.dtypes
        dt = feats.dtype
        n_rows = x_c.shape[0]
        # g = d loss / d x_hat [B, D]; err * scale is also the mse's direct pull on x.
        scale = 2.0 * g_mse / n_rows if g_mse is not None else torch.zeros((), device=err.device)
        if g_x_hat is None:
            g = (err * scale).to(dt)
            g_sum = err.sum(0) * scale  # [D]
        else:
            g32 = err * scale + g_x_hat.float()
            g, g_sum = g32.to(dt), g32.sum(0)

        d_w_dec = torch.mm(feats.T, g).to(w_dec.dtype)  # [F, D], product 1
        if ctx.dec_norm and g_l1 is not None:
            row_scale = norm_pull(g_l1, col_sum, w, n_rows)
            d_w_dec.addcmul_(row_scale[:, None].to(w_dec.dtype), w_dec)

        l1_grad = (g_l1 * w / n_rows).to(dt) if g_l1 is not None else None  # [F]
        d_pre = linear(g, w_dec_c, l1_grad)  # [B, F], product 2, the L1 term as its bias
        if g_feats is not None:
            d_pre.add_(g_feats.to(dt))
        _relu_mask(d_pre, feats, 0, grad_input=d_pre)  # zero where the feature did not fire

        d_w_enc = torch.mm(x_c.T, d_pre).to(w_enc.dtype)  # [D, F], product 3
        d_b_enc = column_sums(d_pre)  # [F]
        d_b_dec = g_sum - torch.mv(w_enc.float(), d_b_enc)  # [D]: no [B, D] product needed
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = (torch.mm(d_pre, w_enc_c.T).float() - err * scale).to(x_dtype)
        return (d_x, d_w_enc, d_b_enc.to(b_enc_dtype), d_w_dec, d_b_dec.to(b_dec_dtype),
                None, None, None)


def sae_step(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor,
             b_dec: torch.Tensor, k: Optional[int] = None, dec_norm: bool = False,
             compute_dtype: Optional[torch.dtype] = None) -> StepOut:
    """The SAE step (contract in `reference.py`); products in `compute_dtype` when given.

    x_hat and feats come back in the compute dtype.
    """
    if k is not None and not 1 <= k <= w_enc.shape[1]:
        raise ValueError(f"k must be between 1 and d_sae={w_enc.shape[1]}, got {k}")
    return StepOut(*EagerStep.apply(x, w_enc, b_enc, w_dec, b_dec, k, dec_norm, compute_dtype))
