"""Stage 6 driver: `monofast site` turns analysis/ into site/, a static feature browser.

    site/index.html            summary, figures, and the sortable, filterable feature table
    site/features.js           the table's rows (a script, so file:// needs no server)
    site/features/<id>.html    one page per feature, with prev / next links
    site/assets/               style.css, index.js, feature.js

The feature pages are written into a temporary folder that replaces features/ only when
complete, and index.html is written last, so a killed build never leaves a site whose
index points at missing pages.
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
from typing import Any, Optional

from monofast.analysis import output
from monofast.common import files
from monofast.common.log import logger, progress
from monofast.site import pages
from monofast.site.config import SiteConfig
from monofast.site.text import Vocab

ASSET_FILES = ("style.css", "index.js", "feature.js")


def run_stage(cfg: SiteConfig, run: Any) -> None:
    """Pipeline entry point: analysis/ (and sae/'s training metrics, if any) into site/."""
    sae_dir = run.stage("sae")
    build(cfg, run.require("analysis"), run.stage("site"), sae_dir if sae_dir.is_dir() else None)


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
"""Feature pages one worker renders per task (a progress-bar tick)."""
MIN_PAGES_PER_WORKER = 256
"""Fewer pages than this per worker are not worth a process start."""

_worker_data: Optional[pages.SiteData] = None
"""The site data of a worker process (loaded once, by `_start_worker`)."""


def _site_data(title: str, analysis: output.Analysis) -> pages.SiteData:
    return pages.SiteData(title, analysis.summary, analysis.features, analysis.neurons, analysis.examples,
                          Vocab(analysis.tokens), list(analysis.summary["sources"]))


def _start_worker(title: str, analysis_dir: str) -> None:
    global _worker_data
    _worker_data = _site_data(title, output.load(analysis_dir, verify=False))  # `build` checked them


def _render(folder: str, ids: range) -> int:
    """Worker task: write the pages `ids` into `folder`."""
    assert _worker_data is not None
    for f in ids:
        Path(folder, f"{f}.html").write_text(pages.feature_page(_worker_data, f), encoding="utf-8")
    return len(ids)


def workers_for(count: int) -> int:
    """Processes to render `count` pages with: one per core, each with enough pages to pay
    for its start (a fresh interpreter that loads the analysis files)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, count // MIN_PAGES_PER_WORKER))


def _write_pages(data: pages.SiteData, out: Path, count: int, analysis_dir: Path) -> None:
    """features/ via a temporary sibling folder renamed into place once complete. Pages are
    rendered by worker processes when there are enough of them (spawned, not forked: the
    pipeline's process holds threads and perhaps a GPU context)."""
    tmp = Path(tempfile.mkdtemp(prefix=".features.", suffix=".tmp", dir=out))
    try:
        workers = workers_for(count)
        bar = progress(total=count, desc="site", unit="page")
        if workers == 1:
            for f in range(count):
                (tmp / f"{f}.html").write_text(pages.feature_page(data, f), encoding="utf-8")
                bar.update(1)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                     initargs=(data.title, str(analysis_dir))) as pool:
                tasks = [pool.submit(_render, str(tmp), range(i, min(i + PAGES_PER_TASK, count)))
                         for i in range(0, count, PAGES_PER_TASK)]
                for task in as_completed(tasks):
                    bar.update(task.result())
        bar.close()
        os.chmod(tmp, 0o755)
        final = out / "features"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(cfg: SiteConfig, analysis_dir: str | Path, out: str | Path, sae_dir: Optional[Path] = None) -> Path:
    """Write the site into `out`; returns the path of its index.html."""
    analysis = output.load(analysis_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".features.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    (out / "index.html").unlink(missing_ok=True)
    data = _site_data(cfg.title, analysis)
    n_features = len(analysis.features["density"])
    count = n_features if cfg.max_pages == 0 else min(cfg.max_pages, n_features)
    _copy_assets(out)
    _write_pages(data, out, count, Path(analysis_dir))
    files.write_text(out / "features.js", pages.index_script(data))
    index = out / "index.html"
    files.write_text(index, pages.index_page(data, _metrics(sae_dir), _evaluation(sae_dir)))
    logger.info("site: %d feature pages -> %s", count, index)
    return index
