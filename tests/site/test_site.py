"""The feature browser: correct text (escaped, whole-window UTF-8), complete files, working
navigation, and an index that works from file:// (checked in headless Chromium when present)."""

from __future__ import annotations

import html.parser
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import make_run
from monofast.analysis import output
from monofast.analysis.config import AnalysisConfig
from monofast.analysis.run import analyze
from monofast.run import report
from monofast.run.manifest import run_stage
from monofast.run.resolve import resolve_config
from monofast.run.stages import RunDir, Stage
from monofast.site import pages
from monofast.site.build import build
from monofast.site.config import SiteConfig
from monofast.site.text import Vocab, decode_window, display

PIECES = [b"caf", b"\xc3", b"\xa9 ", b"\xe6\x97", b"\xa5\xe6\x9c\xac", b" \xf0\x9f", b"\x98\x80",
          b"<tag a=", b"\"1\" b='2'>", b" & ", b"x\n", b"\ty", b"<|endoftext|>"]
EOT = len(PIECES) - 1


def fake_vocab() -> Vocab:
    return Vocab({"bytes": [p.hex() for p in PIECES], "special": [EOT], "special_text": {str(EOT): "<|endoftext|>"}})


def test_windows_decode_multibyte_characters_split_across_tokens():
    vocab = fake_vocab()
    tokens = list(range(EOT))
    groups = decode_window(vocab, tokens)
    assert "".join(g.text for g in groups) == b"".join(PIECES[:EOT]).decode("utf-8")
    by_text = {g.text: g.members for g in groups}
    assert by_text["é "] == (1, 2)  # "é" is split over tokens 1 and 2: one group, both members
    assert by_text["日本"] == (3, 4)
    assert by_text["😀"] == (6,) and by_text[" "] == (5,)  # the space completes on its own
    assert all(g.members for g in groups)


def test_windows_survive_broken_utf8_and_edges():
    vocab = fake_vocab()
    groups = decode_window(vocab, [-1, 4, 0, 3, EOT, 0, -1])  # starts mid-character, ends mid-character
    text = "".join(g.text for g in groups)
    assert text.startswith("\ufffd") and "<|endoftext|>" in text
    assert [g.special for g in groups].count(True) == 1
    assert all(0 < m < 6 for g in groups for m in g.members)


def test_window_groups_spell_what_a_plain_incremental_decode_gives():
    """The shortcut for tokens that are whole characters never changes the text, whatever
    broken or split sequences come before or after them."""
    import codecs

    pieces = [b"a\xe2\x82", b"x", b"\xac", b"\xe2\x82\xac", b"hi", b"\xf0\x9f", b"\x98\x80", b"\xff", b"\n<"]
    vocab = Vocab({"bytes": [p.hex() for p in pieces]})
    rng = np.random.default_rng(3)
    for _ in range(3000):
        tokens = rng.integers(0, len(pieces), rng.integers(1, 9)).tolist()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        plain = "".join(decoder.decode(pieces[t]) for t in tokens) + decoder.decode(b"", final=True)
        groups = decode_window(vocab, tokens)
        assert "".join(g.text for g in groups) == plain, tokens
        assert sorted(m for g in groups for m in g.members) == list(range(len(tokens)))


def test_window_html_is_escaped_and_shows_whitespace():
    vocab = fake_vocab()
    tokens = np.array([7, 8, 9, 10, 11, EOT, 0], dtype=np.int32)
    acts = np.array([0.5, 0.0, 1.0, np.nan, 0.25, 0.0, 2.0], dtype=np.float32)
    effects = np.array([-0.1, np.nan, 0.2, np.nan, np.nan, np.nan, np.nan], dtype=np.float32)
    out = pages.window(vocab, tokens, acts, effects, centre=2, scale=2.0)
    assert "<tag" not in out and "&lt;tag a=" in out
    assert "&quot;1&quot; b=&#x27;2&#x27;&gt;" in out and " &amp; " in out
    assert "⏎</span>\n" in out and "⇥</span>\t" in out
    assert "&lt;|endoftext|&gt;" in out
    assert 'class="pk" style="--a:0.50" title="act 1, Δlog p(next) 0.2"' in out
    assert display("a<b>\n") == 'a&lt;b&gt;<span class="ws">⏎</span>\n'


