"""Streaming selections over the analysis pass: exact top-k per feature and uniform
reservoir samples per (feature, activation bin) cell.

Both keep, beside each kept entry, a *payload* (its token window, the activations and
ablation effects there) that only the batch holding the entry can compute. Payloads are
computed for the entries that enter the selection, never for those that do not: with the
contexts in random order the top-k of a column changes about k (1 + ln(batches)) times
over a pass, a reservoir cell R (1 + ln(items / R)) times.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from monofast.common.errors import UserError
from monofast.common.hf import available_memory

Payload = Callable[[Tensor, Tensor], dict[str, Tensor]]
"""`fn(features (m,), rows (m,)) -> {name: (m, ...)}`: the payload of m new entries, given
each one's feature and its row in the current batch."""

EMPTY_KEY = 2.0
"""Key of an empty reservoir slot: above every real key (those lie in [0, 1))."""


def _allocate(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], lead: tuple[int, ...],
              device: torch.device, fix: str) -> dict[str, Tensor]:
    """Payload buffers of shape lead + each entry's shape, NaN (floats) or -1 (integers);
    refused with `fix` (the options to lower) when they alone exceed the memory free on `device`."""
    need = math.prod(lead) * sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())
    free = available_memory(device)
    if free is not None and need > free:
        raise UserError(f"analysis: the example windows need {need / 2**30:.1f} GiB but {device} has "
                        f"{free / 2**30:.1f} GiB free; {fix}")
    out = {}
    for name, (shape, dtype) in shapes.items():
        fill = float("nan") if dtype.is_floating_point else -1
        out[name] = torch.full(lead + shape, fill, dtype=dtype, device=device)
    return out


class StreamingTopK:
    """The k largest positive values of every column of a stream of (rows, F) matrices.

    Exact: after any sequence of `update`s, `values[f]` equals `torch.topk` of column f over
    every row seen (values <= 0 never enter), sorted descending, and `ids[f]` holds the
    global row ids of those values (-1 for empty slots).
    """

    def __init__(self, n_features: int, k: int, payload: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device):
        self.k = k
        self.values = torch.zeros(n_features, k, device=device)  # (F, k)
        self.ids = torch.full((n_features, k), -1, dtype=torch.int64, device=device)  # (F, k)
        self.payload = _allocate(payload, (n_features, k), device,  # each (F, k, ...)
                                 "lower --top-k or --window-radius")

    def threshold(self) -> Tensor:
        """(F,) the value a new entry of each column must beat (0 while it has free slots)."""
        return self.values[:, -1]

    def update_dense(self, acts: Tensor, first_row: int, payload_fn: Payload) -> int:
        """Merge a batch `acts` (n, F) whose rows have global ids first_row..first_row+n-1.
        Returns the number of entries that entered."""
        kb = min(self.k, acts.shape[0])
        batch_v, batch_rows = acts.topk(kb, dim=0)  # (kb, F) each
        return self._merge(batch_v.T.float(), batch_rows.T, first_row, payload_fn)

    def update_sparse(self, features: Tensor, values: Tensor, rows: Tensor, first_row: int,
                      payload_fn: Payload) -> int:
        """Merge a batch given as its nonzero entries (all (m,)): the same result as
        `update_dense` on the dense matrix, without scanning it (only entries above their
        column's threshold are sorted)."""
        cand = (values > self.threshold()[features]).nonzero().squeeze(1)  # (m',)
        f, v, r = features[cand], values[cand].float(), rows[cand]
        # One integer sort by (column, value descending): positive float32 values order like
        # their bit patterns, so the key is column * 2^31 + (2^31 - 1 - bits).
        bits = v.view(torch.int32).long()
        order = torch.argsort(f.long() * 2**31 + (2**31 - 1 - bits))
        f, v, r = f[order], v[order], r[order]
        counts = torch.bincount(f, minlength=self.values.shape[0])  # (F,)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(f), device=f.device) - starts[f]
        keep = rank < self.k
        batch_v = torch.zeros_like(self.values)  # (F, k)
        batch_rows = torch.zeros_like(self.ids)  # (F, k)
        batch_v[f[keep], rank[keep]] = v[keep]
        batch_rows[f[keep], rank[keep]] = r[keep]
        return self._merge(batch_v, batch_rows, first_row, payload_fn)

    def _merge(self, batch_v: Tensor, batch_rows: Tensor, first_row: int, payload_fn: Payload) -> int:
        """Merge candidates batch_v, batch_rows (F, kb), each row sorted descending."""
        merged_v = torch.cat([self.values, batch_v], dim=1)  # (F, k + kb)
        top_v, order = merged_v.topk(self.k, dim=1)  # (F, k): positions in the merged list
        fresh = (order >= self.k) & (top_v > 0)  # (F, k) entries from this batch
        from_old = order.clamp(max=self.k - 1)  # (F, k)
        batch_pos = (order - self.k).clamp(min=0)  # (F, k)
        rows = batch_rows.gather(1, batch_pos)  # (F, k) batch row of each entry
        ids = torch.where(fresh, rows + first_row, self.ids.gather(1, from_old))
        self.values = torch.where(top_v > 0, top_v, torch.zeros_like(top_v))
        self.ids = torch.where(top_v > 0, ids, torch.full_like(ids, -1))
        feat_idx, slot_idx = fresh.nonzero(as_tuple=True)  # (m,) each
        new = payload_fn(feat_idx, rows[feat_idx, slot_idx]) if len(feat_idx) else {}
        for name, buf in self.payload.items():
            index = from_old.view(from_old.shape + (1,) * (buf.dim() - 2)).expand_as(buf)
            buf = buf.gather(1, index)  # entries kept from before, in their new slots
            if name in new:
                buf[feat_idx, slot_idx] = new[name].to(buf.dtype)
            self.payload[name] = buf
        return int(len(feat_idx))


