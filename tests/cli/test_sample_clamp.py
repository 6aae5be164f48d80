"""`monofast gpt sample --clamp FEATURE=VALUE`: sampling with SAE features held at the hook."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from monofast import cli

SAMPLE = ["gpt", "sample", "--prompt", "def run", "--tokens", "20", "--seed", "5", "--device", "cpu"]


@pytest.mark.parametrize("spec", ["12", "x=3", "3=abc", "3=2xx"])
def test_bad_clamp_syntax_is_one_line_exit_2(tmp_path, capsys, spec):
    assert cli.main([*SAMPLE, "--run", str(tmp_path / "none"), "--clamp", spec]) == 2  # before any file is read
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"monofast: error: --clamp {spec!r} is not FEATURE=VALUE; write e.g. --clamp 12=5.5")


def test_clamped_samples_are_seeded_and_differ_from_clean(smoke_run, capsys):
    run = ["--run", str(smoke_run.run)]
    assert cli.main([*SAMPLE, *run]) == 0
    clean = capsys.readouterr().out
    maxima = np.load(smoke_run.run / "analysis" / "features.npz")["max_act"]
    feature = int(np.argmax(maxima))
    clamp = ["--clamp", f"{feature}=50x"]
    assert cli.main([*SAMPLE, *run, *clamp]) == 0
    steered = capsys.readouterr()
    assert steered.out.startswith("def run") and steered.out != clean
    assert f"feature {feature} clamped at" in steered.err and "50x its largest activation" in steered.err
    layer = json.loads((smoke_run.run / "sae" / "cfg.json").read_text())["hook_layer"]
    assert f"at layer {layer}" in steered.err
    assert cli.main([*SAMPLE, *run, *clamp]) == 0
    assert capsys.readouterr().out == steered.out  # the same seed, the same clamped text
    assert cli.main([*SAMPLE, *run]) == 0
    assert capsys.readouterr().out == clean  # and without --clamp, as before


def test_clamp_errors_name_the_fix(smoke_run, tmp_path, capsys):
    run = ["--run", str(smoke_run.run)]
    assert cli.main([*SAMPLE, *run, "--clamp", "100000=1"]) == 2
    assert "feature 100000 does not exist; this SAE has features 0.." in capsys.readouterr().err
    bare = tmp_path / "bare"  # the run without its analysis
    for stage in ("data", "gpt", "sae", "activations"):
        shutil.copytree(smoke_run.run / stage, bare / stage)
    assert cli.main([*SAMPLE, "--run", str(bare), "--clamp", "0=3x"]) == 2
    assert "run `monofast analysis` first" in capsys.readouterr().err
    assert cli.main([*SAMPLE, "--run", str(bare), "--clamp", "0=3"]) == 0  # an activation needs no analysis
    shutil.rmtree(bare / "sae")
    assert cli.main([*SAMPLE, "--run", str(bare), "--clamp", "0=3"]) == 2
    assert "stage 'sae' has not finished" in capsys.readouterr().err
