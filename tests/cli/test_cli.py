"""The command line: overview, dispatch, stage commands, run, and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from monofast import cli


def test_overview_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("run", "presets", "data"):
        assert f"  {name}" in out


def test_no_command_is_usage_error(capsys):
    assert cli.main([]) == 2


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_help_imports_nothing_heavy():
    code = ("import sys, monofast.cli as c; c.main(['--help']); "
            "heavy = [m for m in ('torch', 'numpy', 'tokenizers') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_module_and_console_script():
    result = subprocess.run([sys.executable, "-m", "monofast", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("monofast ")
    script = subprocess.run(["monofast", "presets"], capture_output=True, text=True)
    assert script.returncode == 0 and "quick" in script.stdout


def test_data_command_runs_then_skips(tmp_path, two_sources, capsys):
    argv = ["data", "--preset", "smoke", "--run", str(tmp_path / "r"), "--vocab-size", "300"]
    for spec in two_sources:
        argv += ["--source", spec]
    assert cli.main(argv) == 0
    meta = json.loads((tmp_path / "r" / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and [s["name"] for s in meta["sources"]] == ["verse", "code"]
    manifest = json.loads((tmp_path / "r" / "data" / "manifest.json").read_text())
    assert manifest["config"]["chars_per_source"] == 40_000  # smoke preset value
    assert cli.main(argv) == 0
    assert "up to date" in capsys.readouterr().err


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    code = cli.main(["data", "--run", str(tmp_path), "--source", "x=/nonexistent/file.txt",
                     "--source", "python"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("monofast: error: source 'x'") and err.count("\n") == 1
    assert "Traceback" not in err


def test_invalid_option_value_exit_2(tmp_path, capsys):
    assert cli.main(["data", "--run", str(tmp_path), "--vocab-size", "10"]) == 2
    assert "vocab_size=10" in capsys.readouterr().err


def test_bad_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["data", "--no-such-flag"])
    assert err.value.code == 2


def test_run_with_set_and_config_file(tmp_path, two_sources):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[data]\nvocab_size = 310\nsources = [%s]\n' % ", ".join(f'"{s}"' for s in two_sources))
    run_dir = tmp_path / "r"
    assert cli.main(["run", "--preset", "smoke", "--run", str(run_dir), "--config", str(cfg),
                     "--set", "data.chars_per_source=5000", "--to", "data"]) == 0
    meta = json.loads((run_dir / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 310
    assert sum(s["chars"]["train"] + s["chars"]["val"] for s in meta["sources"]) <= 10_000


@pytest.mark.parametrize("argv, match", [
    (["run", "--set", "vocab_size=3"], "STAGE.KEY=VALUE"),
    (["run", "--set", "nostage.x=3"], "no stage 'nostage'"),
    (["run", "--set", "data.nope=3"], "unknown option 'nope'"),
], ids=["no-stage", "bad-stage", "bad-key"])
def test_run_set_errors(tmp_path, capsys, argv, match):
    assert cli.main(argv + ["--run", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


def test_config_file_unknown_keys(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"colour": "blue"}))
    assert cli.main(["data", "--run", str(tmp_path), "--config", str(cfg)]) == 2
    assert "unknown option(s) colour" in capsys.readouterr().err
    cfg.write_text(json.dumps({"dtaa": {"vocab_size": 300}}))
    assert cli.main(["data", "--run", str(tmp_path), "--config", str(cfg)]) == 2
    assert "unknown stage table(s) dtaa" in capsys.readouterr().err


def test_presets_lists_all(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("smoke", "quick", "laptop", "paper"):
        assert out.count(f"{name}:") >= 1
    # The table's time is the default run's; the findings' stages are counted apart.
    row = next(line for line in out.splitlines() if line.strip().startswith("quick "))
    estimated = next(line for line in out.splitlines() if line.startswith("  estimated:") and "family" in line)
    assert "with findings)" in row and "family" in estimated


def test_full_disk_is_one_line(tmp_path, two_sources, monkeypatch, capsys):
    import errno

    from monofast.data import prepare

    def full(cfg, out):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "train.bin"))

    monkeypatch.setattr(prepare, "build", full)
    argv = ["data", "--run", str(tmp_path / "r")] + [a for s in two_sources for a in ("--source", s)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "disk is full writing" in err and "train.bin" in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "data" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------
# Every user error: one line, exit code 2, the fix named

def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_flag_is_one_line_naming_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sae", "train", "--no-such-flag"])
    assert exit_.value.code == 2
    err = _one_line(capsys.readouterr().err)
    assert "monofast sae train: error: unrecognized arguments: --no-such-flag" in err
    assert "see `monofast sae train --help`" in err
    with pytest.raises(SystemExit):
        cli.main(["run", "--preset", "huge"])
    assert "invalid choice: 'huge'" in _one_line(capsys.readouterr().err)


def test_missing_stage_output_names_the_command(tmp_path, two_sources, capsys):
    assert cli.main(["sae", "train", "--run", str(tmp_path / "empty")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "stage 'data' has not finished" in err and "monofast data --run" in err
    run = tmp_path / "r"
    sources = [a for s in two_sources for a in ("--source", s)]
    assert cli.main(["data", "--preset", "smoke", "--run", str(run), *sources]) == 0
    capsys.readouterr()
    (run / "data" / "train.bin").unlink()
    assert cli.main(["gpt", "train", "--preset", "smoke", "--run", str(run)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "train.bin is missing but stage 'data' recorded it" in err and "--from data" in err


def test_incompatible_run_directory(tmp_path, two_sources, capsys):
    run = tmp_path / "r"
    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nsources = [%s]\n" % ", ".join(f'"{s}"' for s in two_sources))
    argv = ["run", "--preset", "smoke", "--run", str(run), "--config", str(cfg), "--to", "data"]
    assert cli.main(argv) == 0
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    manifest.update(format=2, versions={"monofast": "0.9.0"})
    (run / "data" / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert "was written by monofast 0.9.0 (manifest format 2" in err
    assert "--from data" in err and "--force" in err and "--name NAME" in err
    assert cli.main(["gpt", "train", "--preset", "smoke", "--run", str(run)]) == 2  # reading it refuses too
    assert "manifest format 2" in _one_line(capsys.readouterr().err)
    assert cli.main(argv + ["--force"]) == 0


def test_report_without_analysis(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "docs")]) == 2
    assert "has no finished analysis" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["a/b", "..", ""])
def test_bad_run_name(tmp_path, capsys, name):
    assert cli.main(["data", "--name", name]) == 2
    assert "give a plain folder name" in _one_line(capsys.readouterr().err)


def test_run_and_name_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        cli.main(["data", "--run", "x", "--name", "y"])
    assert "not allowed with argument" in _one_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------
# Where values come from: default < preset < config file < --set (run) or a flag (stage)

def test_override_order_for_run(tmp_path, two_sources, monkeypatch):
    monkeypatch.setenv("MONOFAST_RUNS", str(tmp_path / "runs"))
    cfg = tmp_path / "c.toml"
    cfg.write_text("val_fraction = 0.2\n[data]\nvocab_size = 310\nsources = [%s]\n"
                   % ", ".join(f'"{s}"' for s in two_sources))
    assert cli.main(["run", "--preset", "smoke", "--name", "n1", "--config", str(cfg), "--to", "data",
                     "--set", "data.vocab_size=305"]) == 0
    config = json.loads((tmp_path / "runs" / "n1" / "data" / "manifest.json").read_text())["config"]
    assert config["vocab_size"] == 305  # --set beats the config file
    assert config["val_fraction"] == 0.2  # a flat key of the config file beats the default
    assert config["chars_per_source"] == 40_000  # the preset beats the default
    assert config["seed"] == 1337  # the default


def test_override_order_for_a_stage(tmp_path, two_sources):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"data": {"vocab_size": 310, "chars_per_source": 20_000}}))
    sources = [a for s in two_sources for a in ("--source", s)]
    assert cli.main(["data", "--preset", "smoke", "--run", str(tmp_path / "r"), "--config", str(cfg),
                     "--vocab-size", "300", *sources]) == 0
    config = json.loads((tmp_path / "r" / "data" / "manifest.json").read_text())["config"]
    assert config["vocab_size"] == 300 and config["chars_per_source"] == 20_000


# ---------------------------------------------------------------------------------------
# presets

def test_presets_show_labelled_estimates(capsys):
    assert cli.main(["presets", "--gflops", "500", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "rough estimates" in out and "500 GFLOP/s, assumed" in out
    assert "time (est.)" in out and "disk (est.)" in out
    table = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and
             line.split()[0] in ("smoke", "quick", "laptop", "paper")}
    assert set(table) == {"smoke", "quick", "laptop", "paper"}
    assert "estimated: data" in out
    assert cli.main(["presets", "--gflops", "0"]) == 2
    assert "positive rate" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Values refused before a stage starts (its folder and manifest untouched)

@pytest.mark.parametrize("command", [["data"], ["gpt", "train"], ["activations", "harvest"], ["sae", "train"],
                                     ["analysis"], ["findings"]], ids=lambda c: "-".join(c))
def test_a_negative_seed_is_refused_before_the_stage_runs(tmp_path, capsys, command):
    assert cli.main([*command, "--preset", "smoke", "--run", str(tmp_path / "r"), "--seed", "-1", "--force"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "seed=-1 must be >= 0" in err
    assert not (tmp_path / "r").exists()  # refused while the config was read: nothing cleared


def test_a_negative_seed_through_set_is_refused(tmp_path, capsys):
    assert cli.main(["run", "--preset", "smoke", "--run", str(tmp_path / "r"), "--set", "sae.seed=-1"]) == 2
    assert "sae config: seed=-1 must be >= 0" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("content, match", [
    (b"[1, 2]", "holds a list, not a table of options"),
    (b"null", "holds null, not a table of options"),
    (b"vocab_size = 300\n\xff\xfe\n", "is not UTF-8 text"),
], ids=["json-list", "json-null", "toml-not-utf8"])
def test_a_malformed_config_file_is_one_line(tmp_path, capsys, content, match):
    path = tmp_path / ("c.toml" if b"=" in content else "c.json")
    path.write_bytes(content)
    assert cli.main(["run", "--preset", "smoke", "--run", str(tmp_path / "r"), "--config", str(path)]) == 2
    assert match in _one_line(capsys.readouterr().err)


def test_gpt_sample_refuses_non_finite_temperatures_and_non_utf8_prompts(tmp_path, capsys):
    import os

    sample = ["gpt", "sample", "--run", str(tmp_path / "none"), "--device", "cpu"]  # refused before any file is read
    for value in ("nan", "inf", "-inf"):
        assert cli.main([*sample, "--temperature", value]) == 2
        assert f"--temperature {value} is not a finite number" in _one_line(capsys.readouterr().err)
    prompt = os.fsdecode(b"ab\xff\xfecd")  # as Python gives undecodable command-line bytes
    assert cli.main([*sample, "--prompt", prompt]) == 2
    assert r"--prompt 'ab\xff\xfecd' holds bytes that are not UTF-8 text" in _one_line(capsys.readouterr().err)
    assert cli.main(["gpt", "train", "--run", str(tmp_path / "none"), "--sample-prompts", prompt]) == 2
    assert "sample_prompts: 'ab\\xff\\xfecd' holds bytes" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv, match", [
    (["sae", "train", "--variant", "topk", "--k", "8", "--aux-coeff", "-1"], "aux_coeff is a weight of the AuxK loss"),
    (["sae", "train", "--aux-coeff", "-1e6"], "got -1000000.0"),
    (["sae", "train", "--resample-every", "-7"], "resample_every=-7"),
    (["analysis", "--top-k", "100000"], "top_k=100000 is more windows per feature than the 4096 tokens"),
    (["analysis", "--context-size", "16", "--window-radius", "16"], "give at most --window-radius 15"),
], ids=["aux-coeff", "aux-coeff-scientific", "resample-every", "top-k", "window-radius"])
def test_out_of_range_stage_options_are_one_line(tmp_path, capsys, argv, match):
    assert cli.main([*argv, "--preset", "smoke", "--run", str(tmp_path / "r")]) == 2
    assert match in _one_line(capsys.readouterr().err)
