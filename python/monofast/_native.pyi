"""Type stubs of the Rust extension, checked against the built module by mypy.stubtest.

`ShardWriter`, `Store` and `Stream` are the bases of `ActivationWriter`, `ActivationStore`
and `ActivationStream` (`monofast.activations.store`), which inherit their getters as typed
here; hence `Self` from the constructors.
"""

import os
from typing import Any, final

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

__version__: str

_BatchTuple = tuple[
    npt.NDArray[Any],  # (B, D) activations: float32, float16 or uint16 (bf16 bits)
    npt.NDArray[np.int32],  # (B,) token_id
    npt.NDArray[np.uint8],  # (B,) source_id
    npt.NDArray[np.int32],  # (B,) context_id
    npt.NDArray[np.int32],  # (B,) position
    npt.NDArray[np.int64],  # (B,) global row index
]

class CorruptFileError(ValueError):
    """A file was read but its contents are invalid (truncated, bad header, checksum mismatch)."""

def hash_file(path: str | os.PathLike[str]) -> str:
    """XXH3-128 hex digest of a file's contents, computed with the GIL released."""

def hash_bytes(data: bytes) -> str:
    """XXH3-128 hex digest of a bytes-like object."""

def verify(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """Check every shard of the store in `path`; returns (shards, rows, bytes)."""

def merge_parts(path: str | os.PathLike[str], starts: list[int], extra: str = "{}") -> str:
    """Join the finished parts starting at shards `starts` into `index.json`; returns it as JSON."""

def sample_positions(
    seed: int, context_ids: npt.NDArray[np.uint64], length: int, count: int, skip: int
) -> npt.NDArray[np.int64]:
    """(B, count) sorted positions in [skip, length): the `count` with the smallest keys."""

def positive_entries(
    feats: npt.NDArray[Any], threads: int = 1
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[Any]]:
    """(row_ptr [B + 1], col [nnz], val [nnz]) of the entries of feats (B, F) (float32, or
    uint16 / int16 bf16 bits) that are positive or NaN; val float32 or uint16 bf16 bits."""

def sampled_dot(
    a: npt.NDArray[np.float32],
    b: npt.NDArray[Any],
    row_ptr: npt.NDArray[np.int64],
    col: npt.NDArray[np.int64],
    out: npt.NDArray[np.float32],
    threads: int = 1,
) -> None:
    """out[j] = a[r] . b[col[j]] for each entry j of row r; b float32 or bf16 bits."""

def top_k(
    pre: npt.NDArray[Any],
    k: int,
    values: npt.NDArray[Any],
    indices: npt.NDArray[np.int64],
    threads: int = 1,
) -> None:
    """The k largest entries of each row of pre (B, F) (float32, or uint16 / int16 bf16 bits),
    ties to the lower column and NaN above all, into values (B, k) (pre's dtype) and
    indices (B, k), each row's by increasing column."""

class ShardWriter:
    """Writes an activation store on a background thread."""

    def __new__(
        cls,
        path: str | os.PathLike[str],
        dim: int,
        dtype: str,
        rows_per_shard: int,
        fingerprint: str = "",
        resume: bool = False,
        queue: int = 2,
        part: tuple[int, int] | None = None,
    ) -> Self: ...
    @property
    def rows(self) -> int: ...
    @property
    def resumed_rows(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def rows_per_shard(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def append(
        self,
        activations: npt.NDArray[Any],
        token_id: npt.NDArray[np.int32],
        source_id: npt.NDArray[np.uint8],
        context_id: npt.NDArray[np.int32],
        position: npt.NDArray[np.int32],
    ) -> None: ...
    def finish_json(self, extra: str = "{}") -> str: ...
    def abort(self) -> None: ...

class Store:
    """An opened activation store: memory-mapped, checked shards."""

    def __new__(cls, path: str | os.PathLike[str]) -> Self: ...
    @property
    def rows(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def rows_per_shard(self) -> int: ...
    @property
    def shards(self) -> list[str]: ...
    @property
    def index_json(self) -> str: ...
    def __len__(self) -> int: ...
    def gather(self, indices: npt.NDArray[np.int64], to_float32: bool = False) -> _BatchTuple: ...

class Stream:
    """Batches of a store in a seeded order, prefetched on Rust threads; with `verify`, each
    shard's checksum is checked before the first batch holding its rows is handed out."""

    def __new__(
        cls,
        store: Store,
        batch_size: int,
        shuffle: str = "exact",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        epochs: int | None = 1,
        to_float32: bool = False,
        threads: int = 2,
        prefetch: int = 4,
        block_rows: int = 4096,
        window_blocks: int = 64,
        rows: int | None = None,
        verify: bool = True,
    ) -> Self: ...
    def __len__(self) -> int: ...
    @property
    def rows_per_epoch(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    def next_batch(self) -> _BatchTuple | None: ...
    def position(self) -> tuple[int, int]: ...
    def seek(self, epoch: int, row: int) -> None: ...
    def close(self) -> None: ...

@final
class _BatchBuffer:
    """Owns a batch's activation memory (the numpy array's base)."""