class CellReservoir:
    """A uniform random sample without replacement of up to R items per cell, over a stream.

    Every item gets a uniform random key in [0, 1); each cell keeps the R items with the
    smallest keys among all it has seen (a bottom-R sketch), which is a uniform sample of
    them. Because keys are uniform whatever the cell, the m <= R smallest keys among the
    kept items of several cells are also a uniform sample of the union of those cells:
    that is how the quantile bins, unions of adjacent histogram cells, are sampled.
    """

    def __init__(self, n_cells: int, capacity: int,
                 payload: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device):
        self.capacity = capacity
        self.keys = torch.full((n_cells, capacity), EMPTY_KEY, device=device)  # (C, R)
        self.values = torch.zeros(n_cells, capacity, device=device)  # (C, R)
        self.ids = torch.full((n_cells, capacity), -1, dtype=torch.int64, device=device)  # (C, R)
        self.payload = _allocate(payload, (n_cells, capacity), device,  # each (C, R, ...)
                                 "lower --quantile-samples, --bins-per-decade or --window-radius")

    def thresholds(self, cells: Tensor) -> Tensor:
        """(m,) the key an item of each cell must be below to enter (its R-th smallest kept key)."""
        return self.keys.max(dim=1).values[cells]

    def update(self, cells: Tensor, keys: Tensor, values: Tensor, rows: Tensor, first_row: int,
               features: Tensor, payload_fn: Payload) -> int:
        """Offer m items: their cells, uniform random keys in [0, 1) that are multiples of 2^-24,
        values, batch rows and features (all (m,)). Returns the number that entered."""
        cand = (keys < self.thresholds(cells)).nonzero().squeeze(1)  # (m',) can still enter
        if not len(cand):
            return 0
        cells, keys = cells[cand], keys[cand]
        # Keys are multiples of 2^-24 (see `update`), so (cell, key) packs into one exact integer.
        order = torch.argsort(cells.long() * 2**24 + (keys * 2**24).long())  # by cell, then key
        cells, keys, cand = cells[order], keys[order], cand[order]
        touched, counts = torch.unique_consecutive(cells, return_counts=True)  # (t,)
        starts = torch.cumsum(counts, 0) - counts  # (t,)
        slot = torch.arange(len(cells), device=cells.device) - torch.repeat_interleave(starts, counts)
        keep = slot < self.capacity  # the batch's own R smallest keys per cell
        cells, keys, cand, slot = cells[keep], keys[keep], cand[keep], slot[keep]
        cell_pos = torch.repeat_interleave(torch.arange(len(touched), device=cells.device), counts)[keep]
        new_keys = torch.full((len(touched), self.capacity), EMPTY_KEY, device=keys.device)  # (t, R)
        new_keys[cell_pos, slot] = keys.float()
        merged = torch.cat([self.keys[touched], new_keys], dim=1)  # (t, 2R)
        top_keys, pick = merged.topk(self.capacity, dim=1, largest=False)  # (t, R)
        fresh = (pick >= self.capacity) & (top_keys < 1.0)  # (t, R) entries from this batch
        from_old = pick.clamp(max=self.capacity - 1)  # (t, R)
        # Map each fresh slot back to its item: the new_keys column is pick - R.
        item_of = torch.full((len(touched), self.capacity), -1, dtype=torch.int64, device=keys.device)
        item_of[cell_pos, slot] = cand
        t_idx, r_idx = fresh.nonzero(as_tuple=True)  # (n_new,)
        items = item_of[t_idx, pick[t_idx, r_idx] - self.capacity]  # (n_new,) index into the offer
        new = payload_fn(features[items], rows[items]) if len(items) else {}
        old_values = self.values[touched].gather(1, from_old)
        old_ids = self.ids[touched].gather(1, from_old)
        old_values[t_idx, r_idx] = values[items].float()
        old_ids[t_idx, r_idx] = rows[items] + first_row
        self.keys[touched] = top_keys
        self.values[touched] = old_values
        self.ids[touched] = old_ids
        for name, buf in self.payload.items():
            part = buf[touched]
            index = from_old.view(from_old.shape + (1,) * (part.dim() - 2)).expand_as(part)
            part = part.gather(1, index)
            if name in new:
                part[t_idx, r_idx] = new[name].to(part.dtype)
            buf[touched] = part
        return int(len(items))
