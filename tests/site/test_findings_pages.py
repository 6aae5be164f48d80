"""The findings in the site: the Findings page, family pages linked to parents and children,
the feature pages' new sections, and a site without findings left as it was. The findings
folder is synthetic (`write_findings`), with planted parents and children; the analysis is
a real one of a small random run."""

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
from monofast.common.errors import DataError
from monofast.run import report
from monofast.run.stages import RunDir
from monofast.site import build as site_build
from monofast.site.build import build
from monofast.site.config import SiteConfig

CFG = AnalysisConfig(tokens=4_000, batch_contexts=16, top_k=4, window_radius=4, quantile_bins=3,
                     quantile_samples=2, dtype="float32", device="cpu")
SOURCES = ["verse", "code"]
BINS = 6
THRESHOLD = 0.5
TWIN_FEATURES = 40
PLANTED = {  # (member, feature) -> its children in the next larger member, with their cosines
    ("w24", 3): {5: 0.91, 7: 0.82},
    ("w48", 5): {10: 0.87, 11: 0.66},
}
SCRIPT = "<script>alert('clamped')</script>"


def write_findings(folder: Path, n_features: int, n_neurons: int, widths: tuple[int, ...] = (24, 48, 96),
                   main: int = 48, steering: dict | None = None, seed: int = 0) -> Path:
    """A findings/ folder as `monofast findings` writes it: SAEs of `widths` (the run's own
    of width `main`), with the PLANTED parents and children and random weak links elsewhere."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    order = [f"w{w}" for w in widths]
    fam: dict[str, np.ndarray] = {"order": np.array(order), "threshold": np.asarray(THRESHOLD)}
    for name, width in zip(order, widths):
        fam[f"{name}_purity"] = rng.uniform(0.5, 1.0, width).astype(np.float32)
        fam[f"{name}_dominant"] = rng.integers(0, 2, width).astype(np.int16)
        fam[f"{name}_dominant"][-1] = -1  # a dead feature
        fam[f"{name}_density"] = rng.uniform(0, 0.1, width).astype(np.float32)
        fam[f"{name}_top_tokens"] = rng.integers(0, 200, (width, 5)).astype(np.int32)
        fam[f"{name}_top_tokens"][-1] = -1
    for small, large in zip(order, order[1:]):
        n_large, n_small = len(fam[f"{large}_purity"]), len(fam[f"{small}_purity"])
        parent = rng.integers(0, n_small, n_large).astype(np.int32)
        cos = rng.uniform(0.05, 0.3, n_large).astype(np.float32)  # below THRESHOLD: no clear parent
        for (member, f), kids in PLANTED.items():
            if member == small:
                for child, c in kids.items():
                    parent[child], cos[child] = f, c
        fam[f"{large}_parent"], fam[f"{large}_parent_cos"] = parent, cos
        fam[f"{large}_parent_corr"] = rng.uniform(-0.2, 0.9, n_large).astype(np.float32)
        kids = [sorted(np.flatnonzero((parent == p) & (cos >= THRESHOLD)), key=lambda j: -cos[j])
                for p in range(n_small)]
        fam[f"{small}_child_ptr"] = np.concatenate([[0], np.cumsum([len(k) for k in kids])]).astype(np.int32)
        fam[f"{small}_child_ids"] = np.array([j for k in kids for j in k], dtype=np.int32)
    width_col = np.concatenate([np.full(w, w) for w in widths[:2]]).astype(np.int32)
    feature_col = np.concatenate([np.arange(w) for w in widths[:2]]).astype(np.int32)
    fam["map_xy"] = rng.normal(size=(len(width_col), 2)).astype(np.float32)
    fam["map_width"], fam["map_feature"] = width_col, feature_col
    fam["map_dominant"] = np.concatenate([fam[f"{n}_dominant"] for n in order[:2]])
    np.savez_compressed(folder / "family.npz", **fam)

    match = rng.integers(0, TWIN_FEATURES, n_features).astype(np.int32)
    corr = rng.uniform(0, 1, n_features).astype(np.float32)
    match[5], corr[5] = 17, 0.8766
    match[6], corr[6] = -1, np.nan
    np.savez_compressed(folder / "universality.npz", feature_match=match, feature_corr=corr,
                        neuron_match=rng.integers(0, n_neurons, n_neurons).astype(np.int32),
                        neuron_corr=rng.uniform(0, 1, n_neurons).astype(np.float32),
                        twin_dominant=np.arange(TWIN_FEATURES, dtype=np.int16) % 2,
                        twin_purity=np.full(TWIN_FEATURES, 0.935, np.float32),
                        twin_top_tokens=rng.integers(0, 200, (TWIN_FEATURES, 5)).astype(np.int32))

    levels = rng.integers(0, 50, (n_features, BINS, 2)).astype(np.int32)
    levels[0] = 0  # a feature that never fired
    np.savez_compressed(folder / "specificity.npz", feature_levels=levels,
                        neuron_levels=rng.integers(0, 50, (n_neurons, BINS, 2)).astype(np.int32),
                        feature_specificity=rng.uniform(0.5, 1, n_features).astype(np.float32),
                        feature_sensitivity=rng.uniform(0, 1, n_features).astype(np.float32),
                        neuron_specificity=rng.uniform(0.5, 1, n_neurons).astype(np.float32),
                        neuron_sensitivity=rng.uniform(0, 1, n_neurons).astype(np.float32),
                        feature_max=rng.uniform(1, 3, n_features).astype(np.float32),
                        neuron_max=rng.uniform(0.1, 1, n_neurons).astype(np.float32),
                        tokens_by_source=np.array([2000, 2000]))

    if steering is None:
        example = {"prompt": "def f(x):\n    return x", "clean": " + 1  # clean & plain",
                   "clamped": f" thou art {SCRIPT}"}
        steering = {
            "classifier": {"val_accuracy": 0.987, "val_accuracy_by_source": {"verse": 0.99, "code": 0.984},
                           "val_logprob_by_source": {"verse": -3.871, "code": -3.733}},
            "features": [{"feature": 5, "source": "verse", "purity": 0.97, "multiple": 4.0, "clamp": 7.25,
                          "prompt_sources": {"code": 8}, "share_clean": 0.125, "share_clamped": 0.875,
                          "logprob_clean": -3.456, "logprob_clamped": -6.601,
                          "examples": [example, {"prompt": "x = 1", "clean": "\ny = 2", "clamped": " o sweet love"}]},
                         {"feature": 9, "source": "code"}],  # an entry with few keys
            "baseline": {"share_clean": 0.125, "by_source": {"verse": 0.125}},
            "steered": {"median": 0.875, "min": 0.5, "max": 1.0, "mean": 0.8},
            "logprob": {"clean": -3.605, "clamped": -6.109},
            "null": {"features": [{"feature": 2, "source": "verse", "purity": 0.4, "clamp": 3.0,
                                   "share_clean": 0.125, "share_clamped": 0.25}],
                     "steered": {"median": 0.25, "min": 0.25, "max": 0.25, "mean": 0.25}, "logprob_clamped": -4.321},
        }
    (folder / "steering.json").write_text(json.dumps(steering))

    members = [{"name": n, "width": w, "main": w == main, "alive": w - 1, "pure_fraction": 0.3125,
                "pure_by_source": {"verse": 0.25, "code": 0.0625}, "mean_purity": 0.75} for n, w in zip(order, widths)]
    quality = [{"name": n, "width": w, "main": w == main, "l0": 17.5, "fvu": 0.123, "dead_fraction": 0.0,
                "ce_loss_recovered": 0.9, "ce_loss_recovered_by_source": {"verse": 0.91, "code": 0.89},
                "l1_coeff": 5.0, "meets_goal": w != 96, "misses": [] if w != 96 else ["L0 63.4 outside 5-50"]}
               for n, w in zip(order, widths)]
    pairs = [{"small": s, "large": g, "clear_parent_share": 0.4321, "median_parent_cos": 0.6789,
              "median_parent_corr_clear": 0.5432, "parents_with_children": 3, "parents_with_children_share": 0.125,
              "children_mean": 1.75, "children_median": 2.0, "split_share": 0.6667,
              "cos_histogram": rng.integers(0, 9, 20).tolist()} for s, g in zip(order, order[1:])]
    corr_edges = np.round(np.linspace(-0.1, 1.0, 23), 3).tolist()
    match_numbers = {"units": n_features, "compared": n_features, "median": 0.6543, "histogram": [2] * 22,
                     "above_0.5": 0.8123, "above_0.7": 0.4567, "above_0.9": 0.0312, "same_source_above_0.7": 0.9412}
    neuron_numbers = {**match_numbers, "units": n_neurons, "compared": n_neurons, "median": 0.2109,
                      "above_0.7": 0.0234, "same_source_above_0.7": None}
    unit_numbers = {"units": n_features, "pure": 7, "specificity_high_median": 0.8766,
                    "specificity_high_median_pure": 0.9876, "sensitivity_median": 0.3456,
                    "sensitivity_median_pure": 0.4567, "share_by_level_mean": [0.5, 0.6, 0.7, 0.8, 0.9, None]}
    numbers = {
        "format": 1, "sources": SOURCES, "tokens": 4000, "layer": 1,
        "family": {"decided_by": "decoder cosine (weights only)", "threshold": THRESHOLD,
                   "threshold_rule": "the valley of the best-match histogram", "threshold_valley": 0.4987,
                   "threshold_null_p999": 0.3141, "cos_edges": np.linspace(0, 1, 21).round(3).tolist(),
                   "widths": members, "pairs": pairs, "quality": quality},
        "universality": {"tokens": 4000, "measure": "Pearson correlation of activations over the same tokens",
                         "edges": corr_edges, "features": match_numbers, "neurons": neuron_numbers},
        "specificity": {"bins": BINS, "tokens_by_source": {"verse": 2000, "code": 2000}, "pure_share": 0.9,
                        "features": unit_numbers, "neurons": {**unit_numbers, "units": n_neurons, "pure": 2}},
        "steering": {k: v for k, v in steering.items() if k != "features"},
        "map": {"method": "nearest-neighbour graph layout (UMAP-style)", "points": int(len(width_col))},
    }
    (folder / "findings.json").write_text(json.dumps(numbers))
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "stage": "findings", "outputs": {}}))
    return folder


class Page(html.parser.HTMLParser):
    """Tags, links (to pages, the stylesheet and scripts), the stacked bars of the charts and
    the text of the steering cells."""

    def __init__(self, path: Path):
        super().__init__(convert_charrefs=True)
        self.path, self.tags, self.links, self.stacks, self.cells = path, set(), [], 0, []
        self._cell = False
        self.text = path.read_text(encoding="utf-8")
        self.feed(self.text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag in ("a", "link") and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "script" and attrs.get("src"):
            self.links.append(attrs["src"])
        if tag == "g" and attrs.get("class") == "stack":
            self.stacks += 1
        if attrs.get("class") == "gen":
            self._cell = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag == "div":
            self._cell = False

    def handle_data(self, data):
        if self._cell:
            self.cells[-1] += data

    def resolves(self) -> list[str]:
        """Links to files of the site that do not exist."""
        missing = []
        for href in self.links:
            target = href.split("#")[0]
            if target and not (self.path.parent / target).resolve().is_file():
                missing.append(href)
        return missing


TAGS = {"html", "head", "meta", "title", "link", "body", "nav", "a", "span", "h1", "h2", "h3", "table", "tr", "th",
        "td", "p", "div", "i", "ol", "ul", "li", "code", "b", "svg", "rect", "text", "line", "polyline", "g",
        "circle", "script", "input", "label"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with analysis/ and a synthetic findings/, and its site."""
    root = tmp_path_factory.mktemp("findings_run")
    paths = make_run(root)
    analyze(CFG, paths["data"], paths["gpt"], paths["sae"], paths["analysis"])
    analysis = output.load(paths["analysis"])
    n_features, n_neurons = len(analysis.features["density"]), len(analysis.neurons["density"])
    assert n_features == 48
    write_findings(root / "findings", n_features, n_neurons)
    build(SiteConfig(title="findings <test>"), paths["analysis"], root / "site", None, root / "findings")
    return root


