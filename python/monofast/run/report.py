"""`monofast report RUN --out DIR`: the figures and tables the README shows, from a run.

Writes into DIR:

    results.md               the metrics table and the time of each stage (markdown)
    purity.svg               purity of SAE features against MLP neurons (written by hand:
                             no plotting library)
    pareto-ce.svg            the SAE sweep's trade-off: each member's L0 against its CE-loss
    pareto-fvu.svg           recovered (overall and per source) and against its FVU, the
                             published one ringed (the site's index page shows the same)
    feature-<source>.png     a screenshot of one feature page per source: of the features at
                             least 98% that source (else more than the analysis's pure share),
                             the one that fires most often (headless Chromium; skipped, with a
                             warning, where no Chromium is installed)
    findings.png             with the findings (`monofast run --with findings`): a screenshot
                             of the site's Findings page, its four figures and numbers
    lab-shaded.png           the lab: the last source's showcase feature shaded on its own
                             top example
    lab-steer.png            the lab: a steered feature (with the findings, the most fluent of
                             those that turned half their continuations) clamped on a prompt
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

from monofast.common import files
from monofast.common.errors import DataError, UserError
from monofast.common.log import logger
from monofast.run import results
from monofast.run.stages import run_order

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SHOWCASE_PURITY = 0.98
"""Features this one-sided are shown first: a feature just past 90% often mixes in the other
source's most common tokens."""
SCREEN = (1000, 1400)
"""Screenshot size in CSS pixels: the feature's facts, source share, token lists and the
first top-activation windows."""
LAB_SCREEN = (1100, 1500)
"""The lab: the text, its tokens shaded, the features of the text, the steering controls."""
FINDINGS_SCREEN = (1100, 4200)
"""The whole Findings page: its four figures and tables."""


def write_report(run: Path, out: Path, features: Optional[Sequence[int]] = None) -> list[Path]:
    """Write the report of `run` into `out`; returns the files written. Only finished
    stages are read, each checked against its manifest first (`results.collect`); the
    analysis must be made from the files the run holds now."""
    if not (run / "analysis" / files.MANIFEST_FILE).is_file():
        raise UserError(f"{run} has no finished analysis (no analysis/{files.MANIFEST_FILE}); run "
                        f"`monofast run --run {run}` first")
    res = results.collect(run, required=("analysis",))
    for note in res.missing:
        logger.warning("report: not in results.md: %s", note)
    summary = res.summary or {}  # the analysis has finished: collect read and checked it
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.md", out / "purity.svg"]
    files.write_text(written[0], "\n\n".join([
        f"<!-- written by `monofast report {run} --out {out}` -->",
        results.markdown(res),
        results.timings_markdown(res, [folder for folder, _ in run_order()]),
    ]) + "\n")
    files.write_text(written[1], purity_svg(summary))
    if res.evaluation is not None:
        from monofast.site.quality import pareto

        for name, chart in zip(("pareto-ce.svg", "pareto-fvu.svg"), pareto(res.evaluation, standalone=True)):
            written.append(out / name)
            files.write_text(written[-1], chart)
    if res.site_index is None:
        logger.warning("report: %s has no finished site made from the files it holds now; no screenshots", run)
        return written
    browser = find_browser()
    if browser is None:
        logger.warning("report: no Chromium found (%s); no screenshots", ", ".join(BROWSERS))
        return written
    shown = showcase(summary, feature_arrays(run / "analysis"))
    picks = list(enumerate(features)) if features else [(s, f) for s, f in shown if f is not None]
    if not picks:
        logger.warning("report: no feature is more than %.0f%% one source; no screenshots (choose "
                       "pages with --feature N)", 100 * summary["purity"]["pure_share"])
    names = summary["sources"]
    for source, feature in picks:
        page = res.site_index.parent / "features" / f"{feature}.html"
        if not page.is_file():
            raise UserError(f"{page} does not exist: the site has no page for feature {feature}")
        label = names[source] if not features and source < len(names) else str(feature)
        target = out / f"feature-{label}.png"
        screenshot(browser, page, target)
        written.append(target)
    findings_page = res.site_index.parent / "findings.html"
    if findings_page.is_file():
        written.append(out / "findings.png")
        screenshot(browser, findings_page, written[-1], FINDINGS_SCREEN)
    lab = res.site_index.parent / "lab.html"
    if lab.is_file() and not features:
        written += lab_screenshots(browser, run, lab, out, [f for _, f in shown], res.findings is not None)
    return written


