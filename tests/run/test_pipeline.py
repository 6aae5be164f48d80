"""Manifests: a finished stage is skipped, a changed config or input re-runs it, and a
stage that dies never leaves a manifest behind."""

from __future__ import annotations

import json
import random
import logging
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import KILLER, monofast_env
from monofast import cli
from monofast.activations import store as activations
from monofast.common import files
from monofast.common.errors import UserError
from monofast.data.prepare import DataConfig
from monofast.run.manifest import ATTEMPT, run_stage, up_to_date
from monofast.run.pipeline import Job, _Clock, plan, run_all
from monofast.run.resolve import file_layer, resolve_config
from monofast.run.stages import STAGES as ALL_STAGES
from monofast.run.stages import RunDir, Stage, stage_named

STAGES = tuple(s for s in ALL_STAGES if not s.extra)
"""The stages of a run without extras (the findings' own tests: tests/findings/test_run.py)."""


def _plan(configs: dict, run: RunDir) -> dict[str, bool]:
    return plan([Job(s, configs[s.name], run) for s in STAGES], {s.name: False for s in STAGES})


CALLS: list[str] = []


@dataclass
class ToyConfig:
    factor: int = 2
    """Multiplier."""
    explode: bool = False
    """Raise half-way, as a killed process would stop."""


def toy_stage(cfg: ToyConfig, run: RunDir) -> None:
    CALLS.append("toy")
    data = run.require("data")
    out = run.stage("toy")
    (out / "part1.txt").write_text(str(len((data / "train.bin").read_bytes()) * cfg.factor))
    if cfg.explode:
        raise RuntimeError("killed")
    (out / "part2.txt").write_text("done")


TOY = Stage("toy", f"{__name__}:ToyConfig", f"{__name__}:toy_stage", ("data",), "toy")
DATA = stage_named("data")


@pytest.fixture
def run(tmp_path, two_sources):
    CALLS.clear()
    r = RunDir(tmp_path / "run")
    return r, DataConfig(sources=two_sources, chars_per_source=4_000, vocab_size=300)


def test_skip_when_unchanged(run):
    r, cfg = run
    assert run_stage(DATA, cfg, r) is True
    manifest = (r.stage("data") / "manifest.json").read_text()
    assert "train.bin" in manifest and "tokenizer.json" in manifest
    assert run_stage(DATA, cfg, r) is False
    assert run_stage(DATA, cfg, r, force=True) is True


def test_config_change_reruns(run):
    r, cfg = run
    run_stage(DATA, cfg, r)
    cfg2 = DataConfig(sources=cfg.sources, chars_per_source=4_000, vocab_size=301)
    assert run_stage(DATA, cfg2, r) is True


def test_tampered_output_reruns(run):
    r, cfg = run
    run_stage(DATA, cfg, r)
    (r.stage("data") / "val.bin").write_bytes(b"\x00\x01")
    assert up_to_date(DATA, cfg, r) is False
    assert run_stage(DATA, cfg, r) is True
    assert up_to_date(DATA, cfg, r) is True


def test_downstream_follows_upstream(run):
    r, cfg = run
    run_stage(DATA, cfg, r)
    assert run_stage(TOY, ToyConfig(), r) is True
    assert run_stage(TOY, ToyConfig(), r) is False
    run_stage(DATA, DataConfig(sources=cfg.sources, chars_per_source=5_000, vocab_size=300), r)
    assert up_to_date(TOY, ToyConfig(), r) is False
    assert run_stage(TOY, ToyConfig(), r) is True


def toy_after_stage(cfg: ToyConfig, run: RunDir) -> None:
    (run.stage("after") / "sum.txt").write_text(str(int((run.require("toy") / "part1.txt").read_text()) + 1))


AFTER = Stage("after", f"{__name__}:ToyConfig", f"{__name__}:toy_after_stage", ("toy",), "after toy")


