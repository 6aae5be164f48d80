"""The data stage's files as later stages read them: `meta.json` and the memory-mapped
token and source-label splits (`train.bin` / `train.src.bin`, `val.bin` / `val.src.bin`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from monofast.common import files
from monofast.common.errors import DataError

META_FORMAT = 1
SPLITS = ("train", "val")


class Split(NamedTuple):
    """One split of a built dataset, memory-mapped."""

    tokens: np.ndarray
    """(N,) token ids."""
    sources: np.ndarray
    """(N,) uint8 source id of each token."""


def load_meta(folder: str | Path) -> dict[str, Any]:
    meta = files.read_json(files.verify_recorded(Path(folder) / "meta.json"), "data meta.json")
    if meta.get("format") != META_FORMAT:
        raise DataError(f"{folder}/meta.json has format {meta.get('format')}, expected {META_FORMAT}; "
                        f"re-run `monofast data --force`")
    return meta


def load_split(folder: str | Path, split: str, meta: dict[str, Any] | None = None) -> Split:
    """Memory-map one split's tokens and source labels, checking they agree with meta.json."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(folder)
    meta = meta or load_meta(folder)
    dtype = np.dtype(meta["token_dtype"])
    expected = meta["tokens"][split]
    arrays = []
    for name, dt in ((f"{split}.bin", dtype), (f"{split}.src.bin", np.dtype(np.uint8))):
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing; re-run `monofast data --force`")
        files.verify_recorded(path)
        size = path.stat().st_size
        if size != expected * dt.itemsize:
            raise DataError(f"{path} holds {size} bytes but meta.json says {expected} tokens of "
                            f"{dt.itemsize} bytes; the file is truncated or stale: re-run `monofast data --force`")
        arrays.append(np.memmap(path, dtype=dt, mode="r") if expected else np.zeros(0, dt))
    return Split(arrays[0], arrays[1])
