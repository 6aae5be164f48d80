"""One full SAE training step (forward, backward, Adam, decoder renormalisation) per provider,
against the bare matrix products of the same shapes and precision, timed in the same run.

    pytest benches/bench_sae.py                      each case once at a small shape (checks)
    pytest benches/bench_sae.py --benchmark-enable   timed, still the small shape
    python benches/bench_sae.py                      the real shapes, interleaved, as a table

Providers:
    matmul-bf16 / matmul-fp32   the step's five products alone (the floor)
    monofast-bf16 / -fp32       SparseAutoencoder on the device's backend (torch on CPUs), dense step
    sparse-bf16 / -fp32         the same SAE taking the sparse step (`monofast.kernels.sparse`)
    topk-bf16                   monofast's TopK SAE (k=32), sparse step; topk-dense-bf16: dense step
    reference                   the eager oracle (kernels/reference.py) with the same optimizer
    autograd-fp32 / -bf16       plain PyTorch autograd of the obvious formula (bf16: autocast);
                                the baseline of every row of its precision
    saelens-fp32 / -bf16        SAELens' standard (ReLU + L1) SAE, its trainer's step
    sparsify-fp32 / -bf16       sparsify's TopK SAE (k=32), its trainer's step
                                (peers: bf16 is autocast over fp32 weights, as their trainers
                                run it; installed with `pip install -e '.[peers]'`)

monofast's SAEs fire like trained ones: each encoder bias is set so that its feature fires
on L0 / F of the rows (L0 = 32), the density of the presets' trained SAEs; the peers' and the
floor's costs do not depend on it.

Ratios come from one process with the providers interleaved round by round: each ratio is
the median over rounds of the two providers' timings in the same round, so load from other
processes on a shared machine hits both sides of every ratio alike.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
import torch
from monofast.kernels import reference
from monofast.sae.model import SAEConfig, SparseAutoencoder

SMALL = (256, 64, 128)
"""(B, D, F) of the pytest cases: big enough to be real code paths, quick to run once."""
REAL = ((2048, 768, 1536), (2048, 512, 4096))
"""(B, D, F) of the table: the seed laptop SAE, and the paper's 512 neurons x 4,096 features."""
L1_COEFF = 1e-3

FLOORS = ("matmul-bf16", "matmul-fp32")
OURS = ("monofast-bf16", "monofast-fp32", "sparse-bf16", "sparse-fp32", "onednn-fp32", "sparse-onednn-fp32",
        "topk-bf16", "topk-dense-bf16",
        "reference", "autograd-fp32", "autograd-bf16")
PEERS = ("saelens-fp32", "saelens-bf16", "sparsify-fp32", "sparsify-bf16")
PEERS_INSTALL = "pip install -e '.[peers]'  (sae-lens==6.54.0 eai-sparsify==1.3.3)"
"""How to install the peers; a peer's skip reason names it."""
SPARSIFY_K = 32
TRAINED_L0 = 32
"""Features a row fires in monofast's SAEs here (a trained SAE's L0)."""
PEER_IMPORT_WARNINGS = {
    # sae-lens 6.54 imports transformer_lens.utils, which TransformerLens 3.x deprecates on
    # import: the peer's own import, not our code, so it is ignored while the peer imports
    # and nowhere else.
    "sae_lens": [(DeprecationWarning, r"The 'utils' module has been deprecated")],
}
"""Warnings a peer raises while it is imported: (category, message regex) per module."""


def _batch(n_rows: int, d_in: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, d_in, generator=gen).to(device)


def matmul_floor(n_rows: int, d_in: int, d_sae: int, dtype: torch.dtype,
                 device: str = "cpu") -> Callable[[], None]:
    """The five products of one step, same shapes and layouts as the step's, nothing else."""
    gen = torch.Generator().manual_seed(1)
    x_c = torch.randn(n_rows, d_in, generator=gen).to(device, dtype)  # [B, D]
    w_enc = torch.randn(d_in, d_sae, generator=gen).to(device, dtype)  # [D, F]
    w_dec = torch.randn(d_sae, d_in, generator=gen).to(device, dtype)  # [F, D]
    feats = torch.relu(torch.randn(n_rows, d_sae, generator=gen)).to(device, dtype)  # [B, F]
    g = torch.randn(n_rows, d_in, generator=gen).to(device, dtype)  # [B, D]

    def run() -> None:
        torch.mm(x_c, w_enc)  # encoder
        torch.mm(feats, w_dec)  # decoder
        torch.mm(feats.T, g)  # d_w_dec
        d_pre = torch.mm(g, w_dec.T)  # d_feats
        torch.mm(x_c.T, d_pre)  # d_w_enc

    return run


