"""Resume checkpoints round-trip, and refuse damaged files and other options."""

from __future__ import annotations

import pytest
import torch
from monofast.common import checkpoint
from monofast.common.errors import DataError, UserError


def test_round_trip(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"format": 2, "identity": {"lr": 0.1}, "w": torch.arange(3.0)})
    payload = checkpoint.load(path, 2, "identity", {"lr": 0.1})
    assert torch.equal(payload["w"], torch.arange(3.0))


def test_other_options_listed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"format": 2, "identity": {"lr": 0.1, "steps": 5}})
    with pytest.raises(UserError, match=r"lr=0.1 \(now 0.2\).*drop --resume"):
        checkpoint.load(path, 2, "identity", {"lr": 0.2, "steps": 5})


def test_damaged_and_foreign_files(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(DataError, match="unreadable"):
        checkpoint.load(path, 2, "identity", {})
    checkpoint.save(path, {"format": 1})
    with pytest.raises(DataError, match="format 2"):
        checkpoint.load(path, 2, "identity", {})


def test_a_checkpoint_from_before_a_field_became_runtime_resumes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"format": 2, "identity": {"lr": 0.1, "compute_dtype": "float32"}})
    with pytest.raises(UserError, match="compute_dtype='float32' \\(now None\\)"):
        checkpoint.load(path, 2, "identity", {"lr": 0.1})
    assert checkpoint.load(path, 2, "identity", {"lr": 0.1}, runtime={"compute_dtype"})["format"] == 2
    with pytest.raises(UserError, match="lr=0.1"):
        checkpoint.load(path, 2, "identity", {"lr": 0.3}, runtime={"compute_dtype"})


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7])
def test_a_flipped_byte_is_named(tmp_path, where):
    """torch.load reads a flipped byte in a tensor without complaint; the digest inside does not."""
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"format": 2, "identity": {"lr": 0.1}, "w": torch.randn(50_000),
                           "optimizer": {"state": {0: {"exp_avg": torch.randn(1000)}}, "param_groups": []}})
    assert checkpoint.load(path, 2, "identity", {"lr": 0.1})["w"].shape == (50_000,)
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="damaged|unreadable"):
        checkpoint.load(path, 2, "identity", {"lr": 0.1})


def test_the_digest_covers_every_value():
    base = {"step": 3, "w": torch.arange(4.0), "m": {"a": [1, 2]}}
    digest = checkpoint.content_digest(base)
    assert digest == checkpoint.content_digest({"step": 3, "w": torch.arange(4.0), "m": {"a": [1, 2]}})
    for other in ({**base, "step": 4}, {**base, "w": torch.arange(4.0).double()},
                  {**base, "w": torch.tensor([0.0, 1.0, 2.0, 3.5])}, {**base, "m": {"a": [1, 3]}}):
        assert checkpoint.content_digest(other) != digest
