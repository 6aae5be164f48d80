"""Which token contexts the analysis reads, and their batches.

Contexts tile each split without overlap (so no token is counted twice and no two
examples show the same text), each reads one extra token as the next-token target of its
last position, and an equal number is drawn from every source so that a feature's
source shares are not skewed by one source having more text. The chosen contexts are
visited in a seeded random order: batches mix sources, and the streaming top-k then
replaces few entries after the first batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from monofast.common.errors import DataError
from monofast.common.log import logger
from monofast.data.splits import load_meta, load_split


class ContextPlan(NamedTuple):
    """The contexts of one analysis pass, in visiting order."""

    split: np.ndarray
    """(N,) uint8 index into `splits` of each context."""
    start: np.ndarray
    """(N,) int64 offset of each context's first token in its split."""
    splits: tuple[str, ...]
    """Split names that `split` indexes."""
    size: int
    """Tokens per context (each also reads one more token, the last target)."""


class Batch(NamedTuple):
    """One batch of contexts, as host arrays."""

    first: int
    """Index in the plan of the batch's first context."""
    idx: np.ndarray
    """(b, T) int64 input tokens."""
    targets: np.ndarray
    """(b, T) int64 next tokens (the input shifted by one, plus the token after the context)."""
    sources: np.ndarray
    """(b, T) int64 source id of each input token."""


def _tiles(n_tokens: int, size: int) -> np.ndarray:
    """Starts of non-overlapping contexts of `size` tokens that each have a next token."""
    if n_tokens < size + 1:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n_tokens - size, size, dtype=np.int64)


def plan(data_dir: str | Path, splits: tuple[str, ...], size: int, budget: int, n_sources: int,
         seed: int) -> ContextPlan:
    """Up to `budget` tokens of contexts, the same number from each source, shuffled."""
    meta = load_meta(data_dir)
    per_source: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n_sources)]
    for i, name in enumerate(splits):
        split = load_split(data_dir, name, meta)
        starts = _tiles(len(split.tokens), size)
        owner = np.asarray(split.sources[starts]) if len(starts) else np.zeros(0, np.uint8)  # (n,)
        for sid in range(n_sources):
            per_source[sid].append((i, starts[owner == sid]))
    rng = np.random.default_rng(seed)
    want = max(1, budget // (size * n_sources))
    chosen_split, chosen_start = [], []
    for sid, parts in enumerate(per_source):
        split_ids = np.concatenate([np.full(len(s), i, np.uint8) for i, s in parts])
        starts = np.concatenate([s for _, s in parts])
        if len(starts) < want:
            if len(starts):
                logger.info("analysis: source %d has %d contexts of %d tokens, fewer than the %d "
                            "the budget asks for: using all of them", sid, len(starts), size, want)
            keep = np.arange(len(starts))
        else:
            keep = np.sort(rng.choice(len(starts), size=want, replace=False))
        chosen_split.append(split_ids[keep])
        chosen_start.append(starts[keep])
    split_arr = np.concatenate(chosen_split)
    start_arr = np.concatenate(chosen_start)
    if not len(start_arr):
        raise DataError(f"no context of {size + 1} tokens fits the {', '.join(splits)} split(s); "
                        f"lower --context-size or give the data stage more text")
    order = rng.permutation(len(start_arr))
    return ContextPlan(split_arr[order], start_arr[order], tuple(splits), size)


def batches(data_dir: str | Path, plan_: ContextPlan, batch_contexts: int) -> Iterator[Batch]:
    """The plan's contexts, `batch_contexts` at a time, read from the memory-mapped splits."""
    meta = load_meta(data_dir)
    loaded = [load_split(data_dir, name, meta) for name in plan_.splits]
    span = np.arange(plan_.size + 1)  # (T + 1,)
    for first in range(0, len(plan_.start), batch_contexts):
        rows = slice(first, first + batch_contexts)
        tokens = np.empty((len(plan_.start[rows]), plan_.size + 1), dtype=np.int64)  # (b, T + 1)
        sources = np.empty((len(plan_.start[rows]), plan_.size), dtype=np.int64)  # (b, T)
        for j, (s, start) in enumerate(zip(plan_.split[rows], plan_.start[rows])):
            window = start + span
            tokens[j] = loaded[s].tokens[window]
            sources[j] = loaded[s].sources[window[:-1]]
        yield Batch(first, tokens[:, :-1], tokens[:, 1:], sources)
