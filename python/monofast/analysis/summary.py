"""The numbers a reader wants first: how many features live, and whether the SAE's
features are more monosemantic (here: more one-source) than the MLP's own neurons."""

from __future__ import annotations

from typing import Any

import numpy as np

from monofast.analysis.stats import SourceShares

DENSE = 0.1
"""A unit firing on more than this fraction of tokens counts as dense."""
LOG_DENSITY_EDGES = np.arange(-7.0, 0.01, 0.25)
"""log10 density bins of the density histogram (densities below 1e-7 fall in the first)."""
PURITY_BINS = 20


def unit_counts(density: np.ndarray, ultralow: float) -> dict[str, int]:
    """Alive (density >= ultralow), ultralow (fires, but rarer), dead (never fires), dense."""
    dead = density == 0
    low = (density > 0) & (density < ultralow)
    return {"total": int(len(density)), "alive": int((~dead & ~low).sum()), "ultralow": int(low.sum()),
            "dead": int(dead.sum()), "dense": int((density > DENSE).sum())}


def _distribution(purity: np.ndarray, pure: float) -> dict[str, Any]:
    if not len(purity):
        return {"count": 0}
    return {"count": int(len(purity)), "mean": float(purity.mean()), "median": float(np.median(purity)),
            "p10": float(np.quantile(purity, 0.1)), "p90": float(np.quantile(purity, 0.9)),
            "pure_fraction": float((purity > pure).mean())}


def _pure_by_source(shares: SourceShares, alive: np.ndarray, names: list[str], pure: float) -> dict[str, float]:
    n = max(int(alive.sum()), 1)
    is_pure = alive & (shares.purity > pure)
    return {name: float((is_pure & (shares.dominant == s)).sum() / n) for s, name in enumerate(names)}


def _density_hist(density: np.ndarray) -> list[int]:
    logd = np.log10(np.clip(density[density > 0], 1e-7, 1.0))
    counts, _ = np.histogram(logd, bins=LOG_DENSITY_EDGES)
    return counts.tolist()


def summarize(feature_density: np.ndarray, feature_shares: SourceShares, neuron_density: np.ndarray,
              neuron_shares: SourceShares, names: list[str], ultralow: float, pure: float) -> dict[str, Any]:
    """summary.json's statistics (everything but the run's provenance)."""
    f_alive = feature_density >= max(ultralow, 1e-300)
    n_alive = neuron_density >= max(ultralow, 1e-300)
    edges = np.linspace(0.0, 1.0, PURITY_BINS + 1)
    f_purity, n_purity = feature_shares.purity[f_alive], neuron_shares.purity[n_alive]
    out: dict[str, Any] = {
        "features": unit_counts(feature_density, ultralow),
        "neurons": unit_counts(neuron_density, ultralow),
        "purity": {"features": _distribution(f_purity, pure), "neurons": _distribution(n_purity, pure),
                   "pure_share": pure},
        "pure_by_source": {"features": _pure_by_source(feature_shares, f_alive, names, pure),
                           "neurons": _pure_by_source(neuron_shares, n_alive, names, pure)},
        "density_histogram": {"log10_edges": LOG_DENSITY_EDGES.tolist(),
                              "features": _density_hist(feature_density),
                              "neurons": _density_hist(neuron_density)},
        "purity_histogram": {"edges": edges.tolist(),
                             "features": np.histogram(f_purity, bins=edges)[0].tolist(),
                             "neurons": np.histogram(n_purity, bins=edges)[0].tolist()},
    }
    out["verdict"] = verdict(out)
    return out


def verdict(summary: dict[str, Any]) -> str:
    """One sentence comparing the two bases, with the numbers."""
    f, n = summary["purity"]["features"], summary["purity"]["neurons"]
    if not f.get("count") or not n.get("count"):
        return "Too few alive features or neurons to compare the two bases."
    pct = summary["purity"]["pure_share"] * 100
    better = f["pure_fraction"] > n["pure_fraction"]
    return (f"{f['pure_fraction']:.0%} of alive features are more than {pct:.0f}% one source, against "
            f"{n['pure_fraction']:.0%} of alive neurons (median purity {f['median']:.2f} vs "
            f"{n['median']:.2f}): the SAE basis is {'more' if better else 'not more'} "
            f"monosemantic than the neuron basis by this measure.")
