"""What a run measures about this machine and keeps for the next ones, like an autotuner's
cache: which form of a kernel is faster at a shape, on this processor or card, with this
torch. A later run reads the answer instead of timing again, so runs on one machine make
the same choices (and write the same files); deleting the file measures again.

Files live in the cache folder (`files.cache_dir()`), one JSON object per file, keyed by
`machine(device)` plus whatever else the measurement depends on. The key names the kernels'
code too (`kernels_fingerprint`): a change that makes one form faster is measured afresh
instead of racing by an answer timed before it. A damaged file is rewritten; one that cannot
be written costs a measurement per run, nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from monofast.common import files
from monofast.common.log import logger


@functools.cache
def kernels_fingerprint() -> str:
    """12 hex digits of a digest of the SAE step's code: every file of `monofast.kernels`
    (Python, Metal) and the native library, read once per process."""
    import monofast

    digest = hashlib.sha256()
    package = Path(monofast.__file__).parent
    kernels = (package / "kernels").resolve()  # a link to the sources' kernels/ in a checkout
    found = [(f"kernels/{path.relative_to(kernels).as_posix()}", path)
             for pattern in ("*.py", "*.metal") for path in kernels.rglob(pattern)]
    found += [(path.name, path) for pattern in ("_native*.so", "_native*.pyd") for path in package.glob(pattern)]
    for name, path in sorted(found):
        if any(part.startswith(".") for part in name.split("/")) or not path.is_file():
            continue  # an editor's lock or backup file, a dangling link
        digest.update(name.encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"unreadable")
    return digest.hexdigest()[:12]


def machine(device: torch.device) -> str:
    """The processor (with torch's thread count) or card, torch's version and the kernels'
    code (`kernels_fingerprint`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as info:
                name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
        except OSError:
            pass
        name = f"{name}, {torch.get_num_threads()} threads"
    else:
        name = device.type
    return f"{name} | torch {torch.__version__} | {device.type} | kernels {kernels_fingerprint()}"


def remembered(file: str, key: str, measure: Callable[[], dict[str, Any]],
               keep: Callable[[dict[str, Any]], bool] = lambda value: True) -> dict[str, Any]:
    """The value kept under `key` in the cache folder's `file`, else `measure()` (kept
    unless `keep` says otherwise)."""
    path = files.cache_dir() / file
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(known, dict) and isinstance(known.get(key), dict):
            return known[key]
    except (OSError, ValueError):
        pass
    value = measure()
    if not keep(value):
        return value
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}  # a damaged file is rewritten
    known[key] = value
    try:
        files.write_json(path, known)
    except OSError as err:
        logger.warning("could not keep a measurement of this machine in %s (%s); the next run measures again",
                       path, err)
    return value


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPUs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def race(cases: Mapping[Any, Callable[[], Any]], rounds: int, device: torch.device,
         setup: Optional[Mapping[Any, Callable[[], Any]]] = None) -> dict[Any, list[float]]:
    """Milliseconds of each case per round: one call of every case per round, after one
    untimed round, so a burst of load from elsewhere hits all of them alike. A case's
    `setup`, if any, runs untimed before each of its calls."""
    times: dict[Any, list[float]] = {name: [] for name in cases}
    for round_ in range(rounds + 1):
        for name, case in cases.items():
            if setup and name in setup:
                setup[name]()
            synchronize(device)
            start = time.perf_counter()
            case()
            synchronize(device)
            if round_:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times
