"""Test-wide isolation: no network, and a private download cache per test."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

SHARED_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path_factory):
    """Every test gets an empty cache, a network that refuses and a pip with no settings;
    tests that exercise downloads replace `http_get` / `pip_config` themselves."""
    from monofast.data import corpus

    monkeypatch.setenv("MONOFAST_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("MONOFAST_PROGRESS", "0")

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(corpus, "http_get", refuse)
    monkeypatch.setattr(corpus, "pip_config", dict)  # no settings


def write_text_source(folder: Path, name: str, chars: int, seed: int = 0) -> Path:
    """A small deterministic English-like text file of about `chars` characters."""
    import random

    rng = random.Random(seed)
    words = ["thou", "art", "the", "king", "of", "my", "heart", "and", "love", "sweet",
             "night", "death", "crown", "lord", "ñame", "café", "—", "honour", "fair"]
    lines = []
    total = 0
    while total < chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))).capitalize() + "."
        lines.append(line)
        total += len(line) + 1
    path = folder / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_code_source(folder: Path, files: int = 6, lines: int = 60) -> Path:
    """A folder of small Python files."""
    code = folder / "code"
    code.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        body = [f"def function_{i}_{j}(x, y={j}):\n    return x * y + {i} < {j} and 'ok'\n"
                for j in range(lines // 2)]
        (code / f"mod{i}.py").write_text("".join(body), encoding="utf-8")
    return code


@pytest.fixture
def two_sources(tmp_path) -> tuple[str, ...]:
    """Source specs of a small text and a small code corpus, both local."""
    text = write_text_source(tmp_path, "verse", 30_000)
    code = write_code_source(tmp_path)
    return (f"verse={text}", f"code={code}")


def build_small_data(root: Path, chars_per_source: int = 12_000, vocab_size: int = 300) -> Path:
    """`root/data/` built from a small verse file and a few code files, both local."""
    from monofast.data.prepare import DataConfig, build

    text = write_text_source(root, "verse", 16_000)
    code = write_code_source(root, files=4, lines=40)
    cfg = DataConfig(sources=(f"verse={text}", f"code={code}"), chars_per_source=chars_per_source,
                          vocab_size=vocab_size)
    build(cfg, root / "data")
    return root / "data"


def monofast_env(root: Path) -> dict[str, str]:
    """The environment of a `monofast` subprocess: no progress bars, a private cache."""
    import os

    return dict(os.environ, MONOFAST_PROGRESS="0", MONOFAST_CACHE=str(root / "cache"))


class SmokeRun(NamedTuple):
    run: Path
    """The finished run directory (treat it as read-only: copy it to change it)."""
    args: list[str]
    """The `monofast run` arguments that made it, without --run."""
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """`monofast run --preset smoke` on small local sources, on the CPU, in a subprocess (~6 s)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("smoke")
    text = write_text_source(root, "verse", 40_000)
    code = write_code_source(root, files=10, lines=100)
    cfg = root / "sources.toml"
    cfg.write_text(f'[data]\nsources = ["verse={text}", "code={code}"]\n')
    args = ["run", "--preset", "smoke", "--config", str(cfg), "--set", "activations.shard_mb=0.125"]
    args += [a for stage in ("gpt", "activations", "sae", "analysis") for a in ("--set", f"{stage}.device=cpu")]
    run = root / "reference"
    proc = subprocess.run([sys.executable, "-m", "monofast", *args, "--run", str(run)],
                          capture_output=True, text=True, timeout=600, env=monofast_env(root))
    assert proc.returncode == 0, proc.stderr
    return SmokeRun(run, args, proc.stdout, proc.stderr)


KILLER = r"""
import os, signal, sys
import tqdm.auto

stage_bar, after = sys.argv[1], int(sys.argv[2])


class Killer(tqdm.auto.tqdm):
    '''A progress bar that SIGKILLs its own process at the `after`-th tick of one stage's bar.'''

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mine, self.ticks = kwargs.get("desc") == stage_bar, 0

    def tick(self):
        self.ticks += 1
        if self.mine and self.ticks >= after:
            os.kill(os.getpid(), signal.SIGKILL)

    def update(self, n=1):
        shown = super().update(n)
        self.tick()
        return shown

    def __iter__(self):
        for item in super().__iter__():
            yield item
            self.tick()


tqdm.auto.tqdm = Killer
from monofast.cli import main

sys.exit(main(sys.argv[3:]))
"""
"""`python -c KILLER BAR N ARGS...`: `monofast ARGS` that SIGKILLs itself at the N-th tick of
the progress bar named BAR."""


@pytest.fixture(scope="session")
def smoke_findings(smoke_run, tmp_path_factory) -> SmokeRun:
    """The smoke run again with `--with findings`: its stages up to date, then the second
    model (twin/), the family of SAEs, the findings and the site again (~6 s)."""
    import shutil
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("findings")
    run = root / "reference"
    shutil.copytree(smoke_run.run, run)
    args = smoke_run.args + ["--with", "findings"]
    args += [a for stage in ("family", "findings") for a in ("--set", f"{stage}.device=cpu")]
    proc = subprocess.run([sys.executable, "-m", "monofast", *args, "--run", str(run)],
                          capture_output=True, text=True, timeout=600, env=monofast_env(root))
    assert proc.returncode == 0, proc.stderr
    return SmokeRun(run, args, proc.stdout, proc.stderr)


