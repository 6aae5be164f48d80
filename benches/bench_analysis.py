"""The analysis stage at the laptop preset's shapes against the seed's website step, which
re-ran the whole GPT once per feature to measure ablation effects.

    pytest benches/bench_analysis.py                      each provider once, tiny shapes (checks)
    pytest benches/bench_analysis.py --benchmark-enable   timed, still tiny
    python benches/bench_analysis.py                      laptop shapes: 1,536 features, d_mlp 768,
                                                          >= 1M tokens, as a table

Providers:
    monofast        the whole `analyze` call (`monofast analysis`): one batched pass over every token, the exact
                    last-layer ablation effects of every top-k window token and quantile sample,
                    logit weights, neighbours, summary and files
    floor           the pass's bare minimum over the same batches: the GPT forward to the hooked
                    layer and the SAE encoder product, nothing else (ratios to it are robust to
                    load from other processes)
    seed-rerun      the seed's way: per feature, one full forward over its 100 contexts with the
                    feature removed from the SAE reconstruction spliced into the MLP; timed on a
                    few features and extrapolated to all of them

Weights are random (timing does not depend on training), with each feature's encoder bias
set so that it fires on about 2% of tokens, an L0 of about 30 like a trained SAE's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from monofast.analysis.config import AnalysisConfig
from monofast.analysis.run import analyze
from monofast.data.prepare import DataConfig, build
from monofast.data.splits import load_meta, load_split
from monofast.gpt.model import GPT, GPTConfig
from monofast.gpt.weights import save_model
from monofast.sae.model import SAEConfig, SparseAutoencoder

DENSITY = 0.02
"""Fraction of tokens each random feature fires on (L0 = DENSITY * d_sae)."""
SEED_CONTEXTS = 100
"""Contexts the seed's website step ran per feature (`--num_contexts=100`)."""


class Shape(NamedTuple):
    n_layer: int
    n_embd: int
    block_size: int
    d_sae: int
    tokens: int
    chars_per_source: int


SMALL = Shape(n_layer=2, n_embd=32, block_size=64, d_sae=256, tokens=8_000, chars_per_source=20_000)
LAPTOP = Shape(n_layer=2, n_embd=192, block_size=256, d_sae=1536, tokens=1_048_576, chars_per_source=2_400_000)


