"""The findings stages end to end at smoke size: the second model, the family of SAEs and the
findings pass, cached like every stage."""

import json
import shutil

import numpy as np
import pytest

from monofast import cli
from monofast.common.errors import UserError
from monofast.findings.config import FamilyConfig, FindingsConfig
from monofast.run.stages import RunDir, stage_named


def test_the_twin_view_moves_the_model_stages_only(tmp_path):
    twin = RunDir(tmp_path).twin()
    assert twin.stage("gpt") == tmp_path / "twin" / "gpt"
    assert twin.stage("sae") == tmp_path / "twin" / "sae"
    assert twin.stage("data") == tmp_path / "data"  # the same tokens
    assert stage_named("twin/gpt").name == "gpt"
    with pytest.raises(UserError, match="--with findings"):
        RunDir(tmp_path).require("twin/gpt")
    with pytest.raises(UserError, match="--with findings"):
        RunDir(tmp_path).require("family")


def test_family_members_one_per_width():
    cfg = FamilyConfig(variant="april2024", l1_coeff=(2.0,), expansions=(8, 1, 2))
    assert cfg.members(64) == [("w64", 2.0, None, 64), ("w128", 2.0, None, 128), ("w512", 2.0, None, 512)]
    cfg = FamilyConfig(variant="topk", k=(8, 16), expansions=(1, 2))
    assert [(m[0], m[2]) for m in cfg.members(32)] == [("w32", 8), ("w64", 16)]
    for bad in ({"expansions": ()}, {"expansions": (2, 2)}, {"expansions": (0,)},
                {"l1_coeff": (1.0, 2.0), "expansions": (1, 2, 4)}):
        with pytest.raises(ValueError):
            FamilyConfig(**bad)
    with pytest.raises(ValueError, match="twin_seed_offset"):
        FindingsConfig(twin_seed_offset=0)
    with pytest.raises(ValueError, match="twin_seed_offset=-1 must be >= 1"):  # the twin's seeds could go negative
        FindingsConfig(twin_seed_offset=-1)
    with pytest.raises(ValueError, match="seed=-1 must be >= 0"):
        FindingsConfig(seed=-1)


def test_an_unknown_extra_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--preset", "smoke", "--with", "everything"])
    assert exit_.value.code == 2
    assert "--with" in capsys.readouterr().err


def test_smoke_findings_end_to_end(smoke_findings):
    run = smoke_findings.run
    for folder in ("twin/gpt", "twin/activations", "twin/sae", "family", "findings"):
        assert (run / folder / "manifest.json").is_file(), folder
    first = json.loads((run / "gpt" / "manifest.json").read_text())["config"]
    second = json.loads((run / "twin" / "gpt" / "manifest.json").read_text())["config"]
    assert second["seed"] == first["seed"] + 1
    assert {k: v for k, v in second.items() if k != "seed"} == {k: v for k, v in first.items() if k != "seed"}
    family = json.loads((run / "family" / "eval.json").read_text())
    assert set(family["saes"]) == {"w128", "w512"}  # smoke: expansions 1 and 4 of 128 neurons

    found = json.loads((run / "findings" / "findings.json").read_text())
    widths = [w["width"] for w in found["family"]["widths"]]
    assert widths == [128, 256, 512] and [w["main"] for w in found["family"]["widths"]] == [False, True, False]
    assert [(p["small"], p["large"]) for p in found["family"]["pairs"]] == [("w128", "w256"), ("w256", "w512")]
    assert len(found["family"]["quality"]) == 3
    for pair in found["family"]["pairs"]:
        assert 0 <= pair["clear_parent_share"] <= 1
    u = found["universality"]
    assert u["tokens"] >= 4096 and u["features"]["compared"] > 0 and u["neurons"]["compared"] > 0
    assert sum(u["features"]["histogram"]) == u["features"]["compared"]

    with np.load(run / "findings" / "family.npz") as z:
        assert list(z["order"]) == ["w128", "w256", "w512"]
        parent = z["w512_parent"]
        assert parent.shape == (512,) and (parent >= 0).all() and (parent < 256).all()
        ptr, ids = z["w256_child_ptr"], z["w256_child_ids"]
        assert ptr[-1] == len(ids)
        for i in range(256):  # every listed child names this feature as its parent
            assert (parent[ids[ptr[i]:ptr[i + 1]]] == i).all()
        assert z["map_xy"].shape[1] == 2 and len(z["map_width"]) == len(z["map_xy"]) == 200  # smoke's map_points
        assert set(z["map_width"].tolist()) == {128, 256, 512}  # every width on the map
    with np.load(run / "findings" / "universality.npz") as z:
        assert z["feature_match"].shape == (256,) and z["neuron_match"].shape == (128,)
    with np.load(run / "findings" / "specificity.npz") as z:
        levels = z["feature_levels"]
        assert levels.shape[0] == 256 and levels.shape[2] == 2
        assert levels.sum() > 0
    assert "features matched in a 2nd model" in smoke_findings.stdout


def test_findings_rerun_is_up_to_date_and_follows_a_change(smoke_findings, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_findings.run, run)
    before = (run / "findings" / "findings.json").read_bytes()
    assert cli.main(smoke_findings.args + ["--run", str(run)]) == 0
    assert (run / "findings" / "findings.json").read_bytes() == before  # nothing ran
    assert cli.main(smoke_findings.args + ["--run", str(run), "--set", "findings.specificity_bins=4"]) == 0
    with np.load(run / "findings" / "specificity.npz") as z:
        assert z["feature_levels"].shape[1] == 4
    assert json.loads((run / "twin" / "gpt" / "manifest.json").read_text())["finished"] == \
        json.loads((smoke_findings.run / "twin" / "gpt" / "manifest.json").read_text())["finished"]


@pytest.mark.slow
@pytest.mark.parametrize("folder, bar, after", [
    ("twin/gpt", "gpt", 12),  # after the twin's checkpoint of step 10
    ("family", "sae", 5),  # after the family's checkpoint of step 4
    ("findings", "findings", 1),
], ids=lambda v: str(v))
def test_sigkill_in_the_findings_then_rerun(smoke_findings, tmp_path, folder, bar, after):
    """Killed in one of the findings' stages, the same command finishes the run with the
    files of an uninterrupted one (wall times aside)."""
    import subprocess
    import sys

    from conftest import KILLER, monofast_env

    run = tmp_path / "run"
    shutil.copytree(smoke_findings.run, run)
    later = {"twin/gpt": ["twin", "family", "findings", "site"], "family": ["family", "findings", "site"],
             "findings": ["findings", "site"]}[folder]
    for name in later:
        shutil.rmtree(run / name)
    argv = smoke_findings.args + ["--run", str(run)]
    proc = subprocess.run([sys.executable, "-c", KILLER, bar, str(after), *argv], capture_output=True,
                          text=True, timeout=300, env=monofast_env(tmp_path))
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (run / folder / "manifest.json").exists()
    assert cli.main(argv) == 0
    timing = {"findings.json", "metrics.jsonl", "eval.json", "steering.json", "checkpoint.pt"}  # wall times
    for name in ("twin/gpt", "twin/activations", "twin/sae", "family", "findings"):
        want = json.loads((smoke_findings.run / name / "manifest.json").read_text())["outputs"]
        got = json.loads((run / name / "manifest.json").read_text())["outputs"]
        assert set(got) == set(want), name
        for rel in got:
            if rel.split("/")[-1] not in timing:
                assert got[rel]["digest"] == want[rel]["digest"], f"{name}/{rel}"
