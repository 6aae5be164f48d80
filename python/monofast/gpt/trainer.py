"""One optimizer step of the GPT: AdamW, the learning-rate schedule, dropout keyed on the
step, loss scaling, DistributedDataParallel under torchrun and the torch.compile fallback."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from monofast.common import distributed
from monofast.common.device import autocast
from monofast.common.log import logger
from monofast.gpt.config import GPTTrainConfig
from monofast.gpt.model import GPT


def lr_at(step: int, cfg: GPTTrainConfig) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    progress_ = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: GPT, cfg: GPTTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only; the fused kernel where the
    device has one (one kernel for every parameter instead of a loop of small ones)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": cfg.learning_rate, "betas": (cfg.beta1, cfg.beta2)}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused AdamW for this device or torch version
        return torch.optim.AdamW(groups, **kwargs)


def step_seed(cfg: GPTTrainConfig, step: int, rank: int = 0) -> int:
    """Seed of the global torch generator (dropout masks) for training step `step` on
    `rank` (each rank's rows get their own masks)."""
    if rank == 0:
        return cfg.seed * 1_000_003 + step
    return int(np.random.SeedSequence([cfg.seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def use_compile(choice: str, device: torch.device) -> bool:
    """Whether `--compile choice` compiles on `device` (auto: on CUDA)."""
    return choice == "true" or (choice == "auto" and device.type == "cuda")


class Trainer:
    """The model, its optimizer and the step function, on one device (under torchrun, one
    rank's: `forward` is then the DistributedDataParallel wrapper, which averages the
    gradients over the ranks during `backward`)."""

    def __init__(self, cfg: GPTTrainConfig, vocab_size: int, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.world = distributed.world()
        torch.manual_seed(cfg.seed)
        self.model = GPT(cfg.model_config(vocab_size)).to(device)
        self.optimizer = make_optimizer(self.model, cfg)
        # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        forward: Any = self.model  # the model, or under torchrun its DistributedDataParallel wrapper
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.eager_forward = forward
        self.compile_pending = use_compile(cfg.compile, device)
        """True until the first compiled step has run (auto falls back to eager if it fails)."""
        self.forward = forward
        if self.compile_pending:
            graphs = cfg.compile == "auto" and self.world.size == 1
            self.forward = torch.compile(forward, mode="reduce-overhead" if graphs else None)

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step at schedule position `step`; returns the (detached) loss."""
        cfg = self.cfg
        if cfg.dropout > 0:
            torch.manual_seed(step_seed(cfg, step, self.world.rank))  # dropout masks keyed on the step
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss = self._forward_backward(step, x, y)
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # A copy: with CUDA graphs the output's memory is rewritten by the next step.
        return loss.detach().clone()

    def _forward_backward(self, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward; the loss. The first compiled step is where torch.compile
        builds the forward, the backward (at the first `.backward()`) and, with CUDA graphs,
        records them: under `--compile auto` a failure anywhere in it trains eagerly instead."""
        if not self.compile_pending:
            return self._forward_loss_backward(x, y)
        try:
            loss = self._forward_loss_backward(x, y)
        except Exception as err:  # the compiler failed on this machine
            if self.cfg.compile == "true":
                raise
            logger.warning("gpt: torch.compile failed (%s: %s); training without it (--compile false "
                           "skips the attempt)", type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            self.optimizer.zero_grad(set_to_none=True)  # whatever a half-done backward left
            self.forward = self.eager_forward
            if self.cfg.dropout > 0:
                torch.manual_seed(step_seed(self.cfg, step, self.world.rank))  # the same masks
            loss = self._forward_loss_backward(x, y)
        self.compile_pending = False
        return loss

    def _forward_loss_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            loss = self.forward(x, y).loss
        self.scaler.scale(loss).backward()
        return loss