def sae_training_step(n_rows: int, d_in: int, d_sae: int, compute_dtype: str, device: str = "cpu",
                      sparse: bool = False, k: int | None = None) -> Callable[[], None]:
    """monofast's own step: SparseAutoencoder.forward, backward, fused Adam, renormalisation;
    ReLU firing like a trained SAE (`TRAINED_L0`), or TopK with `k`; dense or sparse."""
    from monofast.sae.crossover import _fire_at

    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, compute_dtype=compute_dtype, variant="topk" if k else "anthropic2023",
                    k=k or SPARSIFY_K)
    sae = SparseAutoencoder(cfg, device=device, generator=torch.Generator().manual_seed(0))
    sae.sparse_step = sparse
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x = _batch(n_rows, d_in, device=device)
    if not k:
        _fire_at(sae, x, min(1.0, TRAINED_L0 / d_sae))

    def run() -> None:
        out = sae(x)
        (out.mse + L1_COEFF * out.l1).backward()
        sae.optimizer_step(opt)
        opt.zero_grad(set_to_none=True)

    return run


@contextlib.contextmanager
def onednn_float32() -> Iterator[None]:
    """float32 products through oneDNN's fused linear, as they ran before float32 moved to
    MKL's `addmm` (`monofast.kernels.eager.FUSED_LINEAR_DTYPES`). Raises if oneDNN refused
    float32, since the step would have timed `addmm` under the oneDNN name."""
    from monofast.kernels import eager

    kept = eager.FUSED_LINEAR_DTYPES
    eager.FUSED_LINEAR_DTYPES = (torch.float32, torch.bfloat16)
    try:
        yield
    finally:
        eager.FUSED_LINEAR_DTYPES = kept
    if torch.float32 in eager._fused_linear_refused:
        raise RuntimeError("oneDNN's fused linear refused a float32 product here; the onednn providers cannot run")


def onednn_products(step: Callable[[], None]) -> Callable[[], None]:
    """The step under `onednn_float32`: that choice, timed side by side (`onednn-fp32`,
    `sparse-onednn-fp32`)."""

    def run() -> None:
        with onednn_float32():
            step()

    return run


def eager_step(n_rows: int, d_in: int, d_sae: int, how: str, device: str = "cpu") -> Callable[[], None]:
    """The oracle, or plain autograd of the obvious formula, with the same optimizer and
    decoder constraint as monofast's step."""
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, compute_dtype="float32"), device=device,
                            generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x = _batch(n_rows, d_in, device=device)
    device_type = torch.device(device).type
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)

    def run() -> None:
        if how == "reference":
            out = reference.sae_step(x, *params)
            mse, l1 = out.mse, out.l1
        else:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=how == "autograd-bf16"):
                _, _, mse, l1 = reference.naive_loss_terms(x, *params)
        (mse + L1_COEFF * l1).backward()
        sae.optimizer_step(opt)
        opt.zero_grad(set_to_none=True)

    return run


