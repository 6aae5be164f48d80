"""Shuffled activation batches: the Rust stream against the ways people do it by hand.

Providers, each reading one whole epoch of shuffled (2,048, 768) batches from data in the
page cache:

- `monofast`: `open_store(...).stream(2048, shuffle="exact")`, every row once, global order;
- `np_memmap`: a flat `.npy` memory-mapped with numpy, fancy-indexed by a random permutation;
- `torch_pt`: whole `.pt` shards through `torch.load`, each indexed by its own permutation
  (the seed recipe's way: batches only mix rows of one shard);
- `memcpy`: a plain sequential copy of the same bytes into a reused buffer: the limit.

Plus the time to the first batch (open + plan + one batch); what checking every shard's
checksum costs: the first epoch of a freshly opened store with the checks (the default)
and without (`verify=False`), and a later epoch (shards already checked); and from a cold
page cache, where evicting it works (`posix_fadvise(DONTNEED)` per file; no root needed),
block shuffle against a sequential read of the same file and an exact shuffle's first
epoch with and without the checks.

    pytest benches/bench_stream.py --benchmark-enable   # pytest-benchmark tables
    python benches/bench_stream.py [--rows 262144]      # the side-by-side table with ratios

The default test run (`--benchmark-disable`) runs each provider once on a small dataset,
after checking that its batches hold the right rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import pytest
import torch
from monofast.activations import store as activations

DIM = 768
BATCH = 2048
PROVIDERS = ("monofast", "np_memmap", "torch_pt", "memcpy")
DTYPES = ("fp32", "bf16")
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
NP_DTYPE = {"fp32": np.float32, "bf16": np.uint16}  # bf16 kept as its bits
SHARD_BYTES = 256 << 20


class Dataset(NamedTuple):
    """One dataset written in every provider's format (the same rows in each)."""

    dtype: str
    rows: int
    store: Path
    """monofast store folder."""
    flat: Path
    """(rows, DIM) .npy file."""
    pt_shards: list[Path]
    """(rows_per_shard, DIM) tensors, one .pt file each."""

    @property
    def nbytes(self) -> int:
        return self.rows * DIM * (4 if self.dtype == "fp32" else 2)


def row_values(rows: np.ndarray, dtype: str) -> np.ndarray:
    """(len(rows), DIM) values that identify their row: column 0 holds the row number
    (exact in bf16 below 256, so only its low byte is compared there)."""
    values = np.empty((len(rows), DIM), np.float32)
    values[:] = np.arange(DIM, dtype=np.float32) / DIM
    values[:, 0] = rows % 256 if dtype == "bf16" else rows
    return values


