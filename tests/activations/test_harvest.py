"""The harvest stage: sampling, stored rows against a direct forward pass, resume after
SIGKILL, the disk-space check and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from monofast import cli
from monofast.activations import harvest
from monofast.activations import store as activations
from monofast.common import files
from monofast.common.errors import DataError, UserError
from monofast.data.prepare import DataConfig, build
from monofast.data.splits import load_meta, load_split
from monofast.gpt.model import GPT, GPTConfig
from monofast.gpt.weights import load_model, save_model

ROW_BYTES = 64 * 4 + activations.META_ROW_BYTES  # d_mlp 64, fp32


def verse(chars: int) -> str:
    words = "thou art the king of my heart and love sweet night death crown lord fair".split()
    rng = np.random.default_rng(0)
    lines, total = [], 0
    while total < chars:
        line = " ".join(rng.choice(words, size=int(rng.integers(4, 9)))).capitalize() + ","
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines)


def source_specs(folder: Path) -> tuple[str, str]:
    text = folder / "verse.txt"
    text.write_text(verse(30_000), encoding="utf-8")
    return (f"verse={text}", f"python={Path(sysconfig.get_paths()['stdlib']) / 'json' / '*.py'}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, gpt folder): a small corpus and an untrained 2-layer GPT (d_mlp 64)."""
    root = tmp_path_factory.mktemp("inputs")
    build(DataConfig(sources=source_specs(root), chars_per_source=30_000, vocab_size=300),
               root / "data")
    torch.manual_seed(0)
    vocab = load_meta(root / "data")["vocab_size"]
    model = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=16))
    save_model(root / "gpt", model)
    return root / "data", root / "gpt"


def small_cfg(**overrides) -> harvest.HarvestConfig:
    values = dict(contexts=40, positions_per_context=12, batch_size=4, device="cpu",
                  shard_mb=(activations.HEADER_BYTES + 48.5 * ROW_BYTES) / 2**20)  # 48 rows a shard
    values.update(overrides)
    return harvest.HarvestConfig(**values)


# ---------------------------------------------------------------------------------------
# Sampling

def test_positions_are_distinct_sorted_and_keyed_on_the_context():
    ids = np.arange(100, 140)
    pos = harvest.sample_positions(7, ids, 256, 200, 1)  # (40, 200)
    assert pos.shape == (40, 200) and pos.min() >= 1 and pos.max() < 256
    assert all(len(set(row)) == 200 and list(row) == sorted(row) for row in pos)
    again = np.concatenate([harvest.sample_positions(7, ids[:13], 256, 200, 1),
                            harvest.sample_positions(7, ids[13:], 256, 200, 1)])
    assert np.array_equal(pos, again)  # any batch layout draws the same positions
    assert not np.array_equal(pos, harvest.sample_positions(8, ids, 256, 200, 1))
    assert not np.array_equal(pos[0], pos[1])
    # Spread over the whole context, position 0 excluded.
    counts = np.bincount(harvest.sample_positions(1, np.arange(2000), 32, 4, 1).ravel(), minlength=32)
    assert counts[0] == 0 and counts[1:].min() > 150


def test_positions_are_pinned():
    """The positions decide which rows a store holds, and a resumed harvest recomputes the
    rows it lost from them: a change here would splice rows of two samplings into one store,
    and would make the stores already harvested irreproducible. The values are those every
    existing store was sampled with."""
    pinned = [
        ((0, np.arange(3), 16, 4, 0), [[0, 7, 10, 15], [6, 10, 12, 15], [0, 1, 8, 9]]),
        ((7, np.array([100, 2**31 - 1]), 256, 5, 1), [[31, 145, 175, 212, 249], [42, 56, 147, 151, 209]]),
        ((2**64 - 1, np.array([5]), 33, 6, 1), [[5, 14, 22, 23, 25, 30]]),
        ((-3, np.array([0, 1]), 8, 8, 0), [list(range(8))] * 2),  # a negative seed wraps to 64 bits
    ]
    for args, expected in pinned:
        pos = harvest.sample_positions(*args)
        assert pos.dtype == np.int64 and pos.tolist() == expected, args
    assert harvest.sample_positions(123456789, np.arange(0), 16, 4, 1).shape == (0, 4)
    big = harvest.sample_positions(20240601, np.arange(0, 5000, 7), 128, 32, 1)  # (715, 32)
    assert big.shape == (715, 32) and big.dtype == np.int64
    digest = hashlib.sha256(np.ascontiguousarray(big, dtype="<i8").tobytes()).hexdigest()
    assert digest == "37bdb991d2d0fb53bc13c52f92a88fa16960854b0b3ed0986be86af8e4a867ec"


