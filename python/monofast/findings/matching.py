"""Matching units across dictionaries and models: decoder cosines, activation correlations,
best matches, and the threshold for a "clear" match.

Feature splitting (a family of widths) is decided by decoder cosine: it depends on the
weights alone, so a parent does not change with the token sample, and a child's direction
lies close to its parent's when one feature splits into several (the paper's picture). The
activation correlation of each matched pair is reported beside it. Universality (two models
with different bases) can only be decided by activations: Pearson correlation over the
same tokens.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class Matches(NamedTuple):
    """For every unit of one side, its best match on the other."""

    index: np.ndarray
    """(N,) int32 index of the best match (-1 where the unit never varied: no correlation)."""
    value: np.ndarray
    """(N,) float32 its similarity (NaN where index is -1)."""


def best_matches(similarity: Tensor) -> Matches:
    """Row-wise best match of an (N, M) similarity matrix; rows of NaN get -1 / NaN."""
    valid = ~torch.isnan(similarity)
    filled = torch.where(valid, similarity, torch.tensor(-float("inf"), dtype=similarity.dtype))
    value, index = filled.max(dim=1)  # (N,)
    has = valid.any(dim=1)
    index = torch.where(has, index, torch.full_like(index, -1))
    value = torch.where(has, value, torch.tensor(float("nan"), dtype=value.dtype))
    return Matches(index.int().numpy(), value.float().numpy())


def decoder_cosine(small: Tensor, large: Tensor) -> Tensor:
    """(F_large, F_small) cosine between the decoder rows of two SAEs (F, d_in) each."""
    a = torch.nn.functional.normalize(large.float(), dim=1)
    b = torch.nn.functional.normalize(small.float(), dim=1)
    return a @ b.T


def null_best_cosine(candidates: Tensor, samples: int, generator: torch.Generator) -> np.ndarray:
    """Best cosine of `samples` random directions against the rows of `candidates` (F, d):
    what a "match" looks like when there is nothing to match."""
    d = candidates.shape[1]
    random = torch.randn(samples, d, generator=generator)
    return best_matches(decoder_cosine(candidates, random)).value


def otsu(values: np.ndarray, bins: int = 64) -> float:
    """The split of `values` that maximises the between-class variance (Otsu's method): the
    valley of a two-humped distribution."""
    values = values[np.isfinite(values)]
    if len(values) < 2 or values.min() == values.max():
        return float(values.max()) if len(values) else 0.0
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1].astype(np.float64)
    w1 = counts.sum() - w0
    s0 = np.cumsum(counts * centres)[:-1]
    m0 = np.divide(s0, w0, out=np.zeros_like(s0), where=w0 > 0)
    m1 = np.divide((counts * centres).sum() - s0, w1, out=np.zeros_like(s0), where=w1 > 0)
    between = w0 * w1 * (m0 - m1) ** 2
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # a gap between humps: all equal
    return float(edges[1:-1][best[len(best) // 2]])


class Threshold(NamedTuple):
    """The similarity above which a match counts as clear, and where it came from."""

    value: float
    valley: float
    """Otsu's split of the observed best matches."""
    null: float
    """99.9th percentile of the best match of random directions."""
    rule: str


def clear_threshold(best: np.ndarray, null: np.ndarray, given: float = 0.0) -> Threshold:
    """`given` when set; else the valley of the observed best-match distribution, but never
    below the 99.9th percentile of the best match random directions reach."""
    valley = otsu(best)
    floor = float(np.quantile(null[np.isfinite(null)], 0.999)) if np.isfinite(null).any() else 0.0
    if given > 0:
        return Threshold(given, valley, floor, "given (--clear-parent)")
    value = max(valley, floor)
    rule = ("the valley of the best-match distribution (Otsu)" if valley >= floor
            else "the best match of random directions (99.9th percentile), above the valley")
    return Threshold(value, valley, floor, rule)


def children(parent: np.ndarray, similarity: np.ndarray, threshold: float, n_parents: int) -> list[list[int]]:
    """For each of `n_parents` features, the features whose best match it is with a
    similarity of at least `threshold`, most similar first."""
    out: list[list[int]] = [[] for _ in range(n_parents)]
    order = np.argsort(-np.nan_to_num(similarity, nan=-np.inf), kind="stable")
    for j in order:
        if parent[j] >= 0 and similarity[j] >= threshold:
            out[int(parent[j])].append(int(j))
    return out


class CrossMoments:
    """Running sums for the Pearson correlation of every column of X (n, P) with every column
    of Y (n, Q), in float64. Sparse X (SAE features: a few per token fire) multiply as CSR."""

    def __init__(self, p: int, q: int, sparse: bool = False):
        self.n = 0
        self.sx = torch.zeros(p, dtype=torch.float64)
        self.sy = torch.zeros(q, dtype=torch.float64)
        self.sxx = torch.zeros(p, dtype=torch.float64)
        self.syy = torch.zeros(q, dtype=torch.float64)
        self.sxy = torch.zeros(p, q, dtype=torch.float64)
        self.sparse = sparse

    def add(self, x: Tensor, y: Tensor) -> None:
        """Add rows x (n, P), y (n, Q) of the same tokens."""
        x, y = x.float().cpu(), y.float().cpu()
        self.n += x.shape[0]
        self.sx += x.sum(0, dtype=torch.float64)
        self.sy += y.sum(0, dtype=torch.float64)
        self.sxx += (x * x).sum(0, dtype=torch.float64)
        self.syy += (y * y).sum(0, dtype=torch.float64)
        if self.sparse:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the product is exact
                warnings.simplefilter("ignore", UserWarning)
                product = torch.sparse.mm(x.T.contiguous().to_sparse_csr(), y)  # (P, Q)
        else:
            product = x.T @ y  # (P, Q)
        self.sxy += product.double()

    def correlation(self) -> Tensor:
        """(P, Q) Pearson correlation; NaN for a column that never varied."""
        n = max(self.n, 1)
        mx, my = self.sx / n, self.sy / n
        vx = (self.sxx / n - mx**2).clamp(min=0)
        vy = (self.syy / n - my**2).clamp(min=0)
        cov = self.sxy / n - mx[:, None] * my[None, :]
        sd = vx.sqrt()[:, None] * vy.sqrt()[None, :]
        still = (vx <= 1e-12 * (1 + mx**2))[:, None] | (vy <= 1e-12 * (1 + my**2))[None, :]
        return torch.where(still, torch.tensor(float("nan"), dtype=torch.float64), cov / sd.clamp(min=1e-300))


class PairMoments:
    """Running sums for the Pearson correlation of column pairs (x[:, i[k]], y[:, k]): each
    column k of Y (a wider SAE's feature) with column i[k] of X (its parent). Only the
    nonzero entries of Y are visited (a few features per token fire), so the cost is that
    of the firings, not of n x K."""

    def __init__(self, i: np.ndarray):
        self.i = torch.as_tensor(i, dtype=torch.long)  # (K,)
        self.n = 0
        self.x = torch.zeros(2, int(self.i.max()) + 1 if len(self.i) else 0, dtype=torch.float64)  # sums of x, xx
        self.y = torch.zeros(3, len(self.i), dtype=torch.float64)  # sums of y, yy, xy

    def add(self, x: Tensor, y: Tensor) -> None:
        """Rows x (n, P), y (n, K) of the same tokens."""
        x, y = x.float().cpu(), y.float().cpu()
        self.n += x.shape[0]
        width = self.x.shape[1]
        self.x[0] += x[:, :width].sum(0, dtype=torch.float64)
        self.x[1] += (x[:, :width] * x[:, :width]).sum(0, dtype=torch.float64)
        rows, cols = y.nonzero().unbind(1)  # (m,) each
        b = y[rows, cols].double()
        a = x[rows, self.i[cols]].double()
        k = len(self.i)
        self.y += torch.stack([torch.bincount(cols, b, minlength=k), torch.bincount(cols, b * b, minlength=k),
                               torch.bincount(cols, a * b, minlength=k)])

    def correlation(self) -> np.ndarray:
        """(K,) Pearson correlation of each pair; NaN where a column never varied."""
        n = max(self.n, 1)
        sx, sxx = self.x[:, self.i] / n
        sy, syy, sxy = self.y / n
        vx, vy = (sxx - sx**2).clamp(min=0), (syy - sy**2).clamp(min=0)
        ok = (vx > 1e-12 * (1 + sx**2)) & (vy > 1e-12 * (1 + sy**2))
        r = (sxy - sx * sy) / (vx * vy).sqrt().clamp(min=1e-300)
        return torch.where(ok, r, torch.tensor(float("nan"), dtype=torch.float64)).float().numpy()
