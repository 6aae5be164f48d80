"""Manifests: a finished stage is skipped, a changed config or input re-runs it, and a
stage that dies never leaves a manifest behind."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from monofast import pipeline
from monofast.data import DataConfig
from monofast.errors import UserError

CALLS: list[str] = []


@dataclass
class ToyConfig:
    factor: int = 2
    """Multiplier."""
    explode: bool = False
    """Raise half-way, as a killed process would stop."""


def toy_stage(cfg: ToyConfig, run: pipeline.RunDir) -> None:
    CALLS.append("toy")
    data = run.require("data")
    out = run.stage("toy")
    (out / "part1.txt").write_text(str(len((data / "train.bin").read_bytes()) * cfg.factor))
    if cfg.explode:
        raise RuntimeError("killed")
    (out / "part2.txt").write_text("done")


TOY = pipeline.Stage("toy", "test_pipeline:ToyConfig", "test_pipeline:toy_stage", ("data",), "toy")
DATA = pipeline.stage_named("data")


@pytest.fixture
def run(tmp_path, two_sources):
    CALLS.clear()
    r = pipeline.RunDir(tmp_path / "run")
    return r, DataConfig(sources=two_sources, chars_per_source=4_000, vocab_size=300)


def test_skip_when_unchanged(run):
    r, cfg = run
    assert pipeline.run_stage(DATA, cfg, r) is True
    manifest = (r.stage("data") / "manifest.json").read_text()
    assert "train.bin" in manifest and "tokenizer.json" in manifest
    assert pipeline.run_stage(DATA, cfg, r) is False
    assert pipeline.run_stage(DATA, cfg, r, force=True) is True


def test_config_change_reruns(run):
    r, cfg = run
    pipeline.run_stage(DATA, cfg, r)
    cfg2 = DataConfig(sources=cfg.sources, chars_per_source=4_000, vocab_size=301)
    assert pipeline.run_stage(DATA, cfg2, r) is True


def test_tampered_output_reruns(run):
    r, cfg = run
    pipeline.run_stage(DATA, cfg, r)
    (r.stage("data") / "val.bin").write_bytes(b"\x00\x01")
    assert pipeline.up_to_date(DATA, cfg, r) is False
    assert pipeline.run_stage(DATA, cfg, r) is True
    assert pipeline.up_to_date(DATA, cfg, r) is True


def test_downstream_follows_upstream(run):
    r, cfg = run
    pipeline.run_stage(DATA, cfg, r)
    assert pipeline.run_stage(TOY, ToyConfig(), r) is True
    assert pipeline.run_stage(TOY, ToyConfig(), r) is False
    pipeline.run_stage(DATA, DataConfig(sources=cfg.sources, chars_per_source=5_000, vocab_size=300), r)
    assert pipeline.up_to_date(TOY, ToyConfig(), r) is False
    assert pipeline.run_stage(TOY, ToyConfig(), r) is True


def test_killed_stage_is_not_trusted(run):
    r, cfg = run
    pipeline.run_stage(DATA, cfg, r)
    pipeline.run_stage(TOY, ToyConfig(), r)
    with pytest.raises(RuntimeError):
        pipeline.run_stage(TOY, ToyConfig(explode=True), r)
    assert not (r.stage("toy") / "manifest.json").exists()
    assert pipeline.up_to_date(TOY, ToyConfig(), r) is False
    assert pipeline.run_stage(TOY, ToyConfig(), r) is True


def test_corrupt_manifest_reruns(run):
    r, cfg = run
    pipeline.run_stage(DATA, cfg, r)
    (r.stage("data") / "manifest.json").write_text("{truncated")
    assert pipeline.run_stage(DATA, cfg, r) is True


def test_missing_upstream_names_the_command(tmp_path):
    r = pipeline.RunDir(tmp_path / "empty")
    with pytest.raises(UserError, match="monofast data"):
        pipeline.run_stage(TOY, ToyConfig(), r)


def test_resolve_config_preset_then_layers():
    cfg = pipeline.resolve_config(DATA, "smoke", {"vocab_size": 400})
    assert cfg.vocab_size == 400
    assert cfg.chars_per_source == 40_000  # from the smoke preset
    with pytest.raises(UserError, match="unknown preset"):
        pipeline.resolve_config(DATA, "huge")