def test_a_stage_made_from_an_earlier_input_is_refused(run):
    """A stage whose own files are intact but were made from an input since redone (an SAE
    trained on activations of a GPT retrained since) is refused by the stages that read it,
    not silently mixed with the new input."""
    r, cfg = run
    run_stage(DATA, cfg, r)
    run_stage(TOY, ToyConfig(), r)
    run_stage(AFTER, ToyConfig(), r)
    run_stage(DATA, DataConfig(sources=cfg.sources, chars_per_source=5_000, vocab_size=300), r)  # toy is now stale
    with pytest.raises(UserError, match=r"toy was made from other files than the run holds now "
                                        r"\(data/\S+ changed since, \d+ in all\).*--from toy"):
        run_stage(AFTER, ToyConfig(), r)
    with pytest.raises(UserError, match="toy was made from other files"):
        up_to_date(AFTER, ToyConfig(), r)
    assert run_stage(TOY, ToyConfig(), r) is True  # redoing it from there clears the way
    assert run_stage(AFTER, ToyConfig(), r) is True
    assert run_stage(AFTER, ToyConfig(), r) is False


def test_killed_stage_is_not_trusted(run):
    r, cfg = run
    run_stage(DATA, cfg, r)
    run_stage(TOY, ToyConfig(), r)
    with pytest.raises(RuntimeError):
        run_stage(TOY, ToyConfig(explode=True), r)
    assert not (r.stage("toy") / "manifest.json").exists()
    assert up_to_date(TOY, ToyConfig(), r) is False
    assert run_stage(TOY, ToyConfig(), r) is True


def test_corrupt_manifest_reruns(run):
    r, cfg = run
    run_stage(DATA, cfg, r)
    (r.stage("data") / "manifest.json").write_text("{truncated")
    assert run_stage(DATA, cfg, r) is True


def test_missing_upstream_names_the_command(tmp_path):
    r = RunDir(tmp_path / "empty")
    with pytest.raises(UserError, match="monofast data"):
        run_stage(TOY, ToyConfig(), r)


def test_resolve_config_preset_then_layers():
    cfg = resolve_config(DATA, "smoke", {"vocab_size": 400})
    assert cfg.vocab_size == 400
    assert cfg.chars_per_source == 40_000  # from the smoke preset
    with pytest.raises(UserError, match="unknown preset"):
        resolve_config(DATA, "huge")


def test_incompatible_manifest_is_refused(run):
    r, cfg = run
    run_stage(DATA, cfg, r)
    path = r.stage("data") / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(format=99, versions={"monofast": "9.0.0"})
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"written by monofast 9\.0\.0 \(manifest format 99.*--from data.*--name NAME"):
        up_to_date(DATA, cfg, r)
    with pytest.raises(UserError, match="manifest format 99"):  # a stage reading it refuses it too
        run_stage(TOY, ToyConfig(), r)
    assert run_stage(DATA, cfg, r, force=True) is True  # --force redoes it in the new format
    assert run_stage(TOY, ToyConfig(), r) is True


def test_manifest_records_versions_and_timing(run):
    r, cfg = run
    run_stage(DATA, cfg, r)
    manifest = json.loads((r.stage("data") / "manifest.json").read_text())
    assert {"monofast", "python", "platform", "torch", "numpy", "tokenizers"} <= set(manifest["versions"])
    assert manifest["finished"] >= manifest["started"] and manifest["seconds"] >= 0
    assert not (r.stage("data") / ATTEMPT).exists()


def test_leftover_temporaries_are_removed_and_never_outputs(run):
    r, cfg = run
    folder = r.stage("data")
    (folder / ".features.x1.tmp").mkdir(parents=True)
    (folder / ".features.x1.tmp" / "3.html").write_text("half")
    (folder / ".train.bin.abc.tmp").write_text("half")
    run_stage(DATA, cfg, r)
    assert not list(folder.glob("*.tmp"))
    outputs = json.loads((folder / "manifest.json").read_text())["outputs"]
    assert not [name for name in outputs if ".tmp" in name]


@dataclass
class ResumableConfig:
    RUNTIME: ClassVar[frozenset[str]] = frozenset({"resume"})
    steps: int = 3
    """Steps to take."""
    die_at: int = -1
    """Raise before this step, as a killed process would stop."""
    resume: bool = False
    """Continue from checkpoint.txt."""


def resumable_stage(cfg: ResumableConfig, run: RunDir) -> None:
    out = run.stage("counter")
    done = int((out / "checkpoint.txt").read_text()) if cfg.resume else 0
    CALLS.append(f"start {done}")
    for step in range(done, cfg.steps):
        if step == cfg.die_at:
            raise RuntimeError("killed")
        (out / "checkpoint.txt").write_text(str(step + 1))
    (out / "result.txt").write_text("done")


