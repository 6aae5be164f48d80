"""Which source a run of tokens reads like: per-source n-gram models over the BPE token ids.

Each source gets its own token n-gram model, trained on that source's tokens of the train
split. Probabilities are smoothed hierarchically (a Dirichlet prior centred on the next
lower order, as in MacKay and Peto's hierarchical Dirichlet language model):

    p0(w)          = (c(w) + 1) / (N + V)
    pn(w | ctx_n)  = (c(ctx_n w) + alpha p(n-1)(w | ctx_(n-1))) / (c(ctx_n) + alpha)

so an unseen context falls back to the lower order, and every level is a distribution.
A sequence is classified by its log-likelihood under each source's model (the argmax; for
two sources, the sign of the log-likelihood ratio). Counts are sorted int64 n-gram keys
(w1 V^(n-1) + ... + wn) with their counts, looked up by binary search: training on the
quick run's 0.77M tokens takes 0.17 s and scoring its 2,097 validation chunks of 40 tokens
0.05 s (2 cores), so nothing is saved: it is rebuilt from the data when needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from monofast.common.errors import DataError
from monofast.data.splits import Split, load_meta, load_split

ORDER = 3
"""Trigrams. On the quick run's validation split, chunks of 40 tokens are all classified
right from order 2 up (2,097 chunks; unigrams 99.95%); at 10 tokens, where there is
something to choose, unigrams score 98.3%, bigrams 98.9%, trigrams 99.0% (alpha 4)."""
ALPHA = 4.0
"""Prior strength; 0.5 to 8 score within 0.3% of each other on those 10-token chunks."""


class NgramCounts(NamedTuple):
    """Counts of the n-grams of one order (n tokens) and of their (n - 1)-token contexts."""

    keys: np.ndarray
    """(K,) int64 sorted n-gram keys."""
    counts: np.ndarray
    """(K,) int64 occurrences of each."""
    context_keys: np.ndarray
    """(C,) int64 sorted keys of the contexts (the first n - 1 tokens) that are followed by a token."""
    context_counts: np.ndarray
    """(C,) int64 how often each context is followed by a token."""


@dataclass(frozen=True)
class SourceModel:
    """One source's token n-gram model."""

    unigram: np.ndarray
    """(V,) float64 smoothed unigram probabilities, p0."""
    levels: tuple[NgramCounts, ...]
    """Counts of the bigrams, trigrams, ... (levels[i] holds (i + 2)-grams)."""
    tokens: int
    """Training tokens of this source."""


class Accuracy(NamedTuple):
    """How often validation chunks are classified as their own source."""

    overall: float
    """Over all chunks."""
    by_source: dict[str, float]
    """Per source name (sources without a whole chunk are left out)."""
    chunks: dict[str, int]
    """Chunks scored per source."""
    length: int
    """Tokens per chunk."""
    token_logprob: dict[str, float]
    """Mean log-probability per token of each source's chunks under its own model: what
    real text of the source scores (generated text far below it is not fluent)."""


@dataclass(frozen=True)
class SourceClassifier:
    """Per-source n-gram models over token ids; `classify` names the likeliest source."""

    sources: tuple[str, ...]
    """Source names, by id."""
    vocab_size: int
    """Token ids are < vocab_size."""
    order: int
    """n of the n-grams (1: unigrams only)."""
    alpha: float
    """Prior strength of the hierarchical smoothing."""
    models: tuple[SourceModel, ...] = field(repr=False)
    """One model per source, by id."""

    def log_likelihood(self, chunks: np.ndarray) -> np.ndarray:
        """(N, S) float64 log-probability of each chunk (N, L) of token ids under each source.
        Each token is scored given the tokens before it in its chunk (up to order - 1)."""
        chunks = np.asarray(chunks, dtype=np.int64)  # (N, L)
        if chunks.ndim != 2:
            raise ValueError(f"chunks must be (N, L) token ids, got shape {chunks.shape}")
        if chunks.size and (chunks.min() < 0 or chunks.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}); got {chunks.min()}..{chunks.max()}")
        return np.stack([self._token_log_probs(m, chunks).sum(1) for m in self.models], axis=1)

    def llr(self, chunks: np.ndarray, source: int = 1, against: int = 0) -> np.ndarray:
        """(N,) log p(chunk | source) - log p(chunk | against): positive reads as `source`."""
        ll = self.log_likelihood(chunks)  # (N, S)
        return ll[:, source] - ll[:, against]

    def classify(self, chunks: np.ndarray) -> np.ndarray:
        """(N,) int64 id of the likeliest source of each chunk (N, L)."""
        return self.log_likelihood(chunks).argmax(axis=1)

    def _token_log_probs(self, model: SourceModel, chunks: np.ndarray) -> np.ndarray:
        """(N, L) log p(token | up to order - 1 tokens before it in the chunk)."""
        V = self.vocab_size
        p = model.unigram[chunks]  # (N, L)
        key = chunks.copy()  # (N, L): at position t, the key of the n tokens ending at t
        for n, level in enumerate(model.levels, start=2):
            if chunks.shape[1] < n:
                break
            context = key[:, :-1]  # (N, L - n + 1): the (n - 1)-grams ending at t - 1
            key = context * V + chunks[:, n - 1:]  # (N, L - n + 1)
            hits = _lookup(level.keys, level.counts, key)  # (N, L - n + 1)
            seen = _lookup(level.context_keys, level.context_counts, context)  # (N, L - n + 1)
            p[:, n - 1:] = (hits + self.alpha * p[:, n - 1:]) / (seen + self.alpha)
        return np.log(p)


