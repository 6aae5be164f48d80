"""Every GPU path of monofast checked against its reference, then timed, in one process.

    python benches/gpu_check.py --out DIR            on a CUDA machine (what gpu_check.sh runs)
    python benches/gpu_check.py --small --out DIR    the same code at toy sizes on a CPU
                                                     (the Triton kernels through the interpreter)

Sections, in order of value, each guarded so a failure is recorded and the next one runs:

    env        card, driver-visible properties, torch and Triton versions
    ceilings   the card's measured bf16 matrix-product rate, device copy and host->device rates
    kernels    the Triton SAE step, dense and sparse (forward, statistics, every gradient)
               against the float64 oracle, fp32 / bf16 / fp16, ReLU, TopK and the
               decoder-norm L1
    sae        one full training step per provider (floor, eager oracle, autograd, compiled,
               monofast on Triton and on torch, with and without CUDA graphs, the sparse
               step firing like a trained SAE, TopK k=32 sparse and dense), two shapes
    sae_train  `monofast sae train` with the step replayed as a CUDA graph and without
    pytest     the test files with GPU-only cases
    laptop     `monofast run --preset laptop` end to end, per-stage seconds (then the SAE
               stage again under cProfile, when time allows)
    gpt        GPT training steps/s at the laptop shape: eager, compiled, compiled with graphs
    stream     activation store -> device: values checked, then GB/s by each way of copying
    breakdown  each Triton kernel of the step at the paper shape beside cuBLAS's product
    harvest    harvest rows/s against the bare forward pass and against writing the bytes

Results go to DIR/gpu_check.json after every section (so a run stopped at its time limit
still leaves what it measured) and the short table is printed last. Nothing here asserts
a speed: it prints ratios measured side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_harvest  # noqa: E402
import bench_sae  # noqa: E402
from monofast.activations import store as activations  # noqa: E402
from monofast.common.device import matmul_precision  # noqa: E402
from monofast.gpt.config import GPTTrainConfig  # noqa: E402
from monofast.gpt.trainer import Trainer  # noqa: E402
from monofast.kernels import reference  # noqa: E402
from monofast.run import presets  # noqa: E402
from monofast.sae import backend  # noqa: E402
from monofast.sae.model import WEIGHTS_FILE, SAEConfig, SparseAutoencoder  # noqa: E402

SEED_SHAPE = (2048, 768, 1536)
"""(B, D, F): the seed recipe's SAE (batches of 2,048 on 768 MLP neurons, 2x expansion)."""
PAPER_SHAPE = (8192, 512, 16384)
"""(B, D, F): 512 neurons, 16,384 features, where the fused step should reach 60% of the
card's measured bf16 matrix-product rate."""
SMALL_SHAPES = {"seed": (64, 48, 96), "paper": (128, 32, 256)}
"""Toy stand-ins for --small (CPU)."""

# Relative error bounds ||out - ref|| / ||ref|| against the float64 oracle on the same
# rounded inputs: Triton multiplies fp32 in tf32 by default (~3e-4), bf16/fp16 operands
# round to 8/11 bits.
REL_TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


class Report:
    """Rows of the final table plus every detail, written to JSON after each section."""

    def __init__(self, out: Path):
        self.out = out
        self.rows: list[tuple[str, str, str]] = []
        self.details: dict[str, Any] = {}
        self.failures: list[str] = []
        self.deadline = math.inf
        """time.perf_counter() value by which the whole check should be done."""

    def row(self, section: str, what: str, value: str) -> None:
        self.rows.append((section, what, value))
        print(f"  {section:<9} {what:<44} {value}", flush=True)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        payload = {"rows": self.rows, "details": self.details, "failures": self.failures}
        (self.out / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str))

    def table(self) -> str:
        width = max((len(w) for _, w, _ in self.rows), default=10)
        lines = [f"{'section':<9} {'what':<{width}} value"]
        lines += [f"{s:<9} {w:<{width}} {v}" for s, w, v in self.rows]
        if self.failures:
            lines.append(f"FAILED: {', '.join(self.failures)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds per call: CUDA events around each call on a GPU, the host clock
    after a synchronisation elsewhere."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return math.inf
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-300))


# ---------------------------------------------------------------------------------------
# Sections

def section_env(rep: Report, device: torch.device, small: bool) -> None:
    import triton

    info: dict[str, Any] = {"torch": torch.__version__, "triton": triton.__version__,
                            "python": sys.version.split()[0], "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        rep.row("env", "card", f"{props.name}, {props.multi_processor_count} SMs, "
                f"{props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}")
    else:
        rep.row("env", "card", "none (CPU run)")
    rep.row("env", "torch / triton / python", f"{info['torch']} / {info['triton']} / {info['python']}")
    rep.details["env"] = info


