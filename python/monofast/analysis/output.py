"""analysis/: the files the site reads, written atomically, and their reader.

    summary.json   counts (alive / ultralow / dead / dense features and neurons), purity of
                   features vs neurons, share of pure features per source, density and purity
                   histograms, sources and tokens analysed, hooked layer, timings, config
    features.npz   one row per SAE feature (FEATURE_ARRAYS)
    neurons.npz    one row per MLP neuron of the hooked layer (NEURON_ARRAYS)
    examples.npz   top-k windows and quantile samples per feature (`Examples` in examples.py)
    tokens.json    each token id's bytes (hex) and the special ids, for decoding windows

Arrays are plain `.npz` (numpy, no pickles), so any tool reads them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from monofast.common import files
from monofast.common.errors import DataError

FORMAT = 1
SUMMARY, FEATURES, NEURONS, EXAMPLES, TOKENS = ("summary.json", "features.npz", "neurons.npz",
                                                "examples.npz", "tokens.json")

FEATURE_ARRAYS = {
    "density": "(F,) float64 fraction of analysed tokens where the feature is > 0",
    "fires": "(F,) int64 tokens where it is > 0",
    "mean_act": "(F,) float32 mean activation over the tokens where it fires",
    "max_act": "(F,) float32 largest activation",
    "fires_by_source": "(F, S) int64 firings on each source's tokens",
    "mass_by_source": "(F, S) float64 activation summed over each source's tokens",
    "share_fires": "(F, S) float32 fires_by_source normalised per feature",
    "share_mass": "(F, S) float32 mass_by_source normalised per feature",
    "purity": "(F,) float32 the largest share_mass (1: one source only)",
    "dominant": "(F,) int16 the source holding it (-1: never fires)",
    "hist": "(F, NB) int64 firings per log-spaced activation bin",
    "hist_edges": "(NB - 1,) float32 inner bin edges: bin 0 is (0, e0), bin i is [e(i-1), e(i)), the last [e(-1), inf)",
    "top_token_ids": "(F, n) int32 tokens it fires on most often (-1: fewer than n)",
    "top_token_counts": "(F, n) int64 how often",
    "token_counts": "(V,) int64 occurrences of each token among the analysed tokens",
    "logit_top_ids": "(F, n) int32 tokens whose logits its direction raises most",
    "logit_top_values": "(F, n) float32 median-subtracted logit weight per unit activation",
    "logit_bottom_ids": "(F, n) int32 tokens whose logits it lowers most",
    "logit_bottom_values": "(F, n) float32",
    "neighbour_ids": "(F, n) int32 features with the most similar decoder direction",
    "neighbour_cos": "(F, n) float32 their cosine similarity",
    "effect_mean": "(F,) float32 mean ablation effect at the top-k peaks (NaN: none computed)",
}
NEURON_ARRAYS = {
    "density": "(N,) float64 fraction of tokens where the neuron is > 0",
    "fires": "(N,) int64",
    "mean_act": "(N,) float32 mean positive activation over its firings",
    "max_act": "(N,) float32",
    "fires_by_source": "(N, S) int64",
    "mass_by_source": "(N, S) float64 positive activation summed per source",
    "share_fires": "(N, S) float32",
    "share_mass": "(N, S) float32",
    "purity": "(N,) float32",
    "dominant": "(N,) int16",
}


class Analysis(NamedTuple):
    """Everything in an analysis/ folder, loaded."""

    summary: dict[str, Any]
    features: dict[str, np.ndarray]
    neurons: dict[str, np.ndarray]
    examples: dict[str, np.ndarray]
    tokens: dict[str, Any]


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write(folder: Path, summary: dict[str, Any], features: dict[str, np.ndarray],
          neurons: dict[str, np.ndarray], examples: dict[str, np.ndarray], tokens: dict[str, Any]) -> None:
    """Write the five files; summary.json last, so a folder with it is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = (set(FEATURE_ARRAYS) - set(features)) | {f"neurons.{k}" for k in set(NEURON_ARRAYS) - set(neurons)}
    if missing:
        raise ValueError(f"analysis arrays missing: {sorted(missing)}")
    files.write_bytes(folder / FEATURES, _npz_bytes(features))
    files.write_bytes(folder / NEURONS, _npz_bytes(neurons))
    files.write_bytes(folder / EXAMPLES, _npz_bytes(examples))
    files.write_json(folder / TOKENS, tokens)
    files.write_json(folder / SUMMARY, {"format": FORMAT, **summary,
                                        "files": {"features.npz": FEATURE_ARRAYS, "neurons.npz": NEURON_ARRAYS}})


def _npz(path: Path) -> dict[str, np.ndarray]:
    return files.read_npz(path, "re-run `monofast analysis --force`")


def load(folder: str | Path, verify: bool = True) -> Analysis:
    """The analysis files, each checked against the analysis manifest first (`verify=False`
    where the same process tree has just checked them)."""
    folder = Path(folder)
    for name in (SUMMARY, FEATURES, NEURONS, EXAMPLES, TOKENS) if verify else ():
        if (folder / name).is_file():  # a missing one is named below, by the reader that needs it
            files.verify_recorded(folder / name)
    summary = files.read_json(folder / SUMMARY, "analysis summary")
    if summary.get("format") != FORMAT:
        raise DataError(f"{folder / SUMMARY} has format {summary.get('format')}, expected {FORMAT}; "
                        f"re-run `monofast analysis --force`")
    return Analysis(summary, _npz(folder / FEATURES), _npz(folder / NEURONS), _npz(folder / EXAMPLES),
                    files.read_json(folder / TOKENS, "analysis tokens"))
