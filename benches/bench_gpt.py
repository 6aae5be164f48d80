"""GPT training throughput and model-FLOPs utilisation (MFU), side by side in one run.

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
import math
import os
import time
from typing import Callable, NamedTuple

import pytest
import torch
from monofast.common.device import matmul_precision
from monofast.gpt.config import GPTTrainConfig
from monofast.gpt.trainer import Trainer, step_seed, use_compile
from monofast.run import presets

VOCAB = 1024
SHAPES = ("quick", "laptop")
PROVIDERS = ("fp32-eager", "bf16-eager", "fp32-compiled", "bf16-compiled")
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
    values = presets.stage_values(shape, "gpt")
    cfg = GPTTrainConfig(**values, device="cpu", dtype="float32" if precision == "fp32" else "bfloat16",
                             compile=mode == "compiled")
    trainer = Trainer(cfg, VOCAB, torch.device("cpu"), PRECISION[precision])
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (cfg.batch_size, cfg.block_size), generator=gen)  # (B, T)
    y = torch.randint(0, VOCAB, (cfg.batch_size, cfg.block_size), generator=gen)  # (B, T)
    flops = trainer.model.flops_per_token(cfg.block_size) * x.numel()
    return Case(trainer, x, y, float(flops))


def stepper(case: Case) -> Callable[[], torch.Tensor]:
    """One training step per call, at the matmul precision training uses."""
    counter = iter(range(10**9))

    def step() -> torch.Tensor:
        with matmul_precision(case.trainer.device):
            return case.trainer.step(next(counter), case.x, case.y)
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

@pytest.mark.parametrize("provider", list(MATMULS))
def test_matmul(benchmark, provider):
    benchmark.group = "gpt: matmul 2048^3 (the MFU denominator)"
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
    case = make_case(shape, provider)
    step = stepper(case)
    check_case(case, step)
    benchmark.extra_info["tokens_per_step"] = case.x.numel()
    benchmark.extra_info["model_gflop_per_step"] = case.flops_per_step / 1e9
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


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
            step = stepper(case)
            check_case(case, step)
            step()  # warm-up (and, compiled, the backward's compilation)
            cases[shape, provider] = (case, step)
            print(f"  ready {shape:6s} {provider:13s} in {time.perf_counter() - started:5.1f} s", flush=True)
    best = {key: math.inf for key in cases}
    rates = {name: 0.0 for name in MATMULS}
    for _ in range(rounds):
        for name in MATMULS:
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
    print(f"\nmatrix products ({MATMUL_N}^3, best of every round): fp32 {rates['fp32']:.0f} GFLOP/s, "
          f"fp32 at precision 'medium' {rates['fp32-medium']:.0f}, bf16 {rates['bf16']:.0f} "
          f"({rates['bf16'] / rates['fp32']:.2f}x fp32)")
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
        print(f"{r.shape:7s} {r.provider:14s} {r.seconds * 1e3:8.1f} {r.tokens / r.seconds:9.0f} "
              f"{gflops:8.1f} {gflops / rates['bf16']:8.0%} {gflops / own:7.0%} {ratio:>14s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round (default: 5)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds; the best counts (default: 5)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled providers")
    parser.add_argument("--shape", action="append", choices=SHAPES, help="preset shapes (default: both)")
    args = parser.parse_args()
    providers = tuple(p for p in PROVIDERS if not (args.no_compile and p.endswith("compiled")))
    shapes = tuple(args.shape or SHAPES)
    print_table(*measure(shapes, providers, args.steps, args.rounds))


if __name__ == "__main__":
    main()
