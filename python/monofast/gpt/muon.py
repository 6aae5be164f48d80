"""Muon with its Newton-Schulz iterations batched over same-shape matrices, at a chosen precision.

`torch.optim.Muon` orthogonalises each matrix on its own, always in bfloat16. On a CPU
without native bf16 products (AVX2 only) those products fall back to a slow path: one
optimizer step of the laptop model took 1.36 s there, more than the whole fp32 forward
and backward. This subclass keeps torch's update rule, defaults and state (a checkpoint
of either loads in the other) and changes two things: the iterations run in `ns_dtype`
(the trainer's compute precision: bf16 where it is native, else fp32), and the matrices
of one shape go through each iteration together as one batched product.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The quintic iteration's (a, b, c), as in torch.optim.Muon and Keller Jordan's Muon."""


def orthogonalize(updates: Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> Tensor:
    """Newton-Schulz applied to each matrix of `updates` [n, rows, cols] (rows <= cols): each
    scaled to Frobenius norm 1, then X <- a X + (b A + c A^2) X with A = X X^T, `steps`
    times. The result is close to U V^T of each matrix's SVD (singular values pushed toward
    0.7-1.2, which is all Muon needs)."""
    a, b, c = coefficients
    x = updates / torch.linalg.vector_norm(updates, dim=(1, 2), keepdim=True).clamp_min(eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.transpose(1, 2))  # [n, rows, rows]
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x


class Muon(torch.optim.Muon):
    """torch.optim.Muon (Nesterov momentum, decoupled weight decay, the "original" rate
    adjustment sqrt(max(1, rows / cols))) with batched iterations in `ns_dtype`."""

    def __init__(self, params: Any, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"adjust_lr_fn {group['adjust_lr_fn']!r}: only the original adjustment is implemented")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            by_shape: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = defaultdict(list)
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buf, momentum) if group["nesterov"] else buf
                wide = update if update.shape[0] <= update.shape[1] else update.T
                by_shape[tuple(wide.shape)].append((param, wide))
            for (rows, cols), members in by_shape.items():
                stacked = torch.stack([wide.to(self.ns_dtype) for _, wide in members])
                ortho = orthogonalize(stacked, group["ns_steps"], group["eps"], group["ns_coefficients"])
                for (param, _), result in zip(members, ortho):
                    tall = param.shape[0] > param.shape[1]
                    param.mul_(1 - lr * group["weight_decay"])
                    adjusted = lr * max(1.0, param.shape[0] / param.shape[1]) ** 0.5
                    param.add_((result.T if tall else result).to(param.dtype), alpha=-adjusted)
        return loss
