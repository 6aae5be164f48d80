"""The headline numbers of a run, read back from its stages' output files.

`monofast run` prints them when it ends and `monofast report` writes them as markdown:
GPT validation loss (overall and per source), the published SAE's L0, FVU, CE-loss
recovered and dead / dense shares, the share of features (and, for comparison, MLP
neurons) that are more than 90% one source, and where the feature browser is. A stage
that has not finished contributes no rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Optional

from monofast.common import files



class Row(NamedTuple):
    label: str
    value: str
    detail: str = ""
    """Per-source numbers or a comparison, shown after the value."""


class Results(NamedTuple):
    """What a finished (or partly finished) run directory holds."""

    run: Path
    gpt: Optional[dict[str, Any]]
    """The last evaluation of gpt/metrics.jsonl."""
    sae_name: str
    sae: Optional[dict[str, Any]]
    """The published SAE's entry of sae/eval.json."""
    sae_shape: tuple[int, int]
    """(d_in, d_sae) of the published SAE, (0, 0) when unknown."""
    summary: Optional[dict[str, Any]]
    """analysis/summary.json."""
    site_index: Optional[Path]
    seconds: dict[str, float]
    """Seconds each finished stage took, from its manifest (the twin's as `twin/gpt`)."""
    findings: Optional[dict[str, Any]] = None
    """findings/findings.json, when the run had the findings."""


def _finished(run: Path, stage: str) -> Optional[Path]:
    folder = run / stage
    return folder if (folder / files.MANIFEST_FILE).is_file() else None


def _last_eval(path: Path) -> Optional[dict[str, Any]]:
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if "val_loss" in record:
                last = record
    return last


def collect(run: str | Path) -> Results:
    """Read the numbers of every finished stage of `run`."""
    run = Path(run)
    gpt_dir, sae_dir = _finished(run, "gpt"), _finished(run, "sae")
    analysis_dir, site_dir = _finished(run, "analysis"), _finished(run, "site")
    gpt = _last_eval(gpt_dir / "metrics.jsonl") if gpt_dir and (gpt_dir / "metrics.jsonl").is_file() else None
    sae_name, sae, shape = "", None, (0, 0)
    if sae_dir and (sae_dir / "eval.json").is_file():
        evaluation = files.read_json(sae_dir / "eval.json", "SAE evaluation")
        cfg = files.read_json(sae_dir / "cfg.json", "SAE config") if (sae_dir / "cfg.json").is_file() else {}
        members = evaluation.get("saes", {})
        sae_name = cfg.get("sweep_member") or next(iter(members), "")
        sae = members.get(sae_name)
        if sae is not None and "ce_loss_gap_by_source" in evaluation:  # shared by the members: kept beside
            sae = {**sae, "ce_loss_gap": evaluation["ce_loss_gap"],
                   "ce_loss_gap_by_source": evaluation["ce_loss_gap_by_source"]}
        shape = (int(cfg.get("d_in", 0)), int(cfg.get("d_sae", 0)))
    summary = None
    if analysis_dir and (analysis_dir / "summary.json").is_file():
        summary = files.read_json(analysis_dir / "summary.json", "analysis summary")
    site_index = site_dir / "index.html" if site_dir and (site_dir / "index.html").is_file() else None
    seconds = {}
    folders = [p for p in run.iterdir() if p.is_dir()] if run.is_dir() else []
    folders += [p for p in (run / "twin").iterdir() if p.is_dir()] if (run / "twin").is_dir() else []
    for folder in sorted(folders):
        if (folder / files.MANIFEST_FILE).is_file():
            try:
                seconds[folder.relative_to(run).as_posix()] = float(
                    json.loads((folder / files.MANIFEST_FILE).read_text())["seconds"])
            except (ValueError, KeyError, TypeError):
                continue
    findings_dir = _finished(run, "findings")
    findings = (files.read_json(findings_dir / "findings.json", "findings")
                if findings_dir and (findings_dir / "findings.json").is_file() else None)
    return Results(run, gpt, sae_name, sae, shape, summary, site_index, seconds, findings)


# ---------------------------------------------------------------------------------------
# Rows

def _by_source(values: Optional[dict[str, float]], fmt: str) -> str:
    if not values:
        return ""
    return ", ".join(f"{name} {format(v, fmt)}" for name, v in values.items())


def units(hook: str | None) -> str:
    """What the SAE's input dimensions are, by the hook it reads (a Hugging Face model's may
    be the residual stream or an attention output)."""
    if hook and hook.endswith("hook_resid_post"):
        return "residual-stream dimensions"
    if hook and hook.endswith("hook_attn_out"):
        return "attention-output dimensions"
    return "MLP neurons"


