"""Harvest throughput against the bare forward pass on the same batches.

Providers, over the same contexts in the same batches of a GPT of the laptop preset's
shape (2 layers, n_embd 192, block 256; random weights: speed does not depend on them):

- `forward`: `model.mlp_activations(x, layer)` alone, under `torch.inference_mode`: the
  compute a harvest cannot avoid;
- `harvest`: the whole stage (`harvest.harvest_model`): sampling 200 positions per context,
  gathering, metadata, writing shards with checksums and fsync, `index.json`.

Rows/s counts the stored rows (contexts x positions); the goal is harvest >= 80% of forward.

    pytest benches/bench_harvest.py --benchmark-enable   # pytest-benchmark tables
    python benches/bench_harvest.py [--contexts 512]     # the side-by-side table

The default test run (`--benchmark-disable`) runs each provider once at a small size after
checking that stored rows equal the forward pass.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monofast.activations import harvest
from monofast.activations import store as activations
from monofast.data.splits import Split
from monofast.gpt.model import GPT, GPTConfig

VOCAB = 1024
PROVIDERS = ("forward", "harvest")


def make_model(n_layer: int = 2, n_embd: int = 192, block_size: int = 256) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd)
    return GPT(cfg).eval()


def make_split(tokens: int) -> Split:
    rng = np.random.default_rng(0)
    return Split(rng.integers(0, VOCAB, tokens).astype(np.uint16), (np.arange(tokens) // 5000 % 2).astype(np.uint8))


def setup(model: GPT, contexts: int, positions: int = 200, batch_size: int = 32, device: str = "cpu"):
    cfg = harvest.HarvestConfig(contexts=contexts, positions_per_context=positions, batch_size=batch_size,
                                device=device)
    split = make_split(contexts * model.config.block_size)
    plan = harvest.plan(cfg, model.config, len(split.tokens))
    return cfg, split, plan


def run_forward(model: GPT, split: Split, cfg: harvest.HarvestConfig, plan: harvest.Plan) -> int:
    """The bare forward passes over the harvest's batches; returns the rows they yield."""
    offsets = np.arange(plan.length)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for begin in range(0, len(plan.starts), cfg.batch_size):
            starts = plan.starts[begin:begin + cfg.batch_size]
            x = torch.from_numpy(np.asarray(split.tokens[starts[:, None] + offsets], dtype=np.int64))  # (B, T)
            model.mlp_activations(x.to(device), plan.layer)  # (B, T, d_mlp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return plan.rows


def run_harvest(model: GPT, split: Split, cfg: harvest.HarvestConfig, plan: harvest.Plan, out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    result = harvest.harvest_model(model, split, cfg, plan, out, {"bench": True})
    return result.rows


def check(model: GPT, split: Split, cfg: harvest.HarvestConfig, plan: harvest.Plan, out: Path) -> None:
    """Stored rows equal the forward pass at the sampled positions."""
    assert run_harvest(model, split, cfg, plan, out) == plan.rows
    store = activations.open_store(out)
    batch = store.take(np.arange(0, plan.rows, max(1, plan.rows // 64)), to_float32=True)
    x = torch.from_numpy(np.stack([split.tokens[s:s + plan.length].astype(np.int64)
                                   for s in plan.starts[batch.context_id]]))  # (R, T)
    with torch.inference_mode():
        acts = model.mlp_activations(x.to(next(model.parameters()).device), plan.layer).cpu()  # (R, T, d_mlp)
    direct = acts[torch.arange(len(x)), torch.from_numpy(batch.position.astype(np.int64))]
    tol = 1e-5 if cfg.dtype == "fp32" else 1e-2  # bf16 keeps 8 significant bits
    torch.testing.assert_close(batch.tensor(), direct, atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def small():
    model = make_model(n_layer=1, n_embd=64, block_size=128)
    return (model, *setup(model, contexts=64, positions=64, batch_size=16))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_harvest_throughput(benchmark, small, tmp_path, provider):
    model, cfg, split, plan = small
    benchmark.group = "harvest rows/s"
    if provider == "forward":
        assert benchmark(run_forward, model, split, cfg, plan) == plan.rows
    else:
        check(model, split, cfg, plan, tmp_path / "check")
        assert benchmark(run_harvest, model, split, cfg, plan, tmp_path / "acts") == plan.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=activations.DTYPES)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = make_model()
    cfg, split, plan = setup(model, args.contexts)
    cfg.dtype = args.dtype
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        out = Path(tmp) / "acts"
        check(model, split, cfg, plan, out)
        times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
        for _ in range(args.rounds):  # providers take turns so machine load hits both alike
            for p in PROVIDERS:
                start = time.perf_counter()
                run_forward(model, split, cfg, plan) if p == "forward" else run_harvest(model, split, cfg, plan, out)
                times[p].append(time.perf_counter() - start)
    print(f"{args.contexts} contexts x 200 positions = {plan.rows} rows of {plan.dim} ({args.dtype}); "
          f"GPT 2 x 192, block 256, batch {cfg.batch_size}; best (median) of {args.rounds}\n")
    print("| provider | rows/s best | rows/s median | vs forward |")
    print("|---|---|---|---|")
    best_forward = plan.rows / min(times["forward"])
    for p in PROVIDERS:
        best, median = plan.rows / min(times[p]), plan.rows / statistics.median(times[p])
        print(f"| {p} | {best:,.0f} | {median:,.0f} | {best / best_forward:.0%} |")


if __name__ == "__main__":
    main()
