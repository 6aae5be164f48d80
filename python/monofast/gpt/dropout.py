"""Dropout whose masks are cheap on the CPU.

`F.dropout` on the CPU draws every mask element with torch's Bernoulli sampler, about 13 ns
an element on one core: at the laptop shape that is a quarter of a training step (the two
(B, H, T, T) attention masks alone are 3.1M elements each). Here a mask is 16 random bits an
element from numpy's SFC64 generator (four elements per 64-bit draw, ~0.5 ns each), kept
where they fall below round((1 - p) * 2^16): the keep probability is 1 - p to within 2^-16,
and kept elements are scaled by exactly 1 / (1 - p), as F.dropout scales them.

Each call seeds its generator with one draw from torch's global generator, so
`torch.manual_seed` makes the masks reproducible exactly as it does F.dropout's (the GPT
trainer seeds it per step). On other devices, and inside torch.compile, it is F.dropout.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

_BITS = 16
CHEAP_MASKS = True
"""False draws every mask with F.dropout (benches/bench_gpt.py measures the difference)."""


class _Scaled(torch.autograd.Function):
    """x * scale where keep, else 0; the gradient is masked and scaled the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        keep, = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0), None, None


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool mask of `shape`, each element True with probability 1 - p (to within 2^-16),
    from a generator seeded by one draw of torch's global generator."""
    n = int(np.prod(shape, dtype=np.int64))
    seed = int(torch.randint(0, 2**62, ()).item())
    raw = np.random.Generator(np.random.SFC64(seed)).bit_generator.random_raw((n + 3) // 4)
    bits = raw.view(np.uint16)[:n]
    return torch.from_numpy(bits < round((1.0 - p) * 2**_BITS)).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with the cheap masks on the CPU."""
    if not training or p <= 0.0:
        return x
    if not CHEAP_MASKS or x.device.type != "cpu" or torch.compiler.is_compiling() or p >= 1.0:
        return F.dropout(x, p, training=True)
    return _Scaled.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


class Dropout(nn.Module):
    """`nn.Dropout` with the cheap masks on the CPU."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
