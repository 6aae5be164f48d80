"""The findings in HTML: sections of the feature pages and one page per feature of every
other family member (the Findings page itself: `monofast.site.findings_page`).

    features/<id>.html       + Family, In the other model, Specificity, Steering
    family/<member>/<id>.html  a feature of an SAE of another width: its parent, children, tree

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


def findings_of(data: SiteData) -> Findings:
    assert data.findings is not None, "findings pages need the findings"
    return data.findings


def _up(depth: int) -> str:
    return "../" * depth


def href(family: Family, member: str, f: int, depth: int) -> str:
    """Link to a family member's feature from a page `depth` folders below the site root."""
    if member == family.main:
        return f"{_up(depth)}features/{f}.html"
    return f"{_up(depth)}family/{member}/{f}.html"


def num(value: Any, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "–"
    return escape(fmt(float(value), digits))


def pct(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "–"
    return f"{value:.1%}"


def whole_pct(value: Any) -> str:
    """A share as a whole percentage (a threshold such as 90%)."""
    return f"{value:.0%}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def source_name(names: Sequence[str], s: int) -> str:
    return escape(names[s]) if 0 <= s < len(names) else "–"


def token_chips(data: SiteData, ids: np.ndarray) -> str:
    """Top tokens inline, as the pages' token lists show them."""
    chips = [f"<code>{escape(data.vocab.label(int(t)))}</code>" for t in ids if 0 <= int(t) < len(data.vocab.bytes)]
    return f'<span class="tk">{" ".join(chips)}</span>' if chips else '<span class="muted">no firings</span>'


def _member_tokens(data: SiteData, member: str, f: int) -> str:
    return token_chips(data, findings_of(data).family.arrays[f"{member}_top_tokens"][f])


# ---------------------------------------------------------------------------------------
# Parents, children and the family tree

def _link_item(data: SiteData, link: Link, depth: int) -> str:
    fam = findings_of(data).family
    weak = link.cos < fam.threshold
    note = ' <span class="weak">below the threshold: not a clear parent</span>' if weak else ""
    return (f'<li><a href="{href(fam, link.member, link.feature, depth)}">{escape(link.member)} #{link.feature}</a> '
            f'<span class="n">cos {link.cos:.2f} · corr {escape(fmt(link.corr, 2))}</span>{note} '
            f'{_member_tokens(data, link.member, link.feature)}</li>')


def relatives(data: SiteData, member: str, f: int, depth: int) -> str:
    """Two columns: the parent in the next smaller member, the children in the next larger."""
    fam = findings_of(data).family
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
    fam = findings_of(data).family
    name = f"{escape(member)} #{f}"
    label = f"<b>{name}</b> (this feature)" if current else f'<a href="{href(fam, member, f, depth)}">{name}</a>'
    if cos is not None:
        label += f' <span class="{"weak" if cos < fam.threshold else "n"}">cos {cos:.2f}</span>'
    return f"{label} {_member_tokens(data, member, f)}"


def tree(data: SiteData, member: str, f: int, depth: int) -> str:
    """Nested lists: the ancestors from the smallest member down to `f`, then its descendants
    down to the largest member (at most TREE_NODES of them)."""
    fam = findings_of(data).family
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
    fam = findings_of(data).family
    return (f'<h2 id="family">Family <a class="n" href="#tree">(tree)</a></h2>{_family_intro(fam)}'
            f'{relatives(data, fam.main, f, 1)}<h3 id="tree">Family tree</h3>{tree(data, fam.main, f, 1)}')


def other_model_section(data: SiteData, f: int) -> str:
    fnd = findings_of(data)
    u = fnd.universality
    match, corr = int(u["feature_match"][f]), float(u["feature_corr"][f])
    intro = ('<p class="muted">Model B is a second GPT trained the same way from another seed, with its own SAE; '
             'its best match is the feature whose activations correlate most with this one\'s on the same '
             'tokens. Model B has no pages of its own.</p>')
    if match < 0 or not math.isfinite(corr):
        return (f'<h2 id="other">In the other model</h2>{intro}'
                '<p>No match (this feature did not fire on the sample).</p>')
    dominant = int(u["twin_dominant"][match])
    source = (f"mostly {source_name(fnd.sources, dominant)} (purity {float(u['twin_purity'][match]):.1%})"
              if dominant >= 0 else "never fired")
    tokens = int(fnd.numbers.get("universality", {}).get("tokens", 0))
    return (f'<h2 id="other">In the other model</h2>{intro}<p>Best match: <b>feature {match}</b> of model B\'s SAE, '
            f'activation correlation <b>{corr:.3f}</b> over {tokens:,} tokens. It is {source} and fires most on '
            f'{token_chips(data, u["twin_top_tokens"][match])}.</p>')


def specificity_chart(data: SiteData, levels: np.ndarray, top: float, title: str) -> str:
    """Stacked bars of firings (bins, sources) per activation level, paper-style."""
    edges = np.linspace(0.0, top, len(levels) + 1).tolist()
    return svg.stacked_bars(title, levels.tolist(), edges, findings_of(data).sources or data.sources,
                            "activation (equal bins from 0 to the maximum)", "firings")


def specificity_section(data: SiteData, f: int) -> str:
    fnd = findings_of(data)
    s = fnd.specificity
    levels = s["feature_levels"][f]  # (NB, S)
    head = '<h2 id="specificity">Specificity</h2>'
    if levels.sum() == 0:
        return head + '<p class="muted">Never fired on the findings\' tokens.</p>'
    dominant = int(data.features["dominant"][f])
    name = source_name(data.sources, dominant) if dominant >= 0 else "its dominant source's"
    spec, sens = float(s["feature_specificity"][f]), float(s["feature_sensitivity"][f])
    return (f'{head}<p class="muted">Its firings on the findings\' tokens by activation level and by the source of '
            f'the token: a specific feature\'s high activations are all of one source.</p>'
            + specificity_chart(data, levels, float(s["feature_max"][f]), f"feature {f}: activation level by source")
            + f'<p>Specificity: {pct(spec)} of its firings in the upper half of its range are on {name} tokens. '
              f'Sensitivity: it fires on {pct(sens)} of the {name} tokens.</p>')


def as_dict(value: Any) -> dict[str, Any]:
    """A dict read from steering.json (anything else: an empty one)."""
    return value if isinstance(value, dict) else {}


def as_dicts(value: Any) -> list[dict[str, Any]]:
    """The dicts of a list read from steering.json (anything else: none)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _text_cell(text: Any) -> str:
    return f'<div class="gen">{display(text) if isinstance(text, str) else ""}</div>'


def _fluency(entry: dict[str, Any]) -> str:
    """The continuations' mean log-probability per token under the source's n-gram model."""
    if num(entry.get("logprob_clean")) == "–" and num(entry.get("logprob_clamped")) == "–":
        return ""
    return (f" Fluency (mean log p per token under the source's n-gram model): {num(entry.get('logprob_clean'))} "
            f"clean, {num(entry.get('logprob_clamped'))} clamped.")


def steering_section(data: SiteData, f: int) -> str:
    entry = findings_of(data).steered().get(f)
    if entry is None:
        return ""
    source = escape(str(entry.get("source", "its source")))
    prompts = entry.get("prompt_sources")
    from_text = (" of " + ", ".join(f"{escape(str(k))} ({num(v)})" for k, v in prompts.items())
                 if isinstance(prompts, dict) and prompts else "")
    how = f" at {num(entry.get('clamp'))}" if num(entry.get("clamp")) != "–" else ""
    if how and num(entry.get("multiple")) != "–":
        how += f" ({num(entry.get('multiple'))}× its largest activation)"
    parts = [f'<h2 id="steering">Steering</h2><p>Clamped{how} at every position while the GPT continued prompts'
             f'{from_text}, from the same seed as the clean continuations. Continuations read as {source} by the '
             f'source classifier: <b>{pct(entry.get("share_clean"))}</b> clean, '
             f'<b>{pct(entry.get("share_clamped"))}</b> clamped.{_fluency(entry)}</p>']
    examples = as_dicts(entry.get("examples"))
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
    fnd = findings_of(data)
    fam = fnd.family
    a = fam.arrays
    n = fam.size(member)
    dominant = int(a[f"{member}_dominant"][f])
    density = float(a[f"{member}_density"][f])
    if dominant >= 0:
        purity = float(a[f"{member}_purity"][f])
        source = f"{source_name(fnd.sources, dominant)}, purity {purity:.1%} of its activation mass"
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
