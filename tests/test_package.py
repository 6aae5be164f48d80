"""The built wheel: native module and kernel sources inside `monofast/`, nothing else
at the top level, and it imports from a plain install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("maturin") is None and subprocess.run(
            [sys.executable, "-m", "maturin", "--version"], capture_output=True).returncode != 0:
        pytest.skip("maturin is not installed (pip install -e '.[test]' brings it)")
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "maturin", "build", "--release", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("monofast-*.whl")
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"monofast", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    assert any(n.startswith("monofast/_native.") and n.endswith((".so", ".pyd")) for n in names)
    assert "monofast/_native.pyi" in names
    kernel_sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").rglob("*")
                            if p.suffix in (".py", ".metal") and "__pycache__" not in p.parts)
    for src in kernel_sources:
        assert f"monofast/{src}" in names, src
    assert not any(n.startswith("kernels/") for n in names)
    package = ROOT / "python" / "monofast"
    sources = sorted(p.relative_to(package.parent).as_posix() for p in package.rglob("*")
                     if p.is_file() and p.suffix in (".py", ".pyi", ".css", ".js")
                     and p.relative_to(package).parts[0] != "kernels" and "__pycache__" not in p.parts)
    assert len(sources) > 60
    assert [s for s in sources if s not in names] == []  # every stage package and its assets
    assert "abi3" in wheel.name


def test_wheel_imports_when_installed(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(target), str(wheel)], check=True)
    code = ("import monofast, monofast._native as n, monofast.kernels, monofast.kernels.triton; "
            "import monofast.cli, monofast.run.pipeline, monofast.gpt.train, monofast.sae.train, "
            "monofast.activations.harvest, monofast.analysis.run, monofast.site.build; "
            f"assert monofast.__file__.startswith({str(target)!r}), monofast.__file__; "
            "print(n.hash_bytes(b'x'))")
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) == 32
