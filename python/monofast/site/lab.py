"""The lab: a page where the reader types text and the run's own tokenizer, GPT and SAE run
in the page (plain JavaScript, from file://, no server), shading a chosen feature, listing
the features that fire, and generating with features clamped.

    lab.html             the page
    lab/tokenizer.js     the tokenizer's vocabulary and merges (`lab_tokenizer`)
    lab/model.js         the GPT up to the logits and the SAE, fp16 (`lab_model`)
    assets/lab/*.js      the tokenizer, the engine and the page's script

The data are scripts, not binary files: a page opened from file:// may load scripts but
Chromium refuses it fetch().
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import NamedTuple, Optional
from urllib.parse import quote

from monofast.common import files
from monofast.common.log import logger
from monofast.site.text import escape

LAB_ASSETS = ("tokenizer.js", "engine.js", "lab.js")
IN_PAGE = ("standard", "topk")
"""SAE architectures (cfg.json's names) that lab/engine.js computes; a BatchTopK SAE's
inference threshold (SAELens' "jumprelu") is not among them yet."""
LAB_PAGE = "lab.html"


class LabInputs(NamedTuple):
    """The finished stages whose files the lab ships."""

    data_dir: Path
    gpt_dir: Path
    sae_dir: Path


def inputs(data_dir: Optional[Path], gpt_dir: Optional[Path], sae_dir: Optional[Path]) -> Optional[LabInputs]:
    """The lab's inputs when all three stages have finished (a site built from an analysis
    alone has no lab)."""
    folders = (data_dir, gpt_dir, sae_dir)
    if any(f is None or not (f / files.MANIFEST_FILE).is_file() for f in folders):
        return None
    assert sae_dir is not None and gpt_dir is not None
    from monofast.gpt.hf import MODEL_RECORD

    if (gpt_dir / MODEL_RECORD).is_file():
        logger.warning("site: no lab: the page's engine runs the tiny GPT, not a Hugging Face model")
        return None
    architecture = files.read_json(sae_dir / "cfg.json", "SAE config").get("architecture", "standard")
    if architecture not in IN_PAGE:
        logger.warning("site: no lab: the page's engine runs ReLU and TopK SAEs, not %s ones", architecture)
        return None
    return LabInputs(*folders)  # type: ignore[arg-type]


def try_it(feature: int, text: str, depth: int = 1) -> str:
    """The link that opens the lab with `feature` selected and `text` typed in."""
    return f'{"../" * depth}{LAB_PAGE}#f={feature}&text={quote(text, safe="")}'


def write(out: Path, lab: LabInputs, html: str) -> list[str]:
    """Write the lab into the site folder `out`, `html` (the page: `body` in the site's
    frame) as lab.html; returns its parts' sizes for the log."""
    from monofast.site.lab_model import model_script
    from monofast.site.lab_tokenizer import tokenizer_script

    folder = resources.files("monofast.site") / "assets" / "lab"
    for name in LAB_ASSETS:
        files.write_bytes(out / "assets" / "lab" / name, (folder / name).read_bytes())
    tokenizer_text = files.verify_recorded(lab.data_dir / "tokenizer.json").read_text(encoding="utf-8")
    files.write_text(out / "lab" / "tokenizer.js", tokenizer_script(tokenizer_text))
    script, _ = model_script(lab.gpt_dir, lab.sae_dir)
    files.write_text(out / "lab" / "model.js", script)
    files.write_text(out / LAB_PAGE, html)
    sizes = {name: (out / "lab" / name).stat().st_size for name in ("model.js", "tokenizer.js")}
    sizes["code"] = sum((out / "assets" / "lab" / name).stat().st_size for name in LAB_ASSETS)
    sizes["page"] = (out / LAB_PAGE).stat().st_size
    total = sum(sizes.values())
    return [f"lab {total / 1e6:.1f} MB (model {sizes['model.js'] / 1e6:.1f} MB, tokenizer "
            f"{sizes['tokenizer.js'] / 1e3:.0f} kB, code and page {(sizes['code'] + sizes['page']) / 1e3:.0f} kB)"]


SAMPLE = "def run(self, args):\n    return self.value\n\nKING RICHARD III:\nNow is the winter of our discontent"


SCRIPTS = ("features.js lab/tokenizer.js lab/model.js assets/lab/tokenizer.js assets/lab/engine.js "
           "assets/lab/lab.js")
"""The page's scripts, in loading order: the data first, then the code that reads them."""


def body(title: str) -> str:
    """lab.html's body: the controls; assets/lab/lab.js fills them."""
    html = f"""<nav class="nav"><a href="index.html">← index</a><span class="muted" id="lab-status"></span></nav>
<h1>Lab · {escape(title)}</h1>
<p class="lead">Type any text: the run's tokenizer, its GPT up to the hooked MLP layer and the SAE run here in the
page (no server), and each token is shaded by the feature you choose. Click a token for the features that fire on
it. Clamp features and generate to see what they do to the model.</p>
<p id="lab-error" class="verdict" hidden></p>
<noscript><p class="verdict">The lab needs JavaScript.</p></noscript>
<div id="lab">
<textarea id="lab-text" rows="6" spellcheck="false">{escape(SAMPLE)}</textarea>
<p class="muted"><span id="lab-time"></span> <span id="lab-note"></span></p>
<p>Shade by feature <input id="lab-feature" type="number" min="0" value="0"> <span id="lab-picked"></span>
 · find a feature by its tokens <input id="lab-search" type="search" placeholder="e.g. self"></p>
<ol class="tl" id="lab-hits"></ol>
<div class="tx lab-tokens" id="lab-tokens"></div>
<div class="cols"><div id="lab-detail"><p class="muted">Click a token for its features.</p></div>
<div id="lab-summary"></div></div>
<h2>Steer</h2>
<p>Clamp the shaded feature at <input id="lab-mult" type="number" step="0.5" value="4"> x its maximum activation
<button id="lab-add">add clamp</button> (at every position: the SAE's error term is kept, so nothing else changes).</p>
<ol class="tl" id="lab-clamps"></ol>
<p>Generate <input id="lab-n" type="number" min="1" max="256" value="40"> tokens, temperature
<input id="lab-temp" type="number" step="0.1" min="0" value="0.8">, top-k <input id="lab-topk" type="number" min="0" value="50">,
seed <input id="lab-seed" type="number" value="0"> <button id="lab-go">generate</button></p>
<div id="lab-gen"></div>
</div>"""
    return html
