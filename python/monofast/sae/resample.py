"""Resampling of dead features (anthropic2023, Towards Monosemanticity).

At a few steps of the run (`resample_steps`) the features that have not fired for a window
of tokens get new encoder and decoder directions pointing at inputs the SAE reconstructs
badly: rows drawn from the training rows with probability proportional to their squared
loss (`SparseAutoencoder.resample` resets their weights and Adam state).
"""

from __future__ import annotations

import numpy as np
import torch

from monofast.activations.store import ActivationStore
from monofast.sae.batches import sample_rows
from monofast.sae.config import SAETrainConfig
from monofast.sae.sweep import Member

MIN_AUTO_RESAMPLE_STEPS = 100
"""Runs shorter than this do not resample unless --resample-every asks: a window of a few
batches cannot tell a dead feature from a rare one."""


def resample_steps(cfg: SAETrainConfig, steps: int) -> list[int]:
    """Steps after which anthropic2023 resamples dead features (none in the last quarter)."""
    if cfg.variant != "anthropic2023" or cfg.resample_every < 0:
        return []
    if cfg.resample_every == 0 and steps < MIN_AUTO_RESAMPLE_STEPS:
        return []
    every = cfg.resample_every or steps // 4
    return [s for s in range(every, int(steps * 0.75) + 1, every)]


def dead_window(cfg: SAETrainConfig, steps: int) -> int:
    """Tokens without firing after which resampling counts a feature as dead: one interval."""
    return (cfg.resample_every or max(1, steps // 4)) * cfg.batch_size


@torch.no_grad()
def resample(member: Member, store: ActivationStore, cutoff: int, window_tokens: int,
             cfg: SAETrainConfig, rng: np.random.Generator, device: torch.device) -> int:
    """Anthropic's resampling of the features that did not fire in the last window."""
    sae = member.sae
    dead = (sae.tokens_since_fired >= window_tokens).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    rows = sample_rows(store, max(cfg.resample_rows, dead.numel()), cutoff, rng).to(device)
    sae.eval()
    losses = torch.cat([(sae(chunk).x_hat.float() - chunk).square().sum(1)
                        for chunk in rows.split(cfg.batch_size)])
    sae.train()
    weights = losses.square().double()
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    gen = torch.Generator(device=weights.device).manual_seed(int(rng.integers(2**31)))
    picks = torch.multinomial(weights, dead.numel(), replacement=dead.numel() > rows.shape[0], generator=gen)
    sae.resample(dead, rows[picks], member.optimizer)
    return dead.numel()
