"""The native module: its stub matches it, and its checksums and errors behave."""

import os
import subprocess
import sys

import pytest

from monofast import _native


def test_stub_matches_module():
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "monofast._native", "--ignore-missing-stub"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hash_file_matches_hash_bytes(tmp_path):
    data = os.urandom(3 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert _native.hash_file(path) == _native.hash_bytes(data)
    assert _native.hash_file(str(path)) == _native.hash_bytes(data)
    assert len(_native.hash_bytes(b"")) == 32


def test_hash_changes_with_one_byte(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"a" * 1000)
    before = _native.hash_file(path)
    path.write_bytes(b"a" * 999 + b"b")
    assert _native.hash_file(path) != before


def test_missing_file_is_oserror_naming_it(tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(OSError, match="nope.bin"):
        _native.hash_file(missing)


def test_corrupt_error_is_value_error():
    assert issubclass(_native.CorruptFileError, ValueError)
    assert _native.CorruptFileError.__module__ == "monofast._native"
