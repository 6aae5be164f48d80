"""Activation stores: shards of MLP activations on disk, written and streamed by Rust.

A store is a folder (`runs/<name>/activations/`) of safetensors shards plus `index.json`
(see `monofast._native` for the byte layout). This module is the Python face of it:

- `ActivationWriter` appends batches (numpy arrays or torch tensors) on a background
  thread, rotates shards, and resumes after a crash; several writers (torchrun ranks) can
  each write a `part` of one store, which `merge_parts` then indexes;
- `open_store(folder)` memory-maps a finished store; `store.stream(...)` yields shuffled,
  prefetched `Batch`es (exactly once per epoch, seeded, resumable, split by rank) and
  `store.take(rows)` fetches rows by index;
- `verify(folder)` checks every shard's checksum; `monofast activations verify RUN` is the
  command. A stream also checks each shard's checksum the first time it reads it (on its
  prefetch threads, before handing out any of the shard's rows) unless `verify=False`.

bf16 activations travel as their raw 16 bits in a uint16 array (numpy has no bfloat16);
`Batch.tensor()` views them as `torch.bfloat16` without a copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from monofast import _native
from monofast._native import CorruptFileError
from monofast.common import files

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

__all__ = [
    "ActivationIndex", "ActivationStore", "ActivationStream", "ActivationWriter", "Batch",
    "CorruptFileError", "VerifyReport", "find_store", "merge_parts", "open_store", "read_index",
    "rows_per_shard", "verify",
]

INDEX_FILE = "index.json"
DTYPES = ("fp32", "fp16", "bf16")
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
META_ROW_BYTES = 13
"""Per-row metadata bytes: context_id, token_id, position (int32) and source_id (uint8)."""
HEADER_BYTES = 4096
"""Every shard's safetensors header is padded to one page; the data starts after it."""


class Batch(NamedTuple):
    """Rows of a store: activations with their metadata, all numpy arrays."""

    activations: np.ndarray
    """(B, D) float32, float16, or uint16 holding bf16 bits (see `dtype`)."""
    token_id: np.ndarray
    """(B,) int32 token id at the row's position."""
    source_id: np.ndarray
    """(B,) uint8 id of the text source the token came from (data/meta.json names them)."""
    context_id: np.ndarray
    """(B,) int32 index of the context (window of tokens) the row was sampled from."""
    position: np.ndarray
    """(B,) int32 position of the token inside its context."""
    row: np.ndarray
    """(B,) int64 global row index in the store."""
    dtype: str
    """What `activations` holds: fp32, fp16 or bf16."""

    def tensor(self, device: str | torch.device | None = None, non_blocking: bool = False,
               pin_memory: bool = False) -> torch.Tensor:
        """The activations as a (B, D) torch tensor: zero-copy on the CPU (bf16 viewed from
        its bits), optionally through pinned memory for an asynchronous CUDA copy."""
        return as_tensor(self.activations, self.dtype, device, non_blocking, pin_memory)


def as_tensor(array: np.ndarray, dtype: str, device: str | torch.device | None = None,
              non_blocking: bool = False, pin_memory: bool = False) -> torch.Tensor:
    import torch

    t = torch.from_numpy(array)  # shares memory with the numpy array
    if dtype == "bf16":
        t = t.view(torch.bfloat16)
    if device is not None and torch.device(device).type != "cpu":
        if pin_memory:
            t = t.pin_memory()
        t = t.to(device, non_blocking=non_blocking)
    return t


