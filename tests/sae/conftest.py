"""Small synthetic activation stores and SAE training configs for the SAE stage's tests."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
from monofast.activations import store as activations
from monofast.sae.config import SAETrainConfig


def write_store(folder, rows=3000, dim=16, poison_row=None, seed=0, context_rows=10):
    """Rows that are sums of a few of 24 random directions, as a real store would hold them,
    in contexts of `context_rows` consecutive rows."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((24, dim))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((rows, 24))
    for r in range(rows):
        codes[r, rng.choice(24, 3, replace=False)] = rng.uniform(0.5, 2.5, 3)
    values = (codes @ atoms * 3.0 + 0.5).astype(np.float32)
    if poison_row is not None:
        values[poison_row, 2] = np.nan
    r = np.arange(rows)
    with activations.ActivationWriter(folder, dim, "fp32") as writer:
        writer.append(values, r % 50, r % 2, r // context_rows, r % context_rows)
        writer.finish(gpt={"layer": 0})
    return folder


def small_config(**overrides) -> SAETrainConfig:
    """Two L1 SAEs of 3 x 16 features, two epochs of batches of 128 on the CPU in float32."""
    base = dict(expansion=3, batch_size=128, epochs=2, l1_coeff=(0.3, 3.0), lr=1e-2, held_out=300, log_every=5,
                resample_rows=512, compute_dtype="float32", device="cpu", b_dec_init="mean")
    return SAETrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """3,000 rows of width 16 in contexts of 10 rows."""
    return write_store(tmp_path_factory.mktemp("store") / "activations")


@pytest.fixture
def make_store() -> Callable:
    """`write_store`, for a test that needs a store of its own."""
    return write_store


@pytest.fixture
def small() -> Callable[..., SAETrainConfig]:
    """`small_config`: the tests' training config with some fields overridden."""
    return small_config