def section_ceilings(rep: Report, device: torch.device, small: bool) -> None:
    n = 512 if small else 8192
    a = torch.randn(n, n, device=device).bfloat16()
    b = torch.randn(n, n, device=device).bfloat16()
    ms = median_ms(lambda: a @ b, device, reps=5 if small else 20)
    tflops = 2 * n**3 / ms / 1e9
    rep.details["bf16_tflops"] = tflops
    rep.row("ceilings", f"bf16 matmul {n}^3 (random data)", f"{tflops:,.1f} TFLOP/s")
    size = (16 if small else 1024) * 2**20
    src = torch.empty(size, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    rep.details["d2d_gbps"] = 2 * size / ms / 1e6
    rep.row("ceilings", "device copy (read + write)", f"{rep.details['d2d_gbps']:,.0f} GB/s")
    if device.type == "cuda":
        host = torch.empty(256 * 2**20, dtype=torch.uint8).pin_memory()
        host.random_()
        target = torch.empty(host.shape, dtype=torch.uint8, device=device)
        ms = median_ms(lambda: target.copy_(host, non_blocking=True), device, reps=10)
        rep.details["h2d_pinned_gbps"] = host.numel() / ms / 1e6
        pageable = torch.empty(host.shape, dtype=torch.uint8).random_()
        ms = median_ms(lambda: target.copy_(pageable), device, reps=5)
        rep.details["h2d_pageable_gbps"] = pageable.numel() / ms / 1e6
        rep.row("ceilings", "host->device pinned / pageable",
                f"{rep.details['h2d_pinned_gbps']:.1f} / {rep.details['h2d_pageable_gbps']:.1f} GB/s")


def kernel_cases(small: bool) -> list[tuple[tuple[int, int, int], torch.dtype, Any, bool]]:
    """Each case is a separate Triton specialisation (dtype, ReLU/TopK, decoder-norm L1,
    sizes divisible by 16 or not), and each costs compile time on the card: the list covers
    every kind once rather than every combination."""
    odd = (37, 24, 50) if small else (1000, 200, 3001)
    real = SMALL_SHAPES["seed"] if small else SEED_SHAPE
    cases: list[tuple[tuple[int, int, int], torch.dtype, Any, bool]] = [
        (real, torch.float32, None, False),
        (real, torch.bfloat16, None, False),
        (real, torch.float16, None, False),
        (odd, torch.float32, None, False),
        (odd, torch.bfloat16, 7, True),
        (real, torch.float32, 32, False),
        (real, torch.bfloat16, None, True),
    ]
    if not small:
        cases.append((PAPER_SHAPE, torch.bfloat16, None, False))
    return cases


class OracleOut(NamedTuple):
    x_hat: torch.Tensor
    feats: torch.Tensor
    mse: torch.Tensor
    l1: torch.Tensor


def masked_oracle(mask: torch.Tensor) -> Callable[..., OracleOut]:
    """The step's formula in float64 with the set of firing features fixed to `mask` [B, F].

    In reduced precision (tf32 included) a pre-activation within rounding of zero can land
    on either side of it, and each such flip moves the gradients by an O(1) amount that no
    kernel can avoid. With the kernels' own firing pattern imposed, what is left to compare
    is the arithmetic; the patterns themselves are compared through the firing counts."""
    def step(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor,
             k: Any = None, dec_norm: bool = False) -> OracleOut:
        feats = ((x - b_dec) @ w_enc + b_enc) * mask
        x_hat = feats @ w_dec + b_dec
        w = torch.linalg.vector_norm(w_dec, dim=1) if dec_norm else torch.ones_like(b_enc)
        return OracleOut(x_hat, feats, (x_hat - x).square().sum(1).mean(), (feats * w).sum(1).mean())
    return step


def check_step_case(step_fn: Callable[..., Any], shape: tuple[int, int, int], dtype: torch.dtype, k: Any,
                    dec_norm: bool, device: torch.device, seed: int) -> dict[str, float]:
    """One case: the kernels' outputs and gradients against the float64 oracle fed the same
    rounded inputs and upstream gradients, with the kernels' firing pattern imposed (see
    `masked_oracle`); returns the relative error per output, the share of firing counts
    that differ from the plain oracle's, and the plain oracle's worst error (information)."""
    n_rows, d_in, d_sae = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype)

    x = rand(n_rows, d_in)
    params = [rand(d_in, d_sae, scale=1 / math.sqrt(d_in)), rand(d_sae, scale=0.1),
              rand(d_sae, d_in, scale=1 / math.sqrt(d_sae)), rand(d_in, scale=0.1)]
    g_x_hat = torch.randn(n_rows, d_in, generator=gen).to(device)
    g_feats = torch.randn(n_rows, d_sae, generator=gen).to(device)

    def run(fn: Callable[..., Any], leaves_in: list[torch.Tensor]) -> tuple[Any, tuple[torch.Tensor, ...]]:
        leaves = [t.clone().requires_grad_() for t in leaves_in]
        out = fn(*leaves, k=k, dec_norm=dec_norm)
        loss = ((out.x_hat.double() * g_x_hat.double()).sum() + (out.feats.double() * g_feats.double()).sum()
                + 1.3 * out.mse.double() + 0.7 * out.l1.double())
        return out, torch.autograd.grad(loss, leaves)

    names = ("x_hat", "feats", "mse", "l1", "d_x", "d_w_enc", "d_b_enc", "d_w_dec", "d_b_dec")

    def compare(out: Any, grads: tuple[torch.Tensor, ...], ref: Any, ref_grads: tuple[torch.Tensor, ...]
                ) -> dict[str, float]:
        got = [out.x_hat, out.feats, out.mse, out.l1, *grads]
        want = [ref.x_hat, ref.feats, ref.mse, ref.l1, *ref_grads]
        return {name: rel_err(a, b) for name, a, b in zip(names, got, want)}

    # Poison: fill memory the allocator is about to hand to the kernels' outputs with NaN, so
    # an element a kernel never writes shows up as a non-finite error.
    poison = [torch.full((n_rows, d_sae), math.nan, device=device) for _ in range(4)]
    del poison
    out, grads = run(step_fn, [x, *params])
    wide = [t.double() for t in (x, *params)]
    errors = compare(out, grads, *run(masked_oracle((out.feats != 0).double()), wide))
    plain, plain_grads = run(reference.sae_step, wide)
    errors["plain_oracle_worst"] = max(compare(out, grads, plain, plain_grads).values())
    # Firing patterns: how many (row, feature) decisions differ from the exact oracle's.
    errors["fired"] = float((out.fired.long() - plain.fired.long()).abs().sum()) / max(1, int(plain.fired.sum()))
    errors["fired_consistent"] = float(not torch.equal(out.fired, (out.feats > 0).sum(0, dtype=torch.int32)))
    return errors