COUNTER = Stage("counter", f"{__name__}:ResumableConfig", f"{__name__}:resumable_stage", (),
                         "a stage that checkpoints", resume_file="checkpoint.txt")


def test_an_interrupted_stage_continues_only_with_the_same_config(tmp_path):
    CALLS.clear()
    r = RunDir(tmp_path)
    with pytest.raises(RuntimeError):
        run_stage(COUNTER, ResumableConfig(die_at=2), r)
    assert (r.stage("counter") / ATTEMPT).is_file()
    assert run_stage(COUNTER, ResumableConfig(), r)  # die_at is part of the identity: starts over
    assert CALLS == ["start 0", "start 0"]
    CALLS.clear()
    (r.stage("counter") / "manifest.json").unlink()
    with pytest.raises(RuntimeError):
        run_stage(COUNTER, ResumableConfig(steps=5, die_at=3), r)
    with pytest.raises(RuntimeError):  # same config: it continues from the checkpoint
        run_stage(COUNTER, ResumableConfig(steps=5, die_at=3), r)
    assert CALLS == ["start 0", "start 3"]
    CALLS.clear()
    with pytest.raises(RuntimeError):
        run_stage(COUNTER, ResumableConfig(steps=5, die_at=3), r, force=True)
    assert CALLS == ["start 0"]  # --force starts over


# ---------------------------------------------------------------------------------------
# The smoke preset end to end: every artifact, skip-when-unchanged, and SIGKILL in each stage


TIMING_FILES = {"gpt/metrics.jsonl", "gpt/checkpoint.pt", "sae/metrics.jsonl", "analysis/summary.json"}
"""Outputs that hold wall times, so two identical runs write them differently."""


def _digests(folder: Path) -> dict[str, str]:
    return {k: v["digest"] for k, v in json.loads((folder / "manifest.json").read_text())["outputs"].items()}


def test_smoke_run_writes_every_artifact(smoke_run):
    reference = smoke_run.run
    for stage in STAGES:
        manifest = json.loads((reference / stage.name / "manifest.json").read_text())
        assert manifest["stage"] == stage.name and manifest["outputs"]
        for rel, record in manifest["outputs"].items():
            assert files.hash_file(reference / stage.name / rel) == record["digest"], rel
    meta = json.loads((reference / "data" / "meta.json").read_text())
    assert [s["name"] for s in meta["sources"]] == ["verse", "code"]
    store = activations.open_store(reference / "activations")
    assert store.rows == 64 * 16 and store.index.dim == 128 and len(store.index.shards) > 1
    assert activations.verify(reference / "activations").rows == store.rows
    evaluation = json.loads((reference / "sae" / "eval.json").read_text())
    assert evaluation["saes"]["l1_5"]["l0"] > 0
    summary = json.loads((reference / "analysis" / "summary.json").read_text())
    assert summary["features"]["total"] == 256 and summary["sources"] == ["verse", "code"]
    assert len(list((reference / "site" / "features").glob("*.html"))) == 256
    # the overall progress lines and the results table
    assert "run: stage 1/6 data" in smoke_run.stderr and "run: stage 6/6 site" in smoke_run.stderr
    assert re.search(r"about .* left \(estimate\)", smoke_run.stderr)
    out = smoke_run.stdout
    assert "GPT validation loss" in out and "CE-loss recovered" in out
    assert "features > 90% verse" in out and "features > 90% code" in out
    assert str(reference / "site" / "index.html") in out


@pytest.fixture
def log(caplog):
    """The monofast logger's records (it does not propagate to pytest's handler)."""
    from monofast.common.log import logger, setup

    setup()  # first, so that the level caplog restores afterwards is the CLI's
    caplog.set_level(logging.INFO, logger="monofast")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_skip_when_unchanged_and_rerun_from_a_change(smoke_run, tmp_path, capsys, log):
    reference, args = smoke_run.run, smoke_run.args
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert cli.main(args + ["--run", str(run)]) == 0
    assert "0 of 6 stages ran, 6 up to date" in log.text and "GPT validation loss" in capsys.readouterr().out
    before = {stage.name: _digests(run / stage.name) for stage in STAGES}
    layers = {"data": [file_layer(Path(args[args.index("--config") + 1]), "data")],
              "activations": [{"shard_mb": 0.125, "device": "cpu"}], "gpt": [{"device": "cpu"}],
              "sae": [{"device": "cpu", "l1_coeff": "3"}], "analysis": [{"device": "cpu"}]}
    ran = run_all("smoke", RunDir(run), layers)
    assert ran == {"data": False, "gpt": False, "activations": False, "sae": True, "analysis": True,
                   "site": True}
    assert _digests(run / "gpt") == before["gpt"]
    assert "l1_3" in json.loads((run / "sae" / "eval.json").read_text())["saes"]


