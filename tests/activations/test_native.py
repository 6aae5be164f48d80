"""The native module: its stub matches it, and its checksums and errors behave."""

import os
import subprocess
import sys

import pytest
from monofast import _native


def test_stub_matches_module():
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "monofast._native", "--ignore-missing-stub"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hash_file_matches_hash_bytes(tmp_path):
    data = os.urandom(3 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert _native.hash_file(path) == _native.hash_bytes(data)
    assert _native.hash_file(str(path)) == _native.hash_bytes(data)
    assert len(_native.hash_bytes(b"")) == 32


def test_hash_changes_with_one_byte(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"a" * 1000)
    before = _native.hash_file(path)
    path.write_bytes(b"a" * 999 + b"b")
    assert _native.hash_file(path) != before


def test_missing_file_is_oserror_naming_it(tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(OSError, match="nope.bin"):
        _native.hash_file(missing)


def test_corrupt_error_is_value_error():
    assert issubclass(_native.CorruptFileError, ValueError)
    assert _native.CorruptFileError.__module__ == "monofast._native"


def test_store_errors_map_to_python_classes(tmp_path):
    import numpy as np

    writer = _native.ShardWriter(tmp_path / "s", 2, "fp32", 10)
    one = np.zeros(1, np.int32)
    with pytest.raises(ValueError, match="float32"):
        writer.append(np.zeros((1, 2), np.float64), one, np.zeros(1, np.uint8), one, one)
    with pytest.raises(ValueError, match="C-contiguous"):
        writer.append(np.zeros((2, 4), np.float32)[:, ::2], np.zeros(2, np.int32), np.zeros(2, np.uint8),
                      np.zeros(2, np.int32), np.zeros(2, np.int32))
    writer.append(np.ones((1, 2), np.float32), one, np.zeros(1, np.uint8), one, one)
    with pytest.raises(ValueError, match="JSON object"):
        writer.finish_json("[1]")
    assert '"rows": 1' in writer.finish_json('{"layer": 3}')
    assert writer.closed
    with pytest.raises(ValueError, match="closed"):
        writer.finish_json()
    with pytest.raises(ValueError, match="dtype"):
        _native.ShardWriter(tmp_path / "t", 2, "int8", 10)
    with pytest.raises(ValueError, match="fingerprint"):
        _native.ShardWriter(tmp_path / "t", 2, "fp32", 10, "x" * 5000)

    store = _native.Store(tmp_path / "s")
    assert (store.rows, store.dim, store.dtype, len(store)) == (1, 2, "fp32", 1)
    with pytest.raises(IndexError, match="out of range"):
        store.gather(np.array([1], np.int64))
    (tmp_path / "t").mkdir()
    with pytest.raises(FileNotFoundError, match=r"index\.json: No such file or directory$"):
        _native.Store(tmp_path / "t")
    with pytest.raises(OSError, match="not a directory"):
        _native.Store(tmp_path / "s" / "index.json")
    with pytest.raises(ValueError, match="rank"):
        _native.Stream(store, 4, rank=1, world_size=1)


def test_stream_batches_and_state(tmp_path):
    import numpy as np

    writer = _native.ShardWriter(tmp_path / "s", 3, "fp16", 4)
    ids = np.arange(10, dtype=np.int32)
    writer.append(np.arange(30, dtype=np.float16).reshape(10, 3), ids, (ids % 2).astype(np.uint8), ids, ids)
    writer.finish_json()
    store = _native.Store(tmp_path / "s")
    assert _native.Stream(store, 4).dtype == "fp16"
    stream = _native.Stream(store, 4, "none", epochs=2, to_float32=True)
    assert len(stream) == 3 and stream.rows_per_epoch == 10 and stream.dtype == "fp32"
    batch = stream.next_batch()
    assert batch is not None
    acts, token_id, source_id, context_id, position, row = batch
    assert acts.dtype == np.float32 and acts.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert row.tolist() == [0, 1, 2, 3] and source_id.tolist() == [0, 1, 0, 1]
    assert stream.position() == (0, 4)
    stream.seek(1, 8)
    assert [r.tolist() for *_, r in iter(stream.next_batch, None)] == [[8, 9]]
    assert stream.position() == (2, 0)
    stream.close()


def test_sample_positions_checks_its_arguments():
    import numpy as np

    ids = np.arange(3, dtype=np.uint64)
    assert _native.sample_positions(1, ids, 8, 100, 2).shape == (3, 6)  # capped by the range
    assert _native.sample_positions(1, ids, 4, 3, 9).shape == (3, 0)
    with pytest.raises(ValueError, match="int64"):
        _native.sample_positions(1, ids, 2**63, 4, 1)
    with pytest.raises(ValueError, match="too many"):
        _native.sample_positions(1, ids, 2**62, 4, 0)
    with pytest.raises(ValueError, match="contiguous"):
        _native.sample_positions(1, np.arange(6, dtype=np.uint64)[::2], 8, 2, 0)
    with pytest.raises(TypeError):
        _native.sample_positions(1, ids.astype(np.int64), 8, 2, 0)
