"""The lab's engine (assets/lab/engine.js) in real headless Chromium, held to PyTorch.

Two small random models, saved and shipped as the site ships them (`model_script`):

- `relu`: a GPT with biases hooked at layer 0 (so the clamp flows through a later block)
  and an anthropic2023 (ReLU) SAE; its widths (n_embd 20, head 10, 3C 60, vocab 300,
  block 20, d_sae 204) are not multiples of 8, which the engine's panels pad.
- `topk`: a GPT without biases hooked at its last layer and a top-k SAE (k 7).

PyTorch runs the same function in fp32 with the SAME fp16-rounded weights the page
decodes (`shipped_models`): fp16 rounding moves activations by ~1e-3 relative, as much
as the tolerance, so comparing with the fp32 originals would test the rounding, not the
engine. What the rounding costs is printed (not asserted) by the last test.

Every backend (WebAssembly SIMD with and without relaxed fma, plain JS) runs every case
in one page, opened once from a file:// URL; the page writes its results as JSON (arrays
as base64 of their float32 bytes, exact) into <pre id="out">.

"Within 1e-3" means |js - torch| <= 1e-3 * max(|torch|, rms), elementwise, with rms the
root mean square of the whole reference tensor: relative where a value is of the tensor's
size, absolute at the tensor's scale where it is near zero (a sum of cancelling terms).
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from monofast.gpt.model import GPT, GPTConfig
from monofast.gpt.weights import load_model, save_model
from monofast.run import report
from monofast.sae.model import SAEConfig, SparseAutoencoder
from monofast.sae.steer import clamp_hook, sample_clamped
from monofast.site import lab_model

ENGINE = Path(lab_model.__file__).parent / "assets" / "lab" / "engine.js"
BACKENDS = ("wasm-fma", "wasm", "js")
RTOL = 1e-3


class Spec(NamedTuple):
    gpt: GPTConfig
    sae: SAEConfig
    layer: int
    clamps: dict[int, float]


SPECS = {
    "relu": Spec(GPTConfig(n_layer=2, n_head=2, n_embd=20, block_size=20, vocab_size=300, bias=True),
                 SAEConfig(d_in=80, d_sae=204, variant="anthropic2023"), 0, {5: 4.0, 17: 0.0}),
    "topk": Spec(GPTConfig(n_layer=2, n_head=3, n_embd=24, block_size=20, vocab_size=250, bias=False),
                 SAEConfig(d_in=96, d_sae=160, variant="topk", k=7), 1, {3: 6.0}),
}


def sequences(vocab: int, block: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(7)
    return {f"T{n}": rng.integers(0, vocab, n).tolist() for n in (1, 7, block)}


def generations(vocab: int, block: int) -> dict[str, tuple[list[int], int]]:
    """Prompts and lengths: one inside the window, one that runs past block_size."""
    rng = np.random.default_rng(8)
    return {"short": (rng.integers(0, vocab, 5).tolist(), 12),
            "past-window": (rng.integers(0, vocab, block - 5).tolist(), 10)}


# ---------------------------------------------------------------------------------------
# The models


def random_models(spec: Spec, seed: int) -> tuple[GPT, SparseAutoencoder]:
    """A GPT and an SAE with O(1) activations and peaked logits (a freshly initialised GPT's
    logits are nearly flat: greedy decoding would hinge on 1e-6 differences)."""
    gen = torch.Generator().manual_seed(seed)
    model = GPT(spec.gpt).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name in ("wte.weight", "wpe.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # Linear (out, in)
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    sae = SparseAutoencoder(spec.sae, generator=gen)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=gen) / spec.sae.d_in ** 0.5)
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=gen) - 0.05)
        sae.b_dec.copy_(0.05 * torch.randn(sae.b_dec.shape, generator=gen))
        sae.input_scale.fill_(1.7)  # folded into the weights when saved
    return model, sae


def save_run(root: Path, spec: Spec, seed: int) -> tuple[Path, Path]:
    model, sae = random_models(spec, seed)
    save_model(root / "gpt", model)
    sae.save(root / "sae", hook_name=f"blocks.{spec.layer}.mlp.hook_post", hook_layer=spec.layer)
    return root / "gpt", root / "sae"


# ---------------------------------------------------------------------------------------
# The page

HARNESS = r"""
const out = {};
const f32 = (a) => { const b = new Uint8Array(a.buffer, a.byteOffset, a.byteLength); let s = "";
  for (let i = 0; i < b.length; i += 8192) s += String.fromCharCode.apply(null, b.subarray(i, i + 8192));
  return btoa(s); };
