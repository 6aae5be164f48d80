"""NaN and Inf in SAE training: a diverging SAE or a corrupt input stops the run with a
named error at the next point where the loop reads values back, and nothing is published."""

from __future__ import annotations

import json

import pytest
import torch
from monofast.common.errors import DataError, UserError
from monofast.sae import train as sae_train

OUTPUTS = ("sae_weights.safetensors", "cfg.json", "eval.json", "l1_0.3", "l1_3")


def poison(monkeypatch, member: int, at_step: int) -> None:
    """Before step `at_step` (0-based), put a NaN into the encoder of the sweep's `member`."""
    real_step = sae_train.train_step
    calls = {"n": 0}

    def step(m, x, *args, **kwargs):
        if calls["n"] == at_step * 2 + member:  # two members a step
            with torch.no_grad():
                m.sae.W_enc[0, 0] = float("nan")
        calls["n"] += 1
        return real_step(m, x, *args, **kwargs)

    monkeypatch.setattr(sae_train, "train_step", step)


def published(out) -> list[str]:
    return [name for name in OUTPUTS if (out / name).exists()]


def test_a_diverging_member_is_named_at_the_next_logged_step(store_dir, small, tmp_path, monkeypatch):
    out = tmp_path / "sae"
    poison(monkeypatch, member=1, at_step=7)
    with pytest.raises(UserError, match=r"SAE l1_3 \(L1 coefficient 3\) diverged: its loss is nan at step 10 "
                                        r"\(finite at step 5\); re-run with a lower --lr \(now 0\.01\)\. "
                                        r"Nothing was published"):
        sae_train.train(small(), store_dir, out)
    assert published(out) == []
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [5]  # no NaN line


def test_no_checkpoint_is_written_after_a_divergence(store_dir, small, tmp_path, monkeypatch):
    out = tmp_path / "sae"
    saved: list[int] = []
    real_save = sae_train.save_checkpoint
    monkeypatch.setattr(sae_train, "save_checkpoint",
                        lambda *args, **kwargs: (saved.append(args[-1].step), real_save(*args, **kwargs)))
    poison(monkeypatch, member=0, at_step=5)
    with pytest.raises(UserError, match=r"SAE l1_0\.3 .* at step 8 \(finite at step 5\)"):
        sae_train.train(small(checkpoint_every=4), store_dir, out)
    assert saved == [4] and published(out) == []


def test_an_absurd_learning_rate_stops_without_publishing(store_dir, small, tmp_path):
    out = tmp_path / "sae"
    with pytest.raises(UserError, match=r"diverged: .* at step 5; re-run with a lower --lr \(now 1e\+38\)"):
        sae_train.train(small(lr=1e38), store_dir, out)
    assert published(out) == []


def test_a_corrupt_batch_between_read_backs_is_a_data_error(make_store, small, tmp_path, monkeypatch):
    store_dir = make_store(tmp_path / "bad", rows=3000, poison_row=1234)
    real_sample = sae_train.sample_rows
    monkeypatch.setattr(sae_train, "sample_rows", lambda *args: torch.nan_to_num(real_sample(*args)))
    monkeypatch.setattr(sae_train, "check_finite", lambda x, where: None)  # only the summed inputs tell
    out = tmp_path / "sae"
    with pytest.raises(DataError, match=r"a training batch of steps \d+\.\.\d+ contains NaN or Inf; .*"
                                        r"monofast activations verify"):
        sae_train.train(small(), store_dir, out)
    assert published(out) == []
