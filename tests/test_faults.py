"""Fault injection: every file a stage reads, damaged after the stage that wrote it
finished, ends with one line naming the file, the check and the command that redoes the
stage that wrote it (exit 2) — never silent success, never a traceback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from monofast import cli

# (file, the stage that wrote it, a command that reads it)
READS = [
    ("data/train.bin", "data", ["gpt", "train"]),
    ("data/train.src.bin", "data", ["gpt", "train"]),
    ("data/meta.json", "data", ["gpt", "train"]),
    ("data/tokenizer.json", "data", ["gpt", "train"]),
    ("gpt/model.safetensors", "gpt", ["activations", "harvest"]),
    ("gpt/config.json", "gpt", ["activations", "harvest"]),
    ("gpt/model.safetensors", "gpt", ["sae", "train"]),
    ("activations/index.json", "activations", ["sae", "train"]),
    ("activations/shard-00000.safetensors", "activations", ["sae", "train"]),
    ("sae/sae_weights.safetensors", "sae", ["analysis"]),
    ("sae/cfg.json", "sae", ["analysis"]),
    ("analysis/features.npz", "analysis", ["site"]),
    ("analysis/examples.npz", "analysis", ["site"]),
    ("analysis/summary.json", "analysis", ["site"]),
]


def flip(path: Path) -> None:
    """One byte in the middle of the file, inverted, in place (the length never changes)."""
    where = path.stat().st_size // 2
    with open(path, "r+b") as fh:
        fh.seek(where)
        byte = fh.read(1)[0]
        fh.seek(where)
        fh.write(bytes([byte ^ 0xFF]))


def truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(max(1, path.stat().st_size // 3))


FAULTS = {"flipped-byte": flip, "truncated": truncate, "deleted": Path.unlink}


@pytest.fixture
def damaged_run(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run.run, run)
    return run


def _stage_args(smoke_run, run: Path) -> list[str]:
    """The smoke run's options, for one stage command."""
    args = ["--preset", "smoke", "--run", str(run), "--force"]
    config = smoke_run.args[smoke_run.args.index("--config") + 1]
    return args + ["--config", config]


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("rel, writer, command", READS, ids=[f"{r[0]}-by-{'-'.join(r[2])}".replace("/", "-") for r in READS])
def test_a_damaged_input_is_named_with_its_fix(smoke_run, damaged_run, capsys, rel, writer, command, fault):
    path = damaged_run / rel
    assert path.is_file(), rel
    FAULTS[fault](path)
    extra = ["--device", "cpu"] if command[0] in ("activations", "sae", "analysis") else []
    code = cli.main([*command, *_stage_args(smoke_run, damaged_run), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("monofast: error: "), err
    assert rel.split("/")[-1] in err[0] and f"--from {writer}" in err[0], err[0]


@pytest.mark.slow
@pytest.mark.parametrize("rel, command", [
    ("gpt/model.safetensors", ["activations", "harvest"]),
    ("sae/sae_weights.safetensors", ["analysis"]),
    ("data/tokenizer.json", ["gpt", "sample"]),
    ("activations/index.json", ["sae", "train"]),
], ids=["gpt-weights", "sae-weights", "tokenizer", "shard-index"])
def test_weights_are_checked_on_load_even_with_their_time_kept(smoke_run, damaged_run, capsys, rel, command):
    """A change that keeps the size and the modification time slips past the pipeline's
    quick check (a stat); loading the file hashes it."""
    path = damaged_run / rel
    st = path.stat()
    flip(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    if command == ["gpt", "sample"]:
        args = ["--run", str(damaged_run), "--tokens", "4", "--device", "cpu"]
    else:
        args = [*_stage_args(smoke_run, damaged_run), "--device", "cpu"]
    code = cli.main([*command, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "changed or damaged" in err[0] and path.name in err[0] and "--from" in err[0], err[0]


def test_an_intact_run_reads_cleanly(smoke_run, damaged_run, capsys):
    assert cli.main(["site", *_stage_args(smoke_run, damaged_run)]) == 0


TIMING_FILES = {"gpt/metrics.jsonl", "gpt/checkpoint.pt", "sae/metrics.jsonl", "analysis/summary.json"}
"""Outputs that hold wall times, so two identical runs write them differently."""


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs whose size the test sets (`mount -o remount,size=...`)."""
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip() or 'mount failed'}): needs root")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)

    yield folder, resize
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["1m", "6m"])
def test_a_full_disk_is_one_line_and_the_rerun_completes(smoke_run, small_disk, capsys, size):
    import json

    folder, resize = small_disk
    resize(size)
    run = folder / "run"
    argv = [*smoke_run.args, "--run", str(run)]
    code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("monofast: error:")]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(errors) == 1 and ("disk is full" in errors[0] or "is free on the disk" in errors[0]), errors
    resize("256m")  # space freed
    assert cli.main(argv) == 0
    for stage in ("data", "gpt", "activations", "sae", "analysis", "site"):
        got = json.loads((run / stage / "manifest.json").read_text())["outputs"]
        want = json.loads((smoke_run.run / stage / "manifest.json").read_text())["outputs"]
        assert set(got) == set(want), stage
        for rel, record in got.items():
            if f"{stage}/{rel}" not in TIMING_FILES:
                assert record["digest"] == want[rel]["digest"], f"{stage}/{rel}"


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["flipped-byte", "truncated"])
def test_a_damaged_checkpoint_is_not_resumed(smoke_run, damaged_run, capsys, fault):
    FAULTS[fault](damaged_run / "gpt" / "checkpoint.pt")
    config = smoke_run.args[smoke_run.args.index("--config") + 1]
    code = cli.main(["gpt", "train", "--preset", "smoke", "--run", str(damaged_run), "--config", config,
                     "--device", "cpu", "--resume"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("monofast: error:")]
    assert code == 2 and len(errors) == 1, errors
    assert "checkpoint.pt" in errors[0] and "--resume" in errors[0], errors[0]