class DeviceFeeder:
    """Host tensors onto a CUDA device through a ring of reusable pinned buffers.

    `Batch.tensor(pin_memory=True)` pins fresh memory for every batch, and pinning costs
    more than the copy it speeds up; a plain copy from pageable memory blocks the host for
    the whole transfer. The feeder copies each batch into the next of `depth` pinned
    buffers (a host memcpy) and starts an asynchronous transfer from it; a buffer is reused
    only once the transfer that read it has finished. The returned device tensors are
    fresh, so they stay valid however long the caller keeps them. On other devices it is a
    plain `.to(device)`.
    """

    def __init__(self, device: str | torch.device, depth: int = 3):
        import torch

        self.device = torch.device(device)
        self.depth = depth
        self.cuda = self.device.type == "cuda"
        self.buffers: list[torch.Tensor] = []
        self.events: list[Any] = []
        self.next = 0

    def __call__(self, host: torch.Tensor) -> torch.Tensor:
        """`host` (any CPU tensor) on the device; its contents are read before returning."""
        import torch

        if not self.cuda:
            return host.to(self.device)
        nbytes = host.numel() * host.element_size()
        if len(self.buffers) < self.depth:
            self.buffers.append(torch.empty(0, dtype=torch.uint8).pin_memory())
            self.events.append(None)
        i = self.next
        self.next = (i + 1) % self.depth
        if self.events[i] is not None:
            self.events[i].synchronize()  # the transfer that last read buffer i is done
        if self.buffers[i].numel() < nbytes:
            self.buffers[i] = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        staged = self.buffers[i][:nbytes].view(host.dtype).view(host.shape)
        staged.copy_(host)
        out = staged.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.events[i] = event
        return out


def rows_per_shard(dim: int, dtype: str, shard_bytes: int) -> int:
    """How many rows fit a shard of at most `shard_bytes` bytes (at least one)."""
    row = dim * ITEMSIZE[_check_dtype(dtype)] + META_ROW_BYTES
    return max(1, (int(shard_bytes) - HEADER_BYTES) // row)


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


# ---------------------------------------------------------------------------------------
# Index

class ActivationIndex(NamedTuple):
    """The parsed `index.json` of a store."""

    dim: int
    dtype: str
    rows: int
    rows_per_shard: int
    fingerprint: str
    shards: list[dict[str, Any]]
    """One record per shard: file, rows, bytes, checksum (XXH3-128 hex)."""
    extra: dict[str, Any]
    """What the harvest recorded: `gpt` (checkpoint checksum, layer), `data`, `contexts`."""

    @classmethod
    def from_json(cls, text: str) -> ActivationIndex:
        raw = json.loads(text)
        known = {"format", "dim", "dtype", "rows", "rows_per_shard", "fingerprint", "columns", "shards"}
        return cls(raw["dim"], raw["dtype"], raw["rows"], raw["rows_per_shard"], raw["fingerprint"],
                   raw["shards"], {k: v for k, v in raw.items() if k not in known})


def find_store(path: str | os.PathLike[str]) -> Path:
    """The store folder for `path`: the folder itself or a run directory's `activations/`."""
    path = Path(path)
    if not (path / INDEX_FILE).is_file() and (path / "activations" / INDEX_FILE).is_file():
        return path / "activations"
    return path


def read_index(folder: str | os.PathLike[str]) -> ActivationIndex:
    """The checked index of a store (shards are opened and their headers checked too)."""
    return ActivationStore(folder).index


# ---------------------------------------------------------------------------------------
# Writing

class ActivationWriter(_native.ShardWriter):
    """Write a store: `append` batches, then `finish`. Use as a context manager so that an
    exception stops the writer thread and deletes the half-written shard.

    The native writer supplies `rows` (the global index the next appended row gets: rows on
    disk or queued, after the rows of the parts before this one), `resumed_rows`, `dim`,
    `dtype`, `rows_per_shard`, `closed` and `abort()` (stop without an index: finished
    shards stay for a resume, the open one goes).

    With `resume=True`, shards finished by an interrupted writer with the same
    `fingerprint`, dim, dtype and shard size are kept and `rows` says how many; the caller
    appends from that row on.

    With `part=(first, end)` it writes only shards [first, end) of a store that other
    writers (other processes) fill beside it: its rows start at row `first x
    rows_per_shard`, `finish` leaves a part record, and `merge_parts` writes the index
    once every part has finished. Resuming keeps what this part wrote before.
    """

    folder: Path

    def __new__(cls, folder: str | os.PathLike[str], dim: int, dtype: str = "fp32", *,
                shard_bytes: int = 256 << 20, fingerprint: str = "", resume: bool = False,
                queue: int = 2, part: tuple[int, int] | None = None) -> Self:
        # The native constructor takes rows per shard; this one takes the shard size.
        folder = Path(folder)
        self = super().__new__(cls, folder, dim, dtype, rows_per_shard(dim, dtype, shard_bytes),
                               fingerprint, resume, queue, part)
        self.folder = folder
        return self

    def append(self, activations: np.ndarray | torch.Tensor, token_id: Any, source_id: Any,
               context_id: Any, position: Any) -> None:
        """Queue rows: activations (B, D) in any float dtype (converted to the store's), and
        the four (B,) metadata columns. Returns once the rows are copied into the queue."""
        acts = self._activation_array(activations)
        super().append(acts, _column(token_id, np.int32), _column(source_id, np.uint8),
                       _column(context_id, np.int32), _column(position, np.int32))

    def _activation_array(self, activations: np.ndarray | torch.Tensor) -> np.ndarray:
        target = {"fp32": np.float32, "fp16": np.float16}.get(self.dtype)
        if isinstance(activations, np.ndarray):
            if target is not None:
                return np.ascontiguousarray(activations, dtype=target)
            if activations.dtype in (np.uint16, np.int16):
                return np.ascontiguousarray(activations)  # already bf16 bits
            import torch

            activations = torch.from_numpy(np.ascontiguousarray(activations))
        import torch

        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]
        t = activations.detach().to("cpu", torch_dtype).contiguous()
        if self.dtype == "bf16":
            t = t.view(torch.int16)
        return t.numpy()

    def finish(self, **extra: Any) -> ActivationIndex:
        """Write the last shard, then `index.json` with `extra` (JSON-ready values) in it;
        a part writes its record instead (its `extra` goes to `merge_parts`)."""
        return ActivationIndex.from_json(self.finish_json(json.dumps(extra)))

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if not self.closed:
            self.abort()