def _lookup(keys: np.ndarray, counts: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Counts of `query` keys (any shape) in sorted `keys` (0 where absent), as float64."""
    if len(keys) == 0:
        return np.zeros(query.shape)
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[at] == query, counts[at], 0).astype(np.float64)


def _ngram_keys(tokens: np.ndarray, n: int, vocab_size: int) -> np.ndarray:
    """(len(tokens) - n + 1,) int64 key of every n-gram of consecutive tokens."""
    key = tokens[:len(tokens) - n + 1].astype(np.int64)
    for j in range(1, n):
        key = key * vocab_size + tokens[j:len(tokens) - n + 1 + j]
    return key


def _runs(sources: np.ndarray, source: int) -> list[tuple[int, int]]:
    """[begin, end) of each maximal run of `source` in the (N,) source ids."""
    inside = np.concatenate([[False], sources == source, [False]])
    edges = np.flatnonzero(np.diff(inside.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def train_source_model(runs: Sequence[np.ndarray], vocab_size: int, order: int) -> SourceModel:
    """One source's model from its runs of consecutive tokens (no n-gram spans two runs)."""
    runs = [np.asarray(r, dtype=np.int64) for r in runs]
    total = sum(len(r) for r in runs)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for r in runs:
        counts += np.bincount(r, minlength=vocab_size)
    unigram = (counts + 1.0) / (total + vocab_size)
    levels = []
    for n in range(2, order + 1):
        grams = [_ngram_keys(r, n, vocab_size) for r in runs if len(r) >= n]
        grams_all = np.concatenate(grams) if grams else np.zeros(0, np.int64)
        keys, key_counts = np.unique(grams_all, return_counts=True)
        context_keys, context_counts = np.unique(grams_all // vocab_size, return_counts=True)
        levels.append(NgramCounts(keys, key_counts.astype(np.int64), context_keys, context_counts.astype(np.int64)))
    return SourceModel(unigram, tuple(levels), total)


def train_classifier(split: Split, names: Sequence[str], vocab_size: int, order: int = ORDER,
                     alpha: float = ALPHA) -> SourceClassifier:
    """A classifier from the tokens of `split`, one model per source name (by id)."""
    if order < 1:
        raise ValueError(f"order={order} must be at least 1 (unigrams)")
    if vocab_size ** order >= 2 ** 62:
        raise ValueError(f"{order}-gram keys of a {vocab_size}-token vocabulary overflow int64; use order "
                         f"{max(1, int(62 / np.log2(max(vocab_size, 2))))} or lower")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} must be > 0, e.g. {ALPHA}")
    tokens, sources = np.asarray(split.tokens), np.asarray(split.sources)
    models = []
    for i, name in enumerate(names):
        runs = [tokens[b:e] for b, e in _runs(sources, i)]
        if not runs:
            raise DataError(f"source {name!r} has no tokens in the training split; the classifier needs "
                            f"some of every source: rebuild the data with `monofast data --force`")
        models.append(train_source_model(runs, vocab_size, order))
    return SourceClassifier(tuple(names), vocab_size, order, alpha, tuple(models))


def source_names(meta: dict) -> tuple[str, ...]:
    """Source names of a data meta.json, by id."""
    return tuple(s["name"] for s in sorted(meta["sources"], key=lambda s: s["id"]))


def load_classifier(data_dir: str | Path, order: int = ORDER, alpha: float = ALPHA) -> SourceClassifier:
    """The classifier of a built dataset, trained on its train split."""
    meta = load_meta(data_dir)
    return train_classifier(load_split(data_dir, "train", meta), source_names(meta), meta["vocab_size"],
                            order, alpha)


def source_chunks(split: Split, source: int, length: int) -> np.ndarray:
    """(N, length) int64 consecutive, non-overlapping chunks of `source`'s tokens in `split`
    (each within one run of the source; a run's remainder is dropped)."""
    tokens = np.asarray(split.tokens)
    parts = []
    for begin, end in _runs(np.asarray(split.sources), source):
        whole = (end - begin) // length
        parts.append(tokens[begin:begin + whole * length].astype(np.int64).reshape(whole, length))
    return np.concatenate(parts) if parts else np.zeros((0, length), np.int64)


def accuracy(classifier: SourceClassifier, split: Split, length: int,
             max_chunks: Optional[int] = None) -> Accuracy:
    """Share of `split`'s chunks of `length` tokens classified as their own source (at most
    `max_chunks` per source, evenly spaced)."""
    if length < 1:
        raise ValueError(f"length={length} must be at least 1 token")
    right, chunks, logprob = {}, {}, {}
    for i, name in enumerate(classifier.sources):
        own = source_chunks(split, i, length)
        if max_chunks is not None and len(own) > max_chunks:
            own = own[np.linspace(0, len(own) - 1, max_chunks).astype(np.int64)]
        if len(own):
            ll = classifier.log_likelihood(own)  # (N, S)
            right[name] = int((ll.argmax(axis=1) == i).sum())
            chunks[name] = len(own)
            logprob[name] = float(ll[:, i].mean() / length)
    total = sum(chunks.values())
    return Accuracy(sum(right.values()) / total if total else float("nan"),
                    {name: right[name] / chunks[name] for name in chunks}, chunks, length, logprob)


def validation_accuracy(classifier: SourceClassifier, data_dir: str | Path, length: int,
                        max_chunks: Optional[int] = None) -> Accuracy:
    """`accuracy` on the validation split of `data_dir`."""
    return accuracy(classifier, load_split(data_dir, "val"), length, max_chunks)
