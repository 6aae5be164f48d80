"""Integrity on every read: a config value of the wrong type and a damaged activation shard
end in one line and exit code 2, before any work, never in a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from monofast import cli


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("monofast: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("name, text", [
    ("c.toml", "[gpt]\nn_layer = [1, 2]\n"),
    ("c.toml", "n_layer = [1, 2]\n"),
    ("c.json", json.dumps({"gpt": {"n_layer": [1, 2]}})),
])
def test_a_config_value_of_the_wrong_type_is_one_line(tmp_path, capsys, monkeypatch, name, text):
    from monofast.gpt import train

    monkeypatch.setattr(train, "run_stage", lambda cfg, run: pytest.fail("the stage ran"))
    cfg = tmp_path / name
    cfg.write_text(text)
    run = tmp_path / "run"
    assert cli.main(["gpt", "train", "--preset", "smoke", "--config", str(cfg), "--run", str(run)]) == 2
    err = _error_line(capsys)
    assert "n_layer = [1, 2] is a list; expected an integer" in err
    assert not (run / "gpt").exists()


@pytest.mark.parametrize("setting, match", [
    ("gpt.n_layer=true", "n_layer"),
    ("gpt.learning_rate=nan", "learning_rate = nan is not a finite number"),
    ("sae.l1_coeff=1,x", "l1_coeff"),
    ("activations.contexts=1e400", "contexts"),
])
def test_run_set_of_the_wrong_type_is_one_line(tmp_path, capsys, setting, match):
    assert cli.main(["run", "--preset", "smoke", "--set", setting, "--run", str(tmp_path / "run")]) == 2
    assert match in _error_line(capsys)
    assert not (tmp_path / "run" / "data").exists()


@pytest.mark.parametrize("flag, match", [
    (["--n-layer", "1e400"], "--n-layer"),
    (["--learning-rate", "inf"], "learning_rate = inf is not a finite number"),
    (["--dropout", "nan"], "dropout = nan is not a finite number"),
])
def test_flags_of_no_finite_value_are_one_line(tmp_path, capsys, flag, match):
    try:
        code = cli.main(["gpt", "train", "--preset", "smoke", "--run", str(tmp_path / "run"), *flag])
    except SystemExit as exit_:  # argparse's own error, on one line (monofast.cli.options.Parser)
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and match in err, err


def _store_run(root, shards=3, rows_per_shard=200, dim=16):
    """A run directory whose data/, gpt/ and activations/ count as finished (their manifests
    list no outputs, so nothing is checked before the store is opened), with a small store."""
    from monofast.activations import store as activations

    rows = shards * rows_per_shard
    rng = np.random.default_rng(0)
    r = np.arange(rows)
    with activations.ActivationWriter(root / "activations", dim, "fp32",
                                      shard_bytes=rows_per_shard * dim * 4) as writer:
        writer.append(rng.standard_normal((rows, dim)).astype(np.float32), r % 50, r % 2, r // 10, r % 10)
        writer.finish(gpt={"layer": 0})
    for stage in ("data", "gpt", "activations"):
        (root / stage).mkdir(exist_ok=True)
        (root / stage / "manifest.json").write_text(json.dumps({"format": 1, "stage": stage, "outputs": {}}))
    return root


def test_a_truncated_shard_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys):
    run = _store_run(tmp_path / "run")
    shard = sorted((run / "activations").glob("*.safetensors"))[0]
    assert len(list((run / "activations").glob("*.safetensors"))) > 1
    with open(shard, "r+b") as f:
        f.truncate(1_000)
    argv = ["sae", "train", "--preset", "smoke", "--run", str(run), "--device", "cpu", "--ce-eval-tokens", "0"]
    assert cli.main(argv) == 2
    err = _error_line(capsys)
    assert str(shard) in err and "truncated" in err
    assert "monofast run" in err and "--from activations" in err  # the fix
    assert not (run / "sae" / "manifest.json").exists()


def test_native_errors_not_caused_by_a_file_keep_their_traceback(monkeypatch):
    from monofast.cli import options

    def bad_argument(self, args):
        raise ValueError("batch_size must be positive")  # a bug, not a user's file

    monkeypatch.setattr(options.StageCommand, "main", bad_argument)
    with pytest.raises(ValueError, match="batch_size"):
        cli.main(["site", "--preset", "smoke"])


def test_help_does_not_load_the_native_module():
    code = ("import sys, monofast.cli as c; c.main(['--help']); "
            "assert 'monofast._native' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("message, fix", [
    ("{shard}: truncated: 1000 bytes", "monofast run --run {run} --from activations"),
    ("{shard}: bad header; re-harvest with `monofast run --from activations`",
     "re-harvest with `monofast run --from activations`"),
])
def test_a_native_file_error_gets_the_fix_it_lacks(tmp_path, message, fix):
    from monofast._native import CorruptFileError

    run = tmp_path / "run"
    shard = run / "activations" / "shard-00000.safetensors"
    text = cli._native_file_error(CorruptFileError(message.format(shard=shard)))
    assert text is not None and text.startswith(str(shard))
    assert fix.format(run=run) in text and text.count("monofast run") == 1
    assert cli._native_file_error(ValueError(str(shard))) is None
