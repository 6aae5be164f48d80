"""Per-feature and per-neuron statistics accumulated over the analysis pass.

Features are sparse (a trained SAE fires a few dozen of its features per token), so their
statistics are bincounts over the list of nonzero (token, feature) entries of each batch:
one scan of the batch matrix finds them, and nothing else reads the dense matrix again.
Neurons are dense (a GELU neuron is positive on about half the tokens), so theirs are
column reductions and one small product with the tokens' source one-hot matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

HIST_LOW_DECADE = -3
"""Activations below 10^-3 share the histogram's first bin (0, 1e-3)."""
HIST_HIGH_DECADE = 3
"""Activations of 10^3 and more share its last bin."""


def log_edges(bins_per_decade: int) -> Tensor:
    """(E,) inner edges of the log-spaced activation histogram; bin i is [edge[i-1], edge[i]),
    bin 0 is (0, edge[0]) and bin E is [edge[E-1], inf), so there are E + 1 bins."""
    n = (HIST_HIGH_DECADE - HIST_LOW_DECADE) * bins_per_decade
    exponents = HIST_LOW_DECADE + torch.arange(n + 1, dtype=torch.float64) / bins_per_decade
    return (10.0 ** exponents).float()


def bin_bounds(edges: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bound of every histogram bin (0 and inf at the ends)."""
    e = edges.double().numpy()
    return np.concatenate([[0.0], e]), np.concatenate([e, [np.inf]])


class Firings(NamedTuple):
    """The nonzero entries of one batch's (n, F) feature matrix."""

    rows: Tensor
    """(m,) batch row (token) of each entry."""
    features: Tensor
    """(m,) feature of each entry."""
    values: Tensor
    """(m,) float32 activation."""
    bins: Tensor
    """(m,) histogram bin of the activation."""


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 sums (exact counts, no drift over millions of tokens), float32 on Apple MPS,
    which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def firings(acts: Tensor, edges: Tensor) -> Firings:
    """The nonzero entries of `acts` (n, F), in row-major order."""
    rows, features = acts.nonzero().unbind(1)  # (m,) each
    values = acts[rows, features]
    return Firings(rows, features, values, torch.bucketize(values, edges, right=True))


class FeatureStats:
    """Counts, activation mass, maxima, histograms and token counts per feature."""

    def __init__(self, n_features: int, n_sources: int, n_bins: int, vocab_size: int, device: torch.device):
        self.n_features, self.n_sources, self.n_bins, self.vocab = n_features, n_sources, n_bins, vocab_size
        self.fires = torch.zeros(n_features * n_sources, dtype=torch.int64, device=device)  # (F*S,)
        self.mass = torch.zeros(n_features * n_sources, dtype=accumulator_dtype(device), device=device)  # (F*S,)
        self.max = torch.zeros(n_features, device=device)  # (F,)
        self.hist = torch.zeros(n_features * n_bins, dtype=torch.int64, device=device)  # (F*NB,)
        self.token_fires = torch.zeros(n_features * vocab_size, dtype=torch.int64, device=device)  # (F*V,)

    def update(self, fired: Firings, sources: Tensor, tokens: Tensor) -> None:
        """Add one batch: `sources`, `tokens` (n,) are the batch rows' source and token ids."""
        f = fired.features
        by_source = f * self.n_sources + sources[fired.rows]  # (m,)
        self.fires += torch.bincount(by_source, minlength=self.fires.numel())
        self.mass += torch.bincount(by_source, weights=fired.values.to(self.mass.dtype), minlength=self.mass.numel())
        self.max.scatter_reduce_(0, f, fired.values, "amax")
        self.hist += torch.bincount(f * self.n_bins + fired.bins, minlength=self.hist.numel())
        self.token_fires.index_add_(0, f * self.vocab + tokens[fired.rows], torch.ones_like(f))

    def by_source(self) -> tuple[np.ndarray, np.ndarray]:
        """(F, S) firing counts and (F, S) activation mass."""
        shape = (self.n_features, self.n_sources)
        return self.fires.view(shape).cpu().numpy(), self.mass.view(shape).double().cpu().numpy()

    def histogram(self) -> np.ndarray:
        return self.hist.view(self.n_features, self.n_bins).cpu().numpy()

    def token_counts(self) -> Tensor:
        return self.token_fires.view(self.n_features, self.vocab)


class NeuronStats:
    """Firing counts (activation > 0), positive activation mass and maxima per MLP neuron."""

    def __init__(self, d_mlp: int, n_sources: int, device: torch.device):
        self.n_sources = n_sources
        self.fires = torch.zeros(n_sources, d_mlp, dtype=accumulator_dtype(device), device=device)  # (S, d_mlp)
        self.mass = torch.zeros(n_sources, d_mlp, dtype=accumulator_dtype(device), device=device)  # (S, d_mlp)
        self.max = torch.full((d_mlp,), float("-inf"), device=device)  # (d_mlp,)

    def update(self, acts: Tensor, sources: Tensor) -> None:
        """acts (b, T, d_mlp) post-GELU activations of a batch of contexts, in their compute dtype;
        sources (b, T) the tokens' source ids.

        A context almost always lies within one source, so counts and mass are summed over
        each context's tokens first (one pass over the activations, accumulated in float32)
        and added to that source; the rare context that straddles two sources goes row by row.
        """
        fires = (acts > 0).sum(1)  # (b, d_mlp) int64
        mass = acts.clamp_min(0).sum(1, dtype=torch.float32)  # (b, d_mlp)
        first = sources[:, 0]  # (b,)
        mixed = (sources != first[:, None]).any(1)  # (b,)
        whole = ~mixed
        self.fires.index_add_(0, first[whole], fires[whole].to(self.fires.dtype))
        self.mass.index_add_(0, first[whole], mass[whole].to(self.mass.dtype))
        if bool(mixed.any()):
            rows = acts[mixed].reshape(-1, acts.shape[-1]).float()  # (m * T, d_mlp)
            labels = sources[mixed].reshape(-1)
            self.fires.index_add_(0, labels, (rows > 0).to(self.fires.dtype))
            self.mass.index_add_(0, labels, rows.clamp_min(0).to(self.mass.dtype))
        self.max = torch.maximum(self.max, acts.amax((0, 1)).float())

    def by_source(self) -> tuple[np.ndarray, np.ndarray]:
        """(d_mlp, S) firing counts and (d_mlp, S) positive activation mass."""
        return self.fires.T.double().cpu().numpy().round().astype(np.int64), self.mass.T.double().cpu().numpy()


class SourceShares(NamedTuple):
    """Where a unit's firings and activation mass come from, normalised per unit."""

    fires: np.ndarray
    """(U, S) fraction of its firings on each source (rows of units that never fire are 0)."""
    mass: np.ndarray
    """(U, S) fraction of its activation mass on each source."""
    purity: np.ndarray
    """(U,) the largest mass share: 1 means one source only, 1/S an even spread."""
    dominant: np.ndarray
    """(U,) the source holding that share (-1 for units that never fire)."""


def source_shares(fires: np.ndarray, mass: np.ndarray) -> SourceShares:
    """Normalise (U, S) firing counts and activation mass into shares."""
    total_f = fires.sum(1, keepdims=True)
    total_m = mass.sum(1, keepdims=True)
    share_f = np.divide(fires, total_f, out=np.zeros(fires.shape), where=total_f > 0)
    share_m = np.divide(mass, total_m, out=np.zeros(mass.shape), where=total_m > 0)
    alive = total_m[:, 0] > 0
    dominant = np.where(alive, share_m.argmax(1), -1)
    return SourceShares(share_f, share_m, share_m.max(1), dominant)