try {
  for (const [key, job] of Object.entries(JOBS)) {
    const model = MODELS[key], res = out[key] = {};
    for (const backend of job.backends) {
      let lab;
      try { lab = MonofastLab.load(model, {backend}); } catch (e) { res[backend] = {unavailable: String(e)}; continue; }
      const r = res[backend] = {backend: lab.backend, forward: {}, generate: {}};
      for (const [name, c] of Object.entries(job.forward)) {
        const o = lab.forward(c.ids, {clamps: c.clamps, logits: true});
        r.forward[name] = {acts: f32(o.acts), feats: f32(o.feats), logits: f32(o.logits)};
      }
      for (const [name, c] of Object.entries(job.generate)) {
        const opts = Object.assign({temperature: 0}, c.opts);
        r.generate[name] = {
          cached: Array.from(lab.generate(c.ids, c.n, opts)),
          fresh: Array.from(lab.generate(c.ids, c.n, Object.assign({cache: false}, opts))),
        };
      }
      // Typing: each call reuses the prefix it shares with the one before.
      const ids = job.typing, typed = [];
      lab.reset();
      for (const n of [3, 9, ids.length, 6, ids.length]) {
        const edit = n === 6 ? ids.slice(0, 5).concat([(ids[5] + 1) % lab.config.vocab_size]) : ids.slice(0, n);
        const a = lab.forward(edit, {logits: true, clamps: job.typingClamps});
        const b = lab.forward(edit, {logits: true, clamps: job.typingClamps, cache: false});
        typed.push(["acts", "feats", "logits"].every((k) => a[k].every((v, i) => Object.is(v, b[k][i]))));
      }
      r.typing = typed;
      const s1 = lab.generate(job.typing.slice(0, 4), 8, {temperature: 0.9, topK: 20, seed: 3});
      const s2 = lab.generate(job.typing.slice(0, 4), 8, {temperature: 0.9, topK: 20, seed: 3});
      const top1 = lab.generate(job.typing.slice(0, 4), 8, {temperature: 1.5, topK: 1, seed: 5});
      const greedy = lab.generate(job.typing.slice(0, 4), 8, {temperature: 0});
      r.sampling = {same: Array.from(s1).join() === Array.from(s2).join(), top1: Array.from(top1).join() === Array.from(greedy).join(),
                    inRange: Array.from(s1).every((t) => t >= 0 && t < lab.config.vocab_size)};
      const f = lab.forward(job.typing.slice(0, 4)).feats;
      r.top = lab.topFeatures(f, 3, 5);
      r.row3 = f32(f.subarray(3 * lab.config.d_sae, 4 * lab.config.d_sae));
      const w = lab.window(Array.from({length: lab.config.block_size + 3}, (_, i) => i % 7));
      r.window = {n: w.ids.length, cut: w.cut, dropped: w.dropped, first: w.ids[0]};
      r.errors = [];
      for (const bad of [[], [lab.config.vocab_size], Array(lab.config.block_size + 1).fill(0)]) {
        try { lab.forward(bad); r.errors.push("accepted"); } catch (e) { r.errors.push(e.name + ": " + e.message); }
      }
      try { lab.forward([1], {clamps: {[lab.config.d_sae]: 1}}); r.errors.push("accepted"); } catch (e) { r.errors.push(e.message); }
    }
    try { MonofastLab.load(Object.assign({}, model, {data: model.data.slice(0, -2)})); res.damaged = "loaded"; }
    catch (e) { res.damaged = e.message; }
    try { MonofastLab.load(undefined); res.missing = "loaded"; } catch (e) { res.missing = e.message; }
  }
} catch (e) { out.error = String(e) + "\n" + e.stack; }
document.getElementById("out").textContent = JSON.stringify(out);
"""


def run_page(browser: str, folder: Path, scripts: list[str], body: str) -> dict[str, Any]:
    """Open a page of `scripts` (then `body`) in headless Chromium from a file:// URL; the
    JSON it wrote into <pre id="out">."""
    tags = "".join(s if s.startswith("<") else f'<script src="{s}"></script>' for s in scripts)
    page = folder / "page.html"
    page.write_text(f'<!doctype html><meta charset="utf-8"><pre id="out"></pre>{tags}<script>{body}</script>',
                    encoding="utf-8")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    run = subprocess.run(args + ["--dump-dom", page.as_uri()], capture_output=True, text=True, check=False, timeout=300)
    found = re.search(r'<pre id="out">(.*?)</pre>', run.stdout, re.DOTALL)
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert found and found.group(1), (run.returncode, console or run.stderr[-2000:])
    return json.loads(html.unescape(found.group(1)))


def floats(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


class Lab(NamedTuple):
    spec: Spec
    original: tuple[GPT, SparseAutoencoder]
    """The fp32 models as saved (before fp16 rounding)."""
    shipped: tuple[GPT, SparseAutoencoder]
    """The same models with the fp16 weights of model.js: what the page computes."""
    results: dict[str, Any]
    """Per backend: what the page computed."""


@pytest.fixture(scope="module")
def labs(tmp_path_factory) -> dict[str, Lab]:
    browser = report.find_browser()
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    return build_labs(browser, tmp_path_factory.mktemp("lab"))


def build_labs(browser: str, root: Path) -> dict[str, Lab]:
    """Save both models, write their model.js, run every case in one page."""
    shutil.copy(ENGINE, root / "engine.js")
    jobs: dict[str, Any] = {}
    made: dict[str, tuple[Any, Any]] = {}
    scripts: list[str] = []
    for seed, (key, spec) in enumerate(SPECS.items()):
        gpt_dir, sae_dir = save_run(root / key, spec, seed)
        (root / f"{key}.js").write_text(lab_model.model_script(gpt_dir, sae_dir).script, encoding="ascii")
        scripts += [f"{key}.js", f"<script>(window.MODELS = window.MODELS || {{}})[{key!r}] = window.MONOFAST_MODEL;</script>"]
        original = (load_model(gpt_dir), SparseAutoencoder.load(sae_dir))
        made[key] = (original, lab_model.shipped_models(lab_model.lab_weights(*original, spec.layer)))
        V, B = spec.gpt.vocab_size, spec.gpt.block_size  # json.dumps writes the clamps' ids as strings
        forward: dict[str, Any] = {}
        for name, ids in sequences(V, B).items():
            forward[name] = {"ids": ids, "clamps": {}}
            forward[f"{name}-clamped"] = {"ids": ids, "clamps": spec.clamps}
        generate: dict[str, Any] = {}
        for name, (ids, n) in generations(V, B).items():
            generate[name] = {"ids": ids, "n": n, "opts": {}}
            generate[f"{name}-clamped"] = {"ids": ids, "n": n, "opts": {"clamps": spec.clamps}}
        jobs[key] = {"backends": list(BACKENDS), "forward": forward, "generate": generate,
                     "typing": sequences(V, B)[f"T{B}"], "typingClamps": spec.clamps}
    scripts.append("engine.js")
    results = run_page(browser, root, scripts, f"const JOBS = {json.dumps(jobs)};\n{HARNESS}")
    assert "error" not in results, results["error"]
    return {key: Lab(spec, *made[key], results[key]) for key, spec in SPECS.items()}


def available(lab: Lab, backend: str) -> dict[str, Any]:
    result = lab.results[backend]
    if "unavailable" in result:
        if backend == "js":
            pytest.fail(f"the plain JavaScript backend must always load: {result['unavailable']}")
        pytest.skip(f"this Chromium cannot run {backend}: {result['unavailable']}")
    assert result["backend"] == backend
    return result


# ---------------------------------------------------------------------------------------
# PyTorch's side


@torch.no_grad()
def torch_forward(model: GPT, sae: SparseAutoencoder, layer: int, ids: list[int],
                  clamps: dict[int, float]) -> dict[str, torch.Tensor]:
    """acts (after clamps), feats (of the unclamped activation) and logits, through hooks."""
    raw: list[torch.Tensor] = []
    acts: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(model.hook_mlp(layer, raw.append))  # sees the activation first
        if clamps:
            stack.enter_context(model.hook_mlp(layer, clamp_hook(sae, clamps)))
        stack.enter_context(model.hook_mlp(layer, acts.append))  # then what the clamp made of it
        logits = model(torch.tensor([ids])).logits[0]  # (T, V)
    return {"acts": acts[0][0], "feats": sae.encode(raw[0][0]), "logits": logits}


def worst_error(got: np.ndarray, want: torch.Tensor) -> float:
    """max |got - want| / max(|want|, rms(want)): the measure the tolerance bounds."""
    ref = want.double().reshape(-1)
    rms = ref.square().mean().sqrt().clamp_min(1e-30)
    return float(((torch.from_numpy(got.astype(np.float64).reshape(-1)) - ref).abs() / torch.maximum(ref.abs(), rms)).max())


CASES = [(key, backend, name) for key in SPECS for backend in BACKENDS
         for name in ("T1", "T7", "T20", "T1-clamped", "T7-clamped", "T20-clamped")]


@pytest.mark.parametrize("key,backend,name", CASES, ids=["-".join(c) for c in CASES])
def test_forward_matches_torch_with_the_same_fp16_weights(labs, key, backend, name):
    lab = labs[key]
    page = available(lab, backend)["forward"][name]
    ids = sequences(lab.spec.gpt.vocab_size, lab.spec.gpt.block_size)[name.split("-")[0]]
    clamps = lab.spec.clamps if name.endswith("clamped") else {}
    want = torch_forward(*lab.shipped, lab.spec.layer, ids, clamps)
    for part in ("acts", "feats", "logits"):
        got = floats(page[part])
        assert got.size == want[part].numel(), part
        assert worst_error(got, want[part]) <= RTOL, (part, worst_error(got, want[part]))


GENERATIONS = [(key, backend, name) for key in SPECS for backend in BACKENDS
               for name in ("short", "short-clamped", "past-window", "past-window-clamped")]


@pytest.mark.parametrize("key,backend,name", GENERATIONS, ids=["-".join(c) for c in GENERATIONS])
def test_greedy_generation_equals_sample_clamped_token_for_token(labs, key, backend, name):
    lab = labs[key]
    page = available(lab, backend)["generate"][name]
    prompt, n = generations(lab.spec.gpt.vocab_size, lab.spec.gpt.block_size)[name.split("-clamped")[0]]
    clamps = lab.spec.clamps if name.endswith("clamped") else None
    model, sae = lab.shipped
    want = sample_clamped(model, torch.tensor([prompt]), n, sae, lab.spec.layer, clamps,
                          temperature=0, top_k=None)[0].tolist()
    assert page["cached"] == want
    assert page["fresh"] == page["cached"]  # the KV cache changes nothing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", list(SPECS))
def test_cached_prefixes_sampling_windows_and_errors(labs, key, backend):
    lab = labs[key]
    page = available(lab, backend)
    assert page["typing"] == [True] * 5  # bit for bit what a fresh forward computes
    assert page["sampling"] == {"same": True, "top1": True, "inRange": True}
    row = floats(page["row3"])
    firing = sorted(((-v, j) for j, v in enumerate(row) if v > 0))[:5]
    assert [(t["id"], t["value"]) for t in page["top"]] == [(j, pytest.approx(-v)) for v, j in firing]
    B = lab.spec.gpt.block_size
    assert page["window"] == {"n": B, "cut": True, "dropped": 3, "first": 3 % 7}
    empty, out_of_vocab, too_long, feature = page["errors"]
    assert empty.startswith("RangeError: no tokens")
    assert f"not in 0..{lab.spec.gpt.vocab_size - 1}" in out_of_vocab
    assert "lab.window(ids)" in too_long
    assert f"features 0..{lab.spec.sae.d_sae - 1}" in feature


@pytest.mark.parametrize("key", list(SPECS))
def test_a_damaged_or_missing_model_is_refused_with_the_fix(labs, key):
    assert "is damaged" in labs[key].results["damaged"] and "rebuild the site" in labs[key].results["damaged"]
    assert "lab/model.js did not load" in labs[key].results["missing"]


@torch.no_grad()
def test_report_how_far_fp16_is_from_the_fp32_model(labs, capsys):
    """Not a check of the engine: what shipping fp16 weights costs, printed for the record."""
    lines = []
    for key, lab in labs.items():
        ids = sequences(lab.spec.gpt.vocab_size, lab.spec.gpt.block_size)["T20"]
        original = torch_forward(*lab.original, lab.spec.layer, ids, {})
        shipped = torch_forward(*lab.shipped, lab.spec.layer, ids, {})
        errors = {part: worst_error(shipped[part].numpy(), original[part]) for part in original}
        same = (original["logits"].argmax(-1) == shipped["logits"].argmax(-1)).float().mean().item()
        lines.append(f"fp16 vs fp32 weights, {key}: " + ", ".join(f"{p} {e:.2e}" for p, e in errors.items())
                     + f"; argmax agrees at {same:.0%} of positions")
        assert all(np.isfinite(e) for e in errors.values())
    with capsys.disabled():
        print("\n" + "\n".join(lines))
