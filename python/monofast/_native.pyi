"""Type stubs of the Rust extension, checked against the built module by mypy.stubtest."""

import os

__version__: str

class CorruptFileError(ValueError):
    """A file was read but its contents are invalid (truncated, bad header, checksum mismatch)."""

def hash_file(path: str | os.PathLike[str]) -> str:
    """XXH3-128 hex digest of a file's contents, computed with the GIL released."""

def hash_bytes(data: bytes) -> str:
    """XXH3-128 hex digest of a bytes-like object."""
