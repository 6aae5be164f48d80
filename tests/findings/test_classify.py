"""The source classifier: per-source token n-gram models, checked on sources built here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from monofast.data.splits import Split
from monofast.findings.classify import (accuracy, load_classifier, source_chunks, train_classifier,
                                        train_source_model, validation_accuracy)

V = 40


def two_sources(tokens_each: int, seed: int) -> Split:
    """Source 0 walks up a cycle of tokens 0..19 with small jumps; source 1 draws tokens
    10..39 at random, twice as often from 30..39. They share tokens 10..19, so no single
    token names the source for sure, but their bigrams differ."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.integers(1, 3, tokens_each)) % 20
    probs = np.r_[np.full(20, 1.0), np.full(10, 2.0)]
    draws = rng.choice(np.arange(10, 40), tokens_each, p=probs / probs.sum())
    sources = np.r_[np.zeros(tokens_each), np.ones(tokens_each)].astype(np.uint8)
    return Split(np.r_[walk, draws].astype(np.uint16), sources)


@pytest.fixture(scope="module")
def classifier():
    return train_classifier(two_sources(20_000, seed=0), ("walk", "noise"), V)


def test_probabilities_are_distributions():
    """Each order's smoothed next-token probabilities sum to one over the vocabulary, for a
    seen context and an unseen one."""
    clf = train_classifier(two_sources(2_000, seed=1), ("walk", "noise"), V, order=3, alpha=1.5)
    for context in ([3, 4], [39, 0]):
        chunks = np.array([[*context, w] for w in range(V)])  # (V, 3)
        for model in clf.models:
            p = np.exp(clf._token_log_probs(model, chunks)[:, 2])
            assert math.isclose(p.sum(), 1.0, rel_tol=1e-9)


def test_counts_by_hand():
    model = train_source_model([np.array([1, 2, 1, 2, 3]), np.array([2, 1])], vocab_size=5, order=2)
    assert model.tokens == 7
    np.testing.assert_allclose(model.unigram, (np.array([0, 3, 3, 1, 0]) + 1) / (7 + 5))
    bigrams = model.levels[0]
    assert dict(zip(bigrams.keys.tolist(), bigrams.counts.tolist())) == {1 * 5 + 2: 2, 2 * 5 + 1: 2, 2 * 5 + 3: 1}
    contexts = dict(zip(bigrams.context_keys.tolist(), bigrams.context_counts.tolist()))
    assert contexts == {1: 2, 2: 3}  # the 3 -> 2 across the two runs is no bigram


@pytest.mark.parametrize("order", [1, 2, 3])
def test_held_out_accuracy_is_high(classifier, order):
    clf = classifier if order == 3 else train_classifier(two_sources(20_000, seed=0), ("walk", "noise"), V, order)
    result = accuracy(clf, two_sources(4_000, seed=9), length=20)
    assert result.chunks == {"walk": 200, "noise": 200} and result.length == 20
    assert result.overall >= 0.98 and min(result.by_source.values()) >= 0.95


def test_llr_sign(classifier):
    held_out = two_sources(1_000, seed=5)
    walk, noise = source_chunks(held_out, 0, 25), source_chunks(held_out, 1, 25)
    assert (classifier.llr(walk, source=1, against=0) < 0).mean() > 0.95
    assert (classifier.llr(noise, source=1, against=0) > 0).mean() > 0.95
    # a pure run of the walk's own cycle reads as the walk, one from 30..39 as noise
    runs = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [31, 35, 30, 38, 33, 36, 31, 39]])
    assert classifier.classify(runs).tolist() == [0, 1]


def test_three_sources_take_the_argmax():
    split = two_sources(5_000, seed=2)
    third = 20 + np.arange(5_000, dtype=np.uint16) % 3  # 20 21 22 20 ...
    both = Split(np.r_[split.tokens, third], np.r_[split.sources, np.full(5_000, 2, np.uint8)])
    clf = train_classifier(both, ("walk", "noise", "cycle"), V)
    assert clf.classify(np.array([[20, 21, 22, 20, 21, 22]])).tolist() == [2]
    assert accuracy(clf, both, 20).by_source["cycle"] == 1.0


def test_chunks_stay_inside_runs():
    split = Split(np.arange(12, dtype=np.uint16), np.array([0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 0], np.uint8))
    np.testing.assert_array_equal(source_chunks(split, 0, 2), [[0, 1], [5, 6], [7, 8]])
    assert source_chunks(split, 1, 3).shape == (0, 3)


def test_bad_inputs(classifier):
    with pytest.raises(ValueError, match="token ids must be in"):
        classifier.classify(np.array([[1, V]]))
    with pytest.raises(ValueError, match="overflow int64; use order 3"):
        train_classifier(two_sources(100, seed=0), ("a", "b"), 65_536, order=4)
    with pytest.raises(ValueError, match="at least 1"):
        accuracy(classifier, two_sources(100, seed=0), 0)


def test_on_built_data(tmp_path):
    from conftest import build_small_data

    data = build_small_data(tmp_path)
    clf = load_classifier(data)
    assert clf.sources == ("verse", "code")
    result = validation_accuracy(clf, data, length=16)
    assert set(result.chunks) == {"verse", "code"} and result.overall >= 0.95
