"""The cache of measurements about this machine: what its keys name."""

from __future__ import annotations

import monofast
import torch
from monofast.common import measured


def _fake_package(tmp_path, monkeypatch):
    """A package folder with one kernel file and a native library, as `monofast` for the test."""
    (tmp_path / "kernels" / "triton").mkdir(parents=True)
    (tmp_path / "kernels" / "eager.py").write_text("STEP = 1\n")
    (tmp_path / "kernels" / "triton" / "step.py").write_text("BLOCK = 64\n")
    (tmp_path / "_native.abi3.so").write_bytes(b"\x7fELF one")
    monkeypatch.setattr(monofast, "__file__", str(tmp_path / "__init__.py"))
    measured.kernels_fingerprint.cache_clear()


def test_the_key_names_the_kernels_code(tmp_path, monkeypatch):
    """A measurement timed before a kernel changed is not read back after it: the key moves
    with every kernel file and the native library, and stays put otherwise."""
    _fake_package(tmp_path, monkeypatch)
    try:
        first = measured.kernels_fingerprint()
        assert f"| kernels {first}" in measured.machine(torch.device("cpu"))
        measured.kernels_fingerprint.cache_clear()
        assert measured.kernels_fingerprint() == first  # read again, same code
        seen = {first}
        for path, text in [("kernels/triton/step.py", "BLOCK = 128\n"), ("_native.abi3.so", "\x7fELF two"),
                           ("kernels/eager.py", "STEP = 2\n")]:
            (tmp_path / path).write_text(text)
            measured.kernels_fingerprint.cache_clear()
            now = measured.kernels_fingerprint()
            assert len(now) == 12 and now not in seen, path
            seen.add(now)
    finally:
        measured.kernels_fingerprint.cache_clear()


def test_remembered_measures_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOFAST_CACHE", str(tmp_path))
    calls = []

    def measure(value):
        def run():
            calls.append(value)
            return {"ms": value}
        return run

    assert measured.remembered("t.json", "a", measure(1.0)) == {"ms": 1.0}
    assert measured.remembered("t.json", "a", measure(2.0)) == {"ms": 1.0}  # read back, not timed
    assert measured.remembered("t.json", "b", measure(3.0)) == {"ms": 3.0}
    assert calls == [1.0, 3.0]


def test_the_digest_follows_a_linked_kernels_folder_and_skips_stray_files(tmp_path, monkeypatch):
    """In a checkout the package's kernels/ is a link to the sources' folder: the digest reads
    through it (Metal sources included), and an editor's lock file (a dangling link) or a
    hidden backup neither breaks it nor moves it."""
    source = tmp_path / "src" / "kernels"
    (source / "metal").mkdir(parents=True)
    (source / "eager.py").write_text("STEP = 1\n")
    (source / "metal" / "sae.metal").write_text("kernel void a() {}\n")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "kernels").symlink_to(source, target_is_directory=True)
    monkeypatch.setattr(monofast, "__file__", str(package / "__init__.py"))
    try:
        measured.kernels_fingerprint.cache_clear()
        first = measured.kernels_fingerprint()
        (source / ".#eager.py").symlink_to(tmp_path / "gone")  # dangling, as an editor leaves it
        (source / ".eager.py.swp.py").write_text("junk")
        measured.kernels_fingerprint.cache_clear()
        assert measured.kernels_fingerprint() == first
        (source / "metal" / "sae.metal").write_text("kernel void b() {}\n")
        measured.kernels_fingerprint.cache_clear()
        assert measured.kernels_fingerprint() != first
    finally:
        measured.kernels_fingerprint.cache_clear()
