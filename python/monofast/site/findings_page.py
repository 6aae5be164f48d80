"""The Findings page (`site/findings.html`): the four findings' numbers and figures, with
links into the feature and family pages."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from monofast.site import svg
from monofast.site.findings_pages import href, as_dict, as_dicts, findings_of, num, pct, source_name, token_chips, whole_pct
from monofast.site.pages import SiteData, page
from monofast.site.text import escape

EXAMPLE_FEATURES = 8
"""Features the Findings page links to as examples of specificity."""


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
    return ", ".join(f"{escape(str(k))} {pct(v) if as_pct else num(v)}" for k, v in values.items())


def _widths_table(family: dict[str, Any], pure_share: Any) -> str:
    quality = {q.get("name"): q for q in family.get("quality", []) if isinstance(q, dict)}
    rows, chosen = [], []
    for w in family.get("widths", []):
        q = quality.get(w.get("name"), {})
        misses = q.get("misses") or []
        goal = ("meets" if q.get("meets_goal") else
                "misses: " + "; ".join(escape(str(m)) for m in misses) if misses else "–")
        name = escape(str(w.get("name"))) + (" (the run's SAE)" if w.get("main") else "")
        rows.append([name, f"{int(w.get('width', 0)):,}", f"{int(w.get('alive', 0)):,}", pct(w.get("pure_fraction")),
                     _by_source(w.get("pure_by_source")), num(w.get("mean_purity")), num(q.get("l0")),
                     num(q.get("fvu")), pct(q.get("dead_fraction")), pct(q.get("ce_loss_recovered")),
                     _by_source(q.get("ce_loss_recovered_by_source")), num(q.get("l1_coeff")), goal])
        chosen.append(bool(w.get("main")))
    return _table(["SAE", "features", "alive", f"pure (&gt;{whole_pct(pure_share)} one source)", "pure, by source",
                   "mean purity", "L0", "FVU", "dead", "CE loss recovered", "by source", "L1 coeff", "quality goal"],
                  rows, chosen)


def _pairs_table(family: dict[str, Any]) -> str:
    rows = []
    for p in family.get("pairs", []):
        pair = f"{escape(str(p.get('small')))} → {escape(str(p.get('large')))}"
        rows.append([pair, pct(p.get("clear_parent_share")),
                     num(p.get("median_parent_cos")), num(p.get("median_parent_corr_clear")),
                     f"{int(p.get('parents_with_children') or 0):,} ({pct(p.get('parents_with_children_share'))})",
                     f"{num(p.get('children_mean'))} / {num(p.get('children_median'))}", pct(p.get("split_share"))])
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
        if num(family.get("threshold")) != "–" else []
    return svg.histogram("decoder cosine of each feature to its parent", series, edges, "cosine",
                         "fraction of features", marks=marks)


def _map(data: SiteData) -> str:
    fnd = findings_of(data)
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
    numbers = findings_of(data).numbers
    family = numbers.get("family", {})
    t = family.get("threshold")
    rule = escape(str(family.get("threshold_rule", "")))
    how = (f'<p>The threshold of a clear parent is cosine <b>{num(t)}</b>: {rule} '
           f'(the valley of the histogram is at {num(family.get("threshold_valley"))}; random directions\' best '
           f'match reaches {num(family.get("threshold_null_p999"))} at the 99.9th percentile).</p>')
    return ('<h2 id="splitting">Feature splitting</h2>'
            '<p>SAEs of several widths were trained on the same MLP activations. Each feature of a wider SAE is '
            'matched to its parent, the most similar decoder direction in the next smaller SAE. When a parent has '
            'two or more children, the wider SAE has split it into finer features. '
            f'Decided by {escape(str(family.get("decided_by", "")))}.</p>'
            + _widths_table(family, numbers.get("specificity", {}).get("pure_share"))
            + _pairs_table(family) + how
            + f'<div class="figs">{_cos_histogram(family)}</div>' + _map(data))


def _universality(data: SiteData) -> str:
    u = findings_of(data).numbers.get("universality", {})
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
        rows.append([kind, f"{int(k.get('units') or 0):,}", f"{int(k.get('compared') or 0):,}", num(k.get("median")),
                     pct(k.get("above_0.5")), pct(k.get("above_0.7")), pct(k.get("above_0.9")),
                     pct(k.get("same_source_above_0.7"))])
    f_med, n_med = (u.get("features") or {}).get("median"), (u.get("neurons") or {}).get("median")
    verdict = ""
    if isinstance(f_med, (int, float)) and isinstance(n_med, (int, float)):
        gap = f_med - n_med
        verdict = (" Here features are more universal than neurons." if gap > 0.05 else
                   " Here neurons are more universal than features." if gap < -0.05 else
                   " Here features and neurons are about equally universal.")
    f_07 = pct((u.get("features") or {}).get("above_0.7"))
    n_07 = pct((u.get("neurons") or {}).get("above_0.7"))
    return ('<h2 id="universality">Universality</h2>'
            '<p>A second GPT (model B) was trained the same way from another seed, and an SAE on it. For every '
            'feature of this run\'s SAE, its best match is the model B feature whose activations correlate most '
            f'with it over the same {int(u.get("tokens") or 0):,} tokens; the same for every MLP neuron against '
            f'model B\'s neurons. ({escape(str(u.get("measure", "")))}.)</p>'
            '<p class="verdict">The paper\'s claim: features are far more universal than neurons, most features '
            'having a close counterpart in another model where most neurons do not. Measured: median best-match '
            f'correlation {num(f_med)} for features against {num(n_med)} for neurons; {f_07} of features and '
            f'{n_07} of neurons above 0.7.{verdict}</p>'
            f'<div class="figs">{"".join(charts)}</div>'
            + _table(["", "units", "compared", "median", "&gt; 0.5", "&gt; 0.7", "&gt; 0.9",
                      "same dominant source (of those &gt; 0.7)"], rows)
            + '<p class="muted">Each feature page names its best match in model B.</p>')


def _specificity_examples(data: SiteData) -> str:
    fnd = findings_of(data)
    s = fnd.specificity
    spec, sens = s["feature_specificity"], s["feature_sensitivity"]
    purity = data.features["purity"]
    pure_share = float(fnd.numbers.get("specificity", {}).get("pure_share", 0.9))
    ok = np.isfinite(spec) & np.isfinite(sens)
    pure = ok & (purity > pure_share)
    pick = pure if pure.any() else ok
    ranked = sorted(np.flatnonzero(pick).tolist(), key=lambda f: (-float(sens[f]), f))[:EXAMPLE_FEATURES]
    rows = [[f'<a href="features/{f}.html#specificity">feature {f}</a>',
             source_name(data.sources, int(data.features["dominant"][f])), pct(float(purity[f])),
             pct(float(spec[f])), pct(float(sens[f])), token_chips(data, data.features["top_token_ids"][f][:5])]
            for f in ranked]
    if not rows:
        return ""
    which = "source-pure features" if pure.any() else "features (none is source-pure)"
    return (f"<h3>Examples</h3><p class=\"muted\">The most sensitive {which}; each page shows its plot.</p>"
            + _table(["feature", "source", "purity", "specificity", "sensitivity", "fires most on"], rows))


def _specificity(data: SiteData) -> str:
    sp = findings_of(data).numbers.get("specificity", {})
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
                     pct(k.get("specificity_high_median")), pct(k.get("specificity_high_median_pure")),
                     pct(k.get("sensitivity_median")), pct(k.get("sensitivity_median_pure"))])
    return ('<h2 id="specificity">Specificity</h2>'
            f'<p>For every unit, its firings are counted per activation level ({bins} equal bins from 0 to its '
            'maximum) and per source of the token. Specificity is the share of the dominant source among the '
            'firings in the upper half of the range: a specific unit\'s strong activations are all of one kind of '
            'text. Sensitivity is the share of that source\'s tokens the unit fires on at all.</p>'
            f'<div class="figs">{chart}</div>'
            + _table(["", "units", f"pure (&gt;{whole_pct(sp.get('pure_share'))} one source)", "specificity, median",
                      "of pure units", "sensitivity, median", "of pure units"], rows)
            + _specificity_examples(data))


def _steering_rows(entries: list[dict[str, Any]], null: bool) -> list[list[str]]:
    rows = []
    for e in entries:
        f = e.get("feature")
        name = (f'<a href="features/{f}.html{"" if null else "#steering"}">feature {f}</a>' if isinstance(f, int)
                else "–")
        rows.append([name, escape(str(e.get("source", "–"))), pct(e.get("purity")), num(e.get("clamp")),
                     pct(e.get("share_clean")), pct(e.get("share_clamped")), num(e.get("logprob_clean")),
                     num(e.get("logprob_clamped"))])
    return rows


def _steering(data: SiteData) -> str:
    st = findings_of(data).steering
    head = ('<h2 id="steering">Steering</h2><p>A source-pure feature is clamped to a high value at every position '
            'while the GPT continues prompts taken from the other sources\' text; the clean and clamped '
            'continuations use the same prompts and seed. A classifier trained on each source\'s text says '
            'which source each continuation reads as. Steering works when the clamped continuations turn to the '
            'feature\'s source; random mixed features clamped the same way are the control.</p>')
    if st.get("skipped"):
        return head + f'<p class="muted">Steering was not run: {escape(str(st["skipped"]))}.</p>'
    entries = as_dicts(st.get("features"))
    null = as_dict(st.get("null"))
    null_entries = as_dicts(null.get("features"))
    if not entries:
        return head + '<p class="muted">No feature was steered.</p>'
    facts = []
    classifier = as_dict(st.get("classifier"))
    if "val_accuracy" in classifier:
        facts.append(f"<tr><th>classifier accuracy on held-out text</th><td>{pct(classifier['val_accuracy'])} "
                     f"({_by_source(classifier.get('val_accuracy_by_source'))})</td></tr>")
    baseline = as_dict(st.get("baseline"))
    if "share_clean" in baseline:
        facts.append(f"<tr><th>clean continuations read as the feature's source</th><td>"
                     f"{pct(baseline['share_clean'])} on average</td></tr>")
    for label, spread in (("clamped, steered features", as_dict(st.get("steered"))),
                          ("clamped, control features", as_dict(null.get("steered")))):
        if spread:
            facts.append(f"<tr><th>{label}</th><td>median {pct(spread.get('median'))} (from "
                         f"{pct(spread.get('min'))} to {pct(spread.get('max'))})</td></tr>")
    logprob = as_dict(st.get("logprob"))
    if logprob or "logprob_clamped" in null:
        real = as_dict(classifier.get("val_logprob_by_source"))
        real_text = f" (real text: {_by_source(real, False)})" if real else ""
        facts.append("<tr><th>fluency: mean log p per token under the source's n-gram model</th><td>"
                     f"clean {num(logprob.get('clean'))}, clamped {num(logprob.get('clamped'))}, control clamped "
                     f"{num(null.get('logprob_clamped'))}{real_text}</td></tr>")
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
    fnd = findings_of(data)
    n = fnd.numbers
    parts = ['<nav class="nav"><a href="index.html">← index</a> <span><a href="#splitting">splitting</a> · '
             '<a href="#universality">universality</a> · <a href="#specificity">specificity</a> · '
             '<a href="#steering">steering</a></span></nav>',
             f"<h1>Findings · {escape(data.title)}</h1>",
             f'<p class="lead">The paper\'s other findings, measured on this run at MLP layer {num(n.get("layer"))} '
             f'over {int(n.get("tokens") or 0):,} tokens ({", ".join(escape(s) for s in fnd.sources)}).</p>',
             _splitting(data), _universality(data), _specificity(data), _steering(data)]
    return page(f"Findings · {data.title}", "\n".join(parts), 0)