def test_findings_page_is_linked_from_the_index_and_shows_the_numbers(run):
    site = run / "site"
    index = Page(site / "index.html")
    assert "findings.html" in index.links
    page = Page(site / "findings.html")
    assert page.tags <= TAGS, page.tags - TAGS
    text = page.text
    for shown in ("43.2%", "0.679", "0.543", "66.7%", "1.75 / 2", "threshold 0.50", "0.499", "0.314",
                  "the valley of the best-match histogram", "L0 63.4 outside 5-50", "meets", "17.5",
                  "0.654", "0.211", "81.2%", "45.7%", "2.3%", "94.1%", "87.7%", "98.8%", "34.6%",
                  "98.7%", "nearest-neighbour graph layout (UMAP-style)", "findings &lt;test&gt;",
                  "clean -3.6, clamped -6.11, control clamped -4.32", "verse -3.87, code -3.73", "-6.6"):
        assert shown in text, shown
    assert "far more universal than neurons" in text and "Here features are more universal than neurons." in text
    assert text.count("<circle") >= 24 + 48  # every point of the map (and the legends)
    assert 'href="family/w24/3.html"' in text and 'href="features/5.html"' in text
    assert 'href="features/5.html#steering"' in text and 'href="features/2.html"' in text  # steered and control
    assert not page.resolves(), page.resolves()


