"""Which features a TopK row keeps: one rule, and its fast forms on every device.

The rule (`reference.top_k` states it as a stable sort): the k largest pre-activations of
the row, ties broken toward the lower feature index, NaN above every number. A fixed
rule makes the dense and sparse steps, the backends and inference keep the same features
even where values tie (`torch.topk` leaves ties to its implementation), and the kept
indices come back in increasing order.

- On CPUs the native kernel scans each row once against a running threshold (float32 or
  bfloat16; much faster than `torch.topk`, which took as long as the encoder product).
- Elsewhere (and for other dtypes) `torch.topk` runs on int64 keys that order by value
  and then by lower index, so no two keys tie and the result is the rule's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import native_sparse

_NATIVE = native_sparse.available() and hasattr(native_sparse, "top_k")


def _ordered_keys(pre: Tensor) -> Tensor:
    """[B, F] int64 keys that order like (value, -index): distinct, NaN above +inf."""
    values = pre.float() + 0.0  # -0.0 becomes +0.0: equal values get equal bits
    values = torch.where(torch.isnan(values), torch.full_like(values, float("nan")), values)  # one NaN
    bits = values.view(torch.int32)
    sortable = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # float order as integers
    d_sae = pre.shape[1]
    rank = torch.arange(d_sae - 1, -1, -1, device=pre.device)  # lower index, larger key
    return sortable * d_sae + rank


def top_k(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [B, k] of the rule above for pre [B, F]; indices increasing."""
    if not 1 <= k <= pre.shape[1]:
        raise ValueError(f"k must be between 1 and d_sae={pre.shape[1]}, got {k}")
    if _NATIVE and pre.device.type == "cpu" and pre.dtype in (torch.float32, torch.bfloat16) \
            and pre.dim() == 2 and pre.is_contiguous():
        return native_sparse.top_k(pre, k)
    indices = torch.topk(_ordered_keys(pre), k, dim=1, sorted=False).indices.sort(dim=1).values
    return pre.gather(1, indices), indices


def activate(pre: Tensor, k: Optional[int]) -> Tensor:
    """ReLU, or ReLU of the rule's k kept pre-activations of each row, zero elsewhere."""
    if k is None:
        return torch.relu(pre)
    values, indices = top_k(pre, k)
    return torch.zeros_like(pre).scatter_(1, indices, torch.relu(values))
