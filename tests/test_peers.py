"""The peer adapters of `benches/bench_sae.py` (SAELens, sparsify), kept from rotting: where a
peer is installed its adapter runs a few tiny training steps in fp32 and in bf16 autocast, and
the loss must stay finite and go down; SAELens loads monofast's SAE folders as they are.
Skipped, with the install command, where the peer is not installed."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from monofast.sae.model import VARIANTS, SAEConfig, SparseAutoencoder

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (64, 16, 64)
"""(B, D, F): tiny, but F above sparsify's k=32 so its TopK really selects."""
STEPS = 8


def _bench() -> ModuleType:
    """benches/bench_sae.py as a module (benches/ is not a package)."""
    name = "monofast_bench_sae"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benches" / "bench_sae.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("peer", ["saelens", "sparsify"])
def test_peer_step_runs_and_learns(peer, precision):
    bench = _bench()
    step_for = {"saelens": bench.saelens_step, "sparsify": bench.sparsify_step}[peer]
    # Skips (naming the install command) only when the peer is absent; a broken one raises.
    step = step_for(*SHAPE, bf16=precision == "bf16", lr=1e-2)
    losses = [float(step()) for _ in range(STEPS)]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_a_missing_peer_skips_with_the_install_command(monkeypatch):
    bench = _bench()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sae_lens" else real_find_spec(name, *a))
    with pytest.raises(pytest.skip.Exception, match=r"pip install -e '\.\[peers\]'"):
        bench.saelens_step(*SHAPE)


def test_the_bench_table_runs_the_peers_beside_autograd(capsys):
    """The script's table at a toy shape: each installed peer has a row in both precisions,
    with its ratio to autograd of the same precision."""
    bench = _bench()
    assert bench.main(["--rounds", "2", "--shape", ",".join(map(str, SHAPE))]) == 0
    out = capsys.readouterr().out
    for peer in ("saelens", "sparsify"):
        installed = importlib.util.find_spec({"saelens": "sae_lens"}.get(peer, peer)) is not None
        for precision in ("fp32", "bf16"):
            rows = [line for line in out.splitlines() if f" {peer}-{precision} " in line]
            if installed:
                assert len(rows) == 1 and rows[0].rstrip().endswith("x"), out
            else:
                assert f"({peer}-{precision} skipped: " in out, out


@pytest.mark.parametrize("variant", VARIANTS)
def test_sae_lens_loads_our_sae_folder_as_it_is(variant, tmp_path):
    """Every variant, trained a little (input scale folded in, BatchTopK's threshold learned),
    saved by monofast and loaded by `sae_lens.SAE.load_from_disk` with no renaming: the same
    features and reconstructions as ours."""
    sae_lens = _bench().import_peer("sae_lens")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen) @ torch.randn(16, 16, generator=gen) + 1.0
    cfg = SAEConfig(d_in=16, d_sae=64, variant=variant, k=4, compute_dtype="float32")
    ours = SparseAutoencoder(cfg, generator=gen)
    ours.set_input_scale(x)
    ours.init_b_dec(x, "mean")
    opt = torch.optim.Adam(ours.parameters(), lr=1e-2)
    for _ in range(20):
        out = ours(x)
        (out.mse + 0.1 * out.l1 + out.aux / 32).backward()
        ours.optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
    ours.eval()
    ours.save(tmp_path, hook_name="blocks.1.mlp.hook_post", hook_layer=1, model_name="monofast-gpt")

    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    expected = {"anthropic2023": "StandardSAE", "april2024": "StandardSAE", "topk": "TopKSAE",
                "batchtopk": "JumpReLUSAE", "matryoshka": "JumpReLUSAE"}[variant]
    assert type(theirs).__name__ == expected
    with torch.no_grad():
        feats = ours.encode(x)
        assert 0 < int((feats > 0).sum()) < feats.numel()  # some fire, not all: the comparison bites
        torch.testing.assert_close(theirs.encode(x), feats, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours.decode(feats), rtol=1e-5, atol=1e-5)