@pytest.mark.slow
@pytest.mark.parametrize("stage, bar, after", [
    ("data", "tokenize", 1),
    ("gpt", "gpt", 12),  # after the checkpoint of step 10
    ("activations", "harvest", 3),  # 256 rows a tick, shards of ~250 rows
    ("sae", "sae", 5),  # after the checkpoint of step 4
    ("analysis", "analysis", 3),
    ("site", "site", 100),
], ids=lambda v: str(v))
def test_sigkill_in_each_stage_then_rerun(smoke_run, tmp_path, stage, bar, after, log):
    _kill_and_rerun(smoke_run, tmp_path, stage, bar, after, log)


TICKS = {"gpt": ("gpt", 19), "activations": ("harvest", 3), "sae": ("sae", 6), "analysis": ("analysis", 3),
         "site": ("site", 200)}
"""Each smoke stage's progress bar and how many ticks it makes before it ends (a kill point
is drawn among them below)."""


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("stage", list(TICKS))
def test_sigkill_at_random_points_then_rerun(smoke_run, tmp_path, stage, seed, log):
    """The same at a point drawn from the seed: any moment of a stage is a safe one to die at."""
    bar, ticks = TICKS[stage]
    after = random.Random(f"{stage}-{seed}").randint(1, ticks)
    _kill_and_rerun(smoke_run, tmp_path, stage, bar, after, log)


def _kill_and_rerun(smoke_run, tmp_path, stage, bar, after, log):
    """SIGKILL the run in `stage` at the `after`-th tick of its `bar`; the rerun must leave
    exactly the files of an uninterrupted run, and trust nothing the killed one left."""
    reference, args = smoke_run.run, smoke_run.args
    run = tmp_path / "run"
    names = [s.name for s in STAGES]
    for earlier in names[:names.index(stage)]:
        shutil.copytree(reference / earlier, run / earlier)
    argv = args + ["--run", str(run), "--to", stage]
    proc = subprocess.run([sys.executable, "-c", KILLER, bar, str(after), *argv], capture_output=True,
                          text=True, timeout=300, env=monofast_env(tmp_path))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (run / stage / "manifest.json").exists()  # nothing half-done is trusted
    for earlier in names[:names.index(stage)]:
        assert up_to_date(stage_named(earlier),
                                   resolve_config(stage_named(earlier), "smoke",
                                                           *_layers(args, earlier)), RunDir(run))

    checkpointed = (run / stage / "checkpoint.pt").is_file()
    assert cli.main(argv) == 0
    if checkpointed:  # a killed GPT or SAE stage continues from its last checkpoint
        assert "continuing the interrupted run" in log.text
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name == ATTEMPT]
    got, want = _digests(run / stage), _digests(reference / stage)
    assert set(got) == set(want)
    for rel, digest in got.items():
        assert files.hash_file(run / stage / rel) == digest, rel  # the manifest tells the truth
        if f"{stage}/{rel}" not in TIMING_FILES:
            assert digest == want[rel], f"{stage}/{rel} differs from an uninterrupted run"
    if stage == "gpt":
        losses = [[m["step"], m["val_loss"]] for m in _jsonl(run / "gpt" / "metrics.jsonl")]
        assert losses == [[m["step"], m["val_loss"]] for m in _jsonl(reference / "gpt" / "metrics.jsonl")]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _layers(args: list[str], stage: str) -> list[dict]:
    """The override layers `monofast run args` gives `stage` (config file, then --set)."""
    layers = [file_layer(Path(args[args.index("--config") + 1]), stage)]
    for i, word in enumerate(args):
        if word == "--set" and args[i + 1].startswith(f"{stage}."):
            key, _, value = args[i + 1][len(stage) + 1:].partition("=")
            layers.append({key: value})
    return layers


def left_in(text: str) -> str:
    return re.findall(r"about (.+) left", text)[-1]


