"""Checkpoints and --resume of the SAE stage (monofast.sae.resume)."""

from __future__ import annotations

import json

import pytest
import torch
from monofast.common.errors import UserError
from monofast.sae import train as sae_train
from monofast.sae.model import SparseAutoencoder
from monofast.sae.resume import CHECKPOINT_FILE


class Interrupted(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def interrupt_after_checkpoint(monkeypatch, which: int) -> None:
    real = sae_train.save_checkpoint
    calls = []

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(args[-1].step)
        if len(calls) == which:
            raise Interrupted(f"after the checkpoint of step {calls[-1]}")

    monkeypatch.setattr(sae_train, "save_checkpoint", save_then_stop)


def without_timing(metrics_text: str) -> list[dict]:
    lines = [json.loads(line) for line in metrics_text.splitlines()]
    for line in lines:
        del line["seconds"], line["rows_per_s"]
    return lines


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(store_dir, small, tmp_path, monkeypatch):
    # 42 steps over two epochs, resampling after 10, 20 and 30; killed after the checkpoint of
    # step 14, mid-epoch with rows carried over, before the epoch boundary and two resamplings.
    cfg = small(checkpoint_every=7, resample_every=10)
    whole = sae_train.train(cfg, store_dir, tmp_path / "whole")

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, which=2)
        with pytest.raises(Interrupted, match="step 14"):
            sae_train.train(cfg, store_dir, out)
    assert (out / CHECKPOINT_FILE).is_file()
    assert not (out / "sae_weights.safetensors").exists() and not (out / "eval.json").exists()
    resumed = sae_train.train(small(checkpoint_every=7, resample_every=10, resume=True), store_dir, out)

    assert resumed == whole
    for name in ("l1_0.3", "l1_3"):
        a, b = SparseAutoencoder.load(tmp_path / "whole" / name), SparseAutoencoder.load(out / name)
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert without_timing((out / "metrics.jsonl").read_text()) == \
        without_timing((tmp_path / "whole" / "metrics.jsonl").read_text())
    assert not (out / CHECKPOINT_FILE).exists()


def test_a_checkpoint_from_other_options_is_refused(store_dir, small, make_store, tmp_path, monkeypatch):
    out = tmp_path / "sae"
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, which=1)
        with pytest.raises(Interrupted):
            sae_train.train(small(checkpoint_every=5, epochs=1), store_dir, out)
    with pytest.raises(UserError, match=r"lr=0.01 \(now 0.02\).*drop --resume to start over"):
        sae_train.train(small(checkpoint_every=5, epochs=1, lr=2e-2, resume=True), store_dir, out)
    other_store = make_store(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="activation_store="):
        sae_train.train(small(checkpoint_every=5, epochs=1, resume=True), other_store, out)
    # Without --resume the stale checkpoint is dropped and the run starts over.
    sae_train.train(small(checkpoint_every=5, epochs=1, lr=2e-2), store_dir, out)
    assert not (out / CHECKPOINT_FILE).exists()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 5


def test_a_checkpoint_resumes_in_another_compute_precision(store_dir, small, tmp_path, monkeypatch):
    # The compute precision is a runtime choice, like the device: a run made in fp32 goes on in bf16.
    out = tmp_path / "sae"
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, which=1)
        with pytest.raises(Interrupted, match="step 5"):
            sae_train.train(small(checkpoint_every=5, epochs=1), store_dir, out)
    evaluation = sae_train.train(small(checkpoint_every=5, epochs=1, compute_dtype="bfloat16", resume=True),
                                 store_dir, out)
    assert evaluation["training"]["compute_dtype"] == "bfloat16"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, (3000 - 300) // 128, 5)) + [(3000 - 300) // 128]  # went on from step 5
    assert not (out / CHECKPOINT_FILE).exists()