def to_stored(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "fp32":
        return values
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def build(folder: Path, rows: int, dtype: str) -> Dataset:
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / f"store-{dtype}"
    flat = folder / f"flat-{dtype}.npy"
    writer = activations.ActivationWriter(store, DIM, dtype, shard_bytes=SHARD_BYTES)
    per_shard = writer.rows_per_shard
    mm = np.lib.format.open_memmap(flat, mode="w+", dtype=NP_DTYPE[dtype], shape=(rows, DIM))
    pt_shards = []
    chunk = 16_384
    pending: list[np.ndarray] = []
    for begin in range(0, rows, chunk):
        r = np.arange(begin, min(begin + chunk, rows))
        stored = to_stored(row_values(r, dtype), dtype)
        writer.append(stored, r, r % 2, r // 200, r % 200)
        mm[r[0]:r[-1] + 1] = stored
        pending.append(stored)
        while sum(len(p) for p in pending) >= per_shard or (r[-1] + 1 == rows and pending):
            block = np.concatenate(pending)
            shard, rest = block[:per_shard], block[per_shard:]
            path = folder / f"seed-{dtype}-{len(pt_shards):03d}.pt"
            tensor = torch.from_numpy(shard.copy())
            torch.save(tensor.view(torch.bfloat16) if dtype == "bf16" else tensor, path)
            pt_shards.append(path)
            pending = [rest] if len(rest) else []
    mm.flush()
    del mm
    writer.finish()
    return Dataset(dtype, rows, store, flat, pt_shards)


# ---------------------------------------------------------------------------------------
# Providers: `open_provider` opens the data once (as a training loop would), and the
# returned function runs one epoch, yielding (B, DIM) numpy arrays or torch tensors.

Epoch = Callable[[int], Iterator]


def open_monofast(ds: Dataset) -> Epoch:
    store = activations.open_store(ds.store)
    return lambda seed: (b.activations for b in store.stream(BATCH, shuffle="exact", seed=seed))


def first_epoch(ds: Dataset, verify: bool) -> Epoch:
    """An epoch of a store opened afresh for it, so each one is a first epoch: every shard
    checked (`verify`) or none."""
    def epoch(seed: int) -> Iterator[np.ndarray]:
        store = activations.open_store(ds.store)
        return (b.activations for b in store.stream(BATCH, shuffle="exact", seed=seed, verify=verify))

    return epoch


def open_np_memmap(ds: Dataset) -> Epoch:
    mm = np.load(ds.flat, mmap_mode="r")

    def epoch(seed: int) -> Iterator[np.ndarray]:
        perm = np.random.default_rng(seed).permutation(ds.rows)
        for begin in range(0, ds.rows, BATCH):
            yield mm[perm[begin:begin + BATCH]]

    return epoch


def open_torch_pt(ds: Dataset) -> Epoch:
    def epoch(seed: int) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        for i in torch.randperm(len(ds.pt_shards), generator=gen).tolist():
            shard = torch.load(ds.pt_shards[i])  # the whole shard, every epoch
            perm = torch.randperm(len(shard), generator=gen)
            for begin in range(0, len(shard), BATCH):
                yield shard[perm[begin:begin + BATCH]]

    return epoch


def open_memcpy(ds: Dataset) -> Epoch:
    mm = np.load(ds.flat, mmap_mode="r")
    out = np.empty((BATCH, DIM), mm.dtype)

    def epoch(seed: int) -> Iterator[np.ndarray]:
        for begin in range(0, ds.rows, BATCH):
            src = mm[begin:begin + BATCH]
            np.copyto(out[:len(src)], src)
            yield out[:len(src)]

    return epoch


OPENERS: dict[str, Callable[[Dataset], Epoch]] = {
    "monofast": open_monofast, "np_memmap": open_np_memmap, "torch_pt": open_torch_pt,
    "memcpy": open_memcpy,
}


def first_column(batch) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        return batch[:, 0].float().numpy()
    if batch.dtype == np.uint16:
        return (batch[:, 0].astype(np.uint32) << 16).view(np.float32)  # bf16 bits -> fp32
    return batch[:, 0].copy()  # memcpy reuses its buffer


def check_epoch(ds: Dataset, provider: str) -> None:
    """Every row exactly once (memcpy: in order), with the right values."""
    seen = np.concatenate([first_column(b) for b in OPENERS[provider](ds)(0)])
    expected = row_values(np.arange(ds.rows), ds.dtype)[:, 0]
    assert len(seen) == ds.rows, provider
    assert np.array_equal(np.sort(seen), np.sort(expected)), provider
    if provider != "memcpy":
        assert not np.array_equal(seen, expected), f"{provider} did not shuffle"


def run_epoch(epoch: Epoch, seed: int = 0) -> int:
    return sum(len(batch) for batch in epoch(seed))


def first_batch_seconds(ds: Dataset, provider: str) -> float:
    """Open the data and get one batch, from nothing."""
    start = time.perf_counter()
    next(iter(OPENERS[provider](ds)(0)))
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# Cold reads

def evict(paths: list[Path]) -> bool:
    """Drop the files' pages from the page cache; False where the OS does not allow it."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def cold_sequential_gbps(paths: list[Path]) -> float:
    evict(paths)
    buf = bytearray(8 << 20)
    total, start = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total / (time.perf_counter() - start) / 1e9


def cold_first_epoch_gbps(ds: Dataset, verify: bool) -> float:
    """An exact-shuffle epoch of a store opened afresh, from a cold page cache."""
    paths = sorted(ds.store.glob("shard-*.safetensors"))
    evict(paths)
    start = time.perf_counter()
    n = run_epoch(first_epoch(ds, verify))
    return n * DIM * (4 if ds.dtype == "fp32" else 2) / (time.perf_counter() - start) / 1e9


def cold_block_shuffle_gbps(ds: Dataset) -> float:
    store = activations.open_store(ds.store)
    paths = sorted(ds.store.glob("shard-*.safetensors"))
    evict(paths)
    start = time.perf_counter()
    n = sum(len(b.row) for b in store.stream(BATCH, shuffle="block", block_bytes=8 << 20, window_blocks=16))
    return n * DIM * (4 if ds.dtype == "fp32" else 2) / (time.perf_counter() - start) / 1e9


# ---------------------------------------------------------------------------------------
# pytest-benchmark

TEST_ROWS = 20_000  # 61 MB in fp32: every provider runs once in a second or two


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Dataset]:
    root = tmp_path_factory.mktemp("bench-stream")
    return {dtype: build(root, TEST_ROWS, dtype) for dtype in DTYPES}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shuffled_epoch(benchmark, datasets, dtype, provider):
    ds = datasets[dtype]
    check_epoch(ds, provider)
    benchmark.group = f"epoch of {BATCH} x {DIM} {dtype} batches"
    benchmark.extra_info["GB"] = ds.nbytes / 1e9
    epoch = OPENERS[provider](ds)
    assert benchmark(run_epoch, epoch) == ds.rows


@pytest.mark.parametrize("provider", ("monofast", "np_memmap", "torch_pt"))
def test_first_batch(benchmark, datasets, provider):
    benchmark.group = "first batch"
    benchmark(first_batch_seconds, datasets["fp32"], provider)


@pytest.mark.parametrize("verify", (True, False), ids=("verify", "no_verify"))
def test_first_epoch(benchmark, datasets, verify):
    ds = datasets["fp32"]
    benchmark.group = "first epoch of a fresh store"
    benchmark.extra_info["GB"] = ds.nbytes / 1e9
    assert benchmark(run_epoch, first_epoch(ds, verify)) == ds.rows


def test_block_shuffle_cold(benchmark, datasets):
    ds = datasets["fp32"]
    rows = np.concatenate([b.row for b in activations.open_store(ds.store).stream(
        BATCH, shuffle="block", block_bytes=1 << 20, window_blocks=4)])
    assert np.array_equal(np.sort(rows), np.arange(ds.rows))
    benchmark.group = "block shuffle, cold"
    benchmark(cold_block_shuffle_gbps, ds)


# ---------------------------------------------------------------------------------------
# Script

def rates_gbps(ds: Dataset, rounds: int) -> dict[str, tuple[float, float]]:
    """(best, median) GB/s of each provider over `rounds` epochs after a warm-up epoch. The
    providers take turns round by round, so load from other processes hits them alike."""
    epochs = {p: OPENERS[p](ds) for p in PROVIDERS}
    for p in PROVIDERS:
        run_epoch(epochs[p])
    return _take_turns(ds, epochs, rounds)


def _take_turns(ds: Dataset, epochs: dict[str, Any], rounds: int) -> dict[str, tuple[float, float]]:
    """(best, median) GB/s of each of `epochs` over `rounds` epochs, one of each per round."""
    times: dict[str, list[float]] = {name: [] for name in epochs}
    for seed in range(rounds):
        for name, epoch in epochs.items():
            start = time.perf_counter()
            run_epoch(epoch, seed)
            times[name].append(time.perf_counter() - start)
    return {n: (ds.nbytes / min(t) / 1e9, ds.nbytes / statistics.median(t) / 1e9) for n, t in times.items()}


VERIFY_ROWS = ("monofast 1st epoch, verify", "monofast 1st epoch, no verify", "monofast later epoch")


def verify_rates_gbps(ds: Dataset, rounds: int) -> dict[str, tuple[float, float]]:
    """(best, median) GB/s of the first epoch of a freshly opened store with and without the
    shard checks, and of a later epoch, taking turns round by round as `rates_gbps` does."""
    later = OPENERS["monofast"](ds)
    epochs = {VERIFY_ROWS[0]: first_epoch(ds, True), VERIFY_ROWS[1]: first_epoch(ds, False),
              VERIFY_ROWS[2]: later}
    run_epoch(later)  # its shards checked and mapped once, before the rounds
    return _take_turns(ds, epochs, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=262_144, help="rows per dataset (default: 262144)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the datasets (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"{args.rows} rows x {DIM}; batches of {BATCH}; best (median) of {args.rounds} epochs, "
              f"data in the page cache; {os.cpu_count()} CPUs\n")
        print("| dtype | provider | GB/s best | GB/s median | vs memcpy | monofast vs it | first batch ms |")
        print("|---|---|---|---|---|---|---|")
        checks = []
        for dtype in DTYPES:
            ds = build(Path(tmp), args.rows, dtype)
            for provider in PROVIDERS:
                check_epoch(ds, provider)
            rates = rates_gbps(ds, args.rounds)
            firsts = {p: min(first_batch_seconds(ds, p) for _ in range(3)) * 1e3 for p in PROVIDERS}
            for p in PROVIDERS:
                best, median = rates[p]
                print(f"| {dtype} | {p} | {best:.2f} | {median:.2f} | {best / rates['memcpy'][0]:.0%} | "
                      f"{rates['monofast'][0] / best:.2f}x | {firsts[p]:.1f} |")
            verified = verify_rates_gbps(ds, args.rounds)
            for name in VERIFY_ROWS:
                best, median = verified[name]
                print(f"| {dtype} | {name} | {best:.2f} | {median:.2f} | {best / rates['memcpy'][0]:.0%} | "
                      f"{rates['monofast'][0] / best:.2f}x | |")
            on, off = (verified[name] for name in VERIFY_ROWS[:2])
            checks.append(f"{dtype}: first epoch with the shard checks at {on[0] / off[0]:.0%} of the speed "
                          f"without them (best; median {on[1] / off[1]:.0%})")
            if dtype == "fp32":
                paths = sorted(ds.store.glob("shard-*.safetensors"))
                seq = cold_sequential_gbps(paths)
                block = cold_block_shuffle_gbps(ds)
                on, off = cold_first_epoch_gbps(ds, True), cold_first_epoch_gbps(ds, False)
                print(f"\ncold (posix_fadvise DONTNEED per file): sequential read {seq:.2f} GB/s, "
                      f"block shuffle {block:.2f} GB/s ({block / seq:.0%}); exact shuffle, first epoch: "
                      f"{on:.2f} GB/s with the shard checks, {off:.2f} GB/s without\n")
            for path in [ds.flat, *ds.pt_shards]:
                path.unlink()
        print("\n" + "\n".join(checks))


if __name__ == "__main__":
    main()