def import_peer(module: str) -> ModuleType:
    """Import an optional peer library: skip when it is not installed, raise when it is
    installed but does not import (a broken peer is an error, never a silent skip)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: {PEERS_INSTALL}")
    with warnings.catch_warnings():
        for category, message in PEER_IMPORT_WARNINGS.get(module, []):
            warnings.filterwarnings("ignore", message=message, category=category)
        return importlib.import_module(module)


def _peer_autocast(bf16: bool, device: str) -> contextlib.AbstractContextManager:
    """bf16 the way both peers' trainers run it: fp32 weights and Adam, the forward under
    bf16 autocast (SAELens: `autocast=True`; sparsify: its forward's own autocast, which
    only names CUDA, so on a CPU it is applied here)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def saelens_step(n_rows: int, d_in: int, d_sae: int, bf16: bool = False, device: str = "cpu",
                 lr: float = 1e-4) -> Callable[[], torch.Tensor]:
    """SAELens' standard (ReLU + L1) SAE, one step as SAETrainer._train_step takes it: forward
    under its autocast, firing statistics, backward, gradient clipping at 1, Adam.
    Returns the step, which returns the step's loss (detached)."""
    sae_lens = import_peer("sae_lens")
    from sae_lens.saes.sae import TrainStepInput

    cfg = sae_lens.StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=L1_COEFF, device=device)
    with torch.random.fork_rng(devices=[]):  # its initialisation draws from the global generator
        torch.manual_seed(0)
        sae = sae_lens.StandardTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))  # SAETrainer's optimizer
    x = _batch(n_rows, d_in, device=device)  # [B, D]
    act_freq = torch.zeros(d_sae, device=device)  # [F], the trainer's firing counts
    step_input = TrainStepInput(sae_in=x, coefficients={"l1": L1_COEFF}, dead_neuron_mask=None,
                                n_training_steps=0, is_logging_step=False)

    def run() -> torch.Tensor:
        sae.train()
        with _peer_autocast(bf16, device):
            out = sae.training_forward_pass(step_input)
            with torch.no_grad():
                act_freq.add_(out.feature_acts.bool().float().sum(-2))  # [B, F] -> [F]
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return out.loss.detach()

    return run


def _import_sparsify(device: str) -> ModuleType:
    """sparsify decodes with a Triton kernel whenever Triton imports, and that kernel
    crashes on a CPU; its switch is read once, when it is first imported."""
    if torch.device(device).type == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    sparsify = import_peer("sparsify")
    from sparsify import sparse_coder, utils

    if torch.device(device).type == "cpu" and sparse_coder.decoder_impl is not utils.eager_decode:
        raise RuntimeError("sparsify was imported with its Triton decoder, which cannot run on a CPU: "
                           "set SPARSIFY_DISABLE_TRITON=1 before it is first imported")
    return sparsify


def sparsify_step(n_rows: int, d_in: int, d_sae: int, bf16: bool = False, device: str = "cpu",
                  lr: float = 1e-4) -> Callable[[], torch.Tensor]:
    """sparsify's TopK SAE (k=32), one step as its Trainer.fit takes it: decoder rows to unit
    norm, forward (under autocast for bf16), FVU backward, the gradient parallel to the
    decoder rows removed, Adam. Returns the step, which returns the FVU (detached)."""
    sparsify = _import_sparsify(device)
    with torch.random.fork_rng(devices=[]):  # its initialisation draws from the global generator
        torch.manual_seed(0)
        sae = sparsify.SparseCoder(d_in, sparsify.SparseCoderConfig(num_latents=d_sae, k=SPARSIFY_K),
                                   device=device, dtype=torch.float32)  # its trainer keeps fp32 weights
    opt = torch.optim.Adam(sae.parameters(), lr=lr)  # its Trainer's without bitsandbytes
    x = _batch(n_rows, d_in, device=device)  # [B, D]

    def run() -> torch.Tensor:
        sae.set_decoder_norm_to_unit_norm()
        with _peer_autocast(bf16, device):
            fvu = sae(x).fvu
        fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        return fvu.detach()

    return run


def make(provider: str, n_rows: int, d_in: int, d_sae: int, device: str = "cpu") -> Callable[[], object]:
    if provider.startswith("matmul-"):
        return matmul_floor(n_rows, d_in, d_sae, torch.bfloat16 if provider.endswith("bf16") else torch.float32,
                            device)
    precision = "bfloat16" if provider.endswith("bf16") else "float32"
    if provider in ("onednn-fp32", "sparse-onednn-fp32"):
        return onednn_products(sae_training_step(n_rows, d_in, d_sae, precision, device,
                                                 sparse=provider.startswith("sparse-")))
    if provider.startswith(("monofast-", "sparse-")):
        return sae_training_step(n_rows, d_in, d_sae, precision, device, sparse=provider.startswith("sparse-"))
    if provider.startswith("topk-"):
        return sae_training_step(n_rows, d_in, d_sae, precision, device, sparse="dense" not in provider,
                                 k=min(SPARSIFY_K, d_sae))
    if provider in ("reference", "autograd-fp32", "autograd-bf16"):
        return eager_step(n_rows, d_in, d_sae, provider, device)
    if provider.startswith("saelens-"):
        return saelens_step(n_rows, d_in, d_sae, bf16=provider.endswith("bf16"), device=device)
    if provider.startswith("sparsify-"):
        return sparsify_step(n_rows, d_in, d_sae, bf16=provider.endswith("bf16"), device=device)
    raise ValueError(f"unknown provider {provider!r}")