def test_contexts_cover_the_data_without_repeats(caplog):
    starts = harvest.choose_contexts(10_000, 100, 100, seed=1)
    assert np.array_equal(np.sort(starts), np.arange(100) * 100)  # all 100 windows, each once
    # In random order: the store's last rows (the SAE's held-out rows) span the corpus.
    assert not np.array_equal(starts, np.sort(starts)) and starts[-10:].min() < 5000 <= starts[-10:].max()
    some = harvest.choose_contexts(10_000, 100, 30, seed=1)
    assert len(set(some)) == 30 and all(s % 100 == 0 for s in some)
    assert not np.array_equal(some, harvest.choose_contexts(10_000, 100, 30, seed=2))
    more = harvest.choose_contexts(10_050, 100, 130, seed=1)
    assert len(more) == 130 and more.max() <= 10_050 - 100
    assert set(np.arange(100) * 100) <= set(more)
    assert "only 100 non-overlapping contexts" in caplog.text
    with pytest.raises(DataError, match="fewer than one context"):
        harvest.choose_contexts(50, 100, 1, seed=0)


def test_plan_checks_layer_and_positions():
    cfg = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=16)
    assert harvest.plan(small_cfg(), cfg, 5000).layer == 1
    assert harvest.plan(small_cfg(layer=0), cfg, 5000).layer == 0
    with pytest.raises(UserError, match="layers 0..1"):
        harvest.plan(small_cfg(layer=2), cfg, 5000)
    with pytest.raises(UserError, match="31 positions"):
        harvest.plan(small_cfg(positions_per_context=32), cfg, 5000)
    assert harvest.plan(small_cfg(positions_per_context=32, skip_first=False), cfg, 5000).skip == 0
    with pytest.raises(ValueError, match="dtype"):
        small_cfg(dtype="int8")