def lab_screenshots(browser: str, run: Path, lab: Path, out: Path, picks: list[Optional[int]],
                    findings: bool = False) -> list[Path]:
    """lab-shaded.png: the last source's showcase feature (`picks`: one per source) shaded on
    its own top example; lab-steer.png: the first source's feature (with the `findings`, the
    best steered one) clamped while the GPT continues that text."""
    from monofast.analysis import output
    from monofast.site.lab import try_it
    from monofast.site.pages import top_text
    from monofast.site.text import Vocab

    if len(picks) < 2 or picks[0] is None or picks[-1] is None:
        logger.warning("report: no pure feature for two sources; no lab screenshots")
        return []
    analysis = output.load(run / "analysis")
    text = top_text(analysis.examples, Vocab(analysis.tokens), picks[-1])
    steer, prompt = (_best_steered(run) if findings else None) or (picks[0], text)
    shots = [(out / "lab-shaded.png", try_it(picks[-1], text, depth=0)),
             (out / "lab-steer.png", try_it(steer, prompt, depth=0) + "&generate=1")]
    for target, link in shots:
        screenshot(browser, lab, target, LAB_SCREEN, fragment=link.partition("#")[2])
    return [target for target, _ in shots]


def _best_steered(run: Path) -> Optional[tuple[int, str]]:
    """With the findings: of the steered features whose clamp turned at least half of the
    continuations to their source, the one whose clamped text stayed most fluent (a clamp
    can win the classifier with a stutter), and the first prompt it was steered from."""
    path = run / "findings" / "steering.json"
    if not path.is_file():  # checked with the findings' other files by `results.collect`
        return None
    steering = files.read_json(path, "steering results")
    entries = [e for e in (steering.get("features") or [] if isinstance(steering, dict) else [])
               if isinstance(e, dict) and type(e.get("feature")) is int and isinstance(e.get("examples"), list)
               and e["examples"] and isinstance(e["examples"][0], dict)]
    if not entries:
        return None
    steered = [e for e in entries if _number(e.get("share_clamped"), 0.0) >= 0.5] or entries
    best = max(steered, key=lambda e: (_number(e.get("logprob_clamped"), -1e9), -e["feature"]))
    return best["feature"], str(best["examples"][0].get("prompt", ""))


def _number(value: Any, default: float) -> float:
    return float(value) if results.is_number(value) else default


# ---------------------------------------------------------------------------------------
# Choosing and photographing feature pages

FEATURE_ARRAYS = ("fires", "purity", "dominant")
"""The arrays of analysis/features.npz the showcase reads, one value per feature."""


def feature_arrays(analysis_dir: Path) -> dict[str, Any]:
    """`FEATURE_ARRAYS` of a finished analysis's features.npz (checked against its manifest
    by `results.collect`); a file without them is a `DataError` naming it."""
    path = analysis_dir / "features.npz"
    redo = files.redo_stage(analysis_dir)
    arrays = files.read_npz(path, redo)
    lacking = [name for name in FEATURE_ARRAYS if name not in arrays]
    shapes = {arrays[name].shape for name in FEATURE_ARRAYS if name not in lacking}
    if lacking or len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise DataError(f"{path} does not hold {', '.join(FEATURE_ARRAYS)} as one value per feature "
                        f"({'no ' + ', '.join(lacking) if lacking else f'shapes {sorted(shapes)}'}); {redo}")
    return arrays


def showcase(summary: dict[str, Any], arrays: dict[str, Any]) -> list[tuple[int, Optional[int]]]:
    """(source id, feature) per source of the analysis `summary`: of the features at least
    `SHOWCASE_PURITY` that source (else more than the analysis's `pure_share`), the one that
    fires most often (`arrays`: `feature_arrays`); None where a source has no pure feature."""
    import numpy as np

    pure = summary["purity"]["pure_share"]
    fires, purity, dominant = (arrays[name] for name in FEATURE_ARRAYS)  # (F,) each
    picks: list[tuple[int, Optional[int]]] = []
    for s in range(len(summary["sources"])):
        mine = (dominant == s) & (fires > 0)
        candidates = np.flatnonzero(mine & (purity >= SHOWCASE_PURITY))
        if not len(candidates):
            candidates = np.flatnonzero(mine & (purity > pure))
        best = int(candidates[np.argmax(fires[candidates])]) if len(candidates) else None
        picks.append((s, best))
    return picks


def find_browser() -> Optional[str]:
    """A headless-capable Chromium: $MONOFAST_CHROMIUM, else the first of `BROWSERS` on PATH."""
    env = os.environ.get("MONOFAST_CHROMIUM")
    if env:
        found = shutil.which(env)
        if found is None:
            raise UserError(f"MONOFAST_CHROMIUM={env} is not an executable; point it at a Chromium "
                            f"or unset it")
        return found
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(browser: str, page: Path, target: Path, size: tuple[int, int] = SCREEN, fragment: str = "") -> None:
    """A PNG of the top of `page` (a file:// URL, so the page's scripts run as in a browser;
    `fragment` goes after its #)."""
    tmp = target.with_name(f".{target.name}.tmp.png")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=10000",  # the lab's scripts run the model before the shot
            f"--window-size={size[0]},{size[1]}", f"--screenshot={tmp}",
            page.resolve().as_uri() + (f"#{fragment}" if fragment else "")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"{browser} could not take a screenshot of {page}: {tail[0]}")
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------
# The purity figure, as a standalone SVG

W, H = 760, 290
FEATURE_COLOR, NEURON_COLOR = "#d9480f", "#1c7ed6"
FONT = "font-family:system-ui,-apple-system,Segoe UI,sans-serif"


