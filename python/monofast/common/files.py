"""File helpers shared by every stage: atomic writes, JSON, content hashes, the cache.

Every file a later stage trusts is written to a temporary name in the same folder and
renamed into place when complete, so a killed process leaves either the old file or
none, never half of a new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from monofast.common.errors import DataError, UserError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; finished files get the usual mode
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON, turning a missing or corrupt file into a `UserError` that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{what} is corrupt ({err}): {path}; delete it and re-run the stage") from None


def canonical_safetensors(blob: bytes) -> bytes:
    """A safetensors file's bytes with the `__metadata__` keys of its header sorted.

    The library writes that table from a hash map whose order changes from one process to
    the next, so the same tensors and metadata gave files with different digests (and a
    stage reading them re-ran for nothing). Tensor offsets count from the end of the
    header, so rewriting it leaves the data as it is."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as the library writes it
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def hash_file(path: str | os.PathLike) -> str:
    """XXH3-128 hex digest of a file (native, GIL released, memory-mapped)."""
    from monofast import _native

    try:
        return _native.hash_file(os.fspath(path))
    except OSError as err:
        if err.filename is not None:
            raise
        if os.path.isdir(path):  # mapping a folder fails as "no such device"
            raise IsADirectoryError(errno.EISDIR, "Is a directory", os.fspath(path)) from err
        raise OSError(err.errno, err.strerror or str(err), os.fspath(path)) from err  # the CLI names the path


def hash_bytes(data: bytes) -> str:
    from monofast import _native

    return _native.hash_bytes(data)


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """What a manifest remembers of a file: digest, size and modification time."""
    st = os.stat(path)
    return {"digest": hash_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


MANIFEST_FILE = "manifest.json"
"""Written last by a finished stage (`monofast.run.manifest`): what it wrote, with digests."""


def verify_recorded(path: str | os.PathLike) -> Path:
    """Check a file an earlier stage wrote against the digest that stage's manifest recorded
    when it finished (the manifest of the file's folder, or of the folder above it for a
    sweep member's files); returns the path. A file no finished stage recorded (a stage still
    running, a folder outside a run) is returned unchecked.

    A changed or damaged file is a `DataError` naming it, the check and the command that
    redoes the stage that wrote it. The whole file is hashed (XXH3, native, memory-mapped):
    for the small files and weights it is used on; activation shards are checked as they
    stream instead."""
    path = Path(path)
    for folder in (path.parent, path.parent.parent):
        manifest = folder / MANIFEST_FILE
        if manifest.is_file():
            break
    else:
        return path
    try:
        outputs = json.loads(manifest.read_text(encoding="utf-8")).get("outputs") or {}
    except (OSError, ValueError, AttributeError):
        return path  # an unreadable manifest: the pipeline re-runs that stage; a lone command reads on
    record = outputs.get(path.relative_to(folder).as_posix())
    if not isinstance(record, dict) or not isinstance(record.get("digest"), str):
        return path
    if not path.is_file() or hash_file(path) != record["digest"]:
        raise not_as_recorded(path, folder)
    return path


def redo_stage(folder: Path) -> str:
    """The advice that ends an error about a finished stage's files: redo the stage in `folder`."""
    return f"redo that stage with `monofast run --run {folder.parent} --from {folder.name}`"


def not_as_recorded(path: Path, folder: Path) -> DataError:
    """The error for a file that the stage in `folder` recorded and that is now missing, or
    changed since: it names the file, the check and the command that redoes the stage."""
    redo = redo_stage(folder)
    if not path.exists():
        return DataError(f"{path} is missing but stage {folder.name!r} recorded it; {redo}")
    return DataError(f"{path} was changed or damaged after stage {folder.name!r} wrote it (its XXH3 "
                     f"digest is not the one recorded in {folder.name}/{MANIFEST_FILE}); {redo}")


def current_digest(path: str | os.PathLike, record: dict[str, Any] | None) -> str | None:
    """The file's digest, reusing `record` when size and mtime still match it.

    Returns None when the file is missing. Rehashing happens only when the file may have
    changed, so checking a large up-to-date stage costs one `stat` per file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if record and record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns:
        return record["digest"]
    return hash_file(path)


def cache_dir() -> Path:
    """Where downloaded sources are kept: $MONOFAST_CACHE, else the user cache folder."""
    env = os.environ.get("MONOFAST_CACHE")
    if env:
        root = Path(env).expanduser()
    elif os.name == "nt":
        root = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "monofast"
    elif sys.platform == "darwin":
        root = Path.home() / "Library" / "Caches" / "monofast"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "monofast"
    root.mkdir(parents=True, exist_ok=True)
    return root


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse early, naming the numbers, when `folder`'s disk cannot hold `needed` bytes."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(
            f"{what} needs {needed / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free "
            f"on the disk holding {folder}; free some space or choose another --run folder"
        )


def read_npz(path: str | os.PathLike, redo: str) -> dict[str, Any]:
    """Every array of a numpy .npz file (no pickles), read whole; a missing or unreadable file
    is a `DataError` naming it and `redo`, the command that writes it again."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path} is missing; {redo}") from None
    except (ValueError, OSError) as err:
        raise DataError(f"{path} is unreadable ({err}); {redo}") from None
