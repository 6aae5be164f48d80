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


def test_showcase_picks_the_most_frequent_pure_feature(smoke_run, tmp_path):
    import numpy as np

    analysis = tmp_path / "analysis"
    shutil.copytree(smoke_run.run / "analysis", analysis)
    with np.load(analysis / "features.npz") as z:
        arrays = dict(z)
    arrays["purity"][:] = 0.5
    arrays["purity"][[3, 7, 9, 11]] = [0.99, 0.95, 0.95, 0.91]
    arrays["dominant"][[3, 7, 9, 11]] = [0, 0, 1, 1]
    arrays["fires"][[3, 7, 9, 11]] = [10, 30, 5, 50]
    np.savez(analysis / "features.npz", **arrays)
    assert report.showcase(analysis) == [(0, 3), (1, 11)]  # the most one-sided first, then by firings
    arrays["purity"][[9, 11]] = 0.5
    np.savez(analysis / "features.npz", **arrays)
    assert report.showcase(analysis) == [(0, 3), (1, None)]


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
