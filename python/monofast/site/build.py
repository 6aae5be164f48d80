"""Stage 7 driver: `monofast site` turns analysis/ into site/, a static feature browser.

    site/index.html            summary, figures, and the sortable, filterable feature table
    site/features.js           the table's rows (a script, so file:// needs no server)
    site/features/<id>.html    one page per feature, with prev / next links
    site/assets/               style.css, index.js, feature.js

When the run has findings (`<run>/findings/` of a finished `--with findings` run), also

    site/findings.html                the four findings: numbers, figures, links
    site/family/<member>/<id>.html    one page per feature of every other SAE width

and the feature pages gain the findings' sections (`monofast.site.findings_pages`).

The pages are written into a temporary folder whose features/ and family/ replace the
site's only when complete, and index.html is written last, so a killed build never leaves
a site whose index points at missing pages.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple, Optional

from monofast.analysis import output
from monofast.common import files
from monofast.common.log import logger, progress
from monofast.site import findings as site_findings
from monofast.site import findings_page, findings_pages, pages
from monofast.site import lab as site_lab
from monofast.site.config import SiteConfig
from monofast.site.text import Vocab

ASSET_FILES = ("style.css", "index.js", "feature.js")


def run_stage(cfg: SiteConfig, run: Any) -> None:
    """Pipeline entry point: analysis/ (and sae/'s training metrics, and findings/, if
    there) into site/."""
    sae_dir = run.stage("sae")
    lab_inputs = site_lab.inputs(run.stage("data"), run.stage("gpt"), sae_dir) if cfg.lab else None
    build(cfg, run.require("analysis"), run.stage("site"), sae_dir if sae_dir.is_dir() else None,
          run.stage("findings"), lab_inputs)


def _metrics(sae_dir: Optional[Path]) -> list[dict[str, Any]]:
    path = sae_dir / "metrics.jsonl" if sae_dir is not None else None
    if path is None or not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
        if isinstance(record, dict):
            records.append(record)
    return records


def _evaluation(sae_dir: Optional[Path]) -> dict[str, Any]:
    path = sae_dir / "eval.json" if sae_dir is not None else None
    if path is None or not path.is_file():
        return {}
    value = files.read_json(path, "SAE evaluation")
    return value if isinstance(value, dict) else {}


def _copy_assets(out: Path) -> None:
    folder = resources.files("monofast.site") / "assets"
    for name in ASSET_FILES:
        files.write_bytes(out / "assets" / name, (folder / name).read_bytes())


PAGES_PER_TASK = 64
"""Pages one worker renders per task (a progress-bar tick)."""
MIN_PAGES_PER_WORKER = 256
"""Fewer pages than this per worker are not worth a process start."""

_worker_data: Optional[pages.SiteData] = None
"""The site data of a worker process (loaded once, by `_start_worker`)."""


class Part(NamedTuple):
    """A folder of pages: the run's feature pages, or one family member's."""

    folder: str
    """Relative to the site root: `features`, `family/w512`."""
    member: str
    """The family member whose pages these are; empty for the run's own SAE."""
    pages: int
    """Pages 0..pages-1."""


def _site_data(title: str, analysis: output.Analysis, found: Optional[site_findings.Findings] = None,
               has_lab: bool = False) -> pages.SiteData:
    return pages.SiteData(title, analysis.summary, analysis.features, analysis.neurons, analysis.examples,
                          Vocab(analysis.tokens), list(analysis.summary["sources"]), found, has_lab)


def _start_worker(title: str, analysis_dir: str, findings_dir: str, has_lab: bool) -> None:
    global _worker_data
    found = site_findings.load(findings_dir, verify=False) if findings_dir else None  # `build` checked them
    _worker_data = _site_data(title, output.load(analysis_dir, verify=False), found, has_lab)


def render(data: pages.SiteData, member: str, f: int) -> str:
    """Page `f` of the run's SAE (member "") or of another family member."""
    if member:
        return findings_pages.family_page(data, member, f)
    sections = findings_pages.feature_sections(data, f) if data.findings is not None else ()
    return pages.feature_page(data, f, sections)


def _render(folder: str, member: str, ids: range) -> int:
    """Worker task: write the pages `ids` into `folder`."""
    assert _worker_data is not None
    for f in ids:
        Path(folder, f"{f}.html").write_text(render(_worker_data, member, f), encoding="utf-8")
    return len(ids)


