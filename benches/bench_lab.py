"""The lab page's engine in headless Chromium: a block_size-token forward to the hooked
layer with the SAE encode, and a generated token with the KV cache, against the targets.

Providers: the quick and laptop preset shapes (random weights; the hook at the last layer,
where harvest puts it and where the forward to the hook costs most), with the engine's
automatic backend. Timing happens in the page (`performance.now()`, warm-up first, the
median of the runs); the times pytest-benchmark records are of the whole page (Chromium's
start, decoding model.js), the in-page medians go into `extra_info`.

    pytest benches/bench_lab.py --benchmark-enable   # pytest-benchmark, medians in extra_info
    python benches/bench_lab.py                      # the table, with the ratios to the targets
    python benches/bench_lab.py --run runs/quick     # also a trained run's model.js

In the default test run (`--benchmark-disable`) each shape runs once, one repetition of
each measurement, after checking the page's logits against PyTorch.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from monofast.gpt.model import GPT, GPTConfig
from monofast.run import presets, report
from monofast.sae.model import SAEConfig, SparseAutoencoder
from monofast.site import lab_model

ENGINE = Path(lab_model.__file__).parent / "assets" / "lab" / "engine.js"
SHAPES = ("quick", "laptop")
FORWARD_TARGET_MS = 150.0
"""A fresh block_size-token text: GPT to the hook and the SAE encode (laptop shape)."""
TOKEN_TARGET_MS = 30.0
"""One generated token, with the KV cache."""
VOCAB = 1024
CHECK_TOKENS = 8
PROMPT = 16

PAGE = r"""
const out = {};
try {
  const lab = MonofastLab.load(window.MONOFAST_MODEL, {backend: BACKEND});
  const c = lab.config, B = c.block_size;
  out.backend = lab.backend; out.loadMs = lab.loadMs;
  let seed = 1;
  const ids = Array.from({length: B}, () => (seed = (seed * 48271) % 2147483647) % c.vocab_size);
  out.check = Array.from(lab.forward(ids.slice(0, CHECK), {logits: true, cache: false}).logits);
  const median = (xs) => xs.slice().sort((a, b) => a - b)[xs.length >> 1];
  const time = (fn) => { const t = performance.now(); fn(); return performance.now() - t; };
  const forward = () => lab.forward(ids, {cache: false});
  for (let i = 0; i < WARMUP; i++) forward();
  out.forwardMs = median(Array.from({length: REPS}, () => time(forward)));
  // One token typed after a full text: the cache holds the rest.
  out.typedMs = median(Array.from({length: REPS}, () => {
    lab.forward(ids.slice(0, B - 1));
    return time(() => lab.forward(ids));
  }));
  const prompt = ids.slice(0, PROMPT), n = Math.min(TOKENS, B - PROMPT - 1);
  const perToken = (opts) => median(Array.from({length: REPS}, () => {
    lab.reset();
    lab.generate(prompt, 1, opts);  // the prompt, computed before the clock starts
    return time(() => lab.generate(prompt, n + 1, opts)) / n;  // its first token is cached
  }));
  const greedy = {temperature: 0};
  perToken(greedy);
  out.tokenMs = perToken(greedy);
  out.clampedTokenMs = perToken({temperature: 0, clamps: {[c.d_sae >> 1]: 5}});
  // Past block_size the positions shift: every token recomputes the window.
  const long = ids.concat(ids.slice(0, 8));
  lab.generate(long, 1, greedy);
  out.pastWindowTokenMs = median(Array.from({length: REPS}, () => time(() => lab.generate(long, 2, greedy)) / 2));
  out.tokens = n;
} catch (e) { out.error = String(e) + "\n" + e.stack; }
document.getElementById("out").textContent = JSON.stringify(out);
"""


class Case(NamedTuple):
    """One shape's model.js and the models it ships, in PyTorch."""

    shape: str
    folder: Path
    """Holds model.js and engine.js."""
    script: lab_model.LabScript
    model: GPT
    sae: SparseAutoencoder