def section_kernels(rep: Report, device: torch.device, small: bool) -> None:
    from monofast.kernels import triton as triton_kernels

    if device.type == "cuda":
        chosen = backend.resolve(device).name
        rep.row("kernels", "backend chosen for cuda", chosen)
        if chosen != "triton":
            rep.failures.append("kernels: cuda did not choose the triton backend")
    worst: dict[str, float] = {}
    results = []
    cases = [(case, form) for case in kernel_cases(small) for form in ("dense", "sparse")]
    for i, ((shape, dtype, k, dec_norm), form) in enumerate(cases):
        if form == "sparse" and shape == PAPER_SHAPE:
            continue  # its dense check covers the tile sizes; the sparse kernels' cost is per entry
        step = triton_kernels.sae_step if form == "dense" else triton_kernels.sparse_step
        errors = check_step_case(step, shape, dtype, k, dec_norm, device, seed=100 + i // 2)
        name = f"B{shape[0]}-D{shape[1]}-F{shape[2]} {str(dtype)[6:]}" + (f" top{k}" if k else "") + \
            (" l1norm" if dec_norm else "") + (" sparse" if form == "sparse" else "")
        # TopK in low precision may swap near-tied features; fp32 must match.
        tol = REL_TOL[dtype]
        # Firing decisions within rounding of the threshold (or, for TopK, of the k-th value)
        # may differ from the exact oracle's: a few per thousand, more for TopK in 8 bits.
        fired_tol = 0.001 if dtype == torch.float32 else (0.05 if k else 0.01)
        values = [v for key, v in errors.items() if key not in ("fired", "fired_consistent", "plain_oracle_worst")]
        ok = max(values) <= tol and errors["fired"] <= fired_tol and not errors["fired_consistent"]
        results.append({"case": name, "ok": ok, "tol": tol, **errors})
        worst[str(dtype)] = max(worst.get(str(dtype), 0.0), max(values))
        flag = "ok" if ok else "FAIL"
        rep.row("kernels", name, f"{flag} worst rel err {max(values):.1e} (tol {tol:.0e}); firing differs "
                f"{errors['fired']:.1e}; unmasked {errors['plain_oracle_worst']:.0e}")
        if not ok:
            rep.failures.append(f"kernels {name}")
    rep.details["kernels"] = results


def build_store(folder: Path, rows: int, dim: int, dtype: str) -> np.ndarray:
    """A store of random rows; returns the float32 values it holds (bf16-rounded if so)."""
    gen = np.random.default_rng(0)
    values = gen.standard_normal((rows, dim), dtype=np.float32)
    with activations.ActivationWriter(folder, dim, dtype, shard_bytes=64 << 20) as writer:
        for begin in range(0, rows, 65536):
            n = min(65536, rows - begin)
            writer.append(values[begin:begin + n], np.zeros(n, np.int32), np.zeros(n, np.uint8),
                          np.zeros(n, np.int32), np.arange(n, dtype=np.int32))
        writer.finish()
    return values


def section_stream(rep: Report, device: torch.device, small: bool) -> None:
    rows, dim = (4096, 64) if small else (1 << 19, 512)
    batch_size = 256 if small else 4096
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("bf16", "fp32"):
            folder = Path(tmp) / dtype
            build_store(folder, rows, dim, dtype)
            store = activations.open_store(folder)
            # Correctness: every row of one shuffled epoch arrives on the device with the
            # value the store holds, read back through `take` on the host.
            seen = np.zeros(rows, dtype=bool)
            bad = 0
            feeder = activations.DeviceFeeder(device)
            kept = []  # device tensors held past later copies: the ring must not overwrite them
            for batch in store.stream(batch_size, seed=1):
                on_device = batch.tensor(device, non_blocking=True, pin_memory=device.type == "cuda")
                fed = feeder(batch.tensor())
                kept.append((fed, batch.row.copy()))
                expected = store.take(batch.row).tensor()
                bad += int(not torch.equal(on_device.cpu(), expected))
                seen[batch.row] = True
            for fed, row in kept:
                bad += int(not torch.equal(fed.cpu(), store.take(row).tensor()))
            del kept
            complete = bool(seen.all())
            ok = bad == 0 and complete
            if not ok:
                rep.failures.append(f"stream {dtype}")

            def epoch(how: str) -> int:
                moved = 0
                feed = activations.DeviceFeeder(device)
                for batch in store.stream(batch_size, seed=2):
                    if how == "host":
                        batch.tensor()
                    elif how == "ring":
                        feed(batch.tensor())
                    else:
                        batch.tensor(device, non_blocking=how == "pinned", pin_memory=how == "pinned")
                    moved += batch.activations.nbytes
                synchronize(device)
                return moved

            rates = {}
            for how in ("host", "ring", "pinned", "pageable"):
                epoch(how)
                t0 = time.perf_counter()
                moved = epoch(how)
                rates[how] = moved / (time.perf_counter() - t0) / 1e9
            ceiling = rep.details.get("h2d_pinned_gbps")
            ratio = f" ({rates['ring'] / ceiling:.0%} of a pinned copy)" if ceiling else ""
            rep.row("stream", f"{dtype} {rows:,} x {dim} shuffled -> {device.type}",
                    f"{'ok' if ok else 'FAIL'}; ring {rates['ring']:.1f} GB/s{ratio}, pin per batch "
                    f"{rates['pinned']:.1f}, pageable {rates['pageable']:.1f}, host only {rates['host']:.1f}")
            rep.details[f"stream_{dtype}"] = {"ok": ok, "mismatched_batches": bad, "complete": complete,
                                              "gbps": rates}


@contextlib.contextmanager
def backend_env(name: str | None) -> Iterator[None]:
    """MONOFAST_BACKEND=name inside the block (unchanged for None), restored after."""
    saved = os.environ.get(backend.ENV)
    if name:
        os.environ[backend.ENV] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(backend.ENV, None)
        else:
            os.environ[backend.ENV] = saved


def graphed_step(n_rows: int, d_in: int, d_sae: int, device: torch.device, force: str | None) -> Callable[[], None]:
    """monofast's full step (forward, backward, Adam, renormalisation) captured in one CUDA
    graph and replayed; `force` pins the backend (MONOFAST_BACKEND) while capturing."""
    with backend_env(force):
        sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, compute_dtype="bfloat16"), device=device,
                                generator=torch.Generator().manual_seed(0))
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True, capturable=True)
        x = bench_sae._batch(n_rows, d_in, device=str(device))

        def step() -> None:
            out = sae(x)
            (out.mse + bench_sae.L1_COEFF * out.l1).backward()
            sae.optimizer_step(opt)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # autotuning and lazy state happen here, outside the capture
                opt.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            step()
    return graph.replay