def make_run(root: Path, layer: int = 1, variant: str = "anthropic2023") -> dict[str, Path]:
    """data/ from two local sources, a random 2-layer GPT and a random sparse-ish SAE: the
    inputs of the analysis and site stages."""
    import torch
    from monofast.data.splits import load_meta
    from monofast.gpt.model import GPT, GPTConfig
    from monofast.gpt.weights import save_model
    from monofast.sae.model import SAEConfig, SparseAutoencoder

    if not (root / "data" / "meta.json").is_file():
        build_small_data(root)
    meta = load_meta(root / "data")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=32, n_layer=2, n_head=2, n_embd=32))
    (root / "gpt").mkdir(exist_ok=True)
    save_model(root / "gpt", model)
    sae = SparseAutoencoder(SAEConfig(d_in=128, d_sae=48, variant=variant, k=6),
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a spread of densities, from dead to dense
        sae.b_enc.copy_(torch.linspace(-0.3, 0.02, 48))
        sae.b_enc[0] = -10.0
    sae_dir = root / "sae"
    sae_dir.mkdir(exist_ok=True)
    sae.save(sae_dir, hook_layer=layer)
    return {"data": root / "data", "gpt": root / "gpt", "sae": sae_dir, "analysis": root / "analysis"}


@dataclass
class Toy:
    """A config dataclass with a field of every kind the flags and files handle."""

    n_embd: int = 64
    """Width of the model."""
    lr: float = 1e-3
    """Learning rate, peak."""
    compile: bool = False
    """Use torch.compile."""
    name: str = "toy"
    """A name with 100% coverage."""
    widths: tuple[int, ...] = (1, 2)
    """Several widths."""
    limit: int | None = None
    """Optional limit."""
    tags: tuple[str, ...] = field(default=("a",), metadata={"flag": "--tag", "repeat": True})
    """Repeatable tag."""

    def __post_init__(self):
        if self.n_embd <= 0:
            raise ValueError("n_embd must be positive; use e.g. --n-embd 64")


# ---------------------------------------------------------------------------------------
# The SAE step's backends against the oracle (tests/kernels)


def run_step(step_fn, x, params, upstream, k, dec_norm, with_feats_grad=True):
    """A step's outputs and the gradients of x and every parameter under a loss that reaches
    x_hat, mse, l1 and (unless told not to) feats, weighted by `upstream`."""
    import torch

    leaves = [t.clone().requires_grad_() for t in [x, *params]]
    out = step_fn(*leaves, k=k, dec_norm=dec_norm)
    loss = (out.x_hat.float() * upstream["x_hat"]).sum() + upstream["mse"] * out.mse + upstream["l1"] * out.l1
    if with_feats_grad:
        loss = loss + (out.feats.float() * upstream["feats"]).sum()
    return out, torch.autograd.grad(loss, leaves)


def assert_step_matches(out, grads, ref, ref_grads, dtype, low_precision, rtol, atol):
    """A backend's step (outputs and gradients in `dtype`) against the float32 oracle's: every output, the
    firing counts (exact in float32; rounding at zero may flip two otherwise), and every
    gradient relative to its largest entry."""
    import torch

    assert out.x_hat.dtype == out.feats.dtype == dtype
    torch.testing.assert_close(out.feats.float(), ref.feats, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.x_hat.float(), ref.x_hat, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.mse, ref.mse, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.l1, ref.l1, rtol=rtol, atol=atol)
    assert out.fired.dtype == torch.int32
    assert torch.equal(out.fired, (out.feats > 0).sum(0, dtype=torch.int32))
    assert (out.fired - ref.fired).abs().sum() <= (2 if low_precision else 0)
    torch.testing.assert_close(out.l0, out.fired.sum().float() / out.feats.shape[0])
    for name, got, want in zip(("x", "w_enc", "b_enc", "w_dec", "b_dec"), grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape
        scale = want.abs().max().clamp_min(1.0)
        torch.testing.assert_close(got.float() / scale, want / scale, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


def assert_loss_only_grads_match(step_fn, x, params):
    """The training call (x needs no gradient, only mse and l1 reach the loss, decoder-norm
    L1): `step_fn`'s parameter gradients against the oracle's."""
    import torch
    from monofast.kernels import reference

    grads = []
    for step in (step_fn, reference.sae_step):
        leaves = [p.clone().requires_grad_() for p in params]
        out = step(x, *leaves, dec_norm=True)
        grads.append(torch.autograd.grad(out.mse + 0.01 * out.l1, leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def interpreted_triton(module: str):
    """A private import of `monofast.kernels.triton.<module>` with TRITON_INTERPRET=1 (Triton
    decides at `@triton.jit` time), for a module-scoped fixture to yield from; afterwards
    the environment and whatever copy of the package other tests imported come back, so
    the interpreter does not leak out of the test module."""
    import importlib
    import os
    import sys

    package = "monofast.kernels.triton"
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_modules = {name: mod for name, mod in sys.modules.items() if name.startswith(package)}
    for name in saved_modules:
        del sys.modules[name]
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield importlib.import_module(f"{package}.{module}")
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        for name in [n for n in sys.modules if n.startswith(package)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