def test_token_labels_show_partial_bytes_and_whitespace():
    vocab = fake_vocab()
    assert vocab.label(1) == "\\xc3"
    assert vocab.label(10) == "x⏎" and vocab.label(11) == "⇥y" and vocab.label(9) == "·&·"
    assert vocab.label(EOT) == "<|endoftext|>"


# ---------------------------------------------------------------------------------------
# A whole site

CFG = AnalysisConfig(tokens=4_000, batch_contexts=16, top_k=4, window_radius=4, quantile_bins=3,
                     quantile_samples=2, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site_run")
    paths = make_run(root)
    analyze(CFG, paths["data"], paths["gpt"], paths["sae"], paths["analysis"])
    records = [{"step": s, "rows": 2048 * s, "lr": 1e-3,
                "saes": {name: {"mse": scale / (s + 1), "l0": 40 - s, "dead": 0} for name, scale in (("l1_3", 1.0),
                                                                                                   ("l1_10", 2.0))}}
               for s in range(5, 55, 5)]
    (paths["sae"] / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"step": 55, "ms\n',  # a line cut short by a kill
        encoding="utf-8")
    (paths["sae"] / "eval.json").write_text(json.dumps({"rows": 4096, "saes": {
        "l1_3": {"mse": 0.1, "l0": 12.5, "ce_loss_recovered": 0.91,
                 "ce_loss_recovered_by_source": {"verse": 0.93, "code": 0.89},
                 "log10_density_histogram": {"edges": [-3, -2], "counts": [4]}},
        "l1_10": {"mse": 0.2, "l0": 4.0}}}))
    index = build(SiteConfig(title="test <site> & co"), paths["analysis"], root / "site", paths["sae"])
    return root / "site", index, output.load(paths["analysis"])


ALLOWED_TAGS = {"html", "head", "meta", "title", "link", "body", "nav", "a", "span", "h1", "h2", "h3", "table",
                "tr", "th", "td", "p", "div", "i", "ol", "li", "code", "svg", "rect", "text", "line", "polyline",
                "script", "form", "label", "input", "select", "option", "thead", "tbody", "button", "noscript"}


class Collector(html.parser.HTMLParser):
    """Tags, links, and the text of each example window (.tx)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.links, self.windows = set(), [], []
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "a":
            self.links.append((attrs.get("rel"), attrs.get("href")))
        if self._depth:
            self._depth += 1
        elif attrs.get("class") == "tx":
            self._depth = 1
            self.windows.append("")

    def handle_endtag(self, tag):
        if self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._depth:
            self.windows[-1] += data


def parse(path: Path) -> Collector:
    c = Collector()
    c.feed(path.read_text(encoding="utf-8"))
    return c


def test_every_file_exists_and_every_page_links_prev_and_next(site):
    folder, index, analysis = site
    n = len(analysis.features["density"])
    assert index == folder / "index.html" and index.is_file()
    for name in ("features.js", "assets/style.css", "assets/index.js", "assets/feature.js"):
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in (folder / "features").iterdir()) == sorted(f"{f}.html" for f in range(n))
    assert not list(folder.glob(".features.*"))
    for f in range(n):
        links = parse(folder / "features" / f"{f}.html").links
        rels = {rel: href for rel, href in links if rel}
        assert rels.get("prev") == (f"{f - 1}.html" if f > 0 else None)
        assert rels.get("next") == (f"{f + 1}.html" if f < n - 1 else None)
        assert (None, "../index.html") in links
        for _, href in links:
            assert (folder / "features" / href).resolve().is_file(), href


def test_pages_are_well_formed_and_their_text_is_the_decoded_tokens(site):
    folder, _, analysis = site
    vocab = Vocab(analysis.tokens)
    ex = analysis.examples
    checked = 0
    for f in np.flatnonzero(analysis.features["fires"] >= CFG.top_k)[:8]:
        page = parse(folder / "features" / f"{f}.html")
        assert page.tags <= ALLOWED_TAGS, page.tags - ALLOWED_TAGS
        for j, shown in enumerate(page.windows[:CFG.top_k]):
            tokens = [int(t) for t in ex["top_tokens"][f, j] if t >= 0]
            expected = "".join(g.text for g in decode_window(vocab, tokens))
            assert shown.replace("⏎", "").replace("⇥", "") == expected
            checked += 1
    assert checked >= 8
    text = (folder / "features" / f"{f}.html").read_text(encoding="utf-8")
    assert "title=\"act " in text and "<i " in text


def test_code_text_is_escaped_on_the_pages(site):
    folder, _, _ = site
    pages_text = "".join(p.read_text(encoding="utf-8") for p in (folder / "features").glob("*.html"))
    assert "&lt;" in pages_text  # the code source is full of `x * y + 1 < 2 and 'ok'`
    assert "&#x27;ok&#x27;" in pages_text or "&#x27;" in pages_text
    assert "café" in pages_text or "ñame" in pages_text  # the verse source's accents, decoded whole


def test_index_data_and_figures(site):
    folder, index, analysis = site
    script = (folder / "features.js").read_text(encoding="utf-8")
    assert script.startswith("window.MONOFAST_INDEX = ") and "<" not in script and "&" not in script
    payload = json.loads(script[len("window.MONOFAST_INDEX = "):].rstrip().rstrip(";"))
    assert len(payload["rows"]) == len(analysis.features["density"])
    assert payload["sources"] == ["verse", "code"]
    page = index.read_text(encoding="utf-8")
    assert "test &lt;site&gt; &amp; co" in page
    assert page.count("<svg") >= 5  # density, purity and three training curves (mse, l0, dead)
    assert "SAE training: mse" in page and "l1_10" in page
    assert "ce_loss_recovered_by_source" in page and "verse 0.93, code 0.89" in page
    assert "log10_density_histogram" not in page
    assert "The trade-off across the sweep" in page and "CE-loss recovered against L0" in page
    assert "FVU (variance unexplained) against L0" not in page  # no member has an FVU here
    assert "l1_3: L0 12.5, CE-loss recovered on verse 0.93" in page and "published (l1_3)" in page  # the first member
    assert 'src="features.js"' in page and "fetch(" not in (folder / "assets" / "index.js").read_text()


def test_rebuilding_replaces_the_pages(site, tmp_path):
    folder, _, _ = site
    analysis_dir = folder.parent / "analysis"
    out = tmp_path / "site"
    build(SiteConfig(max_pages=3), analysis_dir, out)
    assert sorted(p.name for p in (out / "features").iterdir()) == ["0.html", "1.html", "2.html"]
    build(SiteConfig(max_pages=2), analysis_dir, out)
    assert sorted(p.name for p in (out / "features").iterdir()) == ["0.html", "1.html"]


def test_pages_rendered_by_worker_processes_equal_the_serial_ones(site, tmp_path, monkeypatch):
    from monofast.site import build as site_build

    folder, _, _ = site
    analysis_dir = folder.parent / "analysis"
    monkeypatch.setattr(site_build, "workers_for", lambda count: 1)
    build(SiteConfig(max_pages=20), analysis_dir, tmp_path / "serial")
    monkeypatch.setattr(site_build, "workers_for", lambda count: 2)
    monkeypatch.setattr(site_build, "PAGES_PER_TASK", 3)
    build(SiteConfig(max_pages=20), analysis_dir, tmp_path / "parallel")
    serial = sorted((tmp_path / "serial" / "features").iterdir())
    assert len(serial) == 20
    for page in serial:
        assert (tmp_path / "parallel" / "features" / page.name).read_bytes() == page.read_bytes(), page.name


@pytest.fixture
def headless() -> list[str]:
    """The command line of a headless Chromium, or a skip where none is installed."""
    browser = report.find_browser()
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    return [browser, "--headless", "--no-sandbox", "--disable-gpu"]


@pytest.mark.slow
def test_index_renders_in_a_headless_browser_from_file_urls(site, tmp_path, headless):
    folder, index, analysis = site
    args = headless + ["--enable-logging=stderr", "--v=0"]
    run = subprocess.run(args + ["--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120)
    rows = re.findall(r'<tr><td><a href="features/(\d+)\.html">', run.stdout)
    alive = int((analysis.features["density"] > 0).sum())
    assert len(rows) == alive  # dead features are hidden until "show dead" is ticked
    densities = [analysis.features["density"][int(r)] for r in rows]
    assert densities == sorted(densities, reverse=True)  # sorted by density, descending
    assert "Uncaught" not in run.stderr, run.stderr[-2000:]
    feature = folder / "features" / f"{rows[0]}.html"
    shot = tmp_path / "feature.png"
    subprocess.run(args + ["--window-size=1200,1600", f"--screenshot={shot}", feature.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


@pytest.mark.slow
def test_an_index_of_4096_features_renders(site, tmp_path, headless):
    """Every row of a paper-sized index, escaped, sorted by density. The page reports its
    render time (`data-ms`); how fast it is belongs to a benchmark, not to this test."""
    folder, _, _ = site
    shutil.copytree(folder / "assets", tmp_path / "assets")
    shutil.copy(folder / "index.html", tmp_path / "index.html")
    rng = np.random.default_rng(0)
    rows = [[f, float(10 ** rng.uniform(-6, -1)), float(rng.uniform(0, 9)), 1.0, int(rng.integers(0, 2)),
             float(rng.uniform(0.5, 1)), -0.01, "·def ⏎ <x> & 'q'"] for f in range(4096)]
    payload = {"sources": ["verse", "code"], "pure": 0.9, "ultralow": 1e-5, "columns": [], "rows": rows}
    (tmp_path / "features.js").write_text("window.MONOFAST_INDEX = " + json.dumps(payload) + ";")
    run = subprocess.run(headless + ["--dump-dom", (tmp_path / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert re.search(r'data-ms="[\d.]+"', run.stdout)  # the render finished and timed itself
    shown = [int(f) for f in re.findall(r'<tr><td><a href="features/(\d+)\.html">', run.stdout)]
    densities = [rows[f][1] for f in shown]
    assert len(shown) == 4096 and densities == sorted(densities, reverse=True)
    assert run.stdout.count("&lt;x&gt; &amp; 'q'") == 4096


# ---------------------------------------------------------------------------------------
# Through the pipeline, as the stages are registered

ANALYSIS = Stage("analysis", "monofast.analysis.config:AnalysisConfig", "monofast.analysis.run:run_stage",
                          ("data", "gpt", "sae"), "feature statistics, examples and effects")
SITE = Stage("site", "monofast.site.config:SiteConfig", "monofast.site.build:run_stage",
                      ("sae", "analysis"), "static feature browser")


def test_analysis_and_site_run_as_pipeline_stages(tmp_path):
    make_run(tmp_path)
    for name in ("data", "gpt", "sae"):  # stand-ins for the manifests of the earlier stages
        (tmp_path / name / "manifest.json").write_text(json.dumps({"format": 1, "outputs": {}}))
    run = RunDir(tmp_path)
    cfg = resolve_config(ANALYSIS, "smoke", {"device": "cpu"})
    assert cfg.tokens == 4096  # the smoke preset's value
    assert run_stage(ANALYSIS, cfg, run)
    assert not run_stage(ANALYSIS, cfg, run)  # up to date: skipped
    assert run_stage(SITE, resolve_config(SITE, "smoke"), run)
    assert (tmp_path / "site" / "index.html").is_file()
    manifest = json.loads((tmp_path / "site" / "manifest.json").read_text())
    assert "features/0.html" in manifest["outputs"] and "index.html" in manifest["outputs"]
