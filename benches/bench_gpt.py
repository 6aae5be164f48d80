"""GPT training: time to the seed recipe's loss, throughput and model-FLOPs utilisation
(MFU), each measured side by side in one run.

Time to loss (`--time-to-loss`): the seed recipe (the `seed` preset's GPT: AdamW, cosine,
dropout 0.2, 7,500 steps) and the laptop preset's recipe train on the same data to their
last step in one process, in interleaved chunks (a burst of load on a shared machine hits
both), and both are evaluated on the same windows tiling the whole validation split. It
prints each recipe's training time, its validation loss overall and per source, the ratio
of the times, the step where the faster recipe first reaches the seed's final loss on every
source, and what both would take at this machine's bf16 matrix-product rate (the limit).

    python benches/bench_gpt.py --time-to-loss [--data runs/laptop/data]

Providers: the quick and laptop preset shapes x fp32 / bf16 autocast x eager / compiled,
each timing the stage's own `Trainer.step` (forward, backward, clipping, fused AdamW) on a
fixed batch. MFU is the model's training FLOPs (6N + 12 L T C per token) per second over the
matrix-product rate measured on this machine in the same run (a square bf16 and a square
fp32 product), so the ratios hold on a shared machine where absolute times drift.

    pytest benches/bench_gpt.py --benchmark-enable   # pytest-benchmark tables
    python benches/bench_gpt.py                      # the side-by-side table with ratios

In the default test run (`--benchmark-disable`) every eager provider runs one checked step;
the compiled ones are skipped there because compiling takes tens of seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import torch
from monofast.common import config
from monofast.common.device import matmul_precision, native_bf16
from monofast.common.errors import UserError
from monofast.data.splits import Split, load_meta, load_split
from monofast.gpt import dropout as gpt_dropout
from monofast.gpt.batches import EvalResult, evaluate, get_batch, tiling_starts
from monofast.gpt.config import GPTTrainConfig
from monofast.gpt.trainer import Trainer, step_seed, use_compile
from monofast.run import presets

VOCAB = 1024
SHAPES = ("quick", "laptop", "seed")
PROVIDERS = ("fp32-eager", "bf16-eager", "fp32-compiled", "bf16-compiled", "bf16-torchdropout")
"""precision-mode; torchdropout: bf16 eager with every dropout mask drawn by F.dropout (the
cheap CPU masks of `monofast.gpt.dropout` off), to measure what they save."""
PRECISION = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATMUL_N = 2048


# ---------------------------------------------------------------------------------------
# Helpers shared by pytest and the script

MATMULS = {"fp32": (torch.float32, "highest"), "fp32-medium": (torch.float32, "medium"),
           "bf16": (torch.bfloat16, "highest")}
"""The denominators: (dtype, float32 matmul precision). Training runs fp32 products at the
precision `MATMUL_PRECISION` sets ("medium" on CPU), so fp32 rows are measured against that."""


def matmul_gflops(name: str, n: int = MATMUL_N, reps: int = 8) -> float:
    """Best-of-`reps` rate of one (n, n) @ (n, n) product, in GFLOP/s."""
    dtype, precision = MATMULS[name]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # first call pays for the kernel choice
        best = math.inf
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_float32_matmul_precision(before)
    return 2 * n**3 / best / 1e9


class Case(NamedTuple):
    """One provider at one shape, ready to step."""

    trainer: Trainer
    x: torch.Tensor
    """(B, T) inputs."""
    y: torch.Tensor
    """(B, T) targets."""
    flops_per_step: float


def make_case(shape: str, provider: str) -> Case:
    precision, mode = provider.split("-")
    mode = "eager" if mode == "torchdropout" else mode
    values = presets.stage_values(shape, "gpt")
    cfg = GPTTrainConfig(**values, device="cpu", dtype="float32" if precision == "fp32" else "bfloat16",
                             compile=mode == "compiled")
    trainer = Trainer(cfg, VOCAB, torch.device("cpu"), PRECISION[precision])
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (cfg.batch_size, cfg.block_size), generator=gen)  # (B, T)
    y = torch.randint(0, VOCAB, (cfg.batch_size, cfg.block_size), generator=gen)  # (B, T)
    flops = trainer.model.flops_per_token(cfg.block_size) * x.numel()
    return Case(trainer, x, y, float(flops))


def stepper(case: Case, cheap_masks: bool = True) -> Callable[[], torch.Tensor]:
    """One training step per call, at the matmul precision training uses (`cheap_masks`
    False: every dropout mask drawn by F.dropout)."""
    counter = iter(range(10**9))

    def step() -> torch.Tensor:
        before, gpt_dropout.CHEAP_MASKS = gpt_dropout.CHEAP_MASKS, cheap_masks
        try:
            with matmul_precision(case.trainer.device):
                return case.trainer.step(next(counter), case.x, case.y)
        finally:
            gpt_dropout.CHEAP_MASKS = before
    return step


def check_case(case: Case, step: Callable[[], torch.Tensor]) -> None:
    """Before timing: the first step's loss is the untrained model's (about ln V) and equals
    an eager fp32 forward with the same weights and dropout masks, within the error of the
    precision (and, compiled, of the compiler's own dropout random numbers)."""
    trainer = case.trainer
    torch.manual_seed(step_seed(trainer.cfg, 0))
    with torch.no_grad():
        reference = trainer.model.train()(case.x, case.y).loss.item()  # eager fp32
    loss = step().item()
    assert abs(reference - math.log(VOCAB)) < 0.3, reference
    exact = trainer.dtype == torch.float32 and not use_compile(trainer.cfg.compile, trainer.device)
    assert abs(loss - reference) < (1e-5 if exact else 2e-2), (loss, reference)


# ---------------------------------------------------------------------------------------
# pytest-benchmark

def skip_slow_bf16(benchmark, provider: str) -> None:
    """In the plain test run, leave out bf16 rows on a CPU without native bf16 products: there
    they fall back to a slow path (0.8 GFLOP/s against 86 in fp32 on a 2-core AVX2 CPU),
    minutes for what takes seconds elsewhere. Benchmarking (--benchmark-enable) runs them."""
    if provider.startswith("bf16") and benchmark.disabled and not native_bf16(torch.device("cpu")):
        pytest.skip("bf16 products are not native on this CPU (a slow fallback); run with --benchmark-enable")


@pytest.mark.parametrize("provider", list(MATMULS))
def test_matmul(benchmark, provider):
    benchmark.group = "gpt: matmul 2048^3 (the MFU denominator)"
    skip_slow_bf16(benchmark, provider)
    dtype, precision = MATMULS[provider]
    a = torch.randn(MATMUL_N, MATMUL_N).to(dtype)
    reference = a[:4].double() @ a[:, :4].double()  # (4, 4)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        c = benchmark(torch.matmul, a, a)
    finally:
        torch.set_float32_matmul_precision(before)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(c[:4, :4].double(), reference, rtol=tolerance,
                               atol=tolerance * MATMUL_N ** 0.5)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_train_step(benchmark, shape, provider):
    benchmark.group = f"gpt: train step, {shape} preset shape"
    if provider.endswith("compiled") and benchmark.disabled:
        pytest.skip("torch.compile takes tens of seconds on a CPU; runs with --benchmark-enable")
    skip_slow_bf16(benchmark, provider)
    case = make_case(shape, provider)
    step = stepper(case, cheap_masks=not provider.endswith("torchdropout"))
    check_case(case, step)
    benchmark.extra_info["tokens_per_step"] = case.x.numel()
    benchmark.extra_info["model_gflop_per_step"] = case.flops_per_step / 1e9
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


def test_race_to_loss_interleaved_equals_alone(tmp_path, capsys):
    """Interleaving the recipes changes no result: each ends with the loss and weights it
    has trained alone; the table compares them against the first."""
    from conftest import build_small_data

    data_dir = build_small_data(tmp_path)
    small = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 8, "warmup_iters": 2}
    legs = {"seed": recipe("seed", **small, max_iters=12),
            "fast": recipe("seed", **small, max_iters=6, dropout=0.0, optimizer="muon", schedule="wsd")}
    raced = race_to_loss(data_dir, legs, chunks=3, evals=3, show=lambda line: None)
    for name, cfg in legs.items():
        alone, = race_to_loss(data_dir, {name: cfg}, chunks=1, evals=1, show=lambda line: None)
        leg = next(leg for leg in raced if leg.name == name)
        assert [e["step"] for e in leg.evals] == [cfg.max_iters // 3, 2 * cfg.max_iters // 3, cfg.max_iters]
        assert leg.evals[-1]["val_loss_by_source"] == alone.evals[-1]["val_loss_by_source"]
        for a, b in zip(leg.trainer.model.parameters(), alone.trainer.model.parameters()):
            assert torch.equal(a, b)
    summary = print_race(raced, rate=100.0)
    table = capsys.readouterr().out
    assert "fast: " in table and "x faster than seed" in table
    fast = summary["legs"][1]
    assert fast["steps"] == 6 and fast["limit_seconds"] == pytest.approx(raced[1].flops / 100e9)
    target = raced[0].evals[-1]["val_loss_by_source"]
    hit = first_at_or_below(raced[1], target)
    assert hit is None or all(hit["val_loss_by_source"][k] <= v for k, v in target.items())


def test_parse_recipe():
    name, cfg = parse_recipe("laptop@1500,muon_lr=0.03,schedule=cosine,warmup_iters=20,bias=false")
    assert name == "laptop@1500,muon_lr=0.03,schedule=cosine,warmup_iters=20,bias=false"
    assert (cfg.max_iters, cfg.muon_lr, cfg.schedule, cfg.warmup_iters) == (1500, 0.03, "cosine", 20)
    assert cfg.bias is False and parse_recipe("laptop,bias=True")[1].bias is True
    assert (cfg.optimizer, cfg.dropout, cfg.decay_frac) == ("muon", 0.05, 1.0)  # the rest is the laptop preset's
    assert parse_recipe("seed")[1].max_iters == 7500
    assert parse_recipe("laptop,sample_prompts=def f")[1].sample_prompts == ("def f",)
    for bad, message in (("laptop,muon_lr", "FIELD=VALUE"), ("laptop,nonsense=1", "FIELD=VALUE"),
                         ("laptop@x", "max_iters = \"x\" is not an integer"),
                         ("laptop,muon_lr=fast", "muon_lr = \"fast\" is not a finite number"),
                         ("laptop,bias=maybe", "bias = \"maybe\" is not true or false")):
        with pytest.raises(SystemExit, match=message):
            parse_recipe(bad)


# ---------------------------------------------------------------------------------------
# Script: one table with every provider and its ratios

class Row(NamedTuple):
    shape: str
    provider: str
    seconds: float
    tokens: int
    flops: float


def measure(shapes: tuple[str, ...], providers: tuple[str, ...], steps: int,
            rounds: int) -> tuple[list[Row], dict[str, float]]:
    """Interleaved rounds (the matrix products and every provider once per round), best
    round kept: on a shared machine a burst of load then hits one round of each, not one
    provider or the denominator alone."""
    cases = {}
    for shape in shapes:
        for provider in providers:
            started = time.perf_counter()
            case = make_case(shape, provider)
            step = stepper(case, cheap_masks=not provider.endswith("torchdropout"))
            check_case(case, step)
            step()  # warm-up (and, compiled, the backward's compilation)
            cases[shape, provider] = (case, step)
            print(f"  ready {shape:6s} {provider:13s} in {time.perf_counter() - started:5.1f} s", flush=True)
    best = {key: math.inf for key in cases}
    # bf16's rate only where a bf16 provider runs (off its native path a 2048^3 product
    # takes about 20 s).
    timed = [name for name in MATMULS if name != "bf16" or any(p.startswith("bf16") for p in providers)]
    rates = {name: 0.0 for name in timed}
    for _ in range(rounds):
        for name in timed:
            rates[name] = max(rates[name], matmul_gflops(name, reps=4))
        for key, (case, step) in cases.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best[key] = min(best[key], (time.perf_counter() - start) / steps)
    rows = [Row(shape, provider, best[shape, provider], case.x.numel(), case.flops_per_step)
            for (shape, provider), (case, _) in cases.items()]
    return rows, rates


def print_table(rows: list[Row], rates: dict[str, float]) -> None:
    bf16 = (f"bf16 {rates['bf16']:.0f} ({rates['bf16'] / rates['fp32']:.2f}x fp32)" if "bf16" in rates
            else "bf16 not timed (no bf16 provider)")
    print(f"\nmatrix products ({MATMUL_N}^3, best of every round): fp32 {rates['fp32']:.0f} GFLOP/s, "
          f"fp32 at precision 'medium' {rates['fp32-medium']:.0f}, {bf16}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}\n")
    header = (f"{'shape':7s} {'provider':14s} {'ms/step':>8s} {'tokens/s':>9s} {'GFLOP/s':>8s} "
              f"{'MFU/bf16':>9s} {'MFU/own':>8s} {'vs fp32-eager':>14s}")
    print(header)
    print("-" * len(header))
    base = {r.shape: r.seconds for r in rows if r.provider == "fp32-eager"}
    for r in rows:
        gflops = r.flops / r.seconds / 1e9
        own = rates["bf16" if r.provider.startswith("bf16") else "fp32-medium"]
        ratio = f"{base[r.shape] / r.seconds:.2f}x" if r.shape in base else "-"
        of_bf16 = f"{gflops / rates['bf16']:8.0%}" if "bf16" in rates else f"{'-':>8s}"
        print(f"{r.shape:7s} {r.provider:14s} {r.seconds * 1e3:8.1f} {r.tokens / r.seconds:9.0f} "
              f"{gflops:8.1f} {of_bf16} {gflops / own:7.0%} {ratio:>14s}")


# ---------------------------------------------------------------------------------------
# Time to loss: recipes trained to the end side by side

class Leg:
    """One recipe training on one machine: its trainer, the steps done, the seconds spent in
    them (batches and steps only; evaluations are not counted) and its evaluations."""

    def __init__(self, name: str, cfg: GPTTrainConfig, vocab_size: int):
        self.name, self.cfg = name, cfg
        self.trainer = Trainer(cfg, vocab_size, torch.device("cpu"), PRECISION[_precision(cfg)])
        self.step, self.seconds = 0, 0.0
        self.evals: list[dict[str, Any]] = []

    def advance(self, until: int, split: Split) -> None:
        """Train up to step `until`, timing it."""
        start = time.perf_counter()
        with matmul_precision(self.trainer.device):
            while self.step < until:
                x, y = get_batch(split, self.step, self.cfg, self.trainer.device)
                self.trainer.step(self.step, x, y)
                self.step += 1
        self.seconds += time.perf_counter() - start

    def evaluate(self, split: Split, sources: list[str], starts: Any) -> EvalResult:
        result = evaluate(self.trainer.model, split, sources, self.cfg, self.trainer.device,
                          self.trainer.dtype, starts)
        self.evals.append({"step": self.step, "seconds": self.seconds, "val_loss": result.loss,
                           "val_loss_by_source": result.by_source})
        return result

    @property
    def flops(self) -> float:
        """Training FLOPs of every step (6N + 12 L T C per token)."""
        tokens = self.cfg.max_iters * self.cfg.batch_size * self.cfg.block_size
        return float(self.trainer.model.flops_per_token(self.cfg.block_size) * tokens)


def _precision(cfg: GPTTrainConfig) -> str:
    return "fp32" if cfg.dtype == "float32" else "bf16"


def training_precision() -> str:
    """What `--dtype auto` trains at on this CPU: bf16 autocast where its products are native
    (AVX-512 BF16, AMX), else fp32 (elsewhere bf16 products fall back to a slow path)."""
    return "bf16" if native_bf16(torch.device("cpu")) else "fp32"


def recipe(preset: str, **changes: Any) -> GPTTrainConfig:
    """A preset's GPT recipe on the CPU, at the precision a run would train at here unless
    `changes` say otherwise."""
    dtype = "bfloat16" if training_precision() == "bf16" else "float32"
    values = {**presets.stage_values(preset, "gpt"), "device": "cpu", "dtype": dtype,
              "compile": "false", **changes}
    return GPTTrainConfig(**values)


def race_to_loss(data_dir: Path, legs: dict[str, GPTTrainConfig], chunks: int = 100,
                 evals: int = 10, show: Callable[[str], None] = print) -> list[Leg]:
    """Train every recipe in `legs` to its last step in interleaved chunks (each chunk takes
    every leg the same fraction of its steps further), evaluating each `evals` times on the
    windows that tile the validation split. Interleaving changes no result: every random
    choice of a step is keyed on the step."""
    meta = load_meta(data_dir)
    train_split, val_split = load_split(data_dir, "train", meta), load_split(data_dir, "val", meta)
    sources = [s["name"] for s in sorted(meta["sources"], key=lambda s: s["id"])]
    runners = [Leg(name, cfg, meta["vocab_size"]) for name, cfg in legs.items()]
    block_sizes = {leg.cfg.block_size for leg in runners}
    if len(block_sizes) != 1:
        raise ValueError(f"the recipes' block sizes differ ({sorted(block_sizes)}): their losses would not compare")
    starts = tiling_starts(len(val_split.tokens), block_sizes.pop())
    marks = {round(chunks * i / evals) for i in range(1, evals + 1)}
    for chunk in range(1, chunks + 1):
        for leg in runners:
            leg.advance(round(leg.cfg.max_iters * chunk / chunks), train_split)
            if chunk in marks:
                result = leg.evaluate(val_split, sources, starts)
                by_source = ", ".join(f"{k} {v:.4f}" for k, v in result.by_source.items())
                show(f"  {leg.name:11s} step {leg.step:5d}  {leg.seconds:7.1f} s  val {result.loss:.4f} ({by_source})")
    return runners


def first_at_or_below(leg: Leg, target: dict[str, float]) -> dict[str, Any] | None:
    """`leg`'s first evaluation at or below `target` on every source (None if none is)."""
    for record in leg.evals:
        if all(record["val_loss_by_source"][k] <= v for k, v in target.items()):
            return record
    return None


def print_race(legs: list[Leg], rate: float, precision: str = "bf16") -> dict[str, Any]:
    """The side-by-side table against the first leg (the baseline); the summary as a dict.
    `rate`: the product rate at the legs' `precision` (the limit column's denominator)."""
    base = legs[0]
    target = base.evals[-1]["val_loss_by_source"]
    sources = list(target)
    print(f"\n{precision} matrix products ({MATMUL_N}^3, best of the run): {rate:.0f} GFLOP/s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = (f"{'recipe':11s} {'steps':>6s} {'batch':>5s} {'train s':>8s} {'ms/step':>8s} {'val':>7s} "
              + " ".join(f"{k[:11]:>11s}" for k in sources)
              + f" {'limit s':>8s} {'x ' + base.name:>9s} {'to target':>22s}")
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {"precision": precision, f"matmul_{precision}_gflops": rate, "legs": []}
    for leg in legs:
        last = leg.evals[-1]
        hit = first_at_or_below(leg, target)
        reached = f"step {hit['step']} ({hit['seconds']:.0f} s)" if hit else "not reached"
        limit = leg.flops / (rate * 1e9)
        print(f"{leg.name:11s} {leg.step:6d} {leg.cfg.batch_size:5d} {leg.seconds:8.1f} "
              f"{leg.seconds / leg.step * 1e3:8.1f} {last['val_loss']:7.4f} "
              + " ".join(f"{last['val_loss_by_source'][k]:11.4f}" for k in sources)
              + f" {limit:8.1f} {base.seconds / leg.seconds:8.2f}x {reached:>22s}")
        summary["legs"].append({"name": leg.name, "config": {k: v for k, v in vars(leg.cfg).items()},
                                "steps": leg.step, "seconds": leg.seconds, "limit_seconds": limit,
                                "evals": leg.evals, "reached_target": hit})
    for leg in legs[1:]:
        last = leg.evals[-1]["val_loss_by_source"]
        verdict = all(last[k] <= target[k] for k in sources)
        print(f"\n{leg.name}: {base.seconds / leg.seconds:.2f}x faster than {base.name} to the end; final loss "
              f"{'at or below' if verdict else 'ABOVE'} {base.name}'s on every source "
              f"({', '.join(f'{k} {last[k] - target[k]:+.4f}' for k in sources)})")
    return summary


def laptop_data(folder: Path) -> Path:
    """The laptop preset's data stage, built into `folder` (seconds)."""
    subprocess.run([sys.executable, "-m", "monofast", "data", "--preset", "laptop", "--run", str(folder)],
                   check=True)
    return folder / "data"


def parse_recipe(spec: str) -> tuple[str, GPTTrainConfig]:
    """"PRESET", "PRESET@STEPS" (another step count) and either followed by ",FIELD=VALUE"
    changes to the GPT config's fields (e.g. "laptop@1500,muon_lr=0.03"), so a lever is
    raced against the seed from the command line. Values parse as the CLI's flags do."""
    head, *changes = spec.split(",")
    preset, _, steps = head.partition("@")
    hints = config.type_hints(GPTTrainConfig)
    values: dict[str, Any] = {}
    for change in ([f"max_iters={steps}"] if steps else []) + changes:
        name, eq, text = change.partition("=")
        if not eq or name not in hints:
            raise SystemExit(f"--recipe {spec!r}: {change!r} is not FIELD=VALUE of a GPT config field "
                             f"(e.g. muon_lr=0.03, dropout=0.1, bias=false)")
        try:
            values[name] = config.coerce(GPTTrainConfig, name, text, f"--recipe {spec!r}")
        except UserError as err:
            raise SystemExit(str(err)) from None
    return spec, recipe(preset, **values)


def time_to_loss(args: argparse.Namespace) -> None:
    legs = dict([parse_recipe("seed")] + [parse_recipe(spec) for spec in args.recipe or ["laptop"]])
    for name, cfg in legs.items():
        print(f"{name}: {cfg.max_iters} steps of {cfg.batch_size} x {cfg.block_size}, {cfg.optimizer}, "
              f"{cfg.schedule}, dropout {cfg.dropout}, {cfg.dtype}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data) if args.data else laptop_data(Path(tmp))
        precision = training_precision()
        rates = {"bf16": "bf16", "fp32": "fp32-medium"}  # fp32 trains at matmul precision "medium"
        rate = matmul_gflops(rates[precision])
        runners = race_to_loss(data_dir, legs, chunks=args.chunks, evals=args.evals,
                               show=lambda line: print(line, flush=True))
        rate = max(rate, matmul_gflops(rates[precision]))
    summary = print_race(runners, rate, precision)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round (default: 5)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds; the best counts (default: 5)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled providers")
    parser.add_argument("--shape", action="append", choices=SHAPES, help="preset shapes (default: both)")
    parser.add_argument("--providers", help=f"comma-separated, of {', '.join(PROVIDERS)} (default: all; "
                                            "bf16 only where the CPU multiplies it natively)")
    parser.add_argument("--time-to-loss", action="store_true",
                        help="train the seed recipe and --recipe to the end side by side instead")
    parser.add_argument("--recipe", action="append", metavar="PRESET[@STEPS][,FIELD=VALUE...]",
                        help="a preset whose GPT races the seed's, optionally with another step count and "
                             "changed config fields, e.g. laptop@1500,muon_lr=0.03 (repeatable; default: laptop)")
    parser.add_argument("--data", help="a data stage's folder (default: build the laptop preset's "
                                       "in a temporary folder)")
    parser.add_argument("--chunks", type=int, default=100, help="interleaved chunks (default: 100)")
    parser.add_argument("--evals", type=int, default=10, help="evaluations per recipe (default: 10)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.time_to_loss:
        time_to_loss(args)
        return
    providers = tuple(args.providers.split(",")) if args.providers else PROVIDERS
    if unknown := set(providers) - set(PROVIDERS):
        parser.error(f"unknown provider(s) {', '.join(sorted(unknown))}; choose from {', '.join(PROVIDERS)}")
    if not args.providers and not native_bf16(torch.device("cpu")):
        print("bf16 providers left out: this CPU has no native bf16 products (name them in --providers to time them)")
        providers = tuple(p for p in providers if not p.startswith("bf16"))
    providers = tuple(p for p in providers if not (args.no_compile and p.endswith("compiled")))
    shapes = tuple(args.shape or SHAPES)
    print_table(*measure(shapes, providers, args.steps, args.rounds))


if __name__ == "__main__":
    main()
