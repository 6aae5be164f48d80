"""From a finished findings scan to the numbers and arrays of each finding."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch

from monofast.analysis.stats import source_shares
from monofast.common import files
from monofast.findings import matching
from monofast.findings.scan import Scan, top_tokens
from monofast.sae.select import Goal, shortfalls

PURE = 0.9
"""A unit is source-pure when one source holds more than this share of its activation mass
(the analysis' `pure_share` default)."""
MATCH_LEVELS = (0.5, 0.7, 0.9)
CORR_EDGES = np.round(np.linspace(-0.1, 1.0, 23), 3)


class Finding(NamedTuple):
    numbers: dict[str, Any]
    """For findings.json: what a reader quotes."""
    arrays: dict[str, np.ndarray]
    """For the .npz beside it: per unit, for the site."""


def _hist(values: np.ndarray, edges: np.ndarray) -> list[int]:
    return np.histogram(values[np.isfinite(values)], bins=edges)[0].astype(int).tolist()


def _median(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else None


def _share(mask: np.ndarray, of: np.ndarray) -> float | None:
    return float(mask[of].mean()) if of.any() else None


def family(scan: Scan, order: list[str], main: str, parents: Mapping[str, tuple[str, np.ndarray]],
           sims: Mapping[str, np.ndarray], threshold: matching.Threshold, sources: list[str],
           n_top: int) -> Finding:
    """Per width: purity and top tokens; per neighbouring pair: parents, children, and the
    shares a reader quotes."""
    arrays: dict[str, np.ndarray] = {"order": np.array(order), "threshold": np.asarray(threshold.value)}
    widths, pairs = [], []
    for name in order:
        fires, mass = scan.stats[name].by_source()
        shares = source_shares(fires, mass)
        alive = fires.sum(1) > 0
        arrays[f"{name}_purity"] = shares.purity.astype(np.float32)
        arrays[f"{name}_dominant"] = shares.dominant.astype(np.int16)
        arrays[f"{name}_density"] = (fires.sum(1) / max(scan.tokens, 1)).astype(np.float32)
        arrays[f"{name}_top_tokens"] = top_tokens(scan.stats[name], n_top)
        pure = (shares.purity > PURE) & alive
        widths.append({"name": name, "width": int(len(alive)), "main": name == main, "alive": int(alive.sum()),
                       "pure_fraction": float(pure.sum() / max(alive.sum(), 1)),
                       "pure_by_source": {s: float(((shares.dominant == i) & pure).sum() / max(alive.sum(), 1))
                                          for i, s in enumerate(sources)},
                       "mean_purity": float(shares.purity[alive].mean()) if alive.any() else None})
    for name in order[1:]:
        small, parent = parents[name]
        sim = sims[name]
        corr = scan.parents[name][1].correlation()
        clear = sim >= threshold.value
        kids = matching.children(parent, sim, threshold.value, len(arrays[f"{small}_purity"]))
        counts = np.array([len(k) for k in kids])
        arrays[f"{name}_parent"] = parent.astype(np.int32)
        arrays[f"{name}_parent_cos"] = sim.astype(np.float32)
        arrays[f"{name}_parent_corr"] = corr.astype(np.float32)
        arrays[f"{small}_child_ptr"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        arrays[f"{small}_child_ids"] = np.array([j for k in kids for j in k], dtype=np.int32)
        with_kids = counts[counts > 0]
        pairs.append({
            "small": small, "large": name,
            "clear_parent_share": float(clear.mean()),
            "median_parent_cos": _median(sim),
            "median_parent_corr_clear": _median(corr[clear]),
            "parents_with_children": int(len(with_kids)),
            "parents_with_children_share": float(len(with_kids) / max(len(counts), 1)),
            "children_mean": float(with_kids.mean()) if len(with_kids) else None,
            "children_median": float(np.median(with_kids)) if len(with_kids) else None,
            "split_share": float((with_kids >= 2).mean()) if len(with_kids) else None,
            "cos_histogram": _hist(sim, np.linspace(0, 1, 21)),
        })
    numbers = {
        "decided_by": "decoder cosine (weights only); the activation correlation of each matched pair is reported",
        "threshold": threshold.value, "threshold_rule": threshold.rule,
        "threshold_valley": threshold.valley, "threshold_null_p999": threshold.null,
        "cos_edges": np.linspace(0, 1, 21).round(3).tolist(),
        "widths": widths, "pairs": pairs,
    }
    return Finding(numbers, arrays)


def _matches(corr: np.ndarray, dom_a: np.ndarray, dom_b: np.ndarray) -> tuple[matching.Matches, dict[str, Any]]:
    m = matching.best_matches(torch.as_tensor(corr))
    has = m.index >= 0
    value = np.where(has, m.value, np.nan)
    out: dict[str, Any] = {"units": int(len(has)), "compared": int(has.sum()), "median": _median(value),
                           "histogram": _hist(value, CORR_EDGES)}
    for level in MATCH_LEVELS:
        out[f"above_{level}"] = float((value > level).sum() / max(has.sum(), 1))
    matched = has & (value > 0.7) & (dom_a >= 0)
    agree = matched & (dom_b[np.clip(m.index, 0, None)] == dom_a)
    out["same_source_above_0.7"] = float(agree.sum() / matched.sum()) if matched.any() else None
    return m, out


def universality(scan: Scan, sources: list[str]) -> Finding:
    """Best match in model B of every A feature and neuron, by activation correlation."""
    fires_a, mass_a = scan.stats[scan.models.main].by_source()
    fires_b, mass_b = scan.stats["twin"].by_source()
    dom_fa, dom_fb = source_shares(fires_a, mass_a).dominant, source_shares(fires_b, mass_b).dominant
    shares_b = source_shares(fires_b, mass_b)
    dom_na, dom_nb = (source_shares(*scan.neuron_stats[m].by_source()).dominant for m in ("a", "b"))
    fm, fnum = _matches(scan.features.correlation().numpy(), dom_fa, dom_fb)
    nm, nnum = _matches(scan.neurons.correlation().numpy(), dom_na, dom_nb)
    numbers = {"tokens": int(scan.tokens), "measure": "Pearson correlation of activations over the same tokens",
               "edges": CORR_EDGES.tolist(), "features": fnum, "neurons": nnum}
    arrays = {"feature_match": fm.index, "feature_corr": fm.value, "neuron_match": nm.index, "neuron_corr": nm.value,
              "twin_dominant": dom_fb.astype(np.int16), "twin_purity": shares_b.purity.astype(np.float32),
              "twin_top_tokens": top_tokens(scan.stats["twin"], 5)}
    return Finding(numbers, arrays)


def _levels(table: np.ndarray, dominant: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Per unit: share of its dominant source per activation bin, over the top half of the
    bins, and its sensitivity (share of the dominant source's tokens it fires on)."""
    n_units, bins, _ = table.shape
    dom = np.clip(dominant, 0, None)
    total = table.sum(2)  # (U, NB)
    mine = np.take_along_axis(table, dom[:, None, None].repeat(bins, 1), 2)[:, :, 0]  # (U, NB)
    share = np.divide(mine, total, out=np.full(total.shape, np.nan), where=total > 0)
    high = slice(bins // 2, bins)
    spec = np.divide(mine[:, high].sum(1), total[:, high].sum(1), out=np.full(n_units, np.nan),
                     where=total[:, high].sum(1) > 0)
    sens = mine.sum(1) / np.maximum(tokens[dom], 1)
    sens[dominant < 0] = np.nan
    spec[dominant < 0] = np.nan
    return {"share": share.astype(np.float32), "specificity": spec.astype(np.float32),
            "sensitivity": sens.astype(np.float32)}


def specificity(scan: Scan, features: Mapping[str, np.ndarray], neurons: Mapping[str, np.ndarray],
                sources: list[str]) -> Finding:
    """The paper's specificity plots: per activation level, the source of the tokens."""
    tokens = scan.tokens_by_source.numpy()
    f_table, n_table = scan.feature_levels.table(), scan.neuron_levels.table()
    f = _levels(f_table, np.asarray(features["dominant"]), tokens)
    n = _levels(n_table, np.asarray(neurons["dominant"]), tokens)
    pure_f = (np.asarray(features["purity"]) > PURE) & (np.asarray(features["dominant"]) >= 0)
    pure_n = (np.asarray(neurons["purity"]) > PURE) & (np.asarray(neurons["dominant"]) >= 0)
    numbers: dict[str, Any] = {"bins": int(f_table.shape[1]), "tokens_by_source": dict(zip(sources, tokens.tolist())),
                               "pure_share": PURE}
    for label, arr, pure in (("features", f, pure_f), ("neurons", n, pure_n)):
        alive = np.isfinite(arr["specificity"])
        numbers[label] = {
            "units": int(len(alive)), "pure": int(pure.sum()),
            "specificity_high_median": _median(arr["specificity"][alive]),
            "specificity_high_median_pure": _median(arr["specificity"][pure & alive]),
            "sensitivity_median": _median(arr["sensitivity"][alive]),
            "sensitivity_median_pure": _median(arr["sensitivity"][pure & alive]),
            "share_by_level_mean": [None if math.isnan(v) else float(v)
                                    for v in np.nanmean(np.where(alive[:, None], arr["share"], np.nan), 0)]
            if alive.any() else [],
        }
    arrays = {"feature_levels": f_table.astype(np.int32), "neuron_levels": n_table.astype(np.int32),
              "feature_specificity": f["specificity"], "feature_sensitivity": f["sensitivity"],
              "neuron_specificity": n["specificity"], "neuron_sensitivity": n["sensitivity"],
              "feature_max": np.asarray(features["max_act"], np.float32),
              "neuron_max": np.asarray(neurons["max_act"], np.float32),
              "tokens_by_source": tokens.astype(np.int64)}
    return Finding(numbers, arrays)


def _member_quality(record: Mapping[str, Any]) -> dict[str, Any]:
    """One member's numbers against the whole quality goal (its L0 range included)."""
    misses = shortfalls(record, Goal(), check_l0=True)
    keep = ("l0", "fvu", "dead_fraction", "ce_loss_recovered", "ce_loss_recovered_by_source", "l1_coeff")
    return {**{k: record.get(k) for k in keep}, "meets_goal": not misses, "misses": misses}


def quality(sae_dir: Path, family_dir: Path, members: list[tuple[str, Path, bool]]) -> list[dict[str, Any]]:
    """Each member's held-out numbers (from its stage's eval.json) against the quality goal."""
    out = []
    evals = {d: files.read_json(d / "eval.json", "SAE evaluation") for d in (sae_dir, family_dir)}
    for name, folder, is_main in members:
        cfg = files.read_json(folder / "cfg.json", "SAE config")
        stage = sae_dir if is_main else family_dir
        member = cfg.get("sweep_member") or folder.name
        record = evals[stage].get("saes", {}).get(member, {})
        out.append({"name": name, "width": int(cfg["d_sae"]), "main": is_main, **_member_quality(record)})
    return out


def headline(result: Mapping[str, Any]) -> str:
    """One log line with the numbers a reader looks for first."""
    u = result["universality"]
    pairs = result["family"]["pairs"]
    splits = ", ".join(f"{p['small']}->{p['large']} {100 * p['clear_parent_share']:.0f}% clear parents, "
                       f"{p['children_mean'] or 0:.1f} children" for p in pairs)
    return (f"universality: best-match correlation median {u['features']['median'] or 0:.2f} (features) vs "
            f"{u['neurons']['median'] or 0:.2f} (neurons), {100 * u['features']['above_0.7']:.0f}% of features "
            f"above 0.7; splitting: {splits}")