def workers_for(count: int) -> int:
    """Processes to render `count` pages with: one per core, each with enough pages to pay
    for its start (a fresh interpreter that loads the analysis files)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, count // MIN_PAGES_PER_WORKER))


def _parts(data: pages.SiteData, cfg: SiteConfig) -> list[Part]:
    """The folders of pages to write; `max_pages` caps each."""
    def capped(n: int) -> int:
        return n if cfg.max_pages == 0 else min(cfg.max_pages, n)

    parts = [Part("features", "", capped(len(data.features["density"])))]
    if data.findings is not None:
        fam = data.findings.family
        parts += [Part(f"family/{m}", m, capped(fam.size(m))) for m in fam.order if m != fam.main]
    return parts


def _write_pages(data: pages.SiteData, out: Path, parts: list[Part], analysis_dir: Path,
                 findings_dir: Optional[Path]) -> None:
    """features/ and family/ via a temporary sibling folder, moved into place once complete.
    Pages are rendered by worker processes when there are enough of them (spawned, not
    forked: the pipeline's process holds threads and perhaps a GPU context)."""
    tmp = Path(tempfile.mkdtemp(prefix=".pages.", suffix=".tmp", dir=out))
    try:
        for part in parts:
            (tmp / part.folder).mkdir(parents=True)
        total = sum(part.pages for part in parts)
        workers = workers_for(total)
        bar = progress(total=total, desc="site", unit="page")
        if workers == 1:
            for part in parts:
                for f in range(part.pages):
                    (tmp / part.folder / f"{f}.html").write_text(render(data, part.member, f), encoding="utf-8")
                    bar.update(1)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                     initargs=(data.title, str(analysis_dir), str(findings_dir or ""),
                                               data.lab)) as pool:
                tasks = [pool.submit(_render, str(tmp / part.folder), part.member,
                                     range(i, min(i + PAGES_PER_TASK, part.pages)))
                         for part in parts for i in range(0, part.pages, PAGES_PER_TASK)]
                for task in as_completed(tasks):
                    bar.update(task.result())
        bar.close()
        for name in ("features", "family"):
            final = out / name
            if final.exists():
                shutil.rmtree(final)
            if (tmp / name).exists():  # made by mkdir: not mkdtemp's private mode
                os.replace(tmp / name, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _size(path: Path) -> str:
    """A file's or a folder's size in kB or MB, for the log."""
    if path.is_file():
        total = path.stat().st_size
    else:
        total = sum(os.stat(os.path.join(folder, name)).st_size for folder, _, names in os.walk(path) for name in names)
    return f"{total / 1e6:.1f} MB" if total >= 1e6 else f"{total / 1e3:.0f} kB"


def build(cfg: SiteConfig, analysis_dir: str | Path, out: str | Path, sae_dir: Optional[Path] = None,
          findings_dir: Optional[Path] = None, lab_inputs: Optional[site_lab.LabInputs] = None) -> Path:
    """Write the site into `out`; returns the path of its index.html. The findings are
    shown when `findings_dir` holds a finished findings stage; the lab is built from
    `lab_inputs` (the run's data, GPT and SAE) when given."""
    analysis = output.load(analysis_dir)
    found = site_findings.load(findings_dir) if findings_dir is not None else None
    if found is not None and findings_dir is not None:
        site_findings.check(found, len(analysis.features["density"]), len(analysis.neurons["density"]), findings_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in (".features.*.tmp", ".pages.*.tmp"):
        for stale in out.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    (out / "index.html").unlink(missing_ok=True)
    data = _site_data(cfg.title, analysis, found, lab_inputs is not None)
    parts = _parts(data, cfg)
    _copy_assets(out)
    _write_pages(data, out, parts, Path(analysis_dir), findings_dir if found is not None else None)
    files.write_text(out / "features.js", pages.index_script(data))
    sizes = [f"features/ {_size(out / 'features')}"]
    if found is not None:
        files.write_text(out / "findings.html", findings_page.findings_page(data))
        sizes += [f"family/ {_size(out / 'family')}", f"findings.html {_size(out / 'findings.html')}"]
    else:
        (out / "findings.html").unlink(missing_ok=True)
    if lab_inputs is not None:
        html = pages.page(f"Lab · {cfg.title}", site_lab.body(cfg.title), 0, site_lab.SCRIPTS)
        sizes += site_lab.write(out, lab_inputs, html)
    else:
        for stale in (out / site_lab.LAB_PAGE, out / "lab", out / "assets" / "lab"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    index = out / "index.html"
    files.write_text(index, pages.index_page(data, _metrics(sae_dir), _evaluation(sae_dir)))
    family_pages = sum(part.pages for part in parts[1:])
    logger.info("site: %d feature pages%s -> %s (%s)", parts[0].pages,
                f", {family_pages} family pages and findings.html" if found is not None else "", index,
                ", ".join(sizes))
    return index
