"""Stage 5 driver: `monofast analysis` reads data/, gpt/ and sae/ and writes analysis/.

One batched pass (`Scan`) over a source-balanced token budget, then, for the selected
examples only, their tokens and exact ablation effects, the logit weights and decoder
neighbours of every feature, and the summary; see `output` for the files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from monofast.analysis import contexts, effects, examples, output
from monofast.analysis.config import AnalysisConfig
from monofast.analysis.forward import Encoder, check_shapes, resolve_layer
from monofast.analysis.scan import Scan
from monofast.analysis.stats import bin_bounds, source_shares
from monofast.analysis.summary import summarize
from monofast.analysis.vocab import token_table
from monofast.common import config as config_mod
from monofast.common.device import dtype_name, pick_device, pick_dtype
from monofast.common.errors import UserError
from monofast.common.log import logger, progress
from monofast.data import tokenizer
from monofast.data.splits import load_meta
from monofast.gpt.weights import load_model
from monofast.sae.model import SparseAutoencoder
from monofast.sae.steer import sae_hook


def run_stage(cfg: AnalysisConfig, run: Any) -> None:
    """Pipeline entry point: analyse sae/ (or sae/<sae_name>/) into analysis/."""
    sae_dir = run.require("sae")
    if cfg.sae_name:
        sae_dir = sae_dir / cfg.sae_name
    activations = run.stage("activations")
    analyze(cfg, run.require("data"), run.require("gpt"), sae_dir, run.stage("analysis"),
            activations if activations.is_dir() else None)


def analyze(cfg: AnalysisConfig, data_dir: str | Path, gpt_dir: str | Path, sae_dir: str | Path,
            out: str | Path, activations_dir: Optional[Path] = None) -> dict[str, Any]:
    """Run the analysis and write `out`; returns the summary written to summary.json."""
    started = time.perf_counter()
    data_dir, sae_dir, out = Path(data_dir), Path(sae_dir), Path(out)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    meta = load_meta(data_dir)
    names = [s["name"] for s in sorted(meta["sources"], key=lambda s: s["id"])]
    hook = sae_hook(sae_dir)
    model = load_model(gpt_dir, device, hook)
    sae = SparseAutoencoder.load(sae_dir, device)
    check_shapes(model, sae, meta["vocab_size"], sae_dir)
    layer = resolve_layer(cfg.layer, model, sae_dir, activations_dir)
    size = cfg.context_size or model.config.default_context  # a Hugging Face model's: 256, not its limit
    if size > model.config.block_size:
        raise UserError(f"context_size={size} exceeds the GPT's block_size={model.config.block_size}; "
                        f"lower --context-size")
    plan = contexts.plan(data_dir, cfg.splits, size, cfg.tokens, len(names), cfg.seed)
    encoder = Encoder(sae, dtype if dtype != torch.float16 or device.type != "cpu" else torch.float32)
    scan = Scan(cfg, model, encoder, layer, len(plan.start), size, len(names), device, dtype, cfg.seed)
    logger.info("analysis: %d features of layer %d over %d tokens (%d contexts of %d, %s), %s",
                encoder.d_sae, layer, len(plan.start) * size, len(plan.start), size,
                "+".join(cfg.splits), device)
    n_batches = -(-len(plan.start) // cfg.batch_contexts)
    for batch in progress(contexts.batches(data_dir, plan, cfg.batch_contexts), total=n_batches,
                          desc="analysis", unit="batch"):
        scan.add(batch)
    scanned = time.perf_counter()
    result = finish(scan, model, sae, encoder, layer, cfg, device)
    finished = time.perf_counter()

    features, neurons, examples_ = result
    summary = summarize(features["density"], _shares(features), neurons["density"], _shares(neurons),
                        names, cfg.ultralow_density, cfg.pure_share)
    tokens_by_source = np.bincount(scan.store.sources.numpy(), minlength=len(names))
    summary.update({
        "layer": layer,
        "hook_name": hook or f"blocks.{layer}.mlp.hook_post",
        "model": getattr(model.config, "name", "monofast-gpt"),
        "sources": names,
        "tokens": int(scan.counts.tokens),
        "tokens_by_source": {n: int(c) for n, c in zip(names, tokens_by_source)},
        "contexts": int(len(plan.start)),
        "context_size": size,
        "window_radius": cfg.window_radius,
        "sae": {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "variant": sae.cfg.variant,
                "name": _sweep_member(sae_dir)},
        "effects": "exact (last layer, from the residual stream)" if scan.last_layer else
                   f"re-run for the top {cfg.rerun_examples} windows per feature",
        "work": scan.counts._asdict(),
        "dtype": dtype_name(dtype),
        "seconds": {"scan": round(scanned - started, 3), "finish": round(finished - scanned, 3)},
        "config": config_mod.to_dict(cfg),
    })
    output.write(out, summary, features, neurons, examples_, token_table(tokenizer.load(data_dir)))
    summary["seconds"]["total"] = round(time.perf_counter() - started, 3)
    logger.info("analysis: %s", summary["verdict"])
    f = summary["features"]
    logger.info("analysis: %d alive, %d ultralow, %d dead features; %.1f s (pass %.1f s) -> %s",
                f["alive"], f["ultralow"], f["dead"], summary["seconds"]["total"],
                summary["seconds"]["scan"], out)
    return summary


def _sweep_member(sae_dir: Path) -> str:
    """The SAE's name within its training sweep (cfg.json metadata), '' when not recorded."""
    from monofast.common import files

    raw = files.read_json(sae_dir / "cfg.json", "SAE config")
    name = raw.get("sweep_member") or raw.get("metadata", {}).get("sweep_member") or ""
    return str(name)


