"""The step of the BatchTopK variants (batchtopk, matryoshka), in plain PyTorch, and the
inference threshold they learn while training.

The fused kernels rank each row on its own; BatchTopK ranks the whole batch
(`monofast.kernels.reference.batch_topk`), so these variants run this eager step and let
autograd differentiate it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from monofast.kernels.reference import StepOut, batch_topk, jump_relu

THRESHOLD_RATE = 0.01
"""The inference threshold's update rate once 1 / (batches seen) falls below it (SAELens'
topk_threshold_lr): see `update_threshold`."""


def batch_step(xs: Tensor, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, b_dec: Tensor,
               threshold: Tensor, batches: Tensor, k: int, prefixes: Sequence[int], training: bool,
               compute_dtype: Optional[torch.dtype] = None) -> StepOut:
    """One forward pass on the (scaled) inputs xs [B, D] (shapes as in
    `monofast.kernels.reference`; threshold [F], batches a scalar count): batch top-k in
    training (updating the threshold in place), the threshold otherwise. `mse` sums the
    errors of the nested `prefixes` (increasing feature counts ending at F; [F] for
    batchtopk), each reconstructing from its first m features + b_dec; `x_hat` is the
    full reconstruction."""
    cd = compute_dtype or w_enc.dtype
    batch = xs.shape[0]
    pre = ((xs - b_dec).to(cd) @ w_enc.to(cd)).to(w_enc.dtype) + b_enc  # [B, F]
    if training:
        feats = batch_topk(pre, k)
        update_threshold(threshold, batches, feats)
    else:
        feats = jump_relu(pre, threshold.to(pre.dtype))
    target = xs.float()  # [B, D]
    x_hat = b_dec.float().expand_as(target)  # [B, D]: the empty prefix
    mse = torch.zeros((), dtype=torch.float32, device=xs.device)
    start = 0
    for end in prefixes:
        x_hat = x_hat + (feats[:, start:end].to(cd) @ w_dec[start:end].to(cd)).float()  # [B, D]
        mse = mse + (x_hat - target).square().sum() / batch
        start = end
    with torch.no_grad():
        fired = (feats > 0).sum(0, dtype=torch.int32)  # [F]
        l0 = fired.sum().float() / batch
    l1 = feats.float().sum() / batch
    return StepOut(x_hat.to(xs.dtype), feats, mse, l1, l0, fired)


@torch.no_grad()
def update_threshold(threshold: Tensor, batches: Tensor, feats: Tensor) -> None:
    """Fold this batch's smallest kept activation (of feats [B, F]) into `threshold` [F],
    in place; `batches` counts the batches folded in so far.

    The paper's threshold is the expectation over batches of the smallest positive
    activation BatchTopK keeps, so that at inference a JumpReLU there keeps about as many
    features per row as training did. We take the running mean of that minimum over the
    first 1 / THRESHOLD_RATE batches, then an exponential moving average at that rate (the
    authors' and SAELens' estimator), so that it follows the trained encoder rather than
    the early batches. A batch with nothing positive leaves it alone; no host-device sync.
    """
    inf = torch.tensor(math.inf, device=feats.device)
    smallest = torch.where(feats > 0, feats.float(), inf).amin()  # scalar
    seen = torch.isfinite(smallest)
    batches.add_(seen.long())
    rate = (1.0 / batches.clamp_min(1).float()).clamp_min(THRESHOLD_RATE)
    moved = threshold + rate * (smallest - threshold)  # [F]
    threshold.copy_(torch.where(seen, moved, threshold))