# ------------------------------------------------------------------------- pytest cases

def _assert_matches_reference() -> None:
    """monofast's float32 step computes what the oracle computes (checked before timing)."""
    n_rows, d_in, d_sae = SMALL
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, compute_dtype="float32"),
                            generator=torch.Generator().manual_seed(0))
    x = _batch(n_rows, d_in)
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    out = sae(x)
    ours = torch.autograd.grad(out.mse + L1_COEFF * out.l1, params)
    ref = reference.sae_step(x, *params)
    expected = torch.autograd.grad(ref.mse + L1_COEFF * ref.l1, params)
    torch.testing.assert_close(out.mse, ref.mse)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("provider", FLOORS + OURS + PEERS)
def test_sae_step(benchmark, provider):
    benchmark.group = f"sae_step B{SMALL[0]}-D{SMALL[1]}-F{SMALL[2]}"
    if provider.startswith(("monofast", "sparse")):
        _assert_matches_reference()
    if provider.startswith(("onednn", "sparse-onednn")):
        with onednn_float32():
            _assert_matches_reference()
    step = make(provider, *SMALL)
    step()  # warm-up: first-call allocations and lazy initialisation
    benchmark(step)


# ------------------------------------------------------------------------- the table

def time_interleaved(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Milliseconds per call of each provider, one call of each per round (the order
    reversed every other round, so no provider always follows the same one)."""
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator / denominator measured in the same round: on a shared
    machine the load changes from second to second, and a round's two timings share it."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def _peer_versions() -> str:
    """", sae-lens 6.54.0, eai-sparsify 1.3.3" for the peers installed, for the table's header."""
    from importlib import metadata

    found = []
    for dist in ("sae-lens", "eai-sparsify"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f", {dist} {metadata.version(dist)}")
    return "".join(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per provider (default 15)")
    parser.add_argument("--shape", action="append", default=None, metavar="B,D,F",
                        help="batch, d_in, d_sae (repeatable; default: the two real shapes)")
    parser.add_argument("--providers", default=",".join(FLOORS + OURS + PEERS),
                        help="comma-separated providers (the peers are skipped where not installed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else list(REAL)
    providers = [p for p in args.providers.split(",") if p]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds{_peer_versions()}. "
          f"ms per step: median and best round; ratios: median over rounds of the two timings of one round; "
          f"floor: the five products of the step in its precision; vs autograd: autograd of the same precision "
          f"over the step (above 1: faster than autograd); vs SAELens / sparsify: the peer's step over ours, same "
          f"precision (SAELens: ReLU + L1; sparsify: TopK k={SPARSIFY_K})")
    print(f"{'shape':<18} {'provider':<18} {'median':>8} {'best':>8} {'floor/step':>11} {'vs autograd':>12} "
          f"{'vs SAELens':>11} {'vs sparsify':>12}")
    for n_rows, d_in, d_sae in shapes:
        steps = {}
        for provider in providers:
            try:
                steps[provider] = make(provider, n_rows, d_in, d_sae)
            except pytest.skip.Exception as skip:
                print(f"  ({provider} skipped: {skip.msg})")
        times = time_interleaved(steps, args.rounds)
        shape = f"B{n_rows}-D{d_in}-F{d_sae}"
        for name, values in times.items():
            precision = "bf16" if name.endswith("bf16") else "fp32"
            floor = times.get(f"matmul-{precision}")
            ratio = f"{paired_ratio(floor, values):.0%}" if floor and not name.startswith("matmul") else ""
            baseline = times.get(f"autograd-{precision}")
            speedup = (f"{paired_ratio(baseline, values):.2f}x"
                       if baseline and not name.startswith(("matmul", "autograd")) else "")
            peers = []
            for peer in ("saelens", "sparsify"):
                theirs = times.get(f"{peer}-{precision}")
                ours = name.startswith(("monofast", "sparse", "topk", "onednn"))
                peers.append(f"{paired_ratio(theirs, values):.2f}x" if theirs and ours else "")
            print(f"{shape:<18} {name:<18} {statistics.median(values):>8.1f} {min(values):>8.1f} "
                  f"{ratio:>11} {speedup:>12} {peers[0]:>11} {peers[1]:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