def forced(fn: Callable[[], None], name: str) -> Callable[[], None]:
    """`fn` run with MONOFAST_BACKEND=name."""
    def run() -> None:
        with backend_env(name):
            fn()
    return run


def compiled_step(n_rows: int, d_in: int, d_sae: int, device: torch.device) -> Callable[[], None]:
    """torch.compile of the obvious formula under bf16 autocast, same optimizer and constraint."""
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, compute_dtype="float32"), device=device,
                            generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x = bench_sae._batch(n_rows, d_in, device=str(device))

    @torch.compile
    def loss_fn(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor,
                b_dec: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, _, mse, l1 = reference.naive_loss_terms(x, w_enc, b_enc, w_dec, b_dec)
        return mse + bench_sae.L1_COEFF * l1

    def run() -> None:
        loss_fn(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec).backward()
        sae.optimizer_step(opt)
        opt.zero_grad(set_to_none=True)

    return run


def section_sae(rep: Report, device: torch.device, small: bool) -> None:
    shapes = dict(SMALL_SHAPES) if small else {"seed": SEED_SHAPE, "paper": PAPER_SHAPE}
    rate = rep.details.get("bf16_tflops")
    out: dict[str, Any] = {}
    for label, (n_rows, d_in, d_sae) in shapes.items():
        flops = 10 * n_rows * d_in * d_sae  # five products of 2 B D F each
        providers: dict[str, Callable[[], Callable[[], None]]] = {
            "floor (5 bf16 products)": lambda: bench_sae.make("matmul-bf16", n_rows, d_in, d_sae, str(device)),
            "eager oracle fp32": lambda: bench_sae.make("reference", n_rows, d_in, d_sae, str(device)),
            "autograd bf16 autocast": lambda: bench_sae.make("autograd-bf16", n_rows, d_in, d_sae, str(device)),
            "torch.compile bf16": lambda: compiled_step(n_rows, d_in, d_sae, device),
            "monofast torch backend bf16": lambda: forced(
                bench_sae.make("monofast-bf16", n_rows, d_in, d_sae, str(device)), "torch"),
            "monofast triton fp32": lambda: forced(
                bench_sae.make("monofast-fp32", n_rows, d_in, d_sae, str(device)), "triton"),
            "monofast triton bf16": lambda: forced(
                bench_sae.make("monofast-bf16", n_rows, d_in, d_sae, str(device)), "triton"),
            "monofast automatic bf16 (raced)": lambda: bench_sae.make("monofast-bf16", n_rows, d_in, d_sae,
                                                                      str(device)),
            "monofast triton sparse bf16": lambda: forced(
                bench_sae.make("sparse-bf16", n_rows, d_in, d_sae, str(device)), "triton"),
            "monofast torch sparse bf16": lambda: forced(
                bench_sae.make("sparse-bf16", n_rows, d_in, d_sae, str(device)), "torch"),
            "topk32 triton sparse bf16": lambda: forced(
                bench_sae.make("topk-bf16", n_rows, d_in, d_sae, str(device)), "triton"),
            "topk32 triton dense bf16": lambda: forced(
                bench_sae.make("topk-dense-bf16", n_rows, d_in, d_sae, str(device)), "triton"),
        }
        if device.type == "cuda":
            providers["monofast torch backend bf16 + graph"] = lambda: graphed_step(n_rows, d_in, d_sae, device,
                                                                                    "torch")
            providers["monofast triton bf16 + graph"] = lambda: graphed_step(n_rows, d_in, d_sae, device, "triton")
        times: dict[str, float] = {}
        for name, factory in providers.items():
            try:
                fn = factory()
                times[name] = median_ms(fn, device, warmup=3, reps=5 if small else 30)
            except Exception as err:  # one provider failing must not hide the others
                rep.failures.append(f"sae {label} {name}: {type(err).__name__}")
                rep.details.setdefault("errors", []).append(f"sae {label} {name}: {traceback.format_exc()}")
                rep.row("sae", f"{label} {name}", f"FAILED {type(err).__name__}: {str(err)[:80]}")
                continue
        floor = times.get("floor (5 bf16 products)")
        oracle = times.get("eager oracle fp32")
        for name, ms in times.items():
            parts = [f"{ms:8.3f} ms"]
            if rate:
                parts.append(f"{flops / ms / 1e9 / rate:4.0%} of card bf16")
            if floor and not name.startswith("floor"):
                parts.append(f"{floor / ms:4.0%} of floor")
            if oracle and not name.startswith("floor"):
                parts.append(f"{oracle / ms:5.2f}x oracle")
            rep.row("sae", f"{label} B{n_rows} D{d_in} F{d_sae} {name}"[:44] if small else f"{label} {name}",
                    ", ".join(parts))
        out[label] = {"shape": [n_rows, d_in, d_sae], "ms": times, "flops_per_step": flops}
    rep.details["sae"] = out


def section_breakdown(rep: Report, device: torch.device, small: bool) -> None:
    """Each piece of the Triton step at the paper shape in bf16, beside the cuBLAS product of
    the same shape: where the step's time goes."""
    from monofast.kernels.triton import decode, encode

    n_rows, d_in, d_sae = SMALL_SHAPES["paper"] if small else PAPER_SHAPE
    gen = torch.Generator().manual_seed(5)
    bf16 = torch.bfloat16

    def rand(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device, bf16)

    x, g = rand(n_rows, d_in), rand(n_rows, d_in)
    w_enc, b_enc = rand(d_in, d_sae, scale=d_in ** -0.5), rand(d_sae, scale=0.1)
    w_dec, b_dec = rand(d_sae, d_in, scale=d_sae ** -0.5), rand(d_in, scale=0.1)
    enc = encode.encode_forward(x, w_enc, b_enc, b_dec)
    feats = enc.feats
    l1_w = torch.full((d_sae,), 1e-4, device=device)
    d_pre = torch.randn(n_rows, d_sae, device=device).to(bf16)
    pieces = {
        "encode (x W_enc, ReLU, stats)": (lambda: encode.encode_forward(x, w_enc, b_enc, b_dec),
                                          lambda: x @ w_enc),
        "decode (f W_dec, sq err)": (lambda: decode.decode_forward(feats, w_dec, b_dec, x), lambda: feats @ w_dec),
        "encode grad (g W_dec^T, mask)": (lambda: encode.encode_backward(x, w_enc, w_dec, b_dec, feats, g, l1_w),
                                          lambda: (g @ w_dec.T, x.T @ d_pre)),
        "decode grad (f^T g)": (lambda: decode.decode_backward(feats, w_dec, g, None), lambda: feats.T @ g),
    }
    flops = {"encode (x W_enc, ReLU, stats)": 2, "decode (f W_dec, sq err)": 2, "encode grad (g W_dec^T, mask)": 4,
             "decode grad (f^T g)": 2}
    rate = rep.details.get("bf16_tflops")
    out = {}
    for name, (ours, cublas) in pieces.items():
        ms_ours, ms_ref = median_ms(ours, device, reps=20), median_ms(cublas, device, reps=20)
        tflops = flops[name] * n_rows * d_in * d_sae / ms_ours / 1e9
        share = f", {tflops / rate:.0%} of card" if rate else ""
        out[name] = {"ms": ms_ours, "cublas_ms": ms_ref}
        rep.row("breakdown", name, f"{ms_ours:.3f} ms vs cuBLAS products {ms_ref:.3f} ms{share}")
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    for p in sae.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    ms = median_ms(lambda: sae.optimizer_step(opt), device, reps=20)
    out["optimizer + decoder constraint"] = {"ms": ms}
    rep.row("breakdown", "optimizer + decoder constraint", f"{ms:.3f} ms")
    rep.details["breakdown"] = out


def section_sae_train(rep: Report, device: torch.device, small: bool) -> None:
    """`monofast sae train` on a random store, with the step as a CUDA graph and without:
    the same weights at the end (the same arithmetic), and the time of each."""
    from monofast.sae import train as sae_train
    from safetensors.torch import load_file

    rows, dim = (3000, 48) if small else (400_000, 768)
    batch = 128 if small else 2048
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "acts"
        build_store(store, rows, dim, "fp32")
        weights, seconds, replayed = {}, {}, {}
        for graphs in (True, False):
            cfg = sae_train.SAETrainConfig(expansion=2, batch_size=batch, device=str(device), cuda_graphs=graphs,
                                           held_out=batch, log_every=50)
            out = Path(tmp) / f"sae_{graphs}"
            t0 = time.perf_counter()
            replayed[graphs] = sae_train.train(cfg, store, out)["training"]["cuda_graph"]
            seconds[graphs] = time.perf_counter() - t0
            weights[graphs] = load_file(str(out / WEIGHTS_FILE))
    worst = max(rel_err(weights[True][k], weights[False][k]) for k in weights[False])
    # On CUDA the first run must really have replayed graphs, or the check compares eager with eager.
    ok = worst < 1e-4 and replayed[True] == (device.type == "cuda") and not replayed[False]
    if not ok:
        rep.failures.append(f"sae_train: graph replay and eager steps disagree (graphs ran: {replayed})")
    steps = (rows - batch) // batch
    rep.details["sae_train"] = {"seconds": seconds, "steps": steps, "worst_rel_diff": worst}
    rep.row("sae_train", f"{steps} steps D{dim} F{2 * dim} B{batch}: graph vs eager",
            f"{'ok' if ok else 'FAIL'} weights differ {worst:.1e}; {seconds[True]:.1f} s vs {seconds[False]:.1f} s")


def section_pytest(rep: Report, device: torch.device, small: bool) -> None:
    """The test files whose cases need a GPU (skipped on CPU-only machines), run here."""
    tests = ["tests/sae/test_graph.py"]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                          capture_output=True, text=True, timeout=240)
    (rep.out / "pytest.log").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    if proc.returncode != 0:
        rep.failures.append(f"pytest: {summary}")
    rep.row("pytest", " ".join(tests), summary)


