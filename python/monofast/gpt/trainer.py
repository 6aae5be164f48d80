"""One optimizer step of the GPT: AdamW or Muon + AdamW, the learning-rate schedule,
dropout keyed on the step, loss scaling, DistributedDataParallel under torchrun and the
torch.compile fallback."""

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
from monofast.gpt.muon import Muon


def lr_at(step: int, cfg: GPTTrainConfig) -> float:
    """AdamW's learning rate at `step`: linear warm-up to learning_rate, then either a cosine
    decay to min_lr at max_iters, or (wsd) the peak held until the last decay_frac of the
    steps (never before the warm-up ends) and a linear decay to min_lr over those."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "wsd":  # decay_frac 1: linear from the end of the warm-up
        decay = max(1, min(round(cfg.decay_frac * cfg.max_iters), cfg.max_iters - cfg.warmup_iters))
        coeff = min(1.0, max(0.0, (cfg.max_iters - step) / decay))  # 1 where the decay starts, 0 at the end
    else:
        progress_ = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def _adamw(groups: list[dict[str, Any]], cfg: GPTTrainConfig) -> torch.optim.AdamW:
    """AdamW, with the fused kernel where the device has one (one kernel for every
    parameter instead of a loop of small ones)."""
    kwargs: dict[str, Any] = {"lr": cfg.learning_rate, "betas": (cfg.beta1, cfg.beta2)}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused AdamW for this device or torch version
        return torch.optim.AdamW(groups, **kwargs)


def make_optimizers(model: GPT, cfg: GPTTrainConfig,
                    dtype: torch.dtype = torch.float32) -> list[torch.optim.Optimizer]:
    """The optimizers of `cfg.optimizer`, each group's peak rate in its "peak_lr" (the
    schedule scales it). adamw: AdamW for everything, weight decay on matrices and embeddings
    only. muon: Muon for the blocks' weight matrices (orthogonalised momentum: every
    direction of the update moves at one rate), AdamW for the embeddings (the tied
    unembedding is one of them) and the gains, as in the modded-nanogpt speedrun; its
    Newton-Schulz iterations in bf16 when the step computes in bf16 (`dtype`), else fp32."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = {id(p) for block in model.h for p in block.parameters() if p.requires_grad and p.dim() == 2}
    muon = cfg.optimizer == "muon"
    rest = [p for p in params if not (muon and id(p) in matrices)]
    optimizers: list[torch.optim.Optimizer] = [_adamw([
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "peak_lr": cfg.learning_rate},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "peak_lr": cfg.learning_rate},
    ], cfg)]
    if muon:
        optimizers.append(Muon(
            [{"params": [p for p in params if id(p) in matrices], "peak_lr": cfg.muon_lr}],
            ns_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32,
            lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum))
    return optimizers


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
        self.optimizers = make_optimizers(self.model, cfg, dtype)
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
        scale = lr_at(step, cfg) / cfg.learning_rate  # of every group's peak rate
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * scale
        self.model.train()
        loss = self._forward_backward(step, x, y)
        if cfg.grad_clip > 0:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        self.zero_grad()
        # A copy: with CUDA graphs the output's memory is rewritten by the next step.
        return loss.detach().clone()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

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
            self.zero_grad()  # whatever a half-done backward left
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
