"""Harvest throughput against the bare forward pass on the same batches.

Providers, over the same contexts in the same batches of a GPT of the laptop preset's
shape (2 layers, n_embd 192, block 256; random weights: speed does not depend on them):

- `forward`: `model.mlp_activations(x, layer)` alone, under `torch.inference_mode`: the
  compute a harvest cannot avoid;
- `harvest`: the whole stage (`harvest.harvest_model`): sampling 200 positions per context,
  gathering, metadata, writing shards with checksums and fsync, `index.json`.

Rows/s counts the stored rows (contexts x positions); the goal is harvest >= 80% of forward.

With `--hf gpt2|neox|llama` the model is a tiny random Hugging Face causal LM of that
layout instead (4 layers, width 256, context 256, vocabulary 1,024; `monofast[hf]`),
hooked at its last MLP (`blocks.3.mlp.hook_post`), and `forward` is its whole forward pass
(`lm(input_ids)`, what reading the activation with a plain forward hook costs); `to-hook`
is the forward pass that stops at the hook (`HFModel.mlp_activations`).

    pytest benches/bench_harvest.py --benchmark-enable   # pytest-benchmark tables
    python benches/bench_harvest.py [--contexts 512]     # the side-by-side table
    python benches/bench_harvest.py --hf gpt2            # a Hugging Face model

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


def make_hf(kind: str, layers: int = 4, width: int = 256, context: int = 256):
    """A tiny random Hugging Face causal LM of `kind`'s layout, hooked at its last MLP."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import hf_models
    import transformers
    from monofast.gpt.hf import HFModel

    torch.manual_seed(0)
    config = hf_models.config(kind, VOCAB, layers=layers, width=width, context=context)
    lm = transformers.AutoModelForCausalLM.from_config(config).eval()
    return HFModel(lm, "mlp.hook_post", f"tiny-{kind}")


def setup(model, contexts: int, positions: int = 200, batch_size: int = 32, device: str = "cpu"):
    cfg = harvest.HarvestConfig(contexts=contexts, positions_per_context=positions, batch_size=batch_size,
                                device=device, context_length=model.config.block_size)
    split = make_split(contexts * model.config.block_size)
    plan = harvest.plan(cfg, model.config, len(split.tokens))
    return cfg, split, plan


def run_forward(model, split: Split, cfg: harvest.HarvestConfig, plan: harvest.Plan, whole: bool = False) -> int:
    """The bare forward passes over the harvest's batches, up to the hook (`whole`: the
    model's whole forward pass); returns the rows they yield."""
    offsets = np.arange(plan.length)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for begin in range(0, len(plan.starts), cfg.batch_size):
            starts = plan.starts[begin:begin + cfg.batch_size]
            x = torch.from_numpy(np.asarray(split.tokens[starts[:, None] + offsets], dtype=np.int64))  # (B, T)
            if whole:
                model(x.to(device))  # (B, T, V) logits
            else:
                model.mlp_activations(x.to(device), plan.layer)  # (B, T, d_mlp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return plan.rows


def run_harvest(model, split: Split, cfg: harvest.HarvestConfig, plan: harvest.Plan, out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    result = harvest.harvest_model(model, split, cfg, plan, out, {"bench": True})
    return result.rows


def check(model, split: Split, cfg: harvest.HarvestConfig, plan: harvest.Plan, out: Path) -> None:
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


@pytest.fixture(scope="module")
def small_hf():
    model = make_hf("gpt2", layers=2, width=64, context=128)
    return (model, *setup(model, contexts=64, positions=64, batch_size=16))


@pytest.mark.parametrize("provider", ("forward", "to-hook", "harvest"))
def test_hf_harvest_throughput(benchmark, small_hf, tmp_path, provider):
    model, cfg, split, plan = small_hf
    benchmark.group = "harvest rows/s, Hugging Face GPT-2"
    if provider == "harvest":
        check(model, split, cfg, plan, tmp_path / "check")
        assert benchmark(run_harvest, model, split, cfg, plan, tmp_path / "acts") == plan.rows
    else:
        assert benchmark(run_forward, model, split, cfg, plan, provider == "forward") == plan.rows


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
    parser.add_argument("--hf", default=None, choices=("gpt2", "neox", "llama"),
                        help="a tiny random Hugging Face model of this layout instead of the tiny GPT")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = make_model() if args.hf is None else make_hf(args.hf)
    providers = PROVIDERS if args.hf is None else ("forward", "to-hook", "harvest")
    cfg, split, plan = setup(model, args.contexts)
    cfg.dtype = args.dtype
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        out = Path(tmp) / "acts"
        check(model, split, cfg, plan, out)
        times: dict[str, list[float]] = {p: [] for p in providers}
        for _ in range(args.rounds):  # providers take turns so machine load hits them alike
            for p in providers:
                start = time.perf_counter()
                if p == "harvest":
                    run_harvest(model, split, cfg, plan, out)
                else:  # the tiny GPT's forward stops at the hook; a Hugging Face model's runs whole
                    run_forward(model, split, cfg, plan, whole=p == "forward" and args.hf is not None)
                times[p].append(time.perf_counter() - start)
    shape = "GPT 2 x 192" if args.hf is None else f"Hugging Face {args.hf} 4 x 256 (random), hook {plan.layer}'s MLP"
    print(f"{args.contexts} contexts x 200 positions = {plan.rows} rows of {plan.dim} ({args.dtype}); "
          f"{shape}, block 256, batch {cfg.batch_size}; best (median) of {args.rounds}\n")
    print("| provider | rows/s best | rows/s median | vs forward |")
    print("|---|---|---|---|")
    best_forward = plan.rows / min(times["forward"])
    for p in providers:
        best, median = plan.rows / min(times[p]), plan.rows / statistics.median(times[p])
        print(f"| {p} | {best:,.0f} | {median:,.0f} | {best / best_forward:.0%} |")


if __name__ == "__main__":
    main()