def make_case(shape: str, folder: Path, seed: int = 0) -> Case:
    """A random GPT of the preset's shape and an SAE of its width, hooked at the last layer."""
    gpt = presets.stage_values(shape, "gpt")
    cfg = GPTConfig(**{k: gpt[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}, vocab_size=VOCAB)
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    expansion = presets.stage_values(shape, "sae")["expansion"]
    sae = SparseAutoencoder(SAEConfig(d_in=cfg.d_mlp, d_sae=expansion * cfg.d_mlp, variant="april2024"),
                            generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.fill_(-0.02)
    weights = lab_model.lab_weights(model, sae, cfg.n_layer - 1)
    return case_from(shape, folder, weights)


def case_from(shape: str, folder: Path, weights: lab_model.LabWeights) -> Case:
    folder.mkdir(parents=True, exist_ok=True)
    script = lab_model.render(weights)
    (folder / "model.js").write_text(script.script, encoding="ascii")
    shutil.copy(ENGINE, folder / "engine.js")
    return Case(shape, folder, script, *lab_model.shipped_models(weights))


def run_page(browser: str, case: Case, reps: int, warmup: int, tokens: int, backend: str) -> dict[str, Any]:
    """The page's measurements (milliseconds) and its check logits."""
    constants = (f"const BACKEND = {json.dumps(backend)}, REPS = {reps}, WARMUP = {warmup}, "
                 f"TOKENS = {tokens}, PROMPT = {PROMPT}, CHECK = {CHECK_TOKENS};")
    page = case.folder / "bench.html"
    page.write_text('<!doctype html><meta charset="utf-8"><pre id="out"></pre><script src="model.js"></script>'
                    f'<script src="engine.js"></script><script>{constants}\n{PAGE}</script>', encoding="utf-8")
    run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, check=False, timeout=600)
    found = re.search(r'<pre id="out">(.*?)</pre>', run.stdout, re.DOTALL)
    assert found and found.group(1), (run.returncode, run.stderr[-2000:])
    result = json.loads(html.unescape(found.group(1)))
    assert "error" not in result, result["error"]
    return result


@torch.no_grad()
def check(case: Case, result: dict[str, Any]) -> float:
    """The page's logits of the first CHECK_TOKENS ids against PyTorch with the same fp16
    weights: the worst |js - torch| / max(|torch|, rms(torch)), which must be <= 1e-3."""
    seed, ids = 1, []
    for _ in range(CHECK_TOKENS):  # the page's generator of ids
        seed = (seed * 48271) % 2147483647  # MINSTD: exact in JavaScript's doubles too
        ids.append(seed % VOCAB)
    want = case.model(torch.tensor([ids])).logits[0].double().reshape(-1)
    got = torch.tensor(result["check"], dtype=torch.float64)
    rms = want.square().mean().sqrt()
    worst = float(((got - want).abs() / torch.maximum(want.abs(), rms)).max())
    assert worst <= 1e-3, worst
    return worst


# ---------------------------------------------------------------------------------------
# pytest-benchmark


@pytest.mark.parametrize("shape", SHAPES)
def test_lab_engine(benchmark, shape, tmp_path):
    benchmark.group = "lab: engine in headless Chromium"
    browser = report.find_browser()
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    case = make_case(shape, tmp_path)
    reps, warmup, tokens = (1, 0, 4) if benchmark.disabled else (9, 2, 64)
    result = benchmark.pedantic(run_page, args=(browser, case, reps, warmup, tokens, "auto"), rounds=1, iterations=1)
    check(case, result)
    benchmark.extra_info.update({key: result[key] for key in ("backend", "loadMs", "forwardMs", "typedMs",
                                                              "tokenMs", "clampedTokenMs", "pastWindowTokenMs")})
    benchmark.extra_info["model_js_bytes"] = case.script.sizes["total"]


# ---------------------------------------------------------------------------------------
# Script: the table


def run_case(folder: Path, run: Path) -> Case:
    """A trained run's GPT and SAE, as model_script ships them."""
    from monofast.gpt.weights import load_model
    from monofast.sae.steer import sae_layer

    sae_dir = run / "sae"
    weights = lab_model.lab_weights(load_model(run / "gpt"), SparseAutoencoder.load(sae_dir), sae_layer(sae_dir))
    return case_from(run.name, folder, weights)


def fp16_error(run: Path, case: Case, tokens: int = 64) -> str:
    """How far the shipped fp16 model is from the run's fp32 one, on random ids."""
    from monofast.gpt.weights import load_model

    original = load_model(run / "gpt")
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, original.config.vocab_size, (1, tokens)))
    with torch.no_grad():
        a, b = original(ids).logits.double(), case.model(ids).logits.double()
    rms = a.square().mean().sqrt()
    worst = float(((a - b).abs() / torch.maximum(a.abs(), rms)).max())
    agree = float((a.argmax(-1) == b.argmax(-1)).double().mean())
    return f"fp16 vs fp32 logits on {tokens} random ids: worst {worst:.2e}, argmax agrees at {agree:.0%}"


