"""The HTML of the site: one page per feature and the index.

Pages are complete static HTML (their text is rendered here, escaped, with no script
needed to read them); the index's table is filled by assets/index.js from features.js,
a script file rather than JSON so that it loads from file:// where fetch() cannot.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from monofast.site import quality, svg
from monofast.site.findings import Findings
from monofast.site.lab import try_it
from monofast.site.text import Vocab, decode_window, display, escape, fmt

ASSETS = "assets"


class SiteData(NamedTuple):
    """What every page reads."""

    title: str
    summary: dict[str, Any]
    features: dict[str, np.ndarray]
    neurons: dict[str, np.ndarray]
    examples: dict[str, np.ndarray]
    vocab: Vocab
    sources: list[str]
    findings: Optional[Findings] = None
    """The findings stage's results, when the run has them (`monofast.site.findings`)."""
    lab: bool = False
    """Whether the site has the lab (`monofast.site.lab`): feature pages link to it."""


def page(title: str, body: str, depth: int, script: str = "") -> str:
    """A whole document; `depth` folders below the site root (for asset paths)."""
    up = "../" * depth
    scripts = "".join(f'<script src="{up}{src}"></script>' for src in script.split() if src)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
            f"<link rel=\"stylesheet\" href=\"{up}{ASSETS}/style.css\"></head>\n<body>\n{body}\n{scripts}</body></html>\n")


# ---------------------------------------------------------------------------------------
# Token windows

def window(vocab: Vocab, tokens: np.ndarray, acts: np.ndarray, effects: Optional[np.ndarray], centre: int,
           scale: float) -> str:
    """One example: its tokens decoded as a whole, each firing group shaded by activation
    (relative to `scale`, the feature's max) with a tooltip; the peak outlined."""
    parts = []
    for group in decode_window(vocab, tokens):
        values = [float(acts[m]) for m in group.members if not math.isnan(float(acts[m]))]
        peak = max(values, default=0.0)
        text = (f'<span class="sp">{escape(group.text)}</span>' if group.special else display(group.text))
        if peak <= 0:
            parts.append(text)
            continue
        tips = []
        for m in group.members:
            tip = f"act {fmt(float(acts[m]))}"
            if effects is not None and not math.isnan(float(effects[m])):
                tip += f", Δlog p(next) {fmt(float(effects[m]))}"
            tips.append(tip)
        alpha = min(1.0, peak / scale) if scale > 0 else 1.0
        cls = ' class="pk"' if centre in group.members else ""
        parts.append(f'<i{cls} style="--a:{alpha:.2f}" title="{escape("; ".join(tips))}">{text}</i>')
    return "".join(parts)


def example(data: SiteData, f: int, tokens: np.ndarray, acts: np.ndarray, effects: Optional[np.ndarray],
            value: float, source: int, centre_effect: float = float("nan")) -> str:
    """One example row: its activation, the peak's ablation effect, its source, its window."""
    body = window(data.vocab, tokens, acts, effects, int(data.examples["window_radius"]),
                  float(data.features["max_act"][f]))
    label = f'<span class="v">{escape(fmt(value))}</span>'
    if not math.isnan(centre_effect):
        label += (f'<span class="e" title="change in log p(next token) at the peak without this feature">'
                  f'Δ {escape(fmt(centre_effect))}</span>')
    if 0 <= source < len(data.sources):
        label += f'<span class="src s{source % 6}">{escape(data.sources[source])}</span>'
    return f'<div class="ex"><div class="lbl">{label}</div><div class="tx">{body}</div></div>'


# ---------------------------------------------------------------------------------------
# Feature pages

def _share_bar(shares: np.ndarray, names: Sequence[str]) -> str:
    cells = []
    for s, (share, name) in enumerate(zip(shares, names)):
        if share <= 0:
            continue
        cells.append(f'<span class="s{s % 6}" style="width:{share * 100:.1f}%" '
                     f'title="{escape(name)}: {share:.1%}">{escape(name) if share > 0.12 else ""}</span>')
    return f'<div class="bar">{"".join(cells)}</div>'


