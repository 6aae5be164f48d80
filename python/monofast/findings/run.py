"""Stage `findings` (`monofast findings`): feature splitting, universality, specificity and
steering, measured on the run's models and written into `findings/`:

    findings.json     every number of the four findings, with how each was decided
    family.npz        per family width: parent, similarities, children counts, top tokens,
                      purity, dominant source; the 2-D map of all decoder directions
    universality.npz  per A feature (and neuron): best match in model B and its correlation
    specificity.npz   per A feature (and neuron): firings per activation level and source
    steering.json     clamped and unclamped continuations, classified by source

Reads data/, gpt/, sae/, analysis/, family/ and the second model's twin/gpt/ and twin/sae/.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monofast.analysis import contexts
from monofast.analysis.forward import Encoder, resolve_layer
from monofast.common import config as config_mod
from monofast.common import files
from monofast.common.device import dtype_name, pick_device, pick_dtype
from monofast.common.errors import DataError
from monofast.common.log import logger, progress
from monofast.data.splits import load_meta
from monofast.findings import matching, summary
from monofast.findings.config import FindingsConfig
from monofast.findings.layout import layout
from monofast.findings.scan import Models, Scan
from monofast.gpt.weights import load_model
from monofast.sae.model import SparseAutoencoder

FINDINGS_FILE = "findings.json"
FAMILY_FILE = "family.npz"
UNIVERSALITY_FILE = "universality.npz"
SPECIFICITY_FILE = "specificity.npz"
STEERING_FILE = "steering.json"
TOP_TOKENS = 5


def family_members(sae_dir: Path, family_dir: Path) -> list[tuple[str, Path, bool]]:
    """(name, folder, is the run's SAE) of every family member, smallest first: family/w*/
    and the run's own SAE (which replaces a family member of its width)."""
    main = files.read_json(sae_dir / "cfg.json", "SAE config")
    main_width = int(main["d_sae"])
    members = {main_width: (f"w{main_width}", sae_dir, True)}
    for folder in sorted(family_dir.glob("w*/")):
        width = int(files.read_json(folder / "cfg.json", "SAE config")["d_sae"])
        if width != main_width:
            members[width] = (f"w{width}", folder, False)
    if len(members) < 2:
        raise DataError(f"{family_dir} holds no SAE of another width than the run's ({main_width}); "
                        f"re-run `monofast family --force` with --expansions other than the SAE stage's")
    return [members[w] for w in sorted(members)]


def run_stage(cfg: FindingsConfig, run: Any) -> None:
    """Pipeline entry point."""
    measure(cfg, run.require("data"), run.require("gpt"), run.require("sae"), run.require("analysis"),
            run.require("family"), run.require("twin/gpt"), run.require("twin/sae"), run.stage("findings"))


def measure(cfg: FindingsConfig, data_dir: Path, gpt_dir: Path, sae_dir: Path, analysis_dir: Path,
            family_dir: Path, twin_gpt_dir: Path, twin_sae_dir: Path, out: Path) -> dict[str, Any]:
    """Measure the four findings and write `out`; returns findings.json's content."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    enc_dtype = dtype if dtype != torch.float16 or device.type != "cpu" else torch.float32
    meta = load_meta(data_dir)
    names = [s["name"] for s in sorted(meta["sources"], key=lambda s: s["id"])]
    model_a, model_b = load_model(gpt_dir, device), load_model(twin_gpt_dir, device)
    layer = resolve_layer(-1, model_a, sae_dir)
    members = family_members(sae_dir, family_dir)
    saes = {name: SparseAutoencoder.load(folder, device) for name, folder, _ in members}
    main = next(name for name, _, is_main in members if is_main)
    twin_sae = SparseAutoencoder.load(twin_sae_dir, device)
    redo = "re-run `monofast analysis --force`"
    features = files.read_npz(files.verify_recorded(analysis_dir / "features.npz"), redo)
    neurons = files.read_npz(files.verify_recorded(analysis_dir / "neurons.npz"), redo)

    # Feature splitting is decided by decoder cosine (weights only): each feature's parent is
    # its most similar feature in the next smaller SAE.
    order = [name for name, _, _ in members]
    generator = torch.Generator().manual_seed(cfg.seed)
    parents: dict[str, tuple[str, np.ndarray]] = {}
    sims: dict[str, np.ndarray] = {}
    best_all, null_all = [], []
    for small, large in zip(order, order[1:]):
        cos = matching.decoder_cosine(saes[small].W_dec.detach().cpu(), saes[large].W_dec.detach().cpu())
        best = matching.best_matches(cos)
        parents[large], sims[large] = (small, best.index), best.value
        best_all.append(best.value)
        null_all.append(matching.null_best_cosine(saes[small].W_dec.detach().cpu().float(),
                                                  min(len(best.value), 4096), generator))
    threshold = matching.clear_threshold(np.concatenate(best_all), np.concatenate(null_all), cfg.clear_parent)

    encoders = {name: Encoder(sae, enc_dtype) for name, sae in saes.items()}
    models = Models(model_a, model_b, layer, encoders, main, Encoder(twin_sae, enc_dtype))
    size = model_a.config.block_size
    plan = contexts.plan(data_dir, ("val", "train"), size, cfg.tokens, len(names), cfg.seed)
    scan = Scan(models, parents, len(names), meta["vocab_size"], features["max_act"], neurons["max_act"],
                cfg.specificity_bins, device, dtype)
    logger.info("findings: %d tokens through both models, %d SAEs (%s) and the twin's SAE, on %s",
                len(plan.start) * size, len(saes), ", ".join(order), device)
    n_batches = -(-len(plan.start) // cfg.batch_contexts)
    for batch in progress(contexts.batches(data_dir, plan, cfg.batch_contexts), total=n_batches,
                          desc="findings", unit="batch"):
        scan.add(batch.idx, batch.sources)
    scanned = time.perf_counter()

    family = summary.family(scan, order, main, parents, sims, threshold, names, TOP_TOKENS)
    points = _map(saes, order, family, cfg)
    universality = summary.universality(scan, names)
    specificity = summary.specificity(scan, features, neurons, names)
    steering = _steer(cfg, data_dir, model_a, saes[main], layer, features, names, device)
    finished = time.perf_counter()

    np.savez_compressed(out / FAMILY_FILE, **family.arrays, **points)
    np.savez_compressed(out / UNIVERSALITY_FILE, **universality.arrays)
    np.savez_compressed(out / SPECIFICITY_FILE, **specificity.arrays)
    files.write_json(out / STEERING_FILE, steering)
    result = {
        "format": 1,
        "sources": names,
        "tokens": int(scan.tokens),
        "layer": layer,
        "family": {**family.numbers, "quality": summary.quality(sae_dir, family_dir, members)},
        "universality": universality.numbers,
        "specificity": specificity.numbers,
        "steering": {k: v for k, v in steering.items() if k != "features"},
        "map": {"method": "nearest-neighbour graph layout (UMAP-style: 15 neighbours by decoder cosine, "
                          "Cauchy kernel, negative sampling)", "points": int(len(points["map_xy"]))},
        "dtype": dtype_name(dtype),
        "seconds": {"scan": round(scanned - started, 1), "total": round(finished - started, 1)},
        "config": config_mod.to_dict(cfg),
    }
    files.write_json(out / FINDINGS_FILE, result)
    logger.info("findings: %s", summary.headline(result))
    return result


def _map(saes: dict[str, SparseAutoencoder], order: list[str], family: Any, cfg: FindingsConfig) -> dict[str, np.ndarray]:
    """Map coordinates of up to cfg.map_points decoder directions, an equal share from every
    width (a width smaller than its share whole, what it leaves to the wider ones)."""
    rng = np.random.default_rng(cfg.seed)
    picked, budget = [], cfg.map_points
    for i, name in enumerate(order):
        n = saes[name].cfg.d_sae
        share = budget // (len(order) - i)
        take = np.arange(n) if n <= share else np.sort(rng.choice(n, size=share, replace=False))
        budget -= len(take)
        picked.append((name, take))
    rows = [saes[name].W_dec.detach().cpu().float()[take] for name, take in picked if len(take)]
    if not rows:
        return {"map_xy": np.zeros((0, 2), np.float32), "map_width": np.zeros(0, np.int32),
                "map_feature": np.zeros(0, np.int32), "map_dominant": np.zeros(0, np.int16)}
    xy = layout(torch.cat(rows), seed=cfg.seed).numpy().astype(np.float32)
    width = np.concatenate([np.full(len(take), saes[name].cfg.d_sae, np.int32) for name, take in picked])
    feature = np.concatenate([take.astype(np.int32) for _, take in picked])
    dominant = np.concatenate([family.arrays[f"{name}_dominant"][take] for name, take in picked]).astype(np.int16)
    return {"map_xy": xy, "map_width": width, "map_feature": feature, "map_dominant": dominant}


def _steer(cfg: FindingsConfig, data_dir: Path, model: Any, sae: SparseAutoencoder, layer: int,
           features: Any, names: list[str], device: torch.device) -> dict[str, Any]:
    """The steering experiment (`monofast.findings.steering`)."""
    if cfg.steer_features == 0:
        return {"skipped": "steer_features=0", "features": []}
    from monofast.findings import steering

    return steering.experiment(cfg, data_dir, model, sae, layer, features, names, device)