def section_laptop(rep: Report, device: torch.device, small: bool) -> None:
    preset = "smoke" if small else "laptop"
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / preset
        cmd = [sys.executable, "-m", "monofast", "run", "--preset", preset, "--run", str(run_dir)]
        limit = max(60.0, min(300.0, rep.deadline - time.perf_counter()))
        t0 = time.perf_counter()
        log = rep.out / f"{preset}_run.log"
        rep.out.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            try:
                code: Any = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                code = f"stopped at {limit:.0f} s"
        wall = time.perf_counter() - t0
        stages = {}
        for name in ("data", "gpt", "activations", "sae", "analysis", "site"):
            manifest = run_dir / name / "manifest.json"
            if manifest.exists():
                stages[name] = float(json.loads(manifest.read_text()).get("seconds", math.nan))
        per_stage = ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
        rep.details["laptop"] = {"wall_s": wall, "stages": stages, "exit": code}
        if code != 0:
            rep.failures.append(f"laptop run: {code}")
            rep.row("laptop", f"monofast run --preset {preset}", f"FAILED ({code}) after {wall:.0f} s; "
                    f"finished stages: {per_stage or 'none'}")
            return
        rep.row("laptop", f"monofast run --preset {preset} (wall)", f"{wall:.1f} s" + (f" ({per_stage})"
                                                                                      if per_stage else ""))
        for name in ("gpt/metrics.jsonl", "sae/eval.json"):
            path = run_dir / name
            if path.exists():
                text = path.read_text()
                rep.details["laptop"][name] = text[-2000:]
        if rep.deadline - time.perf_counter() > 90:
            profile_stage(rep, run_dir, preset, "sae")