def _token_list(data: SiteData, ids: np.ndarray, values: np.ndarray, kind: str) -> str:
    items = []
    for token, value in zip(ids, values):
        if token < 0:
            continue
        items.append(f'<li><code>{escape(data.vocab.label(int(token)))}</code> <span class="n">'
                     f'{escape(fmt(float(value)) if kind == "weight" else str(int(value)))}</span></li>')
    return f'<ol class="tl">{"".join(items)}</ol>' if items else '<p class="muted">none</p>'


def _histogram(data: SiteData, f: int) -> str:
    hist = data.features["hist"][f]
    nonzero = np.flatnonzero(hist)
    if not len(nonzero):
        return ""
    inner = data.features["hist_edges"].astype(float)
    bounds = np.concatenate([[inner[0] / (inner[1] / inner[0])], inner, [inner[-1] * (inner[1] / inner[0])]])
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    return svg.histogram("activation histogram (log-spaced bins)", [svg.Series("firings", hist[lo:hi].tolist())],
                         bounds[lo:hi + 1].tolist(), "activation", "tokens", tick_every=max(1, (hi - lo) // 6))


def _nav(f: int, n: int) -> str:
    prev_link = f'<a rel="prev" href="{f - 1}.html">← feature {f - 1}</a>' if f > 0 else '<span class="muted">← first</span>'
    next_link = f'<a rel="next" href="{f + 1}.html">feature {f + 1} →</a>' if f < n - 1 else '<span class="muted">last →</span>'
    return f'<nav class="nav">{prev_link} <a href="../index.html">index</a> {next_link}</nav>'


def top_text(examples: dict[str, np.ndarray], vocab: Vocab, f: int) -> str:
    """The text of feature f's top example window (empty when it never fired)."""
    if not len(examples["top_rows"][f]) or examples["top_rows"][f, 0] < 0:
        return ""
    tokens = [int(t) for t in examples["top_tokens"][f, 0] if t >= 0]
    return "".join(g.text for g in decode_window(vocab, tokens) if not g.special)


def feature_page(data: SiteData, f: int, sections: Sequence[str] = ()) -> str:
    """features/<f>.html; `sections` (HTML: the findings') go after the histogram."""
    feats, ex, names = data.features, data.examples, data.sources
    n = len(feats["density"])
    density = float(feats["density"][f])
    fires = int(feats["fires"][f])
    dominant = int(feats["dominant"][f])
    parts = [_nav(f, n), f"<h1>Feature {f}</h1>"]
    if data.lab:
        parts.append(f'<p><a class="try" href="{escape(try_it(f, top_text(data.examples, data.vocab, f)))}">try it in the lab</a>: '
                     f'its top example as the starting text, the feature shaded and ready to clamp</p>')
    if fires == 0:
        parts.append(f'<p class="muted">Never fired on the {data.summary.get("tokens", 0):,} analysed tokens (dead).</p>')
        parts += [s for s in sections if s]
        return page(f"Feature {f} · {data.title}", "\n".join(parts + [_nav(f, n)]), 1, f"{ASSETS}/feature.js")
    one_in = f"1 in {1 / density:,.0f}" if density > 0 else "never"
    parts.append(
        '<table class="facts">'
        f'<tr><th>density</th><td>{density:.3%} of tokens ({one_in}; {fires:,} firings)</td></tr>'
        f'<tr><th>activation</th><td>max {escape(fmt(float(feats["max_act"][f])))}, mean when firing '
        f'{escape(fmt(float(feats["mean_act"][f])))}</td></tr>'
        f'<tr><th>source</th><td>{escape(names[dominant]) if dominant >= 0 else "–"}, purity '
        f'{float(feats["purity"][f]):.1%} of its activation mass</td></tr>'
        f'<tr><th>mean effect at its top examples</th><td>Δlog p(next token) '
        f'{escape(fmt(float(feats["effect_mean"][f])))} when removed</td></tr></table>')
    parts.append("<h2>Source share</h2><p class=\"muted\">activation mass</p>"
                 + _share_bar(feats["share_mass"][f], names)
                 + "<p class=\"muted\">firings</p>" + _share_bar(feats["share_fires"][f], names))
    parts.append('<div class="cols">'
                 f'<div><h2>Fires most on</h2>{_token_list(data, feats["top_token_ids"][f], feats["top_token_counts"][f], "count")}</div>'
                 f'<div><h2>Raises the logits of</h2>{_token_list(data, feats["logit_top_ids"][f], feats["logit_top_values"][f], "weight")}</div>'
                 f'<div><h2>Lowers the logits of</h2>{_token_list(data, feats["logit_bottom_ids"][f], feats["logit_bottom_values"][f], "weight")}</div>'
                 f'<div><h2>Similar decoder directions</h2><ol class="tl">'
                 + "".join(f'<li><a href="{int(i)}.html">feature {int(i)}</a> <span class="n">{float(c):.2f}</span></li>'
                           for i, c in zip(feats["neighbour_ids"][f], feats["neighbour_cos"][f]))
                 + "</ol></div></div>")
    parts.append(_histogram(data, f))
    parts += sections
    parts.append("<h2>Top activations</h2>")
    for j in range(ex["top_rows"].shape[1]):
        if ex["top_rows"][f, j] < 0:
            break
        parts.append(example(data, f, ex["top_tokens"][f, j], ex["top_acts"][f, j], ex["top_effects"][f, j],
                             float(ex["top_values"][f, j]), int(ex["top_sources"][f, j]),
                             float(ex["top_effects"][f, j, int(ex["window_radius"])])))
    parts.append("<h2>Random samples by activation quantile</h2>")
    counts = ex["bin_count"][f]
    for q in reversed(range(ex["bin_count"].shape[1])):
        if counts[q] == 0:
            continue
        parts.append(f'<h3>[{escape(fmt(float(ex["bin_low"][f, q])))}, {escape(fmt(float(ex["bin_high"][f, q])))}): '
                     f'{int(counts[q]):,} firings ({counts[q] / fires:.1%})</h3>')
        for s in range(ex["sample_rows"].shape[2]):
            if ex["sample_rows"][f, q, s] < 0:
                continue
            parts.append(example(data, f, ex["sample_tokens"][f, q, s], ex["sample_acts"][f, q, s], None,
                                 float(ex["sample_values"][f, q, s]), int(ex["sample_sources"][f, q, s]),
                                 float(ex["sample_effects"][f, q, s])))
    parts.append(_nav(f, n))
    return page(f"Feature {f} · {data.title}", "\n".join(p for p in parts if p), 1, f"{ASSETS}/feature.js")


# ---------------------------------------------------------------------------------------
# Index

def _round(value: float, digits: int = 4) -> Optional[float]:
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def index_script(data: SiteData) -> str:
    """features.js: the index table's rows, as a script that sets window.MONOFAST_INDEX."""
    feats = data.features
    rows = []
    for f in range(len(feats["density"])):
        tokens = " ".join(data.vocab.label(int(t)) for t in feats["top_token_ids"][f][:5] if t >= 0)
        rows.append([f, _round(float(feats["density"][f])), _round(float(feats["max_act"][f])),
                     _round(float(feats["mean_act"][f])), int(feats["dominant"][f]), _round(float(feats["purity"][f]), 3),
                     _round(float(feats["effect_mean"][f]), 3), tokens])
    payload = {"sources": data.sources, "pure": data.summary["purity"]["pure_share"],
               "ultralow": data.summary.get("config", {}).get("ultralow_density", 1e-5),
               "columns": ["id", "density", "max", "mean", "source", "purity", "effect", "tokens"], "rows": rows}
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    for ch, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, code)
    return f"window.MONOFAST_INDEX = {text};\n"


def _counts_table(summary: dict[str, Any]) -> str:
    rows = []
    for kind in ("features", "neurons"):
        c = summary[kind]
        p = summary["purity"][kind]
        pure = summary["pure_by_source"][kind]
        by_source = ", ".join(f"{escape(k)} {v:.1%}" for k, v in pure.items())
        rows.append(f"<tr><th>{kind}</th><td>{c['total']:,}</td><td>{c['alive']:,}</td><td>{c['ultralow']:,}</td>"
                    f"<td>{c['dead']:,}</td><td>{c['dense']:,}</td><td>{p.get('median', float('nan')):.3f}</td>"
                    f"<td>{p.get('pure_fraction', float('nan')):.1%}</td><td>{by_source}</td></tr>")
    pct = summary["purity"]["pure_share"] * 100
    return ("<table class=\"facts counts\"><tr><th></th><th>total</th><th>alive</th><th>ultralow</th><th>dead</th>"
            f"<th>dense (&gt;10%)</th><th>median purity</th><th>&gt;{pct:.0f}% one source</th>"
            "<th>pure, by source</th></tr>" + "".join(rows) + "</table>")


def summary_figures(summary: dict[str, Any]) -> list[str]:
    dh, ph = summary["density_histogram"], summary["purity_histogram"]
    figures = [svg.histogram("feature and neuron density", [svg.Series("features", dh["features"]),
                                                             svg.Series("neurons", dh["neurons"])],
                             dh["log10_edges"], "log10 fraction of tokens", "units")]
    fractions = []
    for kind in ("features", "neurons"):
        total = max(sum(ph[kind]), 1)
        fractions.append(svg.Series(kind, [c / total for c in ph[kind]]))
    figures.append(svg.histogram("purity: share of the dominant source (alive units)", fractions, ph["edges"],
                                 "purity", "fraction of units"))
    return figures


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def training_figures(metrics: list[dict[str, Any]], limit: int = 6) -> list[str]:
    """One chart per SAE training metric of sae/metrics.jsonl against its step: a series per
    SAE of the sweep when records nest them under "saes", else the records' own numbers."""
    if not metrics:
        return []
    x = [float(m.get("step", i)) for i, m in enumerate(metrics)]
    nested = isinstance(metrics[-1].get("saes"), dict) and metrics[-1]["saes"]
    if nested:
        names = list(metrics[-1]["saes"])[:len(svg.COLORS)]
        first = metrics[-1]["saes"][names[0]]
        keys = [k for k in first if _numeric(first[k])]

        def series(key: str) -> list[svg.Series]:
            return [svg.Series(name, [float(m.get("saes", {}).get(name, {}).get(key, float("nan"))) for m in metrics])
                    for name in names]
    else:
        keys = [k for k in metrics[-1] if k not in ("step", "time", "seconds") and _numeric(metrics[-1][k])]

        def series(key: str) -> list[svg.Series]:
            return [svg.Series(key, [float(m[key]) if _numeric(m.get(key)) else float("nan") for m in metrics])]
    charts = []
    for key in keys[:limit]:
        lines = series(key)
        spread = [v for s in lines for v in s.values if math.isfinite(v) and v > 0]
        everywhere_positive = all(v > 0 for s in lines for v in s.values if math.isfinite(v))
        log = everywhere_positive and len(spread) > 1 and max(spread) / min(spread) > 30
        charts.append(svg.lines(f"SAE training: {key}", x, lines, "step", key, log_y=log))
    return [c for c in charts if c]


def _cell(value: Any) -> str:
    if _numeric(value):
        return escape(fmt(float(value), 4))
    if isinstance(value, dict) and value and all(_numeric(v) for v in value.values()):
        return ", ".join(f"{escape(str(k))} {escape(fmt(float(v), 4))}" for k, v in value.items())
    return ""


def evaluation_table(evaluation: dict[str, Any], analysed: str = "") -> str:
    """sae/eval.json as a table: its scalars (and per-source dicts, such as CE-loss recovered by
    source), one row per SAE when they are nested under "saes"; the analysed SAE in bold."""
    saes = evaluation.get("saes") if isinstance(evaluation.get("saes"), dict) else None
    rows = saes if saes else {"": evaluation}
    keys: list[str] = []
    for record in rows.values():
        if isinstance(record, dict):
            keys += [k for k in record if k not in keys and _cell(record[k])]
    if not keys:
        return ""
    head = "<tr><th>SAE</th>" + "".join(f"<th>{escape(k)}</th>" for k in keys) + "</tr>"
    body = []
    for name, record in rows.items():
        if not isinstance(record, dict):
            continue
        mark = ' class="chosen"' if name and name == analysed else ""
        body.append(f"<tr{mark}><th>{escape(name)}</th>" + "".join(f"<td>{_cell(record.get(k))}</td>" for k in keys)
                    + "</tr>")
    extra = "".join(f"<p class=\"muted\">{escape(k)}: {_cell(v)}</p>" for k, v in evaluation.items()
                    if k != "saes" and _cell(v)) if saes else ""
    return f'<table class="facts counts">{head}{"".join(body)}</table>{extra}'


def index_page(data: SiteData, metrics: list[dict[str, Any]], evaluation: dict[str, Any]) -> str:
    s = data.summary
    by_source = ", ".join(f"{escape(k)} {v:,}" for k, v in s.get("tokens_by_source", {}).items())
    parts = [f"<h1>{escape(data.title)}</h1>"]
    if data.lab:
        parts.append('<nav class="top"><a href="lab.html">Lab</a>: type any text, see which features fire, clamp '
                     'some and generate (the model runs in this page)</nav>')
    if data.findings is not None:
        parts.append('<nav class="top"><a href="findings.html">Findings</a>: feature splitting across SAE widths, '
                     'universality across two models, specificity, steering</nav>')
    where = "MLP layer" if "mlp" in str(s.get("hook_name", "mlp")) else "layer"
    parts += [f'<p class="lead">{s["features"]["total"]:,} SAE features of {where} {s.get("layer", "?")} '
              f'({s.get("hook_name", "")}), analysed over {s.get("tokens", 0):,} tokens ({by_source}).</p>',
              f'<p class="verdict">{escape(s.get("verdict", ""))}</p>',
              _counts_table(s),
              '<div class="figs">' + "".join(summary_figures(s)) + "</div>"]
    training = training_figures(metrics)
    if training or evaluation:
        parts.append("<h2>SAE training and evaluation</h2>")
        parts.append('<div class="figs">' + "".join(training) + "</div>")
        trade_off = quality.pareto(evaluation)
        if trade_off:
            parts.append('<h3>The trade-off across the sweep</h3><p class="muted">Each SAE the stage trained, '
                         'by its held-out L0: sparser to the left. The stage publishes (ringed) the sparsest one '
                         'that meets the goal on every source (<code>--select quality</code>).</p>'
                         '<div class="figs">' + "".join(trade_off) + "</div>")
        parts.append(evaluation_table(evaluation, str(s.get("sae", {}).get("name", ""))))
    options = "".join(f'<option value="{i}">{escape(name)}</option>' for i, name in enumerate(data.sources))
    parts.append(
        '<h2>Features</h2><form class="filters" onsubmit="return false">'
        '<label>search <input id="q" type="search" placeholder="id or token"></label>'
        f'<label>source <select id="src"><option value="">any</option>{options}'
        '<option value="mixed">mixed</option></select></label>'
        '<label>min purity <input id="pur" type="number" min="0" max="1" step="0.05" value="0"></label>'
        '<label>log10 density from <input id="dmin" type="number" step="0.5" value="-8"></label>'
        '<label>to <input id="dmax" type="number" step="0.5" value="0"></label>'
        '<label><input id="dead" type="checkbox"> show dead</label>'
        '<span id="count" class="muted"></span></form>'
        '<table id="features" class="features"><thead><tr>'
        '<th data-k="0">id</th><th data-k="1">density</th><th data-k="2">max act</th><th data-k="3">mean act</th>'
        '<th data-k="4">source</th><th data-k="5">purity</th><th data-k="6">Δlog p</th>'
        '<th data-k="7">fires most on</th></tr></thead><tbody></tbody></table>'
        '<p><button id="more" type="button">show more</button></p>'
        '<noscript><p>The table needs JavaScript; every feature also has its own page: '
        '<a href="features/0.html">feature 0</a>.</p></noscript>')
    return page(data.title, "\n".join(parts), 0, f"features.js {ASSETS}/index.js")