def _text(x: float, y: float, body: str, size: int = 12, anchor: str = "start", extra: str = "") -> str:
    from html import escape

    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'fill="#222" {extra}>{escape(body)}</text>')


def purity_svg(summary: dict[str, Any]) -> str:
    """Left: the purity distribution of alive SAE features and MLP neurons (share of each
    per bin). Right: per source, the share that is more than `pure_share` that source."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
             f'style="{FONT};background:#fff">', f'<rect width="{W}" height="{H}" fill="#fff"/>']
    hist = summary.get("purity_histogram")
    if not hist:
        parts.append(_text(W / 2, H / 2, "no analysis summary", anchor="middle"))
        return "".join(parts) + "</svg>\n"
    parts += _histogram_panel(hist, x0=50, y0=40, w=380, h=200)
    parts += _bars_panel(summary, x0=500, y0=40, w=240, h=200)
    parts += [_legend(50 + 380 - 150, 44), "</svg>"]
    return "\n".join(parts) + "\n"


def _legend(x: float, y: float) -> str:
    return "".join([
        f'<rect x="{x}" y="{y}" width="12" height="12" fill="{FEATURE_COLOR}"/>',
        _text(x + 17, y + 10, "SAE features", 12),
        f'<rect x="{x}" y="{y + 18}" width="12" height="12" fill="{NEURON_COLOR}"/>',
        _text(x + 17, y + 28, "MLP neurons", 12),
    ])


def _axes(x0: float, y0: float, w: float, h: float, y_max: float, title: str, xlabel: str) -> list[str]:
    out = [_text(x0, y0 - 16, title, 14, extra='font-weight="600"'),
           f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}" stroke="#888"/>',
           f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + h}" stroke="#888"/>',
           _text(x0 + w / 2, y0 + h + 34, xlabel, 12, "middle")]
    for frac in (0.0, 0.5, 1.0):
        y = y0 + h - h * frac
        out.append(_text(x0 - 5, y + 4, f"{y_max * frac:.0%}", 11, "end"))
        if frac:
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#eee"/>')
    return out


def _histogram_panel(hist: dict[str, Any], x0: float, y0: float, w: float, h: float) -> list[str]:
    edges = hist["edges"]
    f_counts, n_counts = hist["features"], hist["neurons"]
    first = next((i for i in range(len(f_counts)) if f_counts[i] or n_counts[i]), 0)
    edges, f_counts, n_counts = edges[first:], f_counts[first:], n_counts[first:]
    f_share = [c / max(sum(f_counts), 1) for c in f_counts]
    n_share = [c / max(sum(n_counts), 1) for c in n_counts]
    y_max = max(f_share + n_share + [1e-9])
    y_max = min(1.0, (int(y_max * 10) + 1) / 10)  # round up to the next 10%
    out = _axes(x0, y0, w, h, y_max, "Purity of alive features and neurons",
                "purity: the largest one-source share of activation mass")
    bins = len(f_counts)
    bw = w / max(bins, 1)
    for b in range(bins):
        for i, (share, color) in enumerate(((f_share[b], FEATURE_COLOR), (n_share[b], NEURON_COLOR))):
            bh = h * share / y_max
            x = x0 + b * bw + 1 + i * (bw - 2) / 2
            out.append(f'<rect x="{x:.1f}" y="{y0 + h - bh:.1f}" width="{(bw - 2) / 2:.1f}" height="{bh:.1f}" '
                       f'fill="{color}"/>')
    for b in range(0, bins + 1, 2):
        out.append(_text(x0 + b * bw, y0 + h + 15, f"{edges[b]:.1f}", 11, "middle"))
    return out


def _bars_panel(summary: dict[str, Any], x0: float, y0: float, w: float, h: float) -> list[str]:
    pure = summary["purity"]["pure_share"]
    features = summary["pure_by_source"]["features"]
    neurons = summary["pure_by_source"]["neurons"]
    names = list(features)
    y_max = max(list(features.values()) + list(neurons.values()) + [1e-9])
    y_max = min(1.0, (int(y_max * 10) + 1) / 10)
    out = _axes(x0, y0, w, h, y_max, f"More than {pure:.0%} one source", "source")
    group = w / max(len(names), 1)
    bar = min(40.0, group / 3)
    for i, name in enumerate(names):
        cx = x0 + group * (i + 0.5)
        for j, (share, color) in enumerate(((features[name], FEATURE_COLOR), (neurons.get(name, 0.0), NEURON_COLOR))):
            bh = h * share / y_max
            x = cx - bar + j * bar
            out.append(f'<rect x="{x:.1f}" y="{y0 + h - bh:.1f}" width="{bar - 2:.1f}" height="{bh:.1f}" '
                       f'fill="{color}"/>')
            out.append(_text(x + (bar - 2) / 2, y0 + h - bh - 4, f"{share:.1%}", 10, "middle"))
        out.append(_text(cx, y0 + h + 15, name, 12, "middle"))
    return out
