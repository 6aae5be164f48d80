"""The examples each feature page shows, assembled at the end of the pass: the top-k
windows, the random samples of each quantile bin, their tokens and ablation effects.

Quantile bins are unions of adjacent histogram bins holding about equal shares of a
feature's firings (a bin that alone holds more than one share stays one bin, so a
feature may have fewer than `quantile_bins`). Each bin's samples are the reservoir
entries with the smallest keys across its histogram bins: a uniform sample of every
firing in the bin (see `CellReservoir`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from monofast.analysis.effects import last_layer_effects, rerun_effects

ABSENT = -1
"""Token id and row id of an empty slot, or of a window position outside its context."""


class Examples(NamedTuple):
    """Every example array of analysis/examples.npz (F features, k top windows, Q quantile
    bins, S samples per bin, W tokens per window; the peak is the window's middle token)."""

    top_values: np.ndarray
    """(F, k) float32 peak activation of each top window, descending; 0 for empty slots."""
    top_rows: np.ndarray
    """(F, k) int64 global token row (context * T + position) of each peak; -1 when empty."""
    top_tokens: np.ndarray
    """(F, k, W) int32 token ids of each window; -1 outside the context."""
    top_acts: np.ndarray
    """(F, k, W) float32 the feature's activation on each window token; NaN outside."""
    top_effects: np.ndarray
    """(F, k, W) float32 change in log p(next token) when the feature is removed, at the tokens
    where it fires; NaN elsewhere (and where not computed)."""
    bin_low: np.ndarray
    """(F, Q) float32 lower activation bound of each quantile bin (NaN for unused bins)."""
    bin_high: np.ndarray
    """(F, Q) float32 upper bound (exclusive)."""
    bin_count: np.ndarray
    """(F, Q) int64 firings in each bin."""
    sample_values: np.ndarray
    """(F, Q, S) float32 activation of each sampled token; 0 for empty slots."""
    sample_rows: np.ndarray
    """(F, Q, S) int64 global token row of each sample; -1 when empty."""
    sample_tokens: np.ndarray
    """(F, Q, S, W) int32 window token ids around each sample."""
    sample_acts: np.ndarray
    """(F, Q, S, W) float32 the feature's activation on them (stored at float16 precision)."""
    sample_effects: np.ndarray
    """(F, Q, S) float32 change in log p(next token) at the sampled token when the feature is removed."""
    top_sources: np.ndarray
    """(F, k) int16 source id of each top window's peak token (-1 when empty)."""
    sample_sources: np.ndarray
    """(F, Q, S) int16 source id of each sampled token."""
    context_size: np.ndarray
    """() int: tokens per context (a global row is context * context_size + position)."""
    window_radius: np.ndarray
    """() int: tokens on each side of the peak; the peak is window index window_radius."""


def quantile_groups(hist: Tensor, n_groups: int) -> Tensor:
    """(F, NB) quantile bin of each histogram bin (-1 for empty ones): a histogram bin goes
    to the quantile whose share of the firings its middle falls in."""
    hist = hist.double()
    cum = hist.cumsum(1)
    total = cum[:, -1:].clamp_min(1.0)
    middle = (cum - hist / 2) / total  # (F, NB) in (0, 1)
    groups = (middle * n_groups).floor().long().clamp(0, n_groups - 1)
    return groups.masked_fill(hist == 0, -1)


class Samples(NamedTuple):
    bin_low: Tensor
    bin_high: Tensor
    bin_count: Tensor
    cells: Tensor
    """(F, Q, S) reservoir cell (feature * NB + histogram bin) of each sample (-1 when empty)."""
    slots: Tensor
    """(F, Q, S) slot inside that cell."""


def pick_samples(keys: Tensor, hist: Tensor, low: Tensor, high: Tensor, n_groups: int,
                 n_samples: int) -> Samples:
    """Choose each quantile bin's samples. keys (F, NB, R) reservoir keys (>= 1 when empty);
    hist (F, NB) firings per histogram bin; low, high (NB,) histogram bin bounds."""
    F_, NB, R = keys.shape
    groups = quantile_groups(hist, n_groups)  # (F, NB)
    slot_group = groups[:, :, None].expand(F_, NB, R)
    valid = (keys < 1.0) & (slot_group >= 0)
    # Sort every feature's slots by (quantile bin, key); invalid slots go last.
    composite = torch.where(valid, slot_group.double() * 2 + keys.double(), torch.tensor(float("inf"),
                            dtype=torch.float64)).reshape(F_, NB * R)
    sorted_keys, order = composite.sort(dim=1)
    bounds = torch.arange(n_groups + 1, dtype=torch.float64).mul(2).expand(F_, -1).contiguous()
    starts = torch.searchsorted(sorted_keys, bounds)  # (F, Q + 1) first slot of each bin
    pos = starts[:, :-1, None] + torch.arange(n_samples)  # (F, Q, S)
    present = pos < starts[:, 1:, None]
    flat = order.gather(1, pos.clamp(max=NB * R - 1).reshape(F_, -1)).reshape(pos.shape)
    feature = torch.arange(F_)[:, None, None]
    cells = torch.where(present, feature * NB + flat // R, torch.full_like(flat, ABSENT))
    slots = torch.where(present, flat % R, torch.full_like(flat, ABSENT))
    member = groups[:, None, :] == torch.arange(n_groups)[None, :, None]  # (F, Q, NB)
    inf = torch.tensor(float("inf"))
    bin_low = torch.where(member, low[None, None, :], inf).amin(2)
    bin_high = torch.where(member, high[None, None, :], -inf).amax(2)
    unused = ~member.any(2)
    bin_low[unused] = float("nan")
    bin_high[unused] = float("nan")
    bin_count = (member * hist[:, None, :]).sum(2)
    return Samples(bin_low, bin_high, bin_count, cells, slots)


def window_tokens(tokens: Tensor, rows: Tensor, radius: int, context_size: int) -> Tensor:
    """(..., W) token ids around each global row in rows (...), -1 outside its context (or
    for absent rows)."""
    offsets = torch.arange(-radius, radius + 1)
    pos = (rows % context_size)[..., None] + offsets  # (..., W)
    inside = (pos >= 0) & (pos < context_size) & (rows >= 0)[..., None]
    where = (rows[..., None] + offsets).clamp(0, len(tokens) - 1)
    return torch.where(inside, tokens[where], torch.full_like(tokens[where], ABSENT))


def exact_effects(model, directions: Tensor, resid: Tensor, targets: Tensor, rows: Tensor,
                  features: Tensor, acts: Tensor) -> Tensor:
    """(P,) last-layer ablation effects of P (global row, feature, activation) pairs, from the
    store's final residuals `resid` (N, C) and next tokens `targets` (N,)."""
    if not len(rows):
        return torch.zeros(0)
    unique, pair_rows = torch.unique(rows, return_inverse=True)
    device = directions.device
    return last_layer_effects(model, directions, resid[unique].to(device), targets[unique].to(device),
                              pair_rows.to(device), features.to(device), acts.to(device)).cpu()


def top_window_pairs(top_rows: Tensor, top_acts: Tensor, radius: int) -> tuple[Tensor, ...]:
    """(feature, k index, window index, global row, activation) of every firing window token."""
    f, j, w = (top_acts > 0).nonzero(as_tuple=True)
    rows = top_rows[f, j] + (w - radius)
    return f, j, w, rows, top_acts[f, j, w]


def rerun_top_effects(model, layer: int, encoder, w_dec: Tensor, store_tokens: Tensor, store_targets: Tensor,
                      top_rows: Tensor, top_acts: Tensor, n_examples: int, radius: int, context_size: int,
                      device: torch.device) -> Tensor:
    """(F, k, W) effects for the first `n_examples` top windows of each feature when the hooked
    layer is not the last: one re-run per window, batched, each context cut after its window."""
    out = torch.full(top_acts.shape, float("nan"))
    F_, k, W = top_acts.shape
    n = min(n_examples, k)
    f, j = torch.meshgrid(torch.arange(F_), torch.arange(n), indexing="ij")
    f, j = f.reshape(-1), j.reshape(-1)
    rows = top_rows[f, j]
    keep = rows >= 0
    f, j, rows = f[keep], j[keep], rows[keep]
    if not len(rows):
        return out
    pos = rows % context_size
    ends = (pos + radius + 1).clamp(max=context_size)
    order = torch.argsort(ends)
    f, j, rows, pos, ends = f[order], j[order], rows[order], pos[order], ends[order]
    starts = rows - pos
    batch = 32
    for s in range(0, len(rows), batch):
        part = slice(s, s + batch)
        length = int(ends[part].max())
        span = starts[part, None] + torch.arange(length)  # (b, L)
        deltas = rerun_effects(model, layer, encoder.one, w_dec, store_tokens[span].long().to(device),
                               store_targets[span].to(device), f[part].to(device), batch=batch).cpu()
        win = pos[part, None] + torch.arange(-radius, radius + 1)  # (b, W)
        inside = (win >= 0) & (win < ends[part, None])
        values = deltas.gather(1, win.clamp(0, length - 1))
        acts = top_acts[f[part], j[part]]  # (b, W)
        out[f[part], j[part]] = torch.where(inside & (acts > 0), values, torch.tensor(float("nan")))
    return out