def merge_parts(folder: str | os.PathLike[str], starts: list[int], **extra: Any) -> ActivationIndex:
    """Write `index.json` (with `extra` in it) for a store written in parts: the finished
    parts whose first shards are `starts`, in order. Removes the part records and any shard
    no part lists; raises without writing anything when a part is missing or the parts
    leave a gap."""
    return ActivationIndex.from_json(_native.merge_parts(Path(folder), list(starts), json.dumps(extra)))


def _column(values: Any, dtype: type) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(values).reshape(-1), dtype=dtype)


# ---------------------------------------------------------------------------------------
# Reading

class ActivationStore(_native.Store):
    """A finished store, memory-mapped. Opening checks the index and every shard header
    (sizes, shapes, identity) but not the checksums: that is `verify`, which reads it all,
    or a stream, which checks each shard as it first reads it.

    The native store supplies `rows` (also `len()`), `dim`, `dtype`, `rows_per_shard`,
    `shards` and `index_json`."""

    folder: Path
    index: ActivationIndex

    def __new__(cls, folder: str | os.PathLike[str]) -> Self:
        # Resolved before the native store opens it: a run directory names its store.
        store = find_store(folder)
        files.verify_recorded(store / INDEX_FILE)  # when a finished harvest recorded it
        self = super().__new__(cls, store)
        self.folder = store
        self.index = ActivationIndex.from_json(self.index_json)
        return self

    def take(self, indices: Any, to_float32: bool = False) -> Batch:
        """Rows by global index, in the given order (IndexError when one is out of range)."""
        rows = np.ascontiguousarray(np.asarray(indices, dtype=np.int64).reshape(-1))
        return Batch(*self.gather(rows, to_float32), dtype="fp32" if to_float32 else self.dtype)

    def stream(self, batch_size: int, *, shuffle: str = "exact", seed: int = 0, rank: int = 0,
               world_size: int = 1, drop_last: bool = False, epochs: int | None = 1,
               to_float32: bool = False, threads: int = 2, prefetch: int = 4,
               block_bytes: int = 4 << 20, window_blocks: int = 64,
               rows: int | None = None, verify: bool = True) -> ActivationStream:
        """Batches in a seeded order: `exact` (every row once per epoch, a fresh permutation
        each epoch), `block` (shuffled blocks of ~`block_bytes`, shuffled again inside
        windows of `window_blocks` blocks: long sequential reads for data larger than RAM)
        or `none` (storage order). Rank `rank` of `world_size` reads its own disjoint,
        equal part of each epoch (the last `rows % world_size` positions are left out).
        `epochs=None` streams forever. `rows` reads only the first `rows` rows (e.g. leaving
        a held-out tail out): epochs and the rank split are over those.

        With `verify` (the default), each shard's XXH3 checksum is checked against
        `index.json` the first time this store is read there, on the prefetch threads and
        before any batch holding the shard's rows is handed out; later epochs (and `take`)
        do not check again. A bad shard raises `CorruptFileError` naming it. `verify=False`
        skips the checks (for a store just checked with `verify`)."""
        row_bytes = self.dim * ITEMSIZE[self.dtype]
        block_rows = max(1, block_bytes // row_bytes)
        stream = ActivationStream(self, batch_size, shuffle, seed, rank, world_size, drop_last, epochs,
                                  to_float32, threads, prefetch, block_rows, window_blocks, rows, verify)
        stream.identity = {"rows": self.rows, "fingerprint": self.index.fingerprint, "seed": seed,
                           "shuffle": shuffle, "rank": rank, "world_size": world_size, "limit": rows}
        if shuffle == "block":
            stream.identity.update(block_rows=block_rows, window_blocks=window_blocks)
        return stream

    def contexts(self) -> np.ndarray | None:
        """(contexts,) int64 start offset of each context in the token split, if recorded."""
        info = self.index.extra.get("contexts", {})
        name = info.get("file")
        return np.load(files.verify_recorded(self.folder / name), allow_pickle=False) if name else None


def open_store(folder: str | os.PathLike[str]) -> ActivationStore:
    """Open a finished store (a store folder or a run directory holding `activations/`)."""
    return ActivationStore(folder)


class ActivationStream(_native.Stream):
    """Iterate to get `Batch`es. `state()` and `restore()` resume at the exact row (e.g.
    saved in an SAE checkpoint). Open one with `ActivationStore.stream`.

    The native stream supplies `len()` (batches per epoch), `rows_per_epoch`, `dtype` (what
    `Batch.activations` holds) and `close()` (stop the prefetch threads; iterating again
    restarts them)."""

    identity: dict[str, Any]
    """What a `state()` must match to be restored here: the store, seed, order and rank
    layout (set by `ActivationStore.stream`, which knows them)."""

    def __iter__(self) -> ActivationStream:
        return self

    def __next__(self) -> Batch:
        parts = self.next_batch()
        if parts is None:
            raise StopIteration
        return Batch(*parts, dtype=self.dtype)

    def state(self) -> dict[str, Any]:
        """Where the consumer stands, plus what must match to restore it (JSON-ready)."""
        epoch, row = self.position()
        return {"epoch": epoch, "row": row, **self.identity}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`: the next batch starts at exactly that row. Raises
        ValueError when the state belongs to another store, seed, order or rank layout."""
        for key, value in self.identity.items():
            if state.get(key) != value:
                raise ValueError(f"stream state has {key}={state.get(key)!r} but this stream has "
                                 f"{value!r}; restore it into a stream opened the same way")
        self.seek(int(state["epoch"]), int(state["row"]))

    def __enter__(self) -> ActivationStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# Verification

class VerifyReport(NamedTuple):
    shards: int
    rows: int
    bytes: int


def verify(folder: str | os.PathLike[str]) -> VerifyReport:
    """Check every shard against `index.json` (size, header, XXH3 checksum), in order.
    Raises `CorruptFileError` naming the first bad shard, `OSError` for a missing file."""
    return VerifyReport(*_native.verify(find_store(folder)))