def print_row(case: Case, result: dict[str, Any], worst: float) -> None:
    cfg = case.model.config
    print(f"{case.shape:8s} {cfg.n_embd:4d} {cfg.block_size:5d} {case.sae.cfg.d_sae:6d} "
          f"{case.script.sizes['total'] / 1e6:7.2f} {result['backend']:9s} {result['loadMs']:7.0f} "
          f"{result['forwardMs']:8.1f} ({result['forwardMs'] / FORWARD_TARGET_MS:4.2f}x) "
          f"{result['typedMs']:7.1f} {result['tokenMs']:7.2f} ({result['tokenMs'] / TOKEN_TARGET_MS:5.3f}x) "
          f"{result['clampedTokenMs']:7.2f} {result['pastWindowTokenMs']:8.1f} {worst:8.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=SHAPES, help="preset shapes (default: both)")
    parser.add_argument("--reps", type=int, default=9, help="timed runs per measurement; the median counts")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per timed run")
    parser.add_argument("--backend", default="auto", choices=("auto", "wasm-fma", "wasm", "js"))
    parser.add_argument("--run", type=Path, default=None, help="also a trained run's GPT and SAE (e.g. runs/quick)")
    args = parser.parse_args()
    browser = report.find_browser()
    if browser is None:
        raise SystemExit("no chromium on this machine (Debian: apt-get install chromium)")
    print(f"targets: forward + encode of a fresh block_size text <= {FORWARD_TARGET_MS:.0f} ms, "
          f"one generated token <= {TOKEN_TARGET_MS:.0f} ms (ratios: measured / target)\n")
    header = (f"{'model':8s} {'C':>4s} {'block':>5s} {'d_sae':>6s} {'js MB':>7s} {'backend':9s} {'load':>7s} "
              f"{'forward ms':>17s} {'typed':>7s} {'token ms':>16s} {'clamped':>7s} {'past-win':>8s} {'vs torch':>8s}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        cases = [make_case(shape, Path(tmp) / shape) for shape in args.shape or SHAPES]
        if args.run is not None:
            cases.append(run_case(Path(tmp) / "run", args.run))
        for case in cases:
            result = run_page(browser, case, args.reps, 2, args.tokens, args.backend)
            print_row(case, result, check(case, result))
        if args.run is not None:
            print(f"\n{args.run}: {fp16_error(args.run, cases[-1])}; model.js parts (bytes): {cases[-1].script.sizes}")
    print("\nforward: block_size tokens, cache off; typed: one more token after a full text; token: one "
          "greedy token with the KV cache (clamped: with one feature clamped); past-win: a token once the "
          "context is past block_size (the window is recomputed); vs torch: worst relative logit error")


if __name__ == "__main__":
    main()
