"""The SAE trainer end to end against its bare step: what the stream, the logging, the
checks, the resampling and the evaluation cost on top of the steps themselves.

    python benches/bench_sae_train.py --run runs/quick     a finished quick run's store
    pytest benches/bench_sae_train.py                      the same code on a small random store

The trainer runs `monofast sae train` as the run's preset configures it (same store, same
GPT for CE-loss recovered), timed whole, with the time inside its steps (forward, backward,
optimizer step, decoder constraint: `sweep.train_step`) summed as it runs: their ratio is
the trainer's rate against its bare step rate (1.0: nothing but steps). Beside it, the
step alone on one batch of the store in a loop, dense and sparse (firing at the trained
SAE's held-out density), times the steps the trainer took in each form (eval.json records
them): the same ratio with an isolated step, which fires less than the trainer's steps
did before L0 settled. The process imports what the trainer imports before the clock
starts (torch's optimizer machinery alone takes seconds to import once per process, and
`monofast run` has done so by the SAE stage).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
from monofast.activations.store import open_store
from monofast.sae import train as sae_train
from monofast.sae.batches import sample_rows
from monofast.sae.config import SAETrainConfig
from monofast.sae.crossover import _fire_at
from monofast.sae.model import SAEConfig, SparseAutoencoder



def small_store(folder: Path, rows: int, dim: int) -> None:
    """Random rows in contexts of 10 (the pytest case's store)."""
    from monofast.activations.store import ActivationWriter

    index = np.arange(rows)
    values = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    with ActivationWriter(folder, dim, "fp32") as writer:
        writer.append(values, np.zeros(rows, np.int32), (index // 500 % 2).astype(np.uint8),
                      (index // 10).astype(np.int32), (index % 10).astype(np.int32))
        writer.finish()


def bare_step_ms(cfg: SAETrainConfig, d_in: int, batch: torch.Tensor, sparse: bool, density: float,
                 reps: int = 10) -> float:
    """Median ms of the SAE step alone (forward, backward, Adam, constraint) on `batch`,
    with every feature firing on `density` of the rows."""
    k = cfg.k[0] if cfg.variant == "topk" else 32
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=cfg.d_sae or cfg.expansion * d_in, variant=cfg.variant, k=k,
                                      compute_dtype=cfg.compute_dtype), generator=torch.Generator().manual_seed(0))
    sae.set_input_scale(batch)
    if cfg.variant != "topk":
        _fire_at(sae, batch * sae.input_scale, density)
    sae.sparse_step = sparse
    opt = torch.optim.Adam(sae.parameters(), lr=1e-5, fused=True)
    times = []
    for i in range(reps + 2):
        start = time.perf_counter()
        out = sae(batch)
        (out.mse + out.l1).backward()
        sae.optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(cfg: SAETrainConfig, store_dir: Path, gpt_dir: Optional[Path] = None, data_dir: Optional[Path] = None,
            reps: int = 10) -> dict[str, Any]:
    store = open_store(store_dir)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)  # the one-off imports
    in_steps = [0.0]
    step = sae_train.train_step

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            in_steps[0] += time.perf_counter() - start

    sae_train.train_step = timed_step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            evaluation = sae_train.train(cfg, store_dir, Path(tmp) / "sae", gpt_dir=gpt_dir, data_dir=data_dir)
            wall = time.perf_counter() - start
            lines = (Path(tmp) / "sae" / "metrics.jsonl").read_text().splitlines()
            loop_seconds = json.loads(lines[-1])["seconds"]
    finally:
        sae_train.train_step = step
    total_steps = int(json.loads(lines[-1])["step"])
    batch = sample_rows(store, cfg.batch_size, store.rows, np.random.default_rng(0))
    d_sae = cfg.d_sae or cfg.expansion * store.dim
    forms = evaluation["training"]["sparse_step"].get("saes", {})
    steps = {name: forms.get(name, {}).get("steps") or {"dense": total_steps, "sparse": 0}
             for name in evaluation["saes"]}
    dense_ms = bare_step_ms(cfg, store.dim, batch, False, 0.5, reps) if any(s["dense"] for s in steps.values()) else 0.0
    # Every member of a sweep takes its own step on each batch: the bare time is theirs summed,
    # each member's sparse steps timed at its own held-out density.
    members: dict[str, Any] = {}
    for name, sae_eval in evaluation["saes"].items():
        bare = {"dense": dense_ms} if steps[name]["dense"] else {}  # the forms this member took
        if steps[name]["sparse"]:
            bare["sparse"] = bare_step_ms(cfg, store.dim, batch, True, min(1.0, sae_eval["l0"] / d_sae), reps)
        members[name] = {"steps": steps[name], "bare_ms": bare, "l0": sae_eval["l0"],
                         "bare_s": sum(steps[name][form] * ms for form, ms in bare.items()) / 1e3}
    bare_seconds = sum(m["bare_s"] for m in members.values())
    return {"wall_s": wall, "loop_s": loop_seconds, "in_steps_s": in_steps[0], "members": members,
            "bare_s": bare_seconds, "ratio": in_steps[0] / wall, "loop_ratio": in_steps[0] / loop_seconds,
            "isolated_ratio": bare_seconds / wall}


def report(result: dict[str, Any]) -> str:
    members = result["members"]
    lines = [f"trainer: {result['wall_s']:.1f} s whole, {result['loop_s']:.1f} s in the training loop, "
             f"{result['in_steps_s']:.1f} s in the steps of its {len(members)} SAE(s)",
             f"trainer rate / its bare step rate: {result['ratio']:.0%} of the whole stage, "
             f"{result['loop_ratio']:.0%} of the loop"]
    for name, m in members.items():
        steps, bare = m["steps"], m["bare_ms"]
        timed = ", ".join(f"{form} {ms:.1f} ms" for form, ms in bare.items())
        lines.append(f"  {name}: {steps['dense']} dense + {steps['sparse']} sparse steps, held-out L0 {m['l0']:.1f}; "
                     f"isolated step {timed} -> {m['bare_s']:.1f} s")
    lines.append(f"isolated steps of every SAE: {result['bare_s']:.1f} s, {result['isolated_ratio']:.0%} of the whole "
                 f"stage, {result['bare_s'] / result['in_steps_s']:.0%} of the time inside its steps")
    return "\n".join(lines)


@pytest.mark.parametrize("sparse_step", ["on", "off"])
def test_trainer_against_bare_step(tmp_path, sparse_step):
    store = tmp_path / "activations"
    small_store(store, 6000, 32)
    cfg = SAETrainConfig(expansion=4, batch_size=256, held_out=600, ce_eval_tokens=0, log_every=5,
                         compute_dtype="float32", device="cpu", b_dec_init="mean", resample_rows=512,
                         l1_coeff=(1.0, 5.0), sparse_step=sparse_step)
    result = measure(cfg, store, reps=2)
    members = result["members"]
    assert list(members) == ["l1_1", "l1_5"]  # a sweep: every member's steps count
    form = "sparse" if sparse_step == "on" else "dense"
    for m in members.values():
        assert m["steps"] == {"dense": 0, "sparse": 0, form: (6000 - 600) // 256}
        assert list(m["bare_ms"]) == [form]  # only the form it took is timed
        assert m["bare_s"] == m["steps"][form] * m["bare_ms"][form] / 1e3 > 0
    assert result["bare_s"] == sum(m["bare_s"] for m in members.values())
    assert 0 < result["in_steps_s"] < result["loop_s"] < result["wall_s"]
    print(report(result))


def main(argv: Optional[list[str]] = None) -> int:
    from monofast.run.resolve import resolve_config
    from monofast.run.stages import stage_named

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quick"), help="a finished run (default runs/quick)")
    parser.add_argument("--preset", default="quick", help="the preset that made it (default quick)")
    parser.add_argument("--sparse-step", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.run / "activations").is_dir():
        print(f"{args.run}/activations not found: run `monofast run --preset {args.preset} --run {args.run}` first",
              file=sys.stderr)
        return 2
    cfg = resolve_config(stage_named("sae"), args.preset, {"sparse_step": args.sparse_step})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} SAE config on "
          f"{args.run}/activations, --sparse-step {args.sparse_step}")
    result = measure(cfg, args.run / "activations", args.run / "gpt", args.run / "data")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
