"""The rows the SAE stage reads (monofast.sae.batches): the held-out split at a context boundary."""

from __future__ import annotations

import numpy as np
import pytest
from monofast.activations import store as activations
from monofast.common.errors import DataError
from monofast.sae.batches import context_bounds, split_rows


def context_store(folder, rows: int, context_rows: int) -> activations.ActivationStore:
    """`rows` rows of width 4 (their values do not matter here) in contexts of `context_rows`."""
    r = np.arange(rows)
    with activations.ActivationWriter(folder, 4, "fp32") as writer:
        writer.append(np.zeros((rows, 4), np.float32), r % 50, r % 2, r // context_rows, r % context_rows)
        writer.finish()
    return activations.open_store(folder)


def assert_whole_contexts(store: activations.ActivationStore, cut: int) -> None:
    ids = store.take(np.arange(store.rows)).context_id
    assert not set(ids[:cut].tolist()) & set(ids[cut:].tolist())  # no context on both sides


def test_the_quick_presets_held_out_rows_are_whole_contexts(tmp_path):
    # 2,500 contexts of 120 rows, 20,000 held out: row 280,000 is a third into context 2,333.
    store = context_store(tmp_path / "quick", 300_000, 120)
    cut = split_rows(store, 20_000)
    assert cut == 2_333 * 120  # the first row of that context: 20,040 rows held out
    assert_whole_contexts(store, cut)


def test_a_cut_inside_a_context_moves_to_its_first_row(tmp_path):
    store = context_store(tmp_path / "acts", 3_000, 120)
    assert context_bounds(store, 2_800) == (2_760, 2_880)
    cut = split_rows(store, 200)  # row 2,800 is inside the context of rows [2,760, 2,880)
    assert cut == 2_760
    assert_whole_contexts(store, cut)
    assert split_rows(store, 240) == 2_760  # a cut on a boundary stays
    assert split_rows(store, 0) == 3_000  # nothing held out


def test_the_cap_of_a_tenth_holds_when_the_context_is_long(tmp_path):
    # 1,000 rows in contexts of 70: at most 100 held out; row 900 lies in [840, 910), and
    # holding out all of that context (160 rows) would pass the cap, so the cut moves to its end.
    store = context_store(tmp_path / "long", 1_000, 70)
    cut = split_rows(store, 5_000)
    assert cut == 910
    assert_whole_contexts(store, cut)
    # One context for the whole store: nothing can be held out without splitting it.
    assert split_rows(context_store(tmp_path / "one", 500, 500), 50) == 500
    assert context_bounds(context_store(tmp_path / "first", 500, 100), 0) == (0, 100)


def test_an_empty_store_is_named(tmp_path):
    with activations.ActivationWriter(tmp_path / "empty", 4, "fp32") as writer:
        writer.finish()
    with pytest.raises(DataError, match="is empty"):
        split_rows(activations.open_store(tmp_path / "empty"), 10)
