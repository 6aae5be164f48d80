"""The rows the SAE stage reads: the training / held-out split, training batches, samples.

The last `held_out` rows of the store (at most 10% of it) are kept out of training for the
evaluation, cut at a context boundary so that no context has rows on both sides (the rows
of one context are contiguous in the store). Training reads the rows before the cut in
batches of exactly `batch_size`; samples of them initialise the SAEs and feed resampling,
and the lambda search measures L0 on held-out rows.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterator

import numpy as np
import torch

from monofast.activations.store import ActivationStore, DeviceFeeder
from monofast.common import distributed
from monofast.common.errors import DataError
from monofast.common.log import logger
from monofast.sae.config import SAETrainConfig

PROBE_ROWS = 4096
"""Rows on which the lambda search measures L0 at its control points (1-2% noise at L0 ~ 30)."""


# ---------------------------------------------------------------------------------------
# Training and held-out rows


def context_of(store: ActivationStore, row: int) -> int:
    """The context id of one row."""
    return int(store.take(np.array([row])).context_id[0])


def context_bounds(store: ActivationStore, row: int) -> tuple[int, int]:
    """[first, end) rows of the context `row` belongs to (found by bisection: a context's
    rows are contiguous, so before `row` they are a run ending at it, after it one starting)."""
    context = context_of(store, row)
    first = bisect_left(range(row), True, key=lambda r: context_of(store, r) == context)
    end = row + bisect_left(range(row, store.rows), True, key=lambda r: context_of(store, r) != context)
    return first, end


def split_rows(store: ActivationStore, held_out: int) -> int:
    """The first row of the held-out tail (rows before it train).

    The last `held_out` rows, at most 10% of the store, with the cut moved back to the first
    row of the context it falls in, so that whole contexts are held out. Where that would
    hold out more than 10% (a context longer than the room left under the cap), the cut moves
    forward to the end of that context instead: fewer rows are held out, none of them shares
    a context with a training row."""
    if store.rows == 0:
        raise DataError(f"the activation store {store.folder} is empty; re-run `monofast activations harvest --force`")
    cap = store.rows // 10
    cut = store.rows - min(held_out, cap)
    if cut == store.rows:
        return cut
    first, end = context_bounds(store, cut)
    cut = first if store.rows - first <= cap else end
    if cut == store.rows:
        logger.warning("sae: no rows held out: the store's last context (%d rows) is longer than 10%% of "
                       "its %d rows; eval.json has no held-out metrics (harvest more contexts)",
                       end - first, store.rows)
    return cut


class TrainingBatches:
    """Float32 batches of exactly `batch_size` training rows (held-out rows filtered out, the
    remainder carried into the next batch; the last partial batch of the run is dropped).
    `state()` and `restore()` resume at the exact row, carried remainder included."""

    def __init__(self, store: ActivationStore, cfg: SAETrainConfig, cutoff: int,
                 device: torch.device):
        here = distributed.world()
        if here.size == 1:
            self.stream = store.stream(cfg.batch_size, shuffle="exact", seed=cfg.seed, epochs=cfg.epochs,
                                       to_float32=True, verify=cfg.verify)
            self.batch_size = cfg.batch_size
        else:
            # This rank's part of each epoch of the training rows only; endless, as the run's
            # steps are counted over all ranks' rows (a rank may start one more epoch by a
            # few rows when the training rows do not split evenly).
            self.batch_size = cfg.batch_size // here.size
            self.stream = store.stream(self.batch_size, shuffle="exact", seed=cfg.seed, epochs=None,
                                       to_float32=True, rank=here.rank, world_size=here.size, rows=cutoff,
                                       verify=cfg.verify)
        self.cutoff, self.device = cutoff, device
        self.feed = DeviceFeeder(device)  # pinned ring on CUDA, plain .to elsewhere
        self.pending = torch.zeros(0, store.dim)  # (R, d_in) rows read but not yet yielded

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.stream:
            rows = batch.tensor()  # (b, d_in)
            keep = batch.row < self.cutoff
            if not keep.all():
                rows = rows[torch.from_numpy(keep)]
            if self.pending.shape[0] == 0 and rows.shape[0] == self.batch_size:
                yield self.feed(rows)  # the usual case: a whole batch, no copy
                continue
            self.pending = torch.cat([self.pending, rows])  # (R + b', d_in)
            while self.pending.shape[0] >= self.batch_size:
                x, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
                yield self.feed(x)  # (batch_size, d_in)

    def state(self) -> dict[str, Any]:
        """The stream's position and the rows read past it but not yet yielded."""
        return {"stream": self.stream.state(), "pending": self.pending.clone()}

    def restore(self, state: dict[str, Any]) -> None:
        self.stream.restore(state["stream"])
        self.pending = state["pending"]

    def close(self) -> None:
        self.stream.close()


# ---------------------------------------------------------------------------------------
# Samples


def sample_rows(store: ActivationStore, count: int, below: int,
                rng: np.random.Generator) -> torch.Tensor:
    """`count` random rows from [0, below) as float32 (sorted reads: the store is memory-mapped)."""
    count = min(count, below)
    indices = np.sort(rng.choice(below, size=count, replace=False))
    return store.take(indices, to_float32=True).tensor().clone()


def probe_rows(store: ActivationStore, cutoff: int, rng: np.random.Generator) -> torch.Tensor:
    """Rows on which the search measures L0: held-out rows spread over the tail, the rows whose
    L0 the evaluation reports (a sample of training rows when nothing is held out)."""
    if store.rows == cutoff:
        return sample_rows(store, PROBE_ROWS, cutoff, rng)
    picks = np.unique(np.linspace(cutoff, store.rows - 1, min(PROBE_ROWS, store.rows - cutoff)).astype(np.int64))
    return store.take(picks, to_float32=True).tensor().clone()


def check_finite(x: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).any(1).nonzero().flatten()[:5].tolist()
        raise DataError(f"{where} contains NaN or Inf (rows {bad} of the batch); the harvested activations are "
                        f"corrupt: check them with `monofast activations verify` and re-run `monofast activations harvest --force`")