# ---------------------------------------------------------------------------------------
# The stored rows

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rows_match_a_direct_forward_pass(inputs, tmp_path, dtype):
    data_dir, gpt_dir = inputs
    result = harvest.harvest(small_cfg(dtype=dtype, layer=0), data_dir, gpt_dir, tmp_path / "acts")
    assert (result.rows, result.resumed_rows, result.shards) == (480, 0, 10 if dtype == "fp32" else 6)
    store = activations.open_store(tmp_path / "acts")
    index = store.index
    assert index.extra["gpt"]["layer"] == 0 and index.extra["gpt"]["checksum"] == files.hash_file(gpt_dir / "model.safetensors")
    assert index.extra["data"]["sources"] == ["verse", "python"]
    starts = store.contexts()
    assert starts is not None and len(starts) == 40

    split = load_split(data_dir, "train")
    model = load_model(gpt_dir)
    rows = np.random.default_rng(0).choice(480, size=50, replace=False)
    batch = store.take(rows, to_float32=True)
    window = torch.from_numpy(np.stack([split.tokens[s:s + 32].astype(np.int64) for s in starts[batch.context_id]]))
    with torch.inference_mode():
        acts = model.mlp_activations(window, 0)  # (50, 32, 64)
    direct = acts[torch.arange(50), torch.from_numpy(batch.position.astype(np.int64))]  # (50, 64)
    tol = 1e-5 if dtype == "fp32" else 1e-2
    torch.testing.assert_close(torch.from_numpy(batch.activations), direct, atol=tol, rtol=tol)
    offsets = starts[batch.context_id] + batch.position
    assert np.array_equal(batch.token_id, split.tokens[offsets])
    assert np.array_equal(batch.source_id, split.sources[offsets])
    assert batch.position.min() >= 1
    assert np.array_equal(batch.context_id, rows // 12)  # rows are stored context by context


def test_nan_activations_stop_the_harvest_and_no_shard_keeps_them(inputs, tmp_path):
    data_dir, gpt_dir = inputs
    cfg = small_cfg(layer=0)  # batches of 4 contexts = 48 rows = one shard
    model, split = load_model(gpt_dir), load_split(data_dir, "train")
    the_plan = harvest.plan(cfg, model.config, len(split.tokens))
    out = tmp_path / "acts"
    calls = {"n": 0}

    def nan_for_context_9(act):  # the third batch holds contexts 8..11
        calls["n"] += 1
        if calls["n"] == 3:
            act = act.clone()
            act[1, :, 3] = float("nan")  # every position of context 9, one unit
        return act

    with model.hook_mlp(0, nan_for_context_9), pytest.raises(
            DataError, match=r"layer-0 MLP activations are NaN or Inf for context 9; the GPT is broken .*"
                             r"`monofast gpt train --force` with a lower --learning-rate"):
        harvest.harvest_model(model, split, cfg, the_plan, out, {"test": 1})
    assert not (out / "index.json").exists() and not list(out.glob(".*.tmp"))

    # What the aborted writer kept is finite: a resume with a sound model finishes the store.
    resumed = harvest.harvest_model(model, split, cfg, the_plan, out, {"test": 1})
    assert resumed.rows == 480 and resumed.resumed_rows <= 96
    rows = activations.open_store(out).take(np.arange(480), to_float32=True)
    assert np.isfinite(rows.activations).all()


KILLER = """
import json, os, signal, sys, time
from pathlib import Path
from monofast.activations import store as activations
from monofast.activations import harvest

data_dir, gpt_dir, out, kill_after, cfg = sys.argv[1:]
journal = Path(out) / "journal.json"
real_append = activations.ActivationWriter.append
calls = 0

def append(self, *args):
    global calls
    real_append(self, *args)
    calls += 1
    if calls == int(kill_after):
        deadline = time.time() + 60  # let the writer thread finish two shards, then die hard
        while time.time() < deadline:
            if journal.is_file() and len(json.loads(journal.read_text())["shards"]) >= 2:
                break
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)

activations.ActivationWriter.append = append
harvest.harvest(harvest.HarvestConfig(**json.loads(cfg)), data_dir, gpt_dir, out)
"""


def test_a_killed_harvest_resumes_without_duplicates_or_gaps(inputs, tmp_path):
    data_dir, gpt_dir = inputs
    cfg = small_cfg()
    out = tmp_path / "killed"
    args = [sys.executable, "-c", KILLER, str(data_dir), str(gpt_dir), str(out), "6",
            json.dumps(vars(cfg))]
    env = dict(os.environ, MONOFAST_PROGRESS="0")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "index.json").exists()
    journaled = json.loads((out / "journal.json").read_text())["rows"]
    assert journaled >= 96

    resumed = harvest.harvest(cfg, data_dir, gpt_dir, out)
    assert resumed.resumed_rows == journaled and resumed.rows == 480
    assert not list(out.glob(".*.tmp")) and not (out / "journal.json").exists()
    whole = harvest.harvest(small_cfg(batch_size=7), data_dir, gpt_dir, tmp_path / "whole")
    assert whole.resumed_rows == 0

    a, b = activations.open_store(out), activations.open_store(tmp_path / "whole")
    everything = np.arange(480)
    x, y = a.take(everything), b.take(everything)
    for name in ("token_id", "source_id", "context_id", "position", "row"):
        assert np.array_equal(getattr(x, name), getattr(y, name)), name
    torch.testing.assert_close(x.tensor(), y.tensor(), atol=1e-5, rtol=1e-5)
    assert activations.verify(out).rows == 480


def test_refuses_when_the_disk_is_too_small(inputs, tmp_path, monkeypatch):
    data_dir, gpt_dir = inputs

    class Usage:
        free = 10_000

    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(UserError, match=r"harvest needs 0\.00 GiB but only"):
        harvest.harvest(small_cfg(), data_dir, gpt_dir, tmp_path / "acts")
    assert not list((tmp_path / "acts").glob("shard-*"))


def test_cli_harvest_skips_when_up_to_date_and_verifies(tmp_path, capsys):
    run = tmp_path / "run"
    specs = source_specs(tmp_path)
    base = ["--run", str(run), "--preset", "smoke"]
    assert cli.main(["data", *base, "--source", specs[0], "--source", specs[1]]) == 0
    assert cli.main(["gpt", "train", *base, "--device", "cpu", "--max-iters", "4"]) == 0
    assert cli.main(["harvest", *base, "--device", "cpu", "--contexts", "20"]) == 0
    store = activations.open_store(run)
    assert store.rows == 20 * 16 and store.dim == 4 * 32
    stamp = (run / "activations" / "index.json").stat().st_mtime_ns
    assert cli.main(["harvest", *base, "--device", "cpu", "--contexts", "20"]) == 0
    assert (run / "activations" / "index.json").stat().st_mtime_ns == stamp  # skipped
    capsys.readouterr()
    assert cli.main(["activations", "verify", str(run)]) == 0
    assert "OK: 1 shards, 320 rows" in capsys.readouterr().out