def profile_stage(rep: Report, run_dir: Path, preset: str, stage: str) -> None:
    """Re-run one finished stage under cProfile; the 40 costliest calls go to a text file."""
    import io
    import pstats

    prof = rep.out / f"{stage}.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "monofast", "run", "--preset", preset,
           "--run", str(run_dir), "--from", stage, "--to", stage]
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=True)
    text = io.StringIO()
    pstats.Stats(str(prof), stream=text).sort_stats("cumulative").print_stats(40)
    (rep.out / f"{preset}_{stage}_profile.txt").write_text(text.getvalue())
    prof.unlink()
    rep.row("laptop", f"{stage} stage again under cProfile", f"{time.perf_counter() - t0:.1f} s (profile saved)")


def section_harvest(rep: Report, device: torch.device, small: bool) -> None:
    model = bench_harvest.make_model().to(device)
    contexts = 64 if small else 2048
    cfg, split, plan = bench_harvest.setup(model, contexts, device=str(device))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "acts"
        bench_harvest.check(model, split, cfg, plan, out)
        rep.row("harvest", "stored rows equal the forward pass", "ok")
        times: dict[str, list[float]] = {"forward": [], "harvest": []}
        for _ in range(3):
            for name in times:
                t0 = time.perf_counter()
                if name == "forward":
                    bench_harvest.run_forward(model, split, cfg, plan)
                else:
                    bench_harvest.run_harvest(model, split, cfg, plan, out)
                times[name].append(time.perf_counter() - t0)
        # The other floor: writing the same bytes to the same disk, nothing else.
        block = np.random.default_rng(0).standard_normal((plan.rows, plan.dim), dtype=np.float32)
        writes = []
        for i in range(2):
            t0 = time.perf_counter()
            with open(Path(tmp) / f"floor{i}.bin", "wb") as fh:
                block.tofile(fh)
                fh.flush()
                os.fsync(fh.fileno())
            writes.append(time.perf_counter() - t0)
        times["disk write"] = writes
    best = {name: plan.rows / min(values) for name, values in times.items()}
    rep.details["harvest"] = {"rows": plan.rows, "rows_per_s": best}
    rep.row("harvest", f"{plan.rows:,} rows of {plan.dim} fp32 (laptop GPT)",
            f"{best['harvest']:,.0f} rows/s = {best['harvest'] / best['forward']:.0%} of bare forward "
            f"({best['forward']:,.0f}), {best['harvest'] / best['disk write']:.0%} of writing the bytes "
            f"({best['disk write']:,.0f})")