def test_eta_moves_with_long_stages_not_short_ones(log):
    clock = _Clock({"data": 4.0, "gpt": 1000.0, "sae": 100.0})
    clock.done("data", 0.9, ran=True)  # a few seconds early: the GPT estimate stands
    clock.announce("gpt", 2, 3, {"gpt": True, "sae": True})
    assert left_in(log.text) == "17 min 27 s"  # 1,100 s x (0.9 + 60) / (4 + 60)
    clock.done("gpt", 2000.0, ran=True)  # twice the estimate: the rest scales up nearly as much
    clock.announce("sae", 3, 3, {"gpt": False, "sae": True})
    assert left_in(log.text) == "3 min 14 s"  # 100 s x (2000.9 + 60) / (1004 + 60)


def test_compute_precision_is_runtime_storage_precision_is_config(smoke_run, tmp_path):
    """The one precision rule (monofast.common.device): another compute precision re-runs
    nothing; another storage precision re-runs the stage that writes it and what follows."""
    layers = {s.name: _layers(smoke_run.args, s.name) for s in STAGES}
    run = RunDir(smoke_run.run)

    def todo(extra: dict[str, dict]) -> dict[str, bool]:
        configs = {s.name: resolve_config(s, "smoke", *layers[s.name], extra.get(s.name, {})) for s in STAGES}
        return _plan(configs, run)

    assert not any(todo({}).values())
    assert not any(todo({"gpt": {"dtype": "float32"}, "sae": {"compute_dtype": "bfloat16"},
                         "analysis": {"dtype": "bfloat16"}}).values())
    stored = todo({"activations": {"dtype": "fp16"}})
    assert stored == {"data": False, "gpt": False, "activations": True, "sae": True, "analysis": True,
                      "site": True}


def test_manifests_from_before_a_field_became_runtime_are_up_to_date(smoke_run, tmp_path):
    """Run folders written before the precision rule (when the SAE's compute_dtype and the
    analysis's dtype still counted as config) load as they are, nothing re-run."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run.run, run)
    for stage, field in (("sae", "compute_dtype"), ("analysis", "dtype")):
        path = run / stage / "manifest.json"
        manifest = json.loads(path.read_text())
        assert field not in manifest["identity"]
        manifest["identity"][field] = "float32"
        path.write_text(json.dumps(manifest))
    layers = {s.name: _layers(smoke_run.args, s.name) for s in STAGES}
    configs = {s.name: resolve_config(s, "smoke", *layers[s.name]) for s in STAGES}
    assert not any(_plan(configs, RunDir(run)).values())
    manifest = json.loads((run / "sae" / "manifest.json").read_text())
    manifest["identity"]["epochs"] = 99  # a field that decides results still counts
    (run / "sae" / "manifest.json").write_text(json.dumps(manifest))
    assert _plan(configs, RunDir(run))["sae"]


def test_a_run_that_would_leave_its_findings_behind_is_refused_before_it_starts(smoke_run, smoke_findings,
                                                                                tmp_path, capsys):
    """After a `--with findings` run, a run without them that redoes the SAE would leave the
    findings (which the site reads) out of date: refused before any stage runs, naming the
    two ways out; with `--with findings` the same change runs through."""
    run = tmp_path / "run"
    shutil.copytree(smoke_findings.run, run)
    before = _digests(run / "sae")
    assert cli.main(smoke_run.args + ["--run", str(run), "--set", "sae.l1_coeff=7"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'findings'} reads analysis/, sae/, which this run redoes" in err and err.count("\n") == 1
    assert f"`monofast run --run {run} --with findings`, or remove the folder" in err
    assert _digests(run / "sae") == before  # nothing ran
    assert cli.main(smoke_findings.args + ["--run", str(run), "--set", "sae.l1_coeff=7"]) == 0


def test_a_removed_input_folder_does_not_block_the_stages_after_it(smoke_run, tmp_path, capsys):
    """Activations deleted to free the disk once the SAE is trained: the analysis, which reads
    the SAE and the GPT, still runs; the SAE stage itself names what is missing."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run.run, run)
    shutil.rmtree(run / "activations")
    assert cli.main(["analysis", "--preset", "smoke", "--run", str(run), "--device", "cpu", "--force"]) == 0
    assert cli.main(["sae", "train", "--preset", "smoke", "--run", str(run), "--device", "cpu"]) == 2
    assert "stage 'activations' has not finished" in capsys.readouterr().err