def _shares(arrays: dict[str, np.ndarray]):
    return source_shares(arrays["fires_by_source"], arrays["mass_by_source"])


def _unit_arrays(fires_by_source: np.ndarray, mass_by_source: np.ndarray, max_act: np.ndarray,
                 n_tokens: int) -> dict[str, np.ndarray]:
    """The arrays features.npz and neurons.npz share."""
    fires = fires_by_source.sum(1)
    mass = mass_by_source.sum(1)
    shares = source_shares(fires_by_source, mass_by_source)
    return {
        "density": fires / max(n_tokens, 1),
        "fires": fires.astype(np.int64),
        "mean_act": np.divide(mass, fires, out=np.zeros(len(fires)), where=fires > 0).astype(np.float32),
        "max_act": np.maximum(max_act, 0).astype(np.float32),
        "fires_by_source": fires_by_source.astype(np.int64),
        "mass_by_source": mass_by_source,
        "share_fires": shares.fires.astype(np.float32),
        "share_mass": shares.mass.astype(np.float32),
        "purity": shares.purity.astype(np.float32),
        "dominant": shares.dominant.astype(np.int16),
    }


def _top_tokens(counts: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    n = min(n, counts.shape[1])
    top = counts.topk(n, dim=1)
    ids = torch.where(top.values > 0, top.indices, torch.full_like(top.indices, -1))
    return ids.int().cpu().numpy(), top.values.cpu().numpy()


@torch.no_grad()
def finish(scan: Scan, model, sae: SparseAutoencoder, encoder: Encoder, layer: int, cfg: AnalysisConfig,
           device: torch.device) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """features.npz, neurons.npz and examples.npz arrays from a finished scan."""
    features = _statistics(scan, model.config.vocab_size, cfg)
    w_dec = sae.W_dec.detach().float()  # (F, d_mlp)
    directions = effects.residual_directions(model, layer, w_dec)  # (F, C)
    features.update(_directions(model, w_dec, directions, cfg))
    ex = _examples(scan, model, encoder, w_dec, directions, layer, cfg, device)
    peak = ex["top_effects"][:, :, cfg.window_radius]  # (F, k) effect at each top window's peak
    seen = ~np.isnan(peak)
    features["effect_mean"] = np.divide(np.where(seen, peak, 0).sum(1), seen.sum(1),
                                        out=np.full(len(peak), np.nan, dtype=np.float32),
                                        where=seen.any(1)).astype(np.float32)
    n_fires, n_mass = scan.neurons.by_source()
    neurons = _unit_arrays(n_fires, n_mass, scan.neurons.max.cpu().numpy(), scan.counts.tokens)
    return features, neurons, ex


def _statistics(scan: Scan, vocab_size: int, cfg: AnalysisConfig) -> dict[str, np.ndarray]:
    """Counts, shares, histograms and token counts of every feature."""
    fires_s, mass_s = scan.stats.by_source()
    features = _unit_arrays(fires_s, mass_s, scan.stats.max.cpu().numpy(), scan.counts.tokens)
    features["hist"] = scan.stats.histogram()
    features["hist_edges"] = scan.edges.cpu().numpy()
    features["top_token_ids"], features["top_token_counts"] = _top_tokens(scan.stats.token_counts(), cfg.top_tokens)
    features["token_counts"] = np.bincount(scan.store.tokens.numpy(), minlength=vocab_size)
    return features


def _directions(model, w_dec: torch.Tensor, directions: torch.Tensor, cfg: AnalysisConfig) -> dict[str, np.ndarray]:
    """Logit weights and decoder neighbours of every feature."""
    logits = effects.logit_weights(model, directions, cfg.logit_tokens)
    ids, cos = effects.neighbours(w_dec, cfg.neighbours)
    return {"logit_top_ids": logits.top_ids.int().cpu().numpy(), "logit_top_values": logits.top_values.cpu().numpy(),
            "logit_bottom_ids": logits.bottom_ids.int().cpu().numpy(),
            "logit_bottom_values": logits.bottom_values.cpu().numpy(),
            "neighbour_ids": ids.int().cpu().numpy(), "neighbour_cos": cos.cpu().numpy()}


def _examples(scan: Scan, model, encoder: Encoder, w_dec: torch.Tensor, directions: torch.Tensor, layer: int,
              cfg: AnalysisConfig, device: torch.device) -> dict[str, np.ndarray]:
    store, T, radius = scan.store, scan.T, cfg.window_radius
    top_values, top_rows = scan.top.values.cpu(), scan.top.ids.cpu()  # (F, k)
    top_acts = scan.top.payload["acts"].float().cpu()  # (F, k, W)
    top_tokens = examples.window_tokens(store.tokens, top_rows, radius, T)

    keys = scan.samples.keys.cpu().view(-1, scan.n_bins, cfg.quantile_samples)  # (F, NB, R)
    low, high = bin_bounds(scan.edges.cpu())
    picked = examples.pick_samples(keys, scan.stats.hist.cpu().view(-1, scan.n_bins), torch.from_numpy(low).float(),
                                   torch.from_numpy(high).float(), cfg.quantile_bins, cfg.quantile_samples)
    present = picked.cells >= 0
    cell, slot = picked.cells.clamp(min=0), picked.slots.clamp(min=0)
    sample_values = torch.where(present, scan.samples.values.cpu()[cell, slot], torch.tensor(0.0))
    sample_rows = torch.where(present, scan.samples.ids.cpu()[cell, slot], torch.tensor(examples.ABSENT))
    sample_acts = scan.samples.payload["acts"].cpu()[cell, slot].float()  # (F, Q, S, W)
    sample_acts[~present] = float("nan")
    sample_tokens = examples.window_tokens(store.tokens, sample_rows, radius, T)

    top_effects = torch.full(top_acts.shape, float("nan"))
    sample_effects = torch.full(sample_values.shape, float("nan"))
    if store.resid is not None:  # the hooked layer is the last: exact, no re-run
        f, j, w, rows, acts = examples.top_window_pairs(top_rows, top_acts, radius)
        fs, qs, ss = present.nonzero(as_tuple=True)
        all_rows = torch.cat([rows, sample_rows[fs, qs, ss]])
        all_feats = torch.cat([f, fs])
        all_acts = torch.cat([acts, sample_values[fs, qs, ss]])
        deltas = examples.exact_effects(model, directions.to(device), store.resid, store.targets,
                                        all_rows, all_feats, all_acts)
        top_effects[f, j, w] = deltas[:len(f)]
        sample_effects[fs, qs, ss] = deltas[len(f):]
    elif cfg.rerun_examples:
        top_effects = examples.rerun_top_effects(model, layer, encoder, w_dec, store.tokens, store.targets,
                                                 top_rows, top_acts, cfg.rerun_examples, radius, T, device)
    return examples.Examples(**{
        "top_values": top_values.numpy(), "top_rows": top_rows.numpy(),
        "top_tokens": top_tokens.int().numpy(), "top_acts": top_acts.numpy(),
        "top_effects": top_effects.numpy(),
        "bin_low": picked.bin_low.numpy(), "bin_high": picked.bin_high.numpy(),
        "bin_count": picked.bin_count.long().numpy(),
        "sample_values": sample_values.numpy(), "sample_rows": sample_rows.numpy(),
        "sample_tokens": sample_tokens.int().numpy(), "sample_acts": sample_acts.numpy(),
        "sample_effects": sample_effects.numpy(),
        "top_sources": _sources_of(store.sources, top_rows), "sample_sources": _sources_of(store.sources, sample_rows),
        "context_size": np.asarray(T), "window_radius": np.asarray(radius),
    })._asdict()


def _sources_of(sources: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    """Source id of each global row (-1 for absent ones)."""
    return torch.where(rows >= 0, sources[rows.clamp(min=0)], torch.tensor(-1)).to(torch.int16).numpy()