def section_gpt(rep: Report, device: torch.device, small: bool) -> None:
    values = presets.stage_values("smoke" if small else "laptop", "gpt")
    vocab = 1024
    rate = rep.details.get("bf16_tflops")
    out = {}
    modes = {"eager": "false", "compiled": "true", "compiled + CUDA graphs (auto)": "auto"}
    for mode, choice in modes.items():
        cfg = GPTTrainConfig(**values, device=str(device), dtype="bfloat16", compile=choice)
        trainer = Trainer(cfg, vocab, device, torch.bfloat16)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, vocab, (cfg.batch_size, cfg.block_size), generator=gen).to(device)
        y = torch.randint(0, vocab, (cfg.batch_size, cfg.block_size), generator=gen).to(device)
        counter = iter(range(10**9))
        first = float(trainer.step(next(counter), x, y))
        if not abs(first - math.log(vocab)) < 0.5:
            rep.failures.append(f"gpt {mode}: first loss {first:.3f}, expected about ln {vocab}")

        def step() -> None:
            with matmul_precision(device):
                trainer.step(next(counter), x, y)

        ms = median_ms(step, device, warmup=5, reps=10 if small else 50)
        flops = trainer.model.flops_per_token(cfg.block_size) * x.numel()
        share = f", {flops / ms / 1e9 / rate:.1%} of card bf16" if rate else ""
        out[mode] = {"ms": ms, "steps_per_s": 1e3 / ms, "tokens_per_s": x.numel() / ms * 1e3}
        rep.row("gpt", f"laptop shape bf16 {mode}", f"{1e3 / ms:,.0f} it/s, {x.numel() / ms * 1e3:,.0f} tok/s{share}")
    rep.details["gpt"] = out


