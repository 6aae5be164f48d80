"""The built wheel: the manylinux abi3 wheel `scripts/build_wheels.sh` makes, with the native
module and kernel sources inside `monofast/` and nothing else at the top level; it imports
from a plain install, and in a fresh virtual environment with no Rust toolchain on PATH it
installs and runs the smoke preset end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import monofast_env, write_code_source, write_text_source

ROOT = Path(__file__).resolve().parents[1]
HOST_TARGET = "x86_64-unknown-linux-gnu"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """This platform's wheel, built by the documented script (x86_64 Linux), else by maturin."""
    if shutil.which("maturin") is None and subprocess.run(
            [sys.executable, "-m", "maturin", "--version"], capture_output=True).returncode != 0:
        pytest.skip("maturin is not installed (pip install -e '.[test]' brings it)")
    out = tmp_path_factory.mktemp("wheel")
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        cmd = ["bash", str(ROOT / "scripts" / "build_wheels.sh"), str(out)]
        env = dict(os.environ, MONOFAST_WHEEL_TARGETS=HOST_TARGET)
    else:
        cmd, env = [sys.executable, "-m", "maturin", "build", "--release", "--out", str(out)], None
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
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


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="the manylinux x86_64 wheel")
def test_wheel_is_manylinux_abi3(wheel):
    assert wheel.name.endswith("-cp310-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"), wheel.name
    shown = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(wheel)],
                           capture_output=True, text=True, check=True).stdout
    assert 'consistent with the following platform tag: "manylinux_2_17_x86_64"' in " ".join(shown.split()), shown


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="a Linux virtual environment")
def test_wheel_runs_the_smoke_preset_without_rust(wheel, tmp_path):
    """A fresh virtual environment (its dependencies shared from this one, so nothing is
    downloaded) with only the venv and the system folders on PATH: no cargo, no rustc."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    path = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])
    assert shutil.which("cargo", path=path) is None and shutil.which("rustc", path=path) is None
    env = dict(monofast_env(tmp_path), PATH=path, PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(wheel)], check=True, env=env)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import monofast; print(monofast.__file__)"],
                           capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's copy, not the source tree
    text = write_text_source(tmp_path, "verse", 40_000)
    code = write_code_source(tmp_path, files=10, lines=100)
    cfg = tmp_path / "sources.toml"
    cfg.write_text(f'[data]\nsources = ["verse={text}", "code={code}"]\n')
    run = tmp_path / "run"
    proc = subprocess.run([str(venv / "bin" / "monofast"), "run", "--preset", "smoke", "--run", str(run),
                           "--config", str(cfg)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "site" / "index.html").is_file() and (run / "sae" / "sae_weights.safetensors").is_file()
