"""Matching across dictionaries and models on hand-checkable cases: a planted permutation of
features, a planted parent with two children, the threshold, the running correlations."""

import numpy as np
import pytest
import torch

from monofast.findings import matching


def sparse_codes(n: int, f: int, generator: torch.Generator, rate: float = 0.05) -> torch.Tensor:
    """(n, f) non-negative activations, each feature firing on about `rate` of the rows."""
    fires = torch.rand(n, f, generator=generator) < rate
    return torch.where(fires, torch.rand(n, f, generator=generator) + 0.1, torch.zeros(()))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_correlation_finds_a_planted_permutation(sparse):
    g = torch.Generator().manual_seed(0)
    a = sparse_codes(4000, 64, g)
    perm = torch.randperm(64, generator=g)
    b = a[:, perm] * 3.0 + 0.01 * torch.rand(4000, 64, generator=g)  # B's feature j is A's perm[j]
    moments = matching.CrossMoments(64, 64, sparse=sparse)
    for chunk in range(0, 4000, 1000):  # sums over chunks equal one pass
        moments.add(a[chunk:chunk + 1000], b[chunk:chunk + 1000])
    corr = moments.correlation()
    expected = np.corrcoef(a.double().numpy().T, b.double().numpy().T)[:64, 64:]
    np.testing.assert_allclose(corr.numpy(), expected, atol=1e-6)
    found = matching.best_matches(corr)
    inverse = torch.argsort(perm).numpy()  # A's feature i went to B's column inverse[i]
    np.testing.assert_array_equal(found.index, inverse)
    assert (found.value > 0.99).all()


def test_a_unit_that_never_varies_has_no_match():
    x = torch.rand(100, 3)
    x[:, 1] = 0.0
    moments = matching.CrossMoments(3, 3)
    moments.add(x, torch.rand(100, 3))
    found = matching.best_matches(moments.correlation())
    assert found.index[1] == -1 and np.isnan(found.value[1])
    assert (found.index[[0, 2]] >= 0).all()


def test_pair_correlation_matches_numpy():
    g = torch.Generator().manual_seed(1)
    x = sparse_codes(500, 4, g, rate=0.3)
    y = sparse_codes(500, 3, g, rate=0.3)
    y[:, 0] = 2 * x[:, 2] + 0.1 * y[:, 0]  # feature 0 of Y follows feature 2 of X
    pairs = matching.PairMoments(np.array([2, 0, 3]))
    pairs.add(x[:250], y[:250])
    pairs.add(x[250:], y[250:])
    want = [np.corrcoef(x[:, i].numpy(), y[:, k].numpy())[0, 1] for k, i in enumerate([2, 0, 3])]
    np.testing.assert_allclose(pairs.correlation(), want, atol=1e-6)
    assert pairs.correlation()[0] > 0.99


def test_decoder_cosine_finds_a_planted_parent_and_its_children():
    """Small SAE: 8 random directions. Large SAE: feature 3 split in two (its direction
    turned slightly two ways), every other small feature copied with noise, plus two
    directions unrelated to any."""
    g = torch.Generator().manual_seed(2)
    small = torch.nn.functional.normalize(torch.randn(8, 64, generator=g), dim=1)
    noise = torch.randn(8, 64, generator=g) * 0.05
    large = [small[i] + noise[i] for i in range(8) if i != 3]
    other = torch.nn.functional.normalize(torch.randn(2, 64, generator=g), dim=1)
    turn = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0) * 0.6
    large += [small[3] + turn, small[3] - turn, other[0], other[1]]
    large_t = torch.stack(large)  # (11, 64): rows 7 and 8 are feature 3's children
    best = matching.best_matches(matching.decoder_cosine(small, large_t))
    null = matching.null_best_cosine(small, 2000, torch.Generator().manual_seed(3))
    threshold = matching.clear_threshold(best.value, null)
    assert best.index[7] == best.index[8] == 3
    assert threshold.null < threshold.value < best.value[7]
    kids = matching.children(best.index, best.value, threshold.value, 8)
    assert sorted(kids[3]) == [7, 8]
    assert all(len(kids[i]) == 1 for i in range(8) if i != 3)
    assert 9 not in sum(kids, []) and 10 not in sum(kids, [])  # the unrelated directions have no parent


def test_threshold_rules():
    rng = np.random.default_rng(0)
    two_humps = np.concatenate([rng.normal(0.25, 0.03, 500), rng.normal(0.9, 0.03, 500)])
    t = matching.clear_threshold(two_humps, rng.normal(0.2, 0.02, 1000))
    assert 0.35 < t.value < 0.8 and "valley" in t.rule
    t = matching.clear_threshold(two_humps, rng.normal(0.7, 0.01, 1000))  # a null above the valley wins
    assert t.value == pytest.approx(t.null) and t.value > 0.7
    assert matching.clear_threshold(two_humps, two_humps, given=0.5).value == 0.5
