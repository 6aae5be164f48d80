"""Resampling of dead features (monofast.sae.resample): when, and what it does."""

from __future__ import annotations

import numpy as np
import torch
from monofast.activations import store as activations
from monofast.sae import resample
from monofast.sae.batches import sample_rows
from monofast.sae.sweep import build_sweep


def test_resampling_happens_before_the_last_quarter_of_long_enough_runs(small):
    assert resample.resample_steps(small(), 100) == [25, 50, 75]
    assert resample.resample_steps(small(), 40) == []  # too short to call a feature dead
    assert resample.resample_steps(small(resample_every=10), 40) == [10, 20, 30]
    assert resample.resample_steps(small(resample_every=-1), 100) == []
    assert resample.resample_steps(small(variant="april2024"), 100) == []


def test_resampling_revives_dead_features(store_dir, small):
    cfg = small(l1_coeff=(1.0,))
    store = activations.open_store(store_dir)
    sample = sample_rows(store, 512, 2700, np.random.default_rng(0))
    (member,) = build_sweep(cfg, store.dim, sample, steps=10, device=torch.device("cpu"))
    member.sae(sample[:128]).mse.backward()
    member.sae.optimizer_step(member.optimizer)  # Adam now has state to reset
    member.sae.tokens_since_fired[:5] = 10_000  # five features "have not fired" for a long time
    revived = resample.resample(member, store, 2700, 5_000, cfg, np.random.default_rng(1), torch.device("cpu"))
    assert revived == 5
    assert int(member.sae.tokens_since_fired[:5].sum()) == 0
    assert torch.all(member.optimizer.state[member.sae.W_dec]["exp_avg"][:5] == 0)
