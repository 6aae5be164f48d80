"""The lab page as the pipeline builds it: it opens from file:// in headless Chromium, runs
the run's tokenizer, GPT and SAE, shades the chosen feature, generates with and without
a clamp, and says what is wrong when something is."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from monofast.data import tokenizer
from monofast.run import report
from monofast.site import lab as site_lab


@pytest.fixture
def chromium() -> list[str]:
    browser = report.find_browser()
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=10000"]


def open_lab(chromium: list[str], site: Path, fragment: str) -> tuple[str, str]:
    """The lab's DOM after its scripts ran, and Chromium's log."""
    url = (site / "lab.html").resolve().as_uri() + "#" + fragment
    run = subprocess.run(chromium + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    return run.stdout, run.stderr


def tokens_shown(dom: str) -> list[str]:
    body = re.search(r'<div class="tx lab-tokens" id="lab-tokens">(.*?)</div>', dom, re.S)
    assert body, dom[-2000:]
    return [html.unescape(t) for t in re.findall(r'<i data-t="\d+"[^>]*>(.*?)</i>', body.group(1), re.S)]


def test_the_site_of_a_run_has_the_lab_and_feature_pages_link_to_it(smoke_run):
    site = smoke_run.run / "site"
    assert (site / "lab.html").is_file() and (site / "lab" / "model.js").is_file()
    assert (site / "lab" / "tokenizer.js").is_file()
    assert 'href="lab.html"' in (site / "index.html").read_text()
    page = (site / "features" / "3.html").read_text()
    link = re.search(r'<a class="try" href="([^"]+)"', page)
    assert link and html.unescape(link.group(1)).startswith("../lab.html#f=3&text=")


@pytest.mark.slow
def test_the_lab_runs_the_model_in_the_page(smoke_run, chromium):
    site = smoke_run.run / "site"
    text = "def run(self):\n    return 'é ✓' <|endoftext|> KING:"
    dom, log = open_lab(chromium, site, f"f=5&text={quote(text, safe='')}&generate=1")
    assert 'data-ready="1"' in dom, log[-3000:]
    assert "Uncaught" not in log, log[-3000:]
    tok = tokenizer.load(smoke_run.run / "data")
    ids = tok.encode(text, add_special_tokens=False).ids
    shown = tokens_shown(dom)
    assert len(shown) == len(ids)  # one shaded span per token the library makes
    assert "".join(shown).replace("⏎", "\n") != ""  # the token texts are there
    assert re.search(r'id="lab-time">\d+ tokens, forward to the hook and encode in \d+ ms', dom)
    assert "<h3>Unclamped</h3>" in dom and "<h3>Clamped</h3>" in dom
    assert re.search(r"\d+ tokens in \d+ ms", dom)  # generation ran and timed itself


@pytest.mark.slow
def test_the_lab_says_what_is_wrong(smoke_run, chromium, tmp_path):
    site = smoke_run.run / "site"
    dom, _ = open_lab(chromium, site, "f=0&text=")
    assert "Type or paste some text above." in dom
    long_text = "to be or not to be " * 200  # far more tokens than the smoke GPT's 32
    dom, log = open_lab(chromium, site, f"f=0&text={quote(long_text)}")
    assert "the model reads 32 at a time, so the lab shows the last 32" in dom, log[-2000:]
    assert len(tokens_shown(dom)) == 32
    broken = tmp_path / "site"
    shutil.copytree(site, broken)
    (broken / "lab" / "model.js").unlink()
    dom, _ = open_lab(chromium, broken, "f=0&text=hi")
    assert "lab/model.js" in dom and "monofast site --force" in dom  # one line naming the fix


def test_try_it_links_carry_any_text():
    link = site_lab.try_it(7, "a&b=c #d\n'é'", depth=1)
    assert link.startswith("../lab.html#f=7&text=")
    assert "&b" not in link and "#d" not in link and "\n" not in link


def test_a_site_without_the_run_stages_has_no_lab(tmp_path):
    assert site_lab.inputs(tmp_path / "data", tmp_path / "gpt", tmp_path / "sae") is None
    assert json.loads(json.dumps(site_lab.SCRIPTS.split()))[-1] == "assets/lab/lab.js"


def firefox() -> str | None:
    return shutil.which("firefox") or shutil.which("firefox-esr")


def lab_log_firefox(site: Path, fragment: str, profile: Path) -> dict:
    """Open the lab in headless Firefox; its one `monofast-lab` console line, parsed. Firefox
    prints page console lines on stdout with `devtools.console.stdout.content` set, and
    does not exit by itself: it is stopped once the line is there."""
    profile.mkdir(exist_ok=True)
    (profile / "user.js").write_text('user_pref("devtools.console.stdout.content", true);\n')
    url = (site / "lab.html").resolve().as_uri() + "#" + fragment
    proc = subprocess.Popen([firefox(), "--headless", "--no-remote", "--profile", str(profile), url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "monofast-lab " in line:
                found = line
                break
            if "Error" in line and "lab" in line:
                raise AssertionError(line)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert found is not None, "Firefox never logged the lab's result"
    payload = json.loads(found.split("console.log: ", 1)[1])  # a JSON string of the logged text
    return json.loads(payload.split("monofast-lab ", 1)[1])


def lab_log_chromium(chromium: list[str], site: Path, fragment: str) -> dict:
    dom, log = open_lab(chromium, site, fragment)
    line = re.search(r'monofast-lab (\{.*?\})", source', log)
    assert line, log[-3000:]
    return json.loads(line.group(1).replace('\\"', '"'))


def python_reference(run: Path, text: str, feature: int, tokens: int) -> dict:
    """What the page must compute, from the same fp16 weights in torch: the token ids (the
    tokenizers library), the strongest feature at each token, greedy continuations with and
    without the feature clamped at 4x its maximum (monofast.sae.steer.sample_clamped)."""
    import numpy as np
    import torch

    from monofast.analysis.forward import Encoder
    from monofast.gpt.weights import load_model
    from monofast.sae.model import SparseAutoencoder
    from monofast.sae.steer import sample_clamped
    from monofast.site.lab_model import lab_weights, shipped_models

    ids = tokenizer.load(run / "data").encode(text, add_special_tokens=False).ids
    sae_file = SparseAutoencoder.load(run / "sae")
    layer = json.loads((run / "sae" / "cfg.json").read_text())["hook_layer"]
    model, sae = shipped_models(lab_weights(load_model(run / "gpt"), sae_file, layer))
    x = torch.tensor([ids])
    with torch.no_grad():
        feats = Encoder(sae, torch.float32)(model.mlp_activations(x, layer)[0])
    top = [int(row.argmax()) if float(row.max()) > 0 else -1 for row in feats]
    max_act = float(np.load(run / "analysis" / "features.npz")["max_act"][feature])
    clean = sample_clamped(model, x, tokens, temperature=0.0)[0].tolist()
    clamped = sample_clamped(model, x, tokens, sae, layer, {feature: 4 * max_act}, temperature=0.0)[0].tolist()
    return {"ids": ids, "top": top, "clean": clean, "clamped": clamped}


TEXT = "def run(self):\n    return 'é ✓' KING: to be"


@pytest.mark.slow
def test_the_page_computes_what_torch_computes_in_chromium(smoke_run, chromium):
    want = python_reference(smoke_run.run, TEXT, 5, 12)
    got = lab_log_chromium(chromium, smoke_run.run / "site", f"f=5&text={quote(TEXT, safe='')}&generate=1&temp=0&n=12&log=1")
    assert {k: got[k] for k in want} == want


@pytest.mark.slow
def test_the_page_computes_what_torch_computes_in_firefox(smoke_run, tmp_path):
    if firefox() is None:
        pytest.skip("no Firefox on this machine (Debian: apt-get install firefox-esr)")
    want = python_reference(smoke_run.run, TEXT, 5, 12)
    got = lab_log_firefox(smoke_run.run / "site", f"f=5&text={quote(TEXT, safe='')}&generate=1&temp=0&n=12&log=1",
                          tmp_path / "profile")
    assert {k: got[k] for k in want} == want
