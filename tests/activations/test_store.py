"""Activation stores: writing, reading, streaming, corruption and resume."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monofast.activations import store as activations
from monofast.activations.store import ActivationWriter, CorruptFileError, open_store

DIM = 4
SIZES = (0, 1, 7, 64, 333, 1000)
FUZZ_REGRESSIONS = Path(__file__).parent / "fuzz_regressions"


def write_store(folder: Path, rows: int, dim: int = DIM, dtype: str = "fp32", rows_per_shard: int = 100,
                fingerprint: str = "test") -> np.ndarray:
    """A store whose row r holds r + column / 10 (exact in every dtype for small r);
    returns the fp32 activations written."""
    values = (np.arange(rows)[:, None] + np.arange(dim)[None, :] / 8).astype(np.float32)  # (rows, dim)
    row_bytes = dim * activations.ITEMSIZE[dtype] + activations.META_ROW_BYTES
    with ActivationWriter(folder, dim, dtype, shard_bytes=activations.HEADER_BYTES + rows_per_shard * row_bytes,
                          fingerprint=fingerprint) as w:
        for begin in range(0, rows, 37):
            r = np.arange(begin, min(begin + 37, rows))
            w.append(values[r], r, r % 3, r // 10, r % 10)
        w.finish(note="hello")
    return values


@pytest.fixture(scope="module")
def store_of(tmp_path_factory):
    """`store_of(rows)`: path of a cached fp32 store of that many rows."""
    root = tmp_path_factory.mktemp("stores")
    cache: dict[int, Path] = {}

    def get(rows: int) -> Path:
        if rows not in cache:
            write_store(root / f"s{rows}", rows)
            cache[rows] = root / f"s{rows}"
        return cache[rows]

    return get


def epoch_rows(stream) -> list[int]:
    return [int(r) for b in stream for r in b.row]


# ---------------------------------------------------------------------------------------
# Round trips

@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip_every_dtype(tmp_path, dtype):
    values = write_store(tmp_path / "s", 250, dim=6, dtype=dtype)
    store = open_store(tmp_path / "s")
    assert (store.rows, store.dim, store.dtype) == (250, 6, dtype)
    assert store.index.extra["note"] == "hello"
    assert [s["rows"] for s in store.index.shards] == [100, 100, 50]
    batch = store.take([249, 0, 17])
    assert batch.row.tolist() == [249, 0, 17]
    assert batch.token_id.tolist() == [249, 0, 17]
    assert batch.source_id.tolist() == [0, 0, 2] and batch.source_id.dtype == np.uint8
    assert batch.context_id.tolist() == [24, 0, 1]
    assert batch.position.tolist() == [9, 0, 7]
    expected = torch.from_numpy(values[[249, 0, 17]])
    as_stored = expected.to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    assert torch.equal(batch.tensor(), as_stored)
    wide = store.take([249, 0, 17], to_float32=True)
    assert wide.activations.dtype == np.float32 and wide.dtype == "fp32"
    assert torch.equal(torch.from_numpy(wide.activations), as_stored.float())


def test_batches_are_zero_copy_numpy(store_of):
    store = open_store(store_of(333))
    batch = next(iter(store.stream(64, seed=1)))
    t = batch.tensor()
    assert t.data_ptr() == batch.activations.ctypes.data  # torch wraps the Rust buffer
    assert type(batch.activations.base).__name__ == "_BatchBuffer"
    assert batch.activations.flags.c_contiguous and batch.activations.shape == (64, DIM)
    assert np.array_equal(batch.activations[:, 0], batch.row.astype(np.float32))


def test_shards_open_in_other_safetensors_readers(tmp_path):
    from safetensors import safe_open

    values = write_store(tmp_path / "s", 120, dim=5, dtype="bf16")
    with safe_open(str(tmp_path / "s" / "shard-00001.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"activations", "token_id", "source_id", "context_id", "position"}
        acts = f.get_tensor("activations")
        assert acts.dtype == torch.bfloat16 and acts.shape == (20, 5)
        assert torch.equal(acts.float(), torch.from_numpy(values[100:]).bfloat16().float())
        assert f.get_tensor("token_id").tolist() == list(range(100, 120))
        assert f.metadata()["format"] == "monofast.activations/1"


def test_writer_accepts_torch_and_checks_shapes(tmp_path):
    with ActivationWriter(tmp_path / "s", 3, "bf16") as w:
        w.append(torch.ones(2, 3), torch.tensor([1, 2]), [0, 1], [0, 0], [5, 6])
        with pytest.raises(ValueError, match="dim 3"):
            w.append(np.ones((2, 4), np.float32), [1, 2], [0, 1], [0, 0], [5, 6])
        with pytest.raises(ValueError, match="source_id"):
            w.append(np.ones((2, 3), np.float32), [1, 2], [0], [0, 0], [5, 6])
        index = w.finish(gpt={"layer": 1})
    assert index.rows == 2 and index.extra == {"gpt": {"layer": 1}}
    assert open_store(tmp_path / "s").take([1]).tensor().float().tolist() == [[1.0, 1.0, 1.0]]


def test_an_aborted_writer_resumes_from_its_last_shard(tmp_path):
    folder = tmp_path / "s"
    values = (np.arange(50)[:, None] * np.ones(DIM)).astype(np.float32)
    w = ActivationWriter(folder, DIM, shard_bytes=activations.HEADER_BYTES + 10 * 29, fingerprint="a")
    assert w.rows_per_shard == 10
    r = np.arange(34)
    w.append(values[r], r, r % 2, r, r)
    w.abort()  # as an exception would: shards 0-2 done, rows 30-33 lost with the temporary file
    assert not (folder / "index.json").exists()
    assert not list(folder.glob(".*.tmp"))
    w = ActivationWriter(folder, DIM, shard_bytes=activations.HEADER_BYTES + 10 * 29, fingerprint="a",
                         resume=True)
    assert (w.rows, w.resumed_rows) == (30, 30)
    r = np.arange(30, 50)
    w.append(values[r], r, r % 2, r, r)
    w.finish()
    assert epoch_rows(open_store(folder).stream(7, shuffle="none")) == list(range(50))
    assert activations.verify(folder).rows == 50


def test_parts_written_by_several_writers_merge_into_one_store(tmp_path):
    # Two writers (two torchrun ranks) fill shards 0-1 and 2-4 of one store of 10-row shards.
    folder = tmp_path / "s"
    values = (np.arange(45)[:, None] * np.ones(DIM)).astype(np.float32)
    shard_bytes = activations.HEADER_BYTES + 10 * 29
    second = ActivationWriter(folder, DIM, shard_bytes=shard_bytes, fingerprint="a", part=(2, 5))
    first = ActivationWriter(folder, DIM, shard_bytes=shard_bytes, fingerprint="a", part=(0, 2))
    assert (first.rows, second.rows) == (0, 20)  # the global row each appends next
    for writer, r in ((second, np.arange(20, 45)), (first, np.arange(20))):
        writer.append(values[r], r, r % 2, r, r)
        assert writer.finish().rows == len(r)
    assert not (folder / "index.json").exists()
    with pytest.raises(OSError, match="part-00003.json"):
        activations.merge_parts(folder, [0, 3])
    index = activations.merge_parts(folder, [0, 2], note="merged")
    assert (index.rows, len(index.shards), index.extra["note"]) == (45, 5, "merged")
    assert epoch_rows(open_store(folder).stream(7, shuffle="none")) == list(range(45))
    assert activations.verify(folder).rows == 45
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".json") == ["index.json"]


def test_a_row_limit_streams_only_the_first_rows(store_of):
    store = open_store(store_of(64))
    parts = [epoch_rows(store.stream(5, rank=r, world_size=2, rows=50)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(50)) and len(parts[0]) == 25
    state = store.stream(5, rows=50).state()
    with pytest.raises(ValueError, match="limit"):
        store.stream(5).restore(state)
    with pytest.raises(ValueError, match="rows=65"):
        store.stream(5, rows=65)


# ---------------------------------------------------------------------------------------
# Stream properties

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.sampled_from(SIZES), batch=st.integers(1, 300), world=st.integers(1, 5),
       shuffle=st.sampled_from(["exact", "block", "none"]), seed=st.integers(0, 2**63))
def test_every_row_exactly_once_per_epoch(store_of, rows, batch, world, shuffle, seed):
    store = open_store(store_of(rows))
    seen: list[int] = []
    for rank in range(world):
        stream = store.stream(batch, shuffle=shuffle, seed=seed, rank=rank, world_size=world,
                              block_bytes=DIM * 4 * 16, window_blocks=3)
        part = epoch_rows(stream)
        assert len(part) == stream.rows_per_epoch == rows // world
        assert len(stream) == -(-(rows // world) // batch)
        seen += part
    assert len(set(seen)) == len(seen) == rows - rows % world
    if world == 1:
        assert sorted(seen) == list(range(rows))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.sampled_from(SIZES[3:]), batch=st.integers(1, 200), seed=st.integers(0, 2**63),
       shuffle=st.sampled_from(["exact", "block"]))
def test_order_is_determined_by_the_seed(store_of, rows, batch, seed, shuffle):
    store = open_store(store_of(rows))
    kw = dict(shuffle=shuffle, block_bytes=DIM * 4 * 8, window_blocks=4, epochs=2)
    first = epoch_rows(store.stream(batch, seed=seed, threads=1, **kw))
    assert first == epoch_rows(store.stream(batch, seed=seed, threads=3, prefetch=7, **kw))
    assert first != epoch_rows(store.stream(batch, seed=seed + 1, **kw))
    assert first[:rows] != first[rows:]  # each epoch has its own order


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.sampled_from(SIZES[1:]), batch=st.integers(1, 100), world=st.integers(1, 3),
       stop=st.integers(0, 40), shuffle=st.sampled_from(["exact", "block", "none"]),
       drop_last=st.booleans())
def test_resume_mid_epoch_equals_uninterrupted(store_of, rows, batch, world, stop, shuffle, drop_last):
    store = open_store(store_of(rows))
    kw = dict(shuffle=shuffle, seed=3, rank=world - 1, world_size=world, epochs=3, drop_last=drop_last,
              block_bytes=DIM * 4 * 8, window_blocks=2)
    whole = [b.row.tolist() for b in store.stream(batch, **kw)]
    stream = store.stream(batch, **kw)
    before = [b.row.tolist() for _, b in zip(range(stop), stream)]
    state = json.loads(json.dumps(stream.state()))  # survives a checkpoint file
    stream.close()
    resumed = store.stream(batch, **kw)
    resumed.restore(state)
    assert before + [b.row.tolist() for b in resumed] == whole


def test_restore_refuses_a_foreign_state(store_of):
    store = open_store(store_of(333))
    state = store.stream(10, seed=1).state()
    with pytest.raises(ValueError, match="seed"):
        store.stream(10, seed=2).restore(state)
    with pytest.raises(ValueError, match="world_size"):
        store.stream(10, seed=1, world_size=2).restore(state)


def test_epochs_none_streams_forever_and_drop_last(store_of):
    store = open_store(store_of(64))
    stream = store.stream(10, epochs=None, drop_last=True)
    assert len(stream) == 6
    batches = [b for _, b in zip(range(20), stream)]
    assert all(len(b.row) == 10 for b in batches)
    state = stream.state()
    assert (state["epoch"], state["row"]) == (3, 20)  # 20 batches of 6 a epoch


def test_bad_arguments_are_value_errors(store_of):
    store = open_store(store_of(64))
    for kwargs, match in [({"batch_size": 0}, "batch_size"), ({"batch_size": 4, "rank": 2, "world_size": 2}, "rank"),
                          ({"batch_size": 4, "shuffle": "random"}, "shuffle"), ({"batch_size": 4, "threads": 0}, "threads")]:
        with pytest.raises(ValueError, match=match):
            store.stream(**kwargs)
    with pytest.raises(IndexError, match="64"):
        store.take([64])
    with pytest.raises(IndexError):
        store.take([-1])


# ---------------------------------------------------------------------------------------
# Damage

@pytest.fixture
def damaged(tmp_path):
    folder = tmp_path / "s"
    write_store(folder, 250)
    return folder


def test_missing_folder_and_files_are_oserrors(tmp_path, damaged):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_store(tmp_path / "nowhere")
    (damaged / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001"):
        open_store(damaged)
    with pytest.raises(FileNotFoundError, match="shard-00001"):
        activations.verify(damaged)


def test_truncated_shard_is_named(damaged):
    path = damaged / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CorruptFileError, match=r"shard-00001\.safetensors: truncated"):
        open_store(damaged)


def test_flipped_data_byte_fails_verify_naming_the_shard(damaged):
    open_store(damaged)
    path = damaged / "shard-00002.safetensors"
    blob = bytearray(path.read_bytes())
    blob[activations.HEADER_BYTES + 5] ^= 0x10
    path.write_bytes(bytes(blob))
    open_store(damaged)  # opening reads headers only
    with pytest.raises(CorruptFileError, match=r"shard-00002\.safetensors: checksum mismatch"):
        activations.verify(damaged)


def flip_data_byte(path: Path) -> None:
    """Flip one byte in the middle of a shard's data (after its header), in place: the file
    keeps its length throughout (rewriting it whole would truncate it for a moment, and a
    stream reading the mapped shard then would fault)."""
    where = activations.HEADER_BYTES + (path.stat().st_size - activations.HEADER_BYTES) // 2
    with open(path, "r+b") as fh:
        fh.seek(where)
        byte = fh.read(1)[0]
        fh.seek(where)
        fh.write(bytes([byte ^ 0x10]))


def rows_until_error(stream) -> tuple[list[int], CorruptFileError]:
    """Rows of every batch the stream yields before it raises (it must raise)."""
    rows: list[int] = []
    with pytest.raises(CorruptFileError) as caught:
        for batch in stream:
            rows.extend(int(r) for r in batch.row)
    return rows, caught.value


@pytest.mark.parametrize("shuffle", ["exact", "none", "block"])
def test_a_stream_stops_at_a_flipped_byte_before_any_row_of_its_shard(damaged, shuffle):
    flip_data_byte(damaged / "shard-00001.safetensors")
    store = open_store(damaged)  # opening reads headers only
    kwargs = {"shuffle": shuffle, "block_bytes": 16 * DIM * 4, "window_blocks": 3}
    rows, err = rows_until_error(store.stream(16, **kwargs))
    assert isinstance(err, ValueError)
    assert not any(100 <= r < 200 for r in rows), "a row of the bad shard reached the consumer"
    message = str(err)
    assert re.match(r".*shard-00001\.safetensors: checksum mismatch: index\.json records [0-9a-f]{32}", message)
    assert "`monofast run --from activations`" in message
    if shuffle == "none":
        assert rows == list(range(96))  # storage order: the good shard before it, whole batches
    with pytest.raises(CorruptFileError, match="shard-00001"):
        epoch_rows(store.stream(16, **kwargs))  # every stream of this store, again
    # Without the checks every row comes out (the flipped one included).
    assert sorted(epoch_rows(store.stream(16, verify=False, **kwargs))) == list(range(250))


def test_shards_are_checked_once_then_not_again(damaged):
    store = open_store(damaged)
    stream = store.stream(32, epochs=2)
    first = [int(r) for _, b in zip(range(8), stream) for r in b.row]  # the whole first epoch
    assert sorted(first) == list(range(250))
    # Changed after the check: later epochs, new streams and take of this opened store do not
    # hash again (a store opened afresh does).
    flip_data_byte(damaged / "shard-00002.safetensors")
    assert sorted(epoch_rows(stream)) == list(range(250))
    assert sorted(epoch_rows(store.stream(32))) == list(range(250))
    assert store.take([201]).row.tolist() == [201]
    with pytest.raises(CorruptFileError, match="shard-00002"):
        next(iter(open_store(damaged).stream(32)))


def test_a_shard_truncated_under_an_open_stream_is_named(damaged):
    store = open_store(damaged)
    path = damaged / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-7])  # today: caught when the store is opened ...
    with pytest.raises(CorruptFileError, match=r"shard-00001\.safetensors: truncated.*monofast run --from activations"):
        open_store(damaged)
    # ... and by an already open store's stream, before reading past the new end.
    rows, err = rows_until_error(store.stream(16, shuffle="none"))
    assert rows == list(range(96))
    assert re.match(r".*shard-00001\.safetensors: truncated", str(err))


def test_flipped_header_byte_is_caught_on_open(damaged):
    path = damaged / "shard-00000.safetensors"
    blob = bytearray(path.read_bytes())
    blob[blob.index(b'"shape"') + 2] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptFileError, match="shard-00000"):
        open_store(damaged)


def test_mismatched_shards_are_named(tmp_path, damaged):
    a, b = damaged / "shard-00000.safetensors", damaged / "shard-00001.safetensors"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    with pytest.raises(CorruptFileError, match=r"shard-00000.*mismatched shard.*shard 1"):
        open_store(damaged)
    other = tmp_path / "other"
    write_store(other, 250, fingerprint="another")
    shutil.copy(other / "shard-00000.safetensors", a)
    b.write_bytes(a_bytes)
    with pytest.raises(CorruptFileError, match=r"shard-00000.*another harvest"):
        open_store(damaged)
    write_store(other / "wide", 100, dim=DIM + 1)
    shutil.copy(other / "wide" / "shard-00000.safetensors", a)
    with pytest.raises(CorruptFileError, match="shard-00000"):
        open_store(damaged)


def test_corrupt_index_is_named(damaged):
    index = damaged / "index.json"
    raw = json.loads(index.read_text())
    raw["rows"] += 1
    index.write_text(json.dumps(raw))
    with pytest.raises(CorruptFileError, match=r"index\.json: rows = 251"):
        open_store(damaged)
    index.write_text("{not json")
    with pytest.raises(CorruptFileError, match="index.json"):
        open_store(damaged)


def test_verify_command(damaged, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    damaged.rename(run / "activations")
    cmd = [sys.executable, "-m", "monofast", "activations", "verify", str(run)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and "OK: 3 shards, 250 rows" in ok.stdout
    path = run / "activations" / "shard-00001.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1 and "shard-00001.safetensors: checksum mismatch" in bad.stdout
    missing = subprocess.run(cmd[:-1] + [str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "cannot verify" in missing.stderr


# ---------------------------------------------------------------------------------------
# Fuzzing the header and index parsers through the public API

@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "s"
    write_store(folder, 5, rows_per_shard=5)
    return folder


def _open_must_not_crash(folder: Path) -> None:
    try:
        open_store(folder)
    except (CorruptFileError, OSError):
        pass


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 700), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 700), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 4200), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 700), st.sampled_from([b"{", b"]", b'"', b"-1", b"1e999",
                                                                         b"18446744073709551616", b"\\u0000"])),
)


def _mutate(blob: bytes, edits) -> bytes:
    data = bytearray(blob)
    for kind, at, arg in edits:
        at = min(at, len(data))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << arg
        elif kind == "set" and at < len(data):
            data[at] = arg
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = arg
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(mutation, min_size=1, max_size=4), target=st.sampled_from(["shard", "index"]))
def test_fuzz_header_and_index_parsers(fuzz_seed, tmp_path_factory, edits, target):
    folder = tmp_path_factory.mktemp("case", numbered=True) / "s"
    shutil.copytree(fuzz_seed, folder)
    name = "shard-00000.safetensors" if target == "shard" else "index.json"
    (folder / name).write_bytes(_mutate((fuzz_seed / name).read_bytes(), edits))
    _open_must_not_crash(folder)
    shutil.rmtree(folder.parent)


@pytest.mark.parametrize("case", sorted(p.name for p in FUZZ_REGRESSIONS.glob("*")))
def test_fuzz_regressions(case, fuzz_seed, tmp_path):
    """Kept inputs (hostile sizes, and any the fuzzer ever finds): the file name says which
    file of the store it replaces."""
    folder = tmp_path / "s"
    shutil.copytree(fuzz_seed, folder)
    target = "index.json" if case.startswith("index") else "shard-00000.safetensors"
    shutil.copy(FUZZ_REGRESSIONS / case, folder / target)
    _open_must_not_crash(folder)
