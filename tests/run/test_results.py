"""The results table read back from a run's output files."""

from __future__ import annotations

import shutil

import pytest

from monofast.run import results


def test_results_of_a_smoke_run(smoke_run):
    res = results.collect(smoke_run.run)
    assert res.sae_name == "l1_5" and res.sae_shape == (128, 256)
    assert res.site_index == smoke_run.run / "site" / "index.html"
    assert res.missing == () and "not shown" not in results.text(res)  # a finished run lacks nothing
    assert set(res.seconds) == {"data", "gpt", "activations", "sae", "analysis", "site"}
    labels = [r.label for r in results.rows(res)]
    assert labels[:2] == ["GPT validation loss", "SAE"]
    assert "features > 90% verse" in labels and "features > 90% code" in labels
    gap, kl = (next(r for r in results.rows(res) if r.label.startswith(start))
               for start in ("CE-loss gap", "KL to the clean model"))
    assert gap.value.endswith(" nats") and "verse " in gap.detail and "code " in kl.detail
    assert res.sae["kl_div"] > 0 and float(kl.value.split()[0]) == pytest.approx(res.sae["kl_div"], rel=1e-2)
    table = results.text(res)
    assert "feature browser" in table and str(res.site_index) in table
    markdown = results.markdown(res)
    assert markdown.startswith("| metric | value | detail |") and "| CE-loss recovered |" in markdown
    assert "| all stages |" in results.timings_markdown(res, list(res.seconds))


def test_a_partial_run_shows_what_exists(smoke_run, tmp_path):
    run = tmp_path / "run"
    for stage in ("data", "gpt"):
        shutil.copytree(smoke_run.run / stage, run / stage)
    res = results.collect(run)
    assert [r.label for r in results.rows(res)] == ["GPT validation loss"]
    assert res.site_index is None
    assert [note.split(":")[0] for note in res.missing] == ["SAE, L0, FVU, CE-loss and dead / dense features",
                                                            "features more than 90% one source", "feature browser"]
    assert "not shown: SAE, L0, FVU" in results.text(res) and "Not in this table:" in results.markdown(res)
    assert results.rows(results.collect(tmp_path / "nothing")) == []


def test_an_sae_without_held_out_rows_says_so(smoke_run, tmp_path):
    import json

    from monofast.common import files

    run = tmp_path / "run"
    for stage in ("data", "gpt", "activations", "sae"):
        shutil.copytree(smoke_run.run / stage, run / stage)
    path = run / "sae" / "eval.json"
    evaluation = json.loads(path.read_text())
    evaluation["rows"] = 0  # the SAE stage's file when no context could be held out: CE-loss only
    evaluation["saes"]["l1_5"] = {k: v for k, v in evaluation["saes"]["l1_5"].items() if k not in results.HELD_OUT}
    files.write_json(path, evaluation)
    manifest = json.loads((run / "sae" / "manifest.json").read_text())
    manifest["outputs"]["eval.json"] = files.file_record(path)
    files.write_json(run / "sae" / "manifest.json", manifest)
    res = results.collect(run)
    labels = [r.label for r in results.rows(res)]
    assert "SAE" in labels and "CE-loss recovered" in labels and not any(label.startswith(("L0", "dead")) for label in labels)
    assert any(note.startswith("L0, FVU and dead / dense features") for note in res.missing)
