"""`monofast report`: the results table, the purity figure and feature-page screenshots."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import pytest
from monofast import cli
from monofast.run import report


def test_purity_svg_is_standalone_and_shows_both_bases():
    summary = {"purity": {"pure_share": 0.9},
               "pure_by_source": {"features": {"verse": 0.25, "code": 0.5},
                                  "neurons": {"verse": 0.05, "code": 0.1}},
               "purity_histogram": {"edges": [i / 20 for i in range(21)],
                                    "features": [0] * 10 + [5, 3, 2, 1, 1, 1, 2, 3, 5, 20],
                                    "neurons": [0] * 10 + [20, 10, 5, 3, 2, 1, 1, 1, 1, 2]}}
    svg = report.purity_svg(summary)
    root = ET.fromstring(svg)  # well-formed XML
    assert root.tag.endswith("svg") and root.get("width") == str(report.W)
    assert "SAE features" in svg and "MLP neurons" in svg and "more than 90% one source" in svg.lower()
    assert "50.0%" in svg and "10.0%" in svg  # the per-source bars are labelled
    assert "<style" not in svg  # no stylesheet: it renders the same everywhere, GitHub included
    assert "no analysis summary" in report.purity_svg({})


def test_showcase_picks_the_most_frequent_pure_feature(smoke_run):
    import json

    summary = json.loads((smoke_run.run / "analysis" / "summary.json").read_text())
    arrays = report.feature_arrays(smoke_run.run / "analysis")
    arrays["purity"][:] = 0.5
    arrays["purity"][[3, 7, 9, 11]] = [0.99, 0.95, 0.95, 0.91]
    arrays["dominant"][[3, 7, 9, 11]] = [0, 0, 1, 1]
    arrays["fires"][[3, 7, 9, 11]] = [10, 30, 5, 50]
    assert report.showcase(summary, arrays) == [(0, 3), (1, 11)]  # the most one-sided first, then by firings
    arrays["purity"][[9, 11]] = 0.5
    assert report.showcase(summary, arrays) == [(0, 3), (1, None)]


# ---------------------------------------------------------------------------------------
# A damaged run: one line naming the file and the stage to redo, exit 2, nothing written


def _copy(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run.run, run)
    return run


def _refused(run, out, capsys) -> str:
    assert cli.main(["report", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()
    return err


def _truncate(path, share=1 / 3):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * share)])


@pytest.mark.parametrize("damage", ["removed", "truncated"])
def test_report_refuses_damaged_features(smoke_run, tmp_path, capsys, damage):
    run = _copy(smoke_run, tmp_path)
    features = run / "analysis" / "features.npz"
    features.unlink() if damage == "removed" else _truncate(features)
    err = _refused(run, tmp_path / "docs", capsys)
    assert str(features) in err and ("is missing" if damage == "removed" else "changed or damaged") in err
    assert f"monofast run --run {run} --from analysis" in err


def test_report_refuses_a_changed_summary(smoke_run, tmp_path, capsys):
    run = _copy(smoke_run, tmp_path)
    (run / "analysis" / "summary.json").write_text('{"oops":1}\n')
    err = _refused(run, tmp_path / "docs", capsys)
    assert f"{run / 'analysis' / 'summary.json'} was changed or damaged" in err and "--from analysis" in err


def test_report_refuses_removed_metrics(smoke_run, tmp_path, capsys):
    run = _copy(smoke_run, tmp_path)
    (run / "sae" / "eval.json").unlink()
    err = _refused(run, tmp_path / "docs", capsys)
    assert f"{run / 'sae' / 'eval.json'} is missing" in err and "--from sae" in err
    (run / "gpt" / "metrics.jsonl").unlink()  # the first stage's missing file is named first
    err = _refused(run, tmp_path / "docs", capsys)
    assert f"{run / 'gpt' / 'metrics.jsonl'} is missing" in err and "--from gpt" in err


def _rewrite_recorded(path, change):
    """Change a JSON output and its manifest record alike, as a stage writing a bad file would."""
    import json

    from monofast.common import files

    doc = json.loads(path.read_text())
    change(doc)
    files.write_json(path, doc)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    manifest["outputs"][path.name] = files.file_record(path)
    files.write_json(path.parent / "manifest.json", manifest)


@pytest.mark.parametrize("file, change, says", [
    ("analysis/summary.json", lambda d: d.pop("purity"), "purity.pure_share is missing, expected a number"),
    ("analysis/summary.json", lambda d: d["pure_by_source"].update(features=[0.5]),
     'pure_by_source.features is [0.5], expected numbers by source'),
    ("sae/eval.json", lambda d: d["saes"]["l1_5"].update(l0="many"), 'saes.l1_5.l0 is "many", expected a number'),
], ids=["summary-no-purity", "summary-list", "eval-l0-text"])
def test_report_refuses_recorded_files_of_the_wrong_shape(smoke_run, tmp_path, capsys, file, change, says):
    run = _copy(smoke_run, tmp_path)
    _rewrite_recorded(run / file, change)
    err = _refused(run, tmp_path / "docs", capsys)
    assert f"{run / file}: {says}" in err and f"--from {file.split('/')[0]}" in err


def test_report_of_an_unfinished_site_says_what_is_missing(smoke_run, tmp_path, capsys):
    run = _copy(smoke_run, tmp_path)
    (run / "site" / "manifest.json").unlink()  # being redone: its files are not read
    assert cli.main(["report", str(run), "--out", str(tmp_path / "docs")]) == 0
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "| GPT validation loss |" in md and "| L0 (features firing per token) |" in md
    assert "Not in this table:" in md and "feature browser: stage 'site' has not finished (no site/manifest.json)" in md
    assert "no screenshots" in capsys.readouterr().err


def test_report_refuses_an_analysis_of_an_sae_redone_since(smoke_run, tmp_path, capsys):
    run = _copy(smoke_run, tmp_path)
    _rewrite_recorded(run / "sae" / "eval.json", lambda d: d.update(note="redone"))  # intact, but not what the analysis read
    err = _refused(run, tmp_path / "docs", capsys)
    assert f"{run / 'analysis'} was made from other files" in err and "sae/eval.json changed" in err
    assert f"monofast run --run {run} --from analysis" in err


@pytest.mark.slow
def test_report_of_a_smoke_run(smoke_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "docs"
    if report.find_browser() is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    assert cli.main(["report", str(smoke_run.run), "--out", str(out), "--feature", "1"]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(out / name) for name in ("results.md", "purity.svg", "pareto-ce.svg", "pareto-fvu.svg",
                                                    "feature-1.png")]
    for name in ("pareto-ce.svg", "pareto-fvu.svg"):  # files of their own: namespace and styles inside
        chart = (out / name).read_text()
        assert chart.startswith('<svg xmlns="http://www.w3.org/2000/svg"') and "<style>" in chart
    md = (out / "results.md").read_text()
    assert "| GPT validation loss |" in md and "| all stages |" in md
    png = (out / "feature-1.png").read_bytes()
    assert png.startswith(b"\x89PNG") and 10_000 < len(png) < 300_000
    monkeypatch.setenv("MONOFAST_CHROMIUM", "/nonexistent/chromium")
    assert cli.main(["report", str(smoke_run.run), "--out", str(tmp_path / "again")]) == 2
    assert "MONOFAST_CHROMIUM=/nonexistent/chromium is not an executable" in capsys.readouterr().err
