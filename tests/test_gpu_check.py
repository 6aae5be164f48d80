"""`benches/gpu_check.py`, the check a CUDA machine runs, kept working without one: its
correctness sections run at toy sizes on the CPU (Triton kernels through the interpreter)
and must report every check as passed. (Its `sae_train` section, graph replays against
eager steps, means something only on CUDA and is left out here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "kernels", "stream", "harvest"]


def test_gpu_check_small_passes_its_checks_on_the_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", MONOFAST_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_check.py"), "--small",
                             "--out", str(tmp_path), "--sections", ",".join(SECTIONS)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == []
    sections = {row[0] for row in report["rows"]}
    assert sections == set(SECTIONS)
    checks = [row for row in report["rows"] if row[0] in ("kernels", "stream")]
    # Every kernel case (fp32, bf16, fp16, odd shapes, TopK) and each other check said ok.
    assert len([row for row in checks if row[0] == "kernels"]) >= 7
    assert checks and all(row[2].startswith("ok") for row in checks)
    assert any(row[2] == "ok" for row in report["rows"] if row[0] == "harvest")
    # The table is the last thing printed.
    assert result.stdout.rstrip().splitlines()[-1].startswith("harvest")