def test_family_pages_exist_for_the_other_members_and_link_the_planted_family(run):
    site = run / "site"
    assert sorted(p.name for p in (site / "family").iterdir()) == ["w24", "w96"]  # not the run's own w48
    for member, width in (("w24", 24), ("w96", 96)):
        assert sorted(int(p.stem) for p in (site / "family" / member).iterdir()) == list(range(width))
    parent = Page(site / "family" / "w24" / "3.html")
    assert parent.tags <= TAGS, parent.tags - TAGS
    assert "../../features/5.html" in parent.links and "../../features/7.html" in parent.links
    assert parent.text.index("../../features/5.html") < parent.text.index("../../features/7.html")  # most similar first
    assert "../../family/w96/10.html" in parent.links and "../../family/w96/11.html" in parent.links  # grandchildren
    assert "cos 0.91" in parent.text and "cos 0.82" in parent.text
    child = Page(site / "family" / "w96" / "10.html")
    assert "../../features/5.html" in child.links and "../../family/w24/3.html" in child.links  # its ancestors
    assert "cos 0.87" in child.text
    lonely = Page(site / "family" / "w24" / "4.html")
    assert "none (no feature of w48 has it as a clear parent)" in lonely.text
    weak = Page(site / "family" / "w96" / "0.html")
    assert "not a clear parent" in weak.text
    for member, count in (("w24", 24), ("w96", 96)):
        for f in range(count):
            page = Page(site / "family" / member / f"{f}.html")
            assert not page.resolves(), (member, f, page.resolves())


