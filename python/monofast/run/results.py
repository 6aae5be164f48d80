"""The headline numbers of a run, read back from its stages' output files.

`monofast run` prints them when it ends and `monofast report` writes them as markdown:
GPT validation loss (overall and per source), the published SAE's L0, FVU, CE-loss
recovered and dead / dense shares, the share of features (and, for comparison, MLP
neurons) that are more than 90% one source, and where the feature browser is.

Only finished stages are read, checked as a command outside the pipeline checks what it
reads (`monofast.run.manifest.require_current`): every file against the digest its stage's
manifest recorded (a missing or changed one is one line naming it and the stage to redo),
then the fields the rows print. A stage that has not finished, or was made from files redone
since, contributes no rows, and the table says so (`Results.missing`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from monofast.common import files
from monofast.common.errors import DataError, UserError
from monofast.run.manifest import MANIFEST_FORMAT, incompatible, require_current
from monofast.run.stages import RunDir


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
    missing: tuple[str, ...] = ()
    """The rows the table lacks, each with why: a stage that has not finished or was made
    from files redone since, a number its stage did not measure."""
    evaluation: Optional[dict[str, Any]] = None
    """sae/eval.json whole: every member of the sweep (the report's Pareto charts)."""


# ---------------------------------------------------------------------------------------
# Reading a finished stage's files

class Finished(NamedTuple):
    """A finished stage's folder and what its manifest recorded of each output."""

    folder: Path
    outputs: dict[str, Any]
    """`relative/path` -> {digest, size, mtime_ns}."""
    seconds: Optional[float]

    @property
    def redo(self) -> str:
        return files.redo_stage(self.folder)

    def file(self, name: str) -> Optional[Path]:
        """`folder/name` when the stage recorded it; None when it did not write it."""
        return self.folder / name if name in self.outputs else None

    def required(self, name: str) -> Path:
        """`folder/name`, a file every finished stage of its kind writes."""
        path = self.file(name)
        if path is None:
            raise DataError(f"{self.folder / name} is not among the files stage {self.folder.name!r} recorded in "
                            f"its {files.MANIFEST_FILE}; {self.redo}")
        return path


def finished(run: Path, stage: str) -> Optional[Finished]:
    """Folder `stage` of `run` (`twin/gpt`: the second model's GPT) when its manifest says it
    finished; None when it has not. A corrupt manifest, or one another monofast wrote, is a
    `UserError` naming the fix. Its files are not checked here (`current` does)."""
    folder = run / stage
    path = folder / files.MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = files.read_json(path, "manifest")
    outputs = manifest.get("outputs") if isinstance(manifest, dict) else None
    if not isinstance(outputs, dict) or not all(isinstance(record, dict) for record in outputs.values()):
        raise DataError(f"{path} does not record the stage's outputs; {files.redo_stage(folder)}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise incompatible(folder, manifest)
    seconds: Any = manifest.get("seconds")
    return Finished(folder, outputs, float(seconds) if is_number(seconds) else None)


def current(run: Path, stage: str, rows: str, missing: list[str], extra: bool = False,
            required: bool = False) -> Optional[Finished]:
    """Stage `stage` of `run` when it has finished, checked as a command outside the pipeline
    checks what it reads (`require_current`): its files, and those of the stages it was made
    from, as their manifests recorded them (one missing or changed since is a `DataError`
    naming it and the stage to redo), and made from the files those stages hold now.
    None when it has not finished or was made from files redone since: a note in `missing`
    then says which `rows` the table lacks and why (for an `extra`'s stage, only when the
    run has its folder). A `required` stage made from files redone since is a `UserError`."""
    done = finished(run, stage)
    if done is None:
        if not extra or (run / stage).is_dir():
            missing.append(f"{rows}: stage {stage!r} has not finished (no {stage}/{files.MANIFEST_FILE})")
        return None
    try:
        require_current(RunDir(run), stage)
    except DataError:
        raise
    except UserError as err:  # made from files redone since: its numbers are of another run
        if required:
            raise
        missing.append(f"{rows}: {err}")
        return None
    return done


def is_number(value: Any) -> bool:
    """A JSON number (a bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


KINDS: dict[str, Callable[[Any], bool]] = {
    "a number": is_number,
    "an object": lambda v: isinstance(v, dict),
    "a string": lambda v: isinstance(v, str),
    "numbers by source": lambda v: isinstance(v, dict) and all(is_number(x) for x in v.values()),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of numbers": lambda v: isinstance(v, list) and all(is_number(x) for x in v),
}
"""What a field of a stage's JSON file may hold, by the name its error gives."""


def _checked(doc: Any, path: Path, stage: Finished, fields: dict[str, str], at: str = "") -> dict[str, Any]:
    """`doc` (the object at dotted key `at` of the file `path`; "": the whole file) when it
    is a JSON object whose fields hold the `KINDS` that `fields` says (dotted keys; a
    trailing `?`: may be absent or null); else a `DataError` naming the file and field."""
    if not isinstance(doc, dict):
        where = f"{path}: {at} is" if at else f"{path} holds"
        raise DataError(f"{where} {json.dumps(doc)[:40]}, not a JSON object; {stage.redo}")
    for key, kind in fields.items():
        name = key.rstrip("?")
        value: Any = doc
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if (value is None and key.endswith("?")) or KINDS[kind](value):
            continue
        found = "missing" if value is None else json.dumps(value)[:40]
        raise DataError(f"{path}: {at + '.' if at else ''}{name} is {found}, expected {kind}; {stage.redo}")
    return doc


# ---------------------------------------------------------------------------------------
# Each stage's numbers

GPT_FIELDS = {"val_loss": "a number", "val_loss_by_source?": "numbers by source"}


def _gpt(stage: Optional[Finished], missing: list[str]) -> Optional[dict[str, Any]]:
    """The last evaluation of gpt/metrics.jsonl."""
    if stage is None:
        return None
    path = stage.file("metrics.jsonl")
    if path is None:  # a Hugging Face model in the GPT's place: nothing trained here
        missing.append("GPT validation loss: the gpt stage trained no model (no gpt/metrics.jsonl)")
        return None
    last = None
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError as err:  # not UTF-8, or not JSON
            raise DataError(f"{path} line {number} is not JSON ({err}); {stage.redo}") from None
        if isinstance(record, dict) and "val_loss" in record:
            last = record
    if last is None:
        raise DataError(f"{path} holds no evaluation (no line with a val_loss); {stage.redo}")
    return _checked(last, path, stage, GPT_FIELDS, "the last evaluation")


EVAL_FIELDS = {"saes": "an object", "rows?": "a number",
               "ce_loss_gap?": "a number", "ce_loss_gap_by_source?": "numbers by source"}
CFG_FIELDS = {"sweep_member?": "a string", "d_in?": "a number", "d_sae?": "a number"}
HELD_OUT = ("l0", "fvu", "dead_fraction", "dense_fraction")
"""An SAE's numbers on the held-out rows of the activations (none when none were held out)."""
SAE_FIELDS = {**{name: "a number" for name in HELD_OUT},
              "ce_loss_recovered?": "a number", "ce_loss_recovered_by_source?": "numbers by source",
              "kl_div?": "a number", "kl_div_by_source?": "numbers by source"}
SAE_ROWS = "SAE, L0, FVU, CE-loss and dead / dense features"


class _SAE(NamedTuple):
    name: str
    entry: Optional[dict[str, Any]]
    shape: tuple[int, int]
    evaluation: Optional[dict[str, Any]]


def _sae(stage: Optional[Finished], missing: list[str]) -> _SAE:
    """The published SAE's entry of sae/eval.json (with the CE-loss gap its members share)."""
    if stage is None:
        return _SAE("", None, (0, 0), None)
    path = stage.required("eval.json")
    evaluation = _checked(files.read_json(path, "SAE evaluation"), path, stage, EVAL_FIELDS)
    cfg_path = stage.required("cfg.json")
    cfg = _checked(files.read_json(cfg_path, "SAE config"), cfg_path, stage, CFG_FIELDS)
    members = evaluation["saes"]
    name = cfg.get("sweep_member") or next(iter(members), "")
    shape = (int(cfg.get("d_in") or 0), int(cfg.get("d_sae") or 0))
    if name not in members:  # no held-out rows and no CE-loss evaluation: nothing measured
        missing.append(f"{SAE_ROWS}: {path} has no numbers for SAE {name!r}")
        return _SAE(name, None, shape, evaluation)
    fields = SAE_FIELDS
    if evaluation.get("rows") == 0:
        fields = {(f"{k}?" if k in HELD_OUT else k): kind for k, kind in SAE_FIELDS.items()}
        missing.append(f"L0, FVU and dead / dense features: {path} has no held-out rows (hold rows out with --held-out N)")
    entry = _checked(members[name], path, stage, fields, f"saes.{name}")
    if evaluation.get("ce_loss_gap") is not None:  # shared by the members: kept beside
        entry = {**entry, "ce_loss_gap": evaluation["ce_loss_gap"],
                 "ce_loss_gap_by_source": evaluation.get("ce_loss_gap_by_source")}
    return _SAE(name, entry, shape, evaluation)


SUMMARY_FIELDS = {
    "purity.pure_share": "a number", "purity.features": "an object", "purity.neurons": "an object",
    "purity.features.pure_fraction?": "a number", "purity.neurons.pure_fraction?": "a number",
    "pure_by_source.features": "numbers by source", "pure_by_source.neurons": "numbers by source",
    "purity_histogram.edges": "a list of numbers", "purity_histogram.features": "a list of numbers",
    "purity_histogram.neurons": "a list of numbers", "sources": "a list of strings", "hook_name?": "a string",
}


def _summary(stage: Optional[Finished]) -> Optional[dict[str, Any]]:
    """analysis/summary.json, with the fields the table and the report's purity figure read."""
    from monofast.analysis.output import FORMAT

    if stage is None:
        return None
    path = stage.required("summary.json")
    summary = files.read_json(path, "analysis summary")
    if isinstance(summary, dict) and summary.get("format") != FORMAT:
        raise DataError(f"{path} has format {summary.get('format')}, expected {FORMAT}; {stage.redo}")
    summary = _checked(summary, path, stage, SUMMARY_FIELDS)
    hist = summary["purity_histogram"]
    if not len(hist["edges"]) == len(hist["features"]) + 1 == len(hist["neurons"]) + 1:
        raise DataError(f"{path}: purity_histogram has {len(hist['edges'])} edges for {len(hist['features'])} "
                        f"and {len(hist['neurons'])} bins; {stage.redo}")
    return summary


def _findings(stage: Optional[Finished]) -> Optional[dict[str, Any]]:
    """findings/findings.json, when the run has the findings (`--with findings`)."""
    if stage is None:
        return None
    path = stage.required("findings.json")
    found = _checked(files.read_json(path, "findings"), path, stage, {})
    try:  # its rows read a deep, partly optional tree: reading them is the check
        findings_rows(found)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{path} lacks numbers the results table reads ({type(err).__name__}: {err}); "
                        f"{stage.redo}") from None
    return found


def collect(run: str | Path, required: tuple[str, ...] = ()) -> Results:
    """Read the numbers of every finished stage of `run`, each stage's files checked first
    (`current`); a stage of `required` made from files redone since is a `UserError`."""
    run = Path(run)
    missing: list[str] = []

    def read(stage: str, rows: str, extra: bool = False) -> Optional[Finished]:
        return current(run, stage, rows, missing, extra, stage in required)

    gpt = _gpt(read("gpt", "GPT validation loss"), missing)
    sae = _sae(read("sae", SAE_ROWS), missing)
    summary = _summary(read("analysis", "features more than 90% one source"))
    site = read("site", "feature browser")
    site_index = site.required("index.html") if site else None
    findings = _findings(read("findings", "the findings", extra=True))
    seconds = {}
    folders = [p for p in run.iterdir() if p.is_dir()] if run.is_dir() else []
    folders += [p for p in (run / "twin").iterdir() if p.is_dir()] if (run / "twin").is_dir() else []
    for folder in sorted(folders):
        try:  # only its time is read: not checked, and a folder that is no finished stage is skipped
            done = finished(run, folder.relative_to(run).as_posix())
        except UserError:
            continue
        if done is not None and done.seconds is not None:
            seconds[folder.relative_to(run).as_posix()] = done.seconds
    return Results(run, gpt, sae.name, sae.entry, sae.shape, summary, site_index, seconds, findings,
                   tuple(missing), sae.evaluation)


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
        if res.sae.get("l0") is not None:  # none without held-out rows (`Results.missing` says so)
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
        if res.sae.get("dead_fraction") is not None:
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
    """The table `monofast run` prints at the end, then the rows it lacks and why."""
    body = rows(res)
    lines = [f"results of {res.run}"]
    width = max([len(r.label) for r in body] + [10])
    value_width = max([len(r.value) for r in body] + [5])
    for r in body:
        detail = f"  ({r.detail})" if r.detail else ""
        lines.append(f"  {r.label.ljust(width)}  {r.value.rjust(value_width)}{detail}")
    if res.site_index is not None:
        lines.append(f"  {'feature browser'.ljust(width)}  {res.site_index}")
    lines += [f"  not shown: {note}" for note in res.missing]
    return "\n".join(lines)


def markdown(res: Results) -> str:
    """The same rows as a markdown table, then the rows it lacks and why."""
    lines = ["| metric | value | detail |", "|---|---|---|"]
    lines += [f"| {r.label} | {r.value} | {r.detail} |" for r in rows(res)]
    if res.missing:
        lines += ["", "Not in this table:", "", *(f"- {note}" for note in res.missing)]
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