SECTIONS: dict[str, Callable[[Report, torch.device, bool], None]] = {
    "env": section_env, "ceilings": section_ceilings, "kernels": section_kernels, "sae": section_sae,
    "sae_train": section_sae_train, "pytest": section_pytest, "laptop": section_laptop, "gpt": section_gpt,
    "stream": section_stream, "breakdown": section_breakdown, "harvest": section_harvest,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for gpu_check.json and logs")
    parser.add_argument("--small", action="store_true", help="toy sizes (a CPU run of the same code)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in order")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds; sections not started by then are skipped (default 450)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    if not args.small and device.type != "cuda":
        print("no CUDA device: run with --small for the CPU version of these checks", file=sys.stderr)
        return 2
    rep = Report(args.out)
    started = time.perf_counter()
    rep.deadline = started + args.budget + 60
    for name in [s for s in args.sections.split(",") if s]:
        if name not in SECTIONS:
            print(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
            return 2
        elapsed = time.perf_counter() - started
        if elapsed > args.budget:
            rep.row(name, "skipped", f"budget of {args.budget:.0f} s spent")
            continue
        print(f"[{elapsed:6.1f} s] {name}", flush=True)
        t0 = time.perf_counter()
        try:
            SECTIONS[name](rep, device, args.small)
        except Exception as err:
            rep.failures.append(f"{name}: {type(err).__name__}: {err}")
            rep.details.setdefault("errors", []).append(f"{name}: {traceback.format_exc()}")
            traceback.print_exc()
        rep.details.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        rep.save()
    print(f"\n== gpu_check, {time.perf_counter() - started:.0f} s ==")
    print(rep.table())
    rep.save()
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