def test_feature_pages_show_family_match_specificity(run):
    site = run / "site"
    page = Page(site / "features" / "5.html")
    assert "../family/w24/3.html" in page.links  # its parent
    assert "../family/w96/10.html" in page.links and "../family/w96/11.html" in page.links  # its children
    assert "#tree" in page.links and 'id="tree"' in page.text
    assert "feature 17</b> of model B" in page.text and "0.877" in page.text and "93.5%" in page.text
    assert page.stacks == BINS  # one stack of bars per activation bin
    assert "Sensitivity" in page.text
    assert "No match" in Page(site / "features" / "6.html").text
    assert "Never fired on the findings" in Page(site / "features" / "0.html").text
    for f in range(48):
        other = Page(site / "features" / f"{f}.html")
        assert other.tags <= TAGS, other.tags - TAGS
        assert not other.resolves(), (f, other.resolves())


def test_steered_features_show_clean_and_clamped_text_escaped(run):
    site = run / "site"
    page = Page(site / "features" / "5.html")
    assert SCRIPT not in page.text and "&lt;script&gt;alert(&#x27;clamped&#x27;)&lt;/script&gt;" in page.text
    assert page.text.count("<script") == 1  # feature.js
    assert len(page.cells) == 6  # two examples: prompt, clean, clamped
    assert page.cells[2] == f" thou art {SCRIPT}" and page.cells[1] == " + 1  # clean & plain"
    assert "12.5%" in page.text and "87.5%" in page.text and "7.25" in page.text
    assert "-3.46 clean, -6.6 clamped" in page.text
    sparse = Page(site / "features" / "9.html")  # an entry with only its id and source
    assert 'id="steering"' in sparse.text and not sparse.cells
    assert 'id="steering"' not in Page(site / "features" / "4.html").text


