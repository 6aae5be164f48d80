"""Atomic writes never leave a half-written file; digests and the disk-space check."""

from __future__ import annotations

import json
import os

import pytest
from monofast.common import files
from monofast.common.errors import UserError


def test_atomic_write_replaces_whole(tmp_path):
    path = tmp_path / "sub" / "a.json"
    files.write_json(path, {"x": 1})
    assert files.read_json(path) == {"x": 1}
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    files.write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with files.atomic_open(path) as fh:
            fh.write(b"new half")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_corrupt_json_names_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="m.json"):
        files.read_json(path, "manifest")


def test_current_digest_uses_record_until_file_changes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    record = files.file_record(path)
    assert files.current_digest(path, record) == record["digest"] == files.hash_bytes(b"abc")
    path.write_bytes(b"abd")
    os.utime(path, ns=(record["mtime_ns"] + 10**9, record["mtime_ns"] + 10**9))
    assert files.current_digest(path, record) == files.hash_bytes(b"abd")
    path.unlink()
    assert files.current_digest(path, record) is None


def test_free_space_check(tmp_path):
    files.check_free_space(tmp_path, 1, "a tiny file")
    with pytest.raises(UserError, match="needs .* GiB but only"):
        files.check_free_space(tmp_path / "not" / "yet", 1 << 60, "harvest")


def test_cache_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOFAST_CACHE", str(tmp_path / "c"))
    assert files.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_canonical_safetensors_sorts_the_metadata_and_keeps_the_tensors():
    import torch
    from safetensors.torch import load, save

    tensors = {"b": torch.arange(5, dtype=torch.float32), "a": torch.ones(3, 2, dtype=torch.bfloat16)}
    blob = save(tensors, metadata={"zeta": "1", "alpha": "two", "format": "pt"})
    canonical = files.canonical_safetensors(blob)
    size = int.from_bytes(canonical[:8], "little")
    assert size % 8 == 0
    assert list(json.loads(canonical[8:8 + size])["__metadata__"]) == ["alpha", "format", "zeta"]
    loaded = load(canonical)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert files.canonical_safetensors(canonical) == canonical