def rows(res: Results) -> list[Row]:
    """The results as (label, value, detail) rows, in reading order."""
    out: list[Row] = []
    basis = units((res.summary or {}).get("hook_name"))
    if res.gpt is not None:
        out.append(Row("GPT validation loss", f"{res.gpt['val_loss']:.3f}",
                       _by_source(res.gpt.get("val_loss_by_source"), ".3f")))
    if res.sae is not None:
        d_in, d_sae = res.sae_shape
        shape = f"{d_sae:,} features on {d_in:,} {basis}" if d_sae else ""
        out.append(Row("SAE", res.sae_name, shape))
        out.append(Row("L0 (features firing per token)", f"{res.sae['l0']:.1f}"))
        out.append(Row("FVU (variance unexplained)", f"{res.sae['fvu']:.3f}"))
        if res.sae.get("ce_loss_recovered") is not None:
            out.append(Row("CE-loss recovered", f"{res.sae['ce_loss_recovered']:.1%}",
                           _by_source(res.sae.get("ce_loss_recovered_by_source"), ".1%")))
        if res.sae.get("ce_loss_gap") is not None:  # the ratio's denominator: small, and the ratio says little
            out.append(Row("CE-loss gap (zero-ablated - clean)", f"{res.sae['ce_loss_gap']:.3f} nats",
                           _by_source(res.sae.get("ce_loss_gap_by_source"), ".3f")))
        if res.sae.get("kl_div") is not None:
            out.append(Row("KL to the clean model (SAE spliced in)", f"{res.sae['kl_div']:.3g} nats",
                           _by_source(res.sae.get("kl_div_by_source"), ".3g")))
        out.append(Row("dead / dense features",
                       f"{res.sae['dead_fraction']:.1%} / {res.sae['dense_fraction']:.1%}",
                       "dense: firing on more than 10% of tokens"))
    if res.summary is not None:
        pure = res.summary["purity"]["pure_share"]
        features = res.summary["pure_by_source"]["features"]
        neurons = res.summary["pure_by_source"]["neurons"]
        for name, share in features.items():
            out.append(Row(f"features > {pure:.0%} {name}", f"{share:.1%}",
                           f"{basis} {neurons.get(name, 0.0):.1%}"))
        f_all = res.summary["purity"]["features"].get("pure_fraction")
        n_all = res.summary["purity"]["neurons"].get("pure_fraction")
        if f_all is not None and n_all is not None:
            out.append(Row(f"features > {pure:.0%} one source", f"{f_all:.1%}", f"{basis} {n_all:.1%}"))
    if res.findings is not None:
        out += findings_rows(res.findings)
    return out


def findings_rows(found: dict[str, Any]) -> list[Row]:
    """The paper's other findings: splitting, universality, specificity, steering."""
    out: list[Row] = []
    pairs = found.get("family", {}).get("pairs", [])
    if pairs:
        detail = "; ".join(f"{p['small'][1:]}->{p['large'][1:]}: {p['clear_parent_share']:.0%}, "
                           f"{p['children_mean'] or 0:.1f} children each" for p in pairs)
        out.append(Row("features with a clear parent (splitting)",
                       f"{sum(p['clear_parent_share'] for p in pairs) / len(pairs):.1%}", detail))
    u = found.get("universality", {})
    if u.get("features"):
        f, n = u["features"], u["neurons"]
        out.append(Row("features matched in a 2nd model (r > 0.7)", f"{f['above_0.7']:.1%}",
                       f"MLP neurons {n['above_0.7']:.1%}; median best r {f['median'] or 0:.2f} vs {n['median'] or 0:.2f}"))
    spec = found.get("specificity", {})
    if spec.get("features", {}).get("specificity_high_median") is not None:
        f, n = spec["features"], spec["neurons"]
        out.append(Row("specificity at high activation (median)", f"{f['specificity_high_median']:.1%}",
                       f"MLP neurons {n['specificity_high_median'] or 0:.1%}"))
    steer = found.get("steering", {})
    clamped = steer.get("steered") or {}
    base = (steer.get("baseline") or {}).get("share_clean")
    null = ((steer.get("null") or {}).get("steered") or {}).get("median")
    if clamped.get("median") is not None and base is not None:
        control = f"; random mixed features {null:.1%}" if null is not None else ""
        out.append(Row("clamped continuations in the feature's source", f"{clamped['median']:.1%}",
                       f"median per feature; unclamped {base:.1%}{control}"))
    return out


def text(res: Results) -> str:
    """The table `monofast run` prints at the end."""
    body = rows(res)
    lines = [f"results of {res.run}"]
    width = max([len(r.label) for r in body] + [10])
    value_width = max([len(r.value) for r in body] + [5])
    for r in body:
        detail = f"  ({r.detail})" if r.detail else ""
        lines.append(f"  {r.label.ljust(width)}  {r.value.rjust(value_width)}{detail}")
    if res.site_index is not None:
        lines.append(f"  {'feature browser'.ljust(width)}  {res.site_index}")
    return "\n".join(lines)


def markdown(res: Results) -> str:
    """The same rows as a markdown table."""
    lines = ["| metric | value | detail |", "|---|---|---|"]
    lines += [f"| {r.label} | {r.value} | {r.detail} |" for r in rows(res)]
    return "\n".join(lines)


def timings_markdown(res: Results, stages: list[str]) -> str:
    """Seconds per stage (from the manifests) as a markdown table."""
    lines = ["| stage | time |", "|---|---|"]
    total = 0.0
    for name in stages:
        if name in res.seconds:
            total += res.seconds[name]
            lines.append(f"| {name} | {res.seconds[name]:.1f} s |")
    lines.append(f"| all stages | {total:.0f} s |")
    return "\n".join(lines)
