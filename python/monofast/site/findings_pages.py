"""The findings in HTML: sections of the feature pages, one page per feature of every other
family member, and the Findings page.

    features/<id>.html       + Family, In the other model, Specificity, Steering
    family/<member>/<id>.html  a feature of an SAE of another width: its parent, children, tree
    findings.html            the four findings: numbers, figures, links into the pages

Links between family members go to features/<id>.html for the run's own SAE (which has the
full pages) and to family/<member>/<id>.html for every other width. Model B (the second
GPT) has no pages: its features are named in text.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from monofast.site import svg
from monofast.site.findings import Family, Findings, Link
from monofast.site.pages import ASSETS, SiteData, page
from monofast.site.text import display, escape, fmt

TREE_NODES = 60
"""Most descendants a family tree lists (a page stays small whatever the family)."""
EXAMPLE_FEATURES = 8
"""Features the Findings page links to as examples of specificity."""


def _findings(data: SiteData) -> Findings:
    assert data.findings is not None, "findings pages need the findings"
    return data.findings


def _up(depth: int) -> str:
    return "../" * depth


def href(family: Family, member: str, f: int, depth: int) -> str:
    """Link to a family member's feature from a page `depth` folders below the site root."""
    if member == family.main:
        return f"{_up(depth)}features/{f}.html"
    return f"{_up(depth)}family/{member}/{f}.html"