def test_a_stub_steering_file_and_other_members_render(run, tmp_path):
    analysis = run / "analysis"
    found = write_findings(tmp_path / "findings", 48, 128, widths=(48, 96, 192),
                           steering={"skipped": "steer_features=0", "features": []})
    build(SiteConfig(), analysis, tmp_path / "site", None, found)
    text = (tmp_path / "site" / "findings.html").read_text(encoding="utf-8")
    assert "Steering was not run: steer_features=0." in text
    assert sorted(p.name for p in (tmp_path / "site" / "family").iterdir()) == ["w192", "w96"]
    assert 'id="steering"' not in (tmp_path / "site" / "features" / "5.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("steering", [
    {"features": [{"feature": 5, "examples": 3, "share_clean": "x", "prompt_sources": [1]}, "junk", {"feature": "7"},
                  {"feature": True}], "null": [], "steered": 3, "classifier": "no", "baseline": None},
    {"features": {"5": {}}, "null": {"features": "none"}},
    {},
], ids=["odd-types", "odd-containers", "empty"])
def test_steering_files_of_any_shape_render(run, tmp_path, steering):
    found = write_findings(tmp_path / "findings", 48, 128, steering=steering)
    build(SiteConfig(max_pages=8), run / "analysis", tmp_path / "site", None, found)
    assert 'id="steering"' in (tmp_path / "site" / "findings.html").read_text(encoding="utf-8")
    steered = 'id="steering"' in (tmp_path / "site" / "features" / "5.html").read_text(encoding="utf-8")
    assert steered == (steering.get("classifier") == "no")
    assert 'id="steering"' not in (tmp_path / "site" / "features" / "1.html").read_text(encoding="utf-8")


def test_the_site_without_findings_is_unchanged(run, tmp_path):
    analysis = run / "analysis"
    build(SiteConfig(max_pages=6), analysis, tmp_path / "plain")
    (tmp_path / "unfinished").mkdir()  # a findings stage still running: no manifest
    build(SiteConfig(max_pages=6), analysis, tmp_path / "again", None, tmp_path / "unfinished")
    for name in ["index.html", "features.js"] + [f"features/{f}.html" for f in range(6)]:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    assert "findings" not in (tmp_path / "plain" / "index.html").read_text(encoding="utf-8")
    assert not (tmp_path / "plain" / "findings.html").exists() and not (tmp_path / "plain" / "family").exists()
    build(SiteConfig(max_pages=6), analysis, tmp_path / "again", None, run / "findings")
    assert (tmp_path / "again" / "findings.html").is_file()
    assert sorted(p.name for p in (tmp_path / "again" / "family" / "w96").iterdir()) == [f"{f}.html" for f in range(6)]
    build(SiteConfig(max_pages=6), analysis, tmp_path / "again")  # the findings gone: so are their pages
    assert not (tmp_path / "again" / "findings.html").exists() and not (tmp_path / "again" / "family").exists()
    assert (tmp_path / "again" / "index.html").read_bytes() == (tmp_path / "plain" / "index.html").read_bytes()


def test_findings_of_another_sae_are_refused(run, tmp_path):
    found = write_findings(tmp_path / "findings", 40, 128, widths=(20, 40, 80), main=40)
    with pytest.raises(DataError, match="40 features but the analysis 48"):
        build(SiteConfig(max_pages=2), run / "analysis", tmp_path / "site", None, found)


def test_the_pipeline_stage_shows_findings_when_the_stage_finished(run, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    shutil.copytree(run / "analysis", root / "analysis")
    (root / "analysis" / "manifest.json").write_text(json.dumps({"format": 1, "outputs": {}}))
    (root / "findings").symlink_to(run / "findings")
    site_build.run_stage(SiteConfig(max_pages=2), RunDir(root))
    assert (root / "site" / "findings.html").is_file() and (root / "site" / "family" / "w24" / "1.html").is_file()


def test_worker_processes_render_the_findings_as_the_serial_build(run, tmp_path, monkeypatch):
    monkeypatch.setattr(site_build, "workers_for", lambda count: 1)
    build(SiteConfig(max_pages=12), run / "analysis", tmp_path / "serial", None, run / "findings")
    monkeypatch.setattr(site_build, "workers_for", lambda count: 2)
    monkeypatch.setattr(site_build, "PAGES_PER_TASK", 5)
    build(SiteConfig(max_pages=12), run / "analysis", tmp_path / "parallel", None, run / "findings")
    serial = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*.html"))
    assert len(serial) == 12 + 12 + 12 + 2  # features, family/w24, family/w96, index and findings
    for name in serial:
        assert (tmp_path / "parallel" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name


@pytest.mark.slow
def test_findings_and_family_pages_load_in_a_headless_browser(run):
    browser = report.find_browser()
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--dump-dom"]
    site = run / "site"
    for path, expect in ((site / "findings.html", r'<svg class="map"'),
                         (site / "family" / "w24" / "3.html", r'class="tree"'),
                         (site / "features" / "5.html", r'class="stack"')):
        shown = subprocess.run(args + [path.as_uri()], capture_output=True, text=True, timeout=120)
        assert re.search(expect, shown.stdout), path
        errors = [line for line in shown.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
        assert not errors, (path, errors)