def write_verse(path: Path, chars: int) -> Path:
    """Deterministic English-like text (the second source beside the Python corpus)."""
    import random

    rng = random.Random(0)
    words = ("thou art the king of my heart and love sweet night death crown lord honour fair "
             "what light through yonder window breaks it is the east juliet sun").split()
    lines, total = [], 0
    while total < chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 11))).capitalize() + "."
        lines.append(line)
        total += len(line) + 1
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def make_run(root: Path, shape: Shape) -> dict[str, Path]:
    """data/ (the offline Python corpus + verse), a random GPT, a random SAE of ~2% density."""
    verse = write_verse(root / "verse.txt", shape.chars_per_source)
    build(DataConfig(sources=("python", f"verse={verse}"), chars_per_source=shape.chars_per_source,
                          vocab_size=1024), root / "data")
    vocab = load_meta(root / "data")["vocab_size"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=shape.block_size, n_layer=shape.n_layer, n_head=2,
                          n_embd=shape.n_embd)).eval()
    (root / "gpt").mkdir()
    save_model(root / "gpt", model)
    d_mlp = 4 * shape.n_embd
    sae = SparseAutoencoder(SAEConfig(d_in=d_mlp, d_sae=shape.d_sae), generator=torch.Generator().manual_seed(0))
    idx = torch.randint(0, vocab, (8, shape.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        acts = model.mlp_activations(idx, shape.n_layer - 1).reshape(-1, d_mlp)
        pre = acts @ sae.W_enc  # (n, F)
        sae.b_enc.copy_(-torch.quantile(pre, 1 - DENSITY, dim=0))
    (root / "sae").mkdir()
    sae.save(root / "sae", hook_layer=shape.n_layer - 1)
    return {"data": root / "data", "gpt": root / "gpt", "sae": root / "sae", "analysis": root / "analysis"}


def run_monofast(paths: dict[str, Path], shape: Shape) -> dict:
    cfg = AnalysisConfig(tokens=shape.tokens, device="cpu")
    return analyze(cfg, paths["data"], paths["gpt"], paths["sae"], paths["analysis"])


@torch.no_grad()
def floor_seconds(paths: dict[str, Path], shape: Shape) -> float:
    """Seconds of the GPT forward to the hooked layer plus the SAE encoder over the batches the
    analysis reads, in the precision it uses, with nothing accumulated."""
    from monofast.analysis import contexts
    from monofast.analysis.forward import Encoder, final_residual
    from monofast.common.device import pick_dtype
    from monofast.gpt.weights import load_model

    cfg = AnalysisConfig(tokens=shape.tokens, device="cpu")
    model = load_model(paths["gpt"])
    dtype = pick_dtype(cfg.dtype, torch.device("cpu"))
    encoder = Encoder(SparseAutoencoder.load(paths["sae"]), dtype)
    n_sources = len(load_meta(paths["data"])["sources"])
    plan = contexts.plan(paths["data"], cfg.splits, shape.block_size, cfg.tokens, n_sources, cfg.seed)
    started = time.perf_counter()
    for batch in contexts.batches(paths["data"], plan, cfg.batch_contexts):
        idx = torch.from_numpy(batch.idx)
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            mlp, _ = final_residual(model, idx, shape.n_layer - 1)
        encoder(mlp.reshape(idx.numel(), -1))
    return time.perf_counter() - started


@torch.no_grad()
def seed_rerun_seconds(paths: dict[str, Path], shape: Shape, features: int) -> float:
    """Seconds per feature of the seed's method: a full forward over SEED_CONTEXTS contexts
    with the MLP activation replaced by the SAE reconstruction without that feature, and the
    next-token probabilities compared with the clean ones."""
    from monofast.gpt.weights import load_model

    model = load_model(paths["gpt"])
    sae = SparseAutoencoder.load(paths["sae"])
    split = load_split(paths["data"], "val")
    T = shape.block_size
    n = min(SEED_CONTEXTS, (len(split.tokens) - 1) // T)
    idx = torch.from_numpy(split.tokens[: n * T].astype("int64")).view(n, T)
    clean = torch.softmax(model(idx).logits, -1)
    layer = shape.n_layer - 1
    started = time.perf_counter()
    for f in range(features):
        def ablate(act, f=f):
            feats = sae.encode(act.reshape(-1, act.shape[-1]))
            feats[:, f] = 0
            return sae.decode(feats).view(act.shape)

        with model.hook_mlp(layer, ablate):
            ablated = torch.softmax(model(idx).logits, -1)
        (ablated - clean).abs().sum()
    return (time.perf_counter() - started) / features


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("bench_analysis"), SMALL)


@pytest.mark.parametrize("provider", ["monofast", "floor", "seed-rerun"])
def test_analysis(benchmark, small_run, provider):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if provider == "monofast":
        summary = benchmark.pedantic(run_monofast, args=(small_run, SMALL), rounds=1, iterations=1)
        assert summary["features"]["total"] == SMALL.d_sae
        assert summary["tokens"] >= SMALL.tokens // 2
    elif provider == "floor":
        assert benchmark.pedantic(floor_seconds, args=(small_run, SMALL), rounds=1, iterations=1) > 0
    else:
        per_feature = benchmark.pedantic(seed_rerun_seconds, args=(small_run, SMALL, 2), rounds=1, iterations=1)
        assert per_feature > 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=LAPTOP.tokens, help="analysed tokens (default: 2^20)")
    parser.add_argument("--seed-features", type=int, default=3,
                        help="features the seed baseline is timed on before extrapolating (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = LAPTOP._replace(tokens=args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        paths = make_run(Path(tmp), shape)
        print(f"setup (data, random GPT and SAE): {time.perf_counter() - started:.1f} s", file=sys.stderr)
        floor = floor_seconds(paths, shape)
        summary = run_monofast(paths, shape)
        floor = min(floor, floor_seconds(paths, shape))  # before and after: the less disturbed
        per_feature = seed_rerun_seconds(paths, shape, args.seed_features)
    ours = summary["seconds"]["total"]
    seed_total = per_feature * shape.d_sae
    work = summary["work"]
    print(f"\nanalysis at the laptop shapes: {shape.n_layer} layers, n_embd {shape.n_embd}, d_mlp "
          f"{4 * shape.n_embd}, {shape.d_sae} features, {torch.get_num_threads()} threads\n")
    print("| provider | tokens analysed | features with effects | seconds | vs seed |")
    print("|---|---|---|---|---|")
    print(f"| monofast analysis | {summary['tokens']:,} | {shape.d_sae:,} (every top-k and sample token) | "
          f"{ours:.1f} (pass {summary['seconds']['scan']:.1f}) | {seed_total / ours:.1f}x faster |")
    print(f"| floor: GPT forward + SAE encoder only | {summary['tokens']:,} | none | {floor:.1f} | "
          f"pass = {summary['seconds']['scan'] / floor:.2f}x floor |")
    print(f"| seed re-run per feature (extrapolated from {args.seed_features}) | "
          f"{SEED_CONTEXTS * shape.block_size:,} per feature | {shape.d_sae:,} | {seed_total:.1f} "
          f"({per_feature:.2f} s/feature) | 1.0x |")
    print(f"\nfirings {work['firings']:,}; top-k entries {work['top_entries']:,}; "
          f"sample entries {work['sample_entries']:,}; {summary['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