def _num(value: Any, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "–"
    return escape(fmt(float(value), digits))


def _pct(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "–"
    return f"{value:.1%}"


def _share(value: Any) -> str:
    """A share as a whole percentage (a threshold such as 90%)."""
    return f"{value:.0%}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _source(names: Sequence[str], s: int) -> str:
    return escape(names[s]) if 0 <= s < len(names) else "–"


def _tokens(data: SiteData, ids: np.ndarray) -> str:
    """Top tokens inline, as the pages' token lists show them."""
    chips = [f"<code>{escape(data.vocab.label(int(t)))}</code>" for t in ids if 0 <= int(t) < len(data.vocab.bytes)]
    return f'<span class="tk">{" ".join(chips)}</span>' if chips else '<span class="muted">no firings</span>'


def _member_tokens(data: SiteData, member: str, f: int) -> str:
    return _tokens(data, _findings(data).family.arrays[f"{member}_top_tokens"][f])


# ---------------------------------------------------------------------------------------
# Parents, children and the family tree

def _link_item(data: SiteData, link: Link, depth: int) -> str:
    fam = _findings(data).family
    weak = link.cos < fam.threshold
    note = ' <span class="weak">below the threshold: not a clear parent</span>' if weak else ""
    return (f'<li><a href="{href(fam, link.member, link.feature, depth)}">{escape(link.member)} #{link.feature}</a> '
            f'<span class="n">cos {link.cos:.2f} · corr {escape(fmt(link.corr, 2))}</span>{note} '
            f'{_member_tokens(data, link.member, link.feature)}</li>')


def relatives(data: SiteData, member: str, f: int, depth: int) -> str:
    """Two columns: the parent in the next smaller member, the children in the next larger."""
    fam = _findings(data).family
    i = fam.order.index(member)
    cols = []
    if i > 0:
        parent = fam.parent(member, f)
        items = _link_item(data, parent, depth) if parent else '<li class="muted">none</li>'
        cols.append(f'<div><h3>Parent in {escape(fam.order[i - 1])}</h3><ul class="rel">{items}</ul></div>')
    if i < len(fam.order) - 1:
        kids = fam.children(member, f)
        items = "".join(_link_item(data, k, depth) for k in kids) or \
            f'<li class="muted">none (no feature of {escape(fam.order[i + 1])} has it as a clear parent)</li>'
        cols.append(f'<div><h3>Children in {escape(fam.order[i + 1])}</h3><ul class="rel">{items}</ul></div>')
    return f'<div class="cols">{"".join(cols)}</div>'


def _node(data: SiteData, member: str, f: int, cos: Optional[float], depth: int, current: bool) -> str:
    fam = _findings(data).family
    name = f"{escape(member)} #{f}"
    label = f"<b>{name}</b> (this feature)" if current else f'<a href="{href(fam, member, f, depth)}">{name}</a>'
    if cos is not None:
        label += f' <span class="{"weak" if cos < fam.threshold else "n"}">cos {cos:.2f}</span>'
    return f"{label} {_member_tokens(data, member, f)}"


def tree(data: SiteData, member: str, f: int, depth: int) -> str:
    """Nested lists: the ancestors from the smallest member down to `f`, then its descendants
    down to the largest member (at most TREE_NODES of them)."""
    fam = _findings(data).family
    budget = [TREE_NODES]

    def descend(m: str, i: int) -> str:
        kids = fam.children(m, i)
        if not kids:
            return ""
        items = []
        for k, link in enumerate(kids):
            if budget[0] <= 0:
                items.append(f'<li class="muted">… {len(kids) - k} more</li>')
                break
            budget[0] -= 1
            items.append(f"<li>{_node(data, link.member, link.feature, link.cos, depth, False)}"
                         f"{descend(link.member, link.feature)}</li>")
        return f'<ul>{"".join(items)}</ul>'

    parent = fam.parent(member, f)
    inner = _node(data, member, f, parent.cos if parent else None, depth, True) + descend(member, f)
    for link in fam.ancestors(member, f):
        above = fam.parent(link.member, link.feature)
        inner = (_node(data, link.member, link.feature, above.cos if above else None, depth, False)
                 + f"<ul><li>{inner}</li></ul>")
    return f'<ul class="tree"><li>{inner}</li></ul>'


def _family_intro(fam: Family) -> str:
    names = ", ".join(escape(m) for m in fam.order)
    return (f'<p class="muted">SAEs of {len(fam.order)} widths ({names}) were trained '
            f'on the same activations. A feature\'s parent is the feature of the next smaller SAE whose decoder '
            f'direction is most similar (cosine); its children are the features of the next larger SAE whose '
            f'parent it is with cosine ≥ {fam.threshold:.2f}. Correlations are of the activations.</p>')


# ---------------------------------------------------------------------------------------
# Sections of the run's feature pages

def family_section(data: SiteData, f: int) -> str:
    fam = _findings(data).family
    return (f'<h2 id="family">Family <a class="n" href="#tree">(tree)</a></h2>{_family_intro(fam)}'
            f'{relatives(data, fam.main, f, 1)}<h3 id="tree">Family tree</h3>{tree(data, fam.main, f, 1)}')


def other_model_section(data: SiteData, f: int) -> str:
    fnd = _findings(data)
    u = fnd.universality
    match, corr = int(u["feature_match"][f]), float(u["feature_corr"][f])
    intro = ('<p class="muted">Model B is a second GPT trained the same way from another seed, with its own SAE; '
             'its best match is the feature whose activations correlate most with this one\'s on the same '
             'tokens. Model B has no pages of its own.</p>')
    if match < 0 or not math.isfinite(corr):
        return (f'<h2 id="other">In the other model</h2>{intro}'
                '<p>No match (this feature did not fire on the sample).</p>')
    dominant = int(u["twin_dominant"][match])
    source = (f"mostly {_source(fnd.sources, dominant)} (purity {float(u['twin_purity'][match]):.1%})"
              if dominant >= 0 else "never fired")
    tokens = int(fnd.numbers.get("universality", {}).get("tokens", 0))
    return (f'<h2 id="other">In the other model</h2>{intro}<p>Best match: <b>feature {match}</b> of model B\'s SAE, '
            f'activation correlation <b>{corr:.3f}</b> over {tokens:,} tokens. It is {source} and fires most on '
            f'{_tokens(data, u["twin_top_tokens"][match])}.</p>')


def specificity_chart(data: SiteData, levels: np.ndarray, top: float, title: str) -> str:
    """Stacked bars of firings (bins, sources) per activation level, paper-style."""
    edges = np.linspace(0.0, top, len(levels) + 1).tolist()
    return svg.stacked_bars(title, levels.tolist(), edges, _findings(data).sources or data.sources,
                            "activation (equal bins from 0 to the maximum)", "firings")


def specificity_section(data: SiteData, f: int) -> str:
    fnd = _findings(data)
    s = fnd.specificity
    levels = s["feature_levels"][f]  # (NB, S)
    head = '<h2 id="specificity">Specificity</h2>'
    if levels.sum() == 0:
        return head + '<p class="muted">Never fired on the findings\' tokens.</p>'
    dominant = int(data.features["dominant"][f])
    name = _source(data.sources, dominant) if dominant >= 0 else "its dominant source's"
    spec, sens = float(s["feature_specificity"][f]), float(s["feature_sensitivity"][f])
    return (f'{head}<p class="muted">Its firings on the findings\' tokens by activation level and by the source of '
            f'the token: a specific feature\'s high activations are all of one source.</p>'
            + specificity_chart(data, levels, float(s["feature_max"][f]), f"feature {f}: activation level by source")
            + f'<p>Specificity: {_pct(spec)} of its firings in the upper half of its range are on {name} tokens. '
              f'Sensitivity: it fires on {_pct(sens)} of the {name} tokens.</p>')


def _dict(value: Any) -> dict[str, Any]:
    """A dict read from steering.json (anything else: an empty one)."""
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The dicts of a list read from steering.json (anything else: none)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _text_cell(text: Any) -> str:
    return f'<div class="gen">{display(text) if isinstance(text, str) else ""}</div>'


def _fluency(entry: dict[str, Any]) -> str:
    """The continuations' mean log-probability per token under the source's n-gram model."""
    if _num(entry.get("logprob_clean")) == "–" and _num(entry.get("logprob_clamped")) == "–":
        return ""
    return (f" Fluency (mean log p per token under the source's n-gram model): {_num(entry.get('logprob_clean'))} "
            f"clean, {_num(entry.get('logprob_clamped'))} clamped.")


def steering_section(data: SiteData, f: int) -> str:
    entry = _findings(data).steered().get(f)
    if entry is None:
        return ""
    source = escape(str(entry.get("source", "its source")))
    prompts = entry.get("prompt_sources")
    from_text = (" of " + ", ".join(f"{escape(str(k))} ({_num(v)})" for k, v in prompts.items())
                 if isinstance(prompts, dict) and prompts else "")
    how = f" at {_num(entry.get('clamp'))}" if _num(entry.get("clamp")) != "–" else ""
    if how and _num(entry.get("multiple")) != "–":
        how += f" ({_num(entry.get('multiple'))}× its largest activation)"
    parts = [f'<h2 id="steering">Steering</h2><p>Clamped{how} at every position while the GPT continued prompts'
             f'{from_text}, from the same seed as the clean continuations. Continuations read as {source} by the '
             f'source classifier: <b>{_pct(entry.get("share_clean"))}</b> clean, '
             f'<b>{_pct(entry.get("share_clamped"))}</b> clamped.{_fluency(entry)}</p>']
    examples = _dicts(entry.get("examples"))
    if examples:
        rows = "".join(_text_cell(e.get("prompt")) + _text_cell(e.get("clean")) + _text_cell(e.get("clamped"))
                       for e in examples)
        parts.append('<div class="steer"><div class="hd">prompt</div><div class="hd">clean continuation</div>'
                     f'<div class="hd">clamped continuation</div>{rows}</div>')
    return "".join(parts)


def feature_sections(data: SiteData, f: int) -> list[str]:
    """The findings' sections of the run's feature page `f`."""
    return [family_section(data, f), other_model_section(data, f), specificity_section(data, f),
            steering_section(data, f)]


# ---------------------------------------------------------------------------------------
# Pages of the other family members

def _family_nav(member: str, f: int, n: int) -> str:
    prev_link = (f'<a rel="prev" href="{f - 1}.html">← {escape(member)} #{f - 1}</a>' if f > 0
                 else '<span class="muted">← first</span>')
    next_link = (f'<a rel="next" href="{f + 1}.html">{escape(member)} #{f + 1} →</a>' if f < n - 1
                 else '<span class="muted">last →</span>')
    return (f'<nav class="nav">{prev_link} <span><a href="../../index.html">index</a> · '
            f'<a href="../../findings.html#splitting">findings</a></span> {next_link}</nav>')


def family_page(data: SiteData, member: str, f: int) -> str:
    """site/family/<member>/<f>.html."""
    fnd = _findings(data)
    fam = fnd.family
    a = fam.arrays
    n = fam.size(member)
    dominant = int(a[f"{member}_dominant"][f])
    density = float(a[f"{member}_density"][f])
    if dominant >= 0:
        purity = float(a[f"{member}_purity"][f])
        source = f"{_source(fnd.sources, dominant)}, purity {purity:.1%} of its activation mass"
    else:
        source = "never fired on the findings' tokens"
    tokens = "".join(f"<li><code>{escape(data.vocab.label(int(t)))}</code></li>" for t in a[f"{member}_top_tokens"][f]
                     if 0 <= int(t) < len(data.vocab.bytes))
    parts = [_family_nav(member, f, n), f"<h1>Feature {f} of {escape(member)}</h1>",
             f'<p class="muted">An SAE of {n:,} features, one of the family of widths; '
             f'the run\'s own SAE is {escape(fam.main)}.</p>',
             f'<table class="facts"><tr><th>density</th><td>{density:.3%} of tokens</td></tr>'
             f'<tr><th>source</th><td>{source}</td></tr></table>',
             "<h2>Fires most on</h2>" + (f'<ol class="tl">{tokens}</ol>' if tokens else '<p class="muted">none</p>'),
             f"<h2>Parent and children</h2>{_family_intro(fam)}{relatives(data, member, f, 2)}",
             f'<h2 id="tree">Family tree</h2>{tree(data, member, f, 2)}', _family_nav(member, f, n)]
    return page(f"{member} #{f} · {data.title}", "\n".join(parts), 2, f"{ASSETS}/feature.js")


# ---------------------------------------------------------------------------------------
# The Findings page

def _table(head: Sequence[str], rows: Sequence[Sequence[str]], chosen: Sequence[bool] = ()) -> str:
    """Cells are HTML already; the first cell of a row is its heading."""
    body = []
    for i, row in enumerate(rows):
        mark = ' class="chosen"' if i < len(chosen) and chosen[i] else ""
        body.append(f"<tr{mark}><th>{row[0]}</th>" + "".join(f"<td>{c}</td>" for c in row[1:]) + "</tr>")
    return ('<table class="facts counts"><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
            + "".join(body) + "</table>")


def _by_source(values: Any, as_pct: bool = True) -> str:
    if not isinstance(values, dict):
        return "–"
    return ", ".join(f"{escape(str(k))} {_pct(v) if as_pct else _num(v)}" for k, v in values.items())


def _widths_table(family: dict[str, Any], pure_share: Any) -> str:
    quality = {q.get("name"): q for q in family.get("quality", []) if isinstance(q, dict)}
    rows, chosen = [], []
    for w in family.get("widths", []):
        q = quality.get(w.get("name"), {})
        misses = q.get("misses") or []
        goal = ("meets" if q.get("meets_goal") else
                "misses: " + "; ".join(escape(str(m)) for m in misses) if misses else "–")
        name = escape(str(w.get("name"))) + (" (the run's SAE)" if w.get("main") else "")
        rows.append([name, f"{int(w.get('width', 0)):,}", f"{int(w.get('alive', 0)):,}", _pct(w.get("pure_fraction")),
                     _by_source(w.get("pure_by_source")), _num(w.get("mean_purity")), _num(q.get("l0")),
                     _num(q.get("fvu")), _pct(q.get("dead_fraction")), _pct(q.get("ce_loss_recovered")),
                     _by_source(q.get("ce_loss_recovered_by_source")), _num(q.get("l1_coeff")), goal])
        chosen.append(bool(w.get("main")))
    return _table(["SAE", "features", "alive", f"pure (&gt;{_share(pure_share)} one source)", "pure, by source",
                   "mean purity", "L0", "FVU", "dead", "CE loss recovered", "by source", "L1 coeff", "quality goal"],
                  rows, chosen)


def _pairs_table(family: dict[str, Any]) -> str:
    rows = []
    for p in family.get("pairs", []):
        pair = f"{escape(str(p.get('small')))} → {escape(str(p.get('large')))}"
        rows.append([pair, _pct(p.get("clear_parent_share")),
                     _num(p.get("median_parent_cos")), _num(p.get("median_parent_corr_clear")),
                     f"{int(p.get('parents_with_children') or 0):,} ({_pct(p.get('parents_with_children_share'))})",
                     f"{_num(p.get('children_mean'))} / {_num(p.get('children_median'))}", _pct(p.get("split_share"))])
    return _table(["smaller → larger", "features with a clear parent", "median parent cos",
                   "median activation corr (clear pairs)", "parents with children",
                   "children per parent (mean / median)",
                   "parents that split (≥ 2 children)"], rows)


def _cos_histogram(family: dict[str, Any]) -> str:
    edges = family.get("cos_edges") or []
    series = []
    for p in family.get("pairs", [])[:len(svg.COLORS)]:
        counts = p.get("cos_histogram") or []
        total = max(sum(counts), 1)
        series.append(svg.Series(f"{p.get('small')}→{p.get('large')}", [c / total for c in counts]))
    if not series or len(edges) != len(series[0].values) + 1:
        return ""
    marks = [(float(family["threshold"]), f"threshold {float(family['threshold']):.2f}")] \
        if _num(family.get("threshold")) != "–" else []
    return svg.histogram("decoder cosine of each feature to its parent", series, edges, "cosine",
                         "fraction of features", marks=marks)


def _map(data: SiteData) -> str:
    fnd = _findings(data)
    fam = fnd.family
    a = fam.arrays
    if "map_xy" not in a or not len(a["map_xy"]):
        return '<p class="muted">No map (the findings stage placed no points).</p>'
    by_size = {fam.size(m): (i, m) for i, m in enumerate(fam.order)}
    names = fnd.sources
    points = []
    order = np.argsort(-a["map_width"], kind="stable")  # the largest width first: smaller ones drawn on top
    for p in order:
        index, member = by_size.get(int(a["map_width"][p]), (-1, "?"))
        f, dom = int(a["map_feature"][p]), int(a["map_dominant"][p])
        if index < 0:
            continue
        top = " ".join(data.vocab.label(int(t)) for t in a[f"{member}_top_tokens"][f][:3] if t >= 0)
        source = names[dom] if 0 <= dom < len(names) else "dead"
        points.append(svg.Point(float(a["map_xy"][p, 0]), float(a["map_xy"][p, 1]),
                                f"w{index % 6} d{dom % 6 if dom >= 0 else 'x'}", href(fam, member, f, 0),
                                f"{member} #{f} · {source} · {top}"))
    legends = [("lgw", [(f"{m} ({fam.size(m):,})", f"w{i % 6}") for i, m in enumerate(fam.order)]),
               ("lgs", [(s, f"d{i % 6}") for i, s in enumerate(names)] + [("dead", "dx")])]
    method = escape(str(fnd.numbers.get("map", {}).get("method", "a 2-D layout")))
    chart = svg.scatter("decoder directions of every width", points, legends)
    return (f'<h3>The map of the family</h3><p class="muted">Each point is the decoder direction of one feature, '
            f'{len(points):,} of them from all widths (the smaller widths whole), placed in 2-D so that similar '
            f'directions sit close together. Method: {method}. Click a point for its page.</p>'
            '<div class="mapview"><input type="radio" name="mapc" id="map-w" checked>'
            '<label for="map-w">colour by width</label> '
            '<input type="radio" name="mapc" id="map-s"><label for="map-s">colour by dominant source</label>'
            f"{chart}</div>")


def _splitting(data: SiteData) -> str:
    numbers = _findings(data).numbers
    family = numbers.get("family", {})
    t = family.get("threshold")
    rule = escape(str(family.get("threshold_rule", "")))
    how = (f'<p>The threshold of a clear parent is cosine <b>{_num(t)}</b>: {rule} '
           f'(the valley of the histogram is at {_num(family.get("threshold_valley"))}; random directions\' best '
           f'match reaches {_num(family.get("threshold_null_p999"))} at the 99.9th percentile).</p>')
    return ('<h2 id="splitting">Feature splitting</h2>'
            '<p>SAEs of several widths were trained on the same MLP activations. Each feature of a wider SAE is '
            'matched to its parent, the most similar decoder direction in the next smaller SAE. When a parent has '
            'two or more children, the wider SAE has split it into finer features. '
            f'Decided by {escape(str(family.get("decided_by", "")))}.</p>'
            + _widths_table(family, numbers.get("specificity", {}).get("pure_share"))
            + _pairs_table(family) + how
            + f'<div class="figs">{_cos_histogram(family)}</div>' + _map(data))


def _universality(data: SiteData) -> str:
    u = _findings(data).numbers.get("universality", {})
    edges = u.get("edges") or []
    charts: list[str] = []
    rows: list[list[str]] = []
    for kind in ("features", "neurons"):
        k = u.get(kind) or {}
        counts = k.get("histogram") or []
        if counts and len(edges) == len(counts) + 1:
            total = max(k.get("compared") or sum(counts), 1)
            charts.append(svg.histogram(f"{kind}: best-match correlation in model B",
                                        [svg.Series(kind, [c / total for c in counts])], edges,
                                        "activation correlation", f"fraction of {kind}",
                                        first_color=len(charts)))
        rows.append([kind, f"{int(k.get('units') or 0):,}", f"{int(k.get('compared') or 0):,}", _num(k.get("median")),
                     _pct(k.get("above_0.5")), _pct(k.get("above_0.7")), _pct(k.get("above_0.9")),
                     _pct(k.get("same_source_above_0.7"))])
    f_med, n_med = (u.get("features") or {}).get("median"), (u.get("neurons") or {}).get("median")
    verdict = ""
    if isinstance(f_med, (int, float)) and isinstance(n_med, (int, float)):
        gap = f_med - n_med
        verdict = (" Here features are more universal than neurons." if gap > 0.05 else
                   " Here neurons are more universal than features." if gap < -0.05 else
                   " Here features and neurons are about equally universal.")
    f_07 = _pct((u.get("features") or {}).get("above_0.7"))
    n_07 = _pct((u.get("neurons") or {}).get("above_0.7"))
    return ('<h2 id="universality">Universality</h2>'
            '<p>A second GPT (model B) was trained the same way from another seed, and an SAE on it. For every '
            'feature of this run\'s SAE, its best match is the model B feature whose activations correlate most '
            f'with it over the same {int(u.get("tokens") or 0):,} tokens; the same for every MLP neuron against '
            f'model B\'s neurons. ({escape(str(u.get("measure", "")))}.)</p>'
            '<p class="verdict">The paper\'s claim: features are far more universal than neurons, most features '
            'having a close counterpart in another model where most neurons do not. Measured: median best-match '
            f'correlation {_num(f_med)} for features against {_num(n_med)} for neurons; {f_07} of features and '
            f'{n_07} of neurons above 0.7.{verdict}</p>'
            f'<div class="figs">{"".join(charts)}</div>'
            + _table(["", "units", "compared", "median", "&gt; 0.5", "&gt; 0.7", "&gt; 0.9",
                      "same dominant source (of those &gt; 0.7)"], rows)
            + '<p class="muted">Each feature page names its best match in model B.</p>')


def _specificity_examples(data: SiteData) -> str:
    fnd = _findings(data)
    s = fnd.specificity
    spec, sens = s["feature_specificity"], s["feature_sensitivity"]
    purity = data.features["purity"]
    pure_share = float(fnd.numbers.get("specificity", {}).get("pure_share", 0.9))
    ok = np.isfinite(spec) & np.isfinite(sens)
    pure = ok & (purity > pure_share)
    pick = pure if pure.any() else ok
    ranked = sorted(np.flatnonzero(pick).tolist(), key=lambda f: (-float(sens[f]), f))[:EXAMPLE_FEATURES]
    rows = [[f'<a href="features/{f}.html#specificity">feature {f}</a>',
             _source(data.sources, int(data.features["dominant"][f])), _pct(float(purity[f])),
             _pct(float(spec[f])), _pct(float(sens[f])), _tokens(data, data.features["top_token_ids"][f][:5])]
            for f in ranked]
    if not rows:
        return ""
    which = "source-pure features" if pure.any() else "features (none is source-pure)"
    return (f"<h3>Examples</h3><p class=\"muted\">The most sensitive {which}; each page shows its plot.</p>"
            + _table(["feature", "source", "purity", "specificity", "sensitivity", "fires most on"], rows))


def _specificity(data: SiteData) -> str:
    sp = _findings(data).numbers.get("specificity", {})
    bins = int(sp.get("bins") or 0)
    series = []
    for kind in ("features", "neurons"):
        values = (sp.get(kind) or {}).get("share_by_level_mean") or []
        series.append(svg.Series(kind, [float(v) if isinstance(v, (int, float)) else float("nan") for v in values]))
    x = [(i + 0.5) / bins for i in range(bins)] if bins else []
    chart = svg.lines("dominant source's share by activation level", x, series,
                      "activation level (fraction of the unit's maximum)", "share") if x else ""
    rows = []
    for kind in ("features", "neurons"):
        k = sp.get(kind) or {}
        rows.append([kind, f"{int(k.get('units') or 0):,}", f"{int(k.get('pure') or 0):,}",
                     _pct(k.get("specificity_high_median")), _pct(k.get("specificity_high_median_pure")),
                     _pct(k.get("sensitivity_median")), _pct(k.get("sensitivity_median_pure"))])
    return ('<h2 id="specificity">Specificity</h2>'
            f'<p>For every unit, its firings are counted per activation level ({bins} equal bins from 0 to its '
            'maximum) and per source of the token. Specificity is the share of the dominant source among the '
            'firings in the upper half of the range: a specific unit\'s strong activations are all of one kind of '
            'text. Sensitivity is the share of that source\'s tokens the unit fires on at all.</p>'
            f'<div class="figs">{chart}</div>'
            + _table(["", "units", f"pure (&gt;{_share(sp.get('pure_share'))} one source)", "specificity, median",
                      "of pure units", "sensitivity, median", "of pure units"], rows)
            + _specificity_examples(data))


def _steering_rows(entries: list[dict[str, Any]], null: bool) -> list[list[str]]:
    rows = []
    for e in entries:
        f = e.get("feature")
        name = (f'<a href="features/{f}.html{"" if null else "#steering"}">feature {f}</a>' if isinstance(f, int)
                else "–")
        rows.append([name, escape(str(e.get("source", "–"))), _pct(e.get("purity")), _num(e.get("clamp")),
                     _pct(e.get("share_clean")), _pct(e.get("share_clamped")), _num(e.get("logprob_clean")),
                     _num(e.get("logprob_clamped"))])
    return rows


def _steering(data: SiteData) -> str:
    st = _findings(data).steering
    head = ('<h2 id="steering">Steering</h2><p>A source-pure feature is clamped to a high value at every position '
            'while the GPT continues prompts taken from the other sources\' text; the clean and clamped '
            'continuations use the same prompts and seed. A classifier trained on each source\'s text says '
            'which source each continuation reads as. Steering works when the clamped continuations turn to the '
            'feature\'s source; random mixed features clamped the same way are the control.</p>')
    if st.get("skipped"):
        return head + f'<p class="muted">Steering was not run: {escape(str(st["skipped"]))}.</p>'
    entries = _dicts(st.get("features"))
    null = _dict(st.get("null"))
    null_entries = _dicts(null.get("features"))
    if not entries:
        return head + '<p class="muted">No feature was steered.</p>'
    facts = []
    classifier = _dict(st.get("classifier"))
    if "val_accuracy" in classifier:
        facts.append(f"<tr><th>classifier accuracy on held-out text</th><td>{_pct(classifier['val_accuracy'])} "
                     f"({_by_source(classifier.get('val_accuracy_by_source'))})</td></tr>")
    baseline = _dict(st.get("baseline"))
    if "share_clean" in baseline:
        facts.append(f"<tr><th>clean continuations read as the feature's source</th><td>"
                     f"{_pct(baseline['share_clean'])} on average</td></tr>")
    for label, spread in (("clamped, steered features", _dict(st.get("steered"))),
                          ("clamped, control features", _dict(null.get("steered")))):
        if spread:
            facts.append(f"<tr><th>{label}</th><td>median {_pct(spread.get('median'))} (from "
                         f"{_pct(spread.get('min'))} to {_pct(spread.get('max'))})</td></tr>")
    logprob = _dict(st.get("logprob"))
    if logprob or "logprob_clamped" in null:
        real = _dict(classifier.get("val_logprob_by_source"))
        real_text = f" (real text: {_by_source(real, False)})" if real else ""
        facts.append("<tr><th>fluency: mean log p per token under the source's n-gram model</th><td>"
                     f"clean {_num(logprob.get('clean'))}, clamped {_num(logprob.get('clamped'))}, control clamped "
                     f"{_num(null.get('logprob_clamped'))}{real_text}</td></tr>")
    edges = np.linspace(0, 1, 11).tolist()

    def shares(items: list[dict[str, Any]], key: str) -> list[float]:
        values = [float(e[key]) for e in items if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])]
        return np.histogram(values, bins=edges)[0].tolist()

    series = [svg.Series("clean", shares(entries, "share_clean")),
              svg.Series("clamped", shares(entries, "share_clamped"))]
    if null_entries:
        series.append(svg.Series("control clamped", shares(null_entries, "share_clamped")))
    chart = svg.histogram("share of continuations read as the feature's source", series, edges, "share",
                          "features", tick_every=2)
    head_row = ["feature", "source", "purity", "clamp", "clean share", "clamped share", "log p clean",
                "log p clamped"]
    parts = [head, f'<table class="facts">{"".join(facts)}</table>', f'<div class="figs">{chart}</div>',
             "<h3>Steered features</h3>", _table(head_row, _steering_rows(entries, False))]
    if null_entries:
        parts += ["<h3>Control: mixed features</h3>", _table(head_row, _steering_rows(null_entries, True))]
    return "".join(parts)


def findings_page(data: SiteData) -> str:
    """site/findings.html."""
    fnd = _findings(data)
    n = fnd.numbers
    parts = ['<nav class="nav"><a href="index.html">← index</a> <span><a href="#splitting">splitting</a> · '
             '<a href="#universality">universality</a> · <a href="#specificity">specificity</a> · '
             '<a href="#steering">steering</a></span></nav>',
             f"<h1>Findings · {escape(data.title)}</h1>",
             f'<p class="lead">The paper\'s other findings, measured on this run at MLP layer {_num(n.get("layer"))} '
             f'over {int(n.get("tokens") or 0):,} tokens ({", ".join(escape(s) for s in fnd.sources)}).</p>',
             _splitting(data), _universality(data), _specificity(data), _steering(data)]
    return page(f"Findings · {data.title}", "\n".join(parts), 0)
