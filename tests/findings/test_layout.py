"""The 2-D map keeps similar directions together."""

import torch

from monofast.findings.layout import layout, neighbours


def test_neighbours_exclude_the_point_itself():
    unit = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    near = neighbours(unit, 5, chunk=16)
    assert near.shape == (50, 5)
    assert not (near == torch.arange(50)[:, None]).any()
    sim = unit @ unit.T
    sim.fill_diagonal_(-2)
    assert torch.equal(near[:, 0], sim.argmax(1))


def test_clusters_stay_apart():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 3
    label = torch.arange(400) % 4
    x = centres[label] + torch.randn(400, 32, generator=g)
    y = layout(x, epochs=150, seed=0)
    assert y.shape == (400, 2) and torch.isfinite(y).all()
    d = torch.cdist(y, y)
    d.fill_diagonal_(float("inf"))
    assert (label[d.argmin(1)] == label).float().mean() > 0.95
    means = torch.stack([y[label == c].mean(0) for c in range(4)])
    spread = torch.stack([(y[label == c] - means[c]).norm(dim=1).mean() for c in range(4)]).mean()
    between = torch.cdist(means, means)[~torch.eye(4, dtype=torch.bool)].min()
    assert between > 2 * spread


def test_tiny_inputs():
    assert layout(torch.randn(2, 4)).shape == (2, 2)
    assert layout(torch.randn(5, 4), epochs=10).shape == (5, 2)
