"""Stage 1: corpus budgets and splits, tokenizer round trip, label alignment, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_code_source, write_text_source
from monofast.common.errors import DataError, UserError
from monofast.data import prepare, tokenizer
from monofast.data.prepare import DataConfig
from monofast.data.splits import load_meta, load_split


def build(tmp_path, sources, **kwargs):
    cfg = DataConfig(sources=tuple(sources), **{"vocab_size": 300, **kwargs})
    out = tmp_path / "data"
    meta = prepare.build(cfg, out)
    return cfg, out, meta


def test_outputs_and_meta(tmp_path, two_sources):
    _, out, meta = build(tmp_path, two_sources, chars_per_source=20_000)
    for name in ("tokenizer.json", "train.bin", "val.bin", "train.src.bin", "val.src.bin", "meta.json"):
        assert (out / name).is_file(), name
    assert meta == json.loads((out / "meta.json").read_text())
    assert [s["name"] for s in meta["sources"]] == ["verse", "code"]
    assert [s["id"] for s in meta["sources"]] == [0, 1]
    assert meta["token_dtype"] == "uint16" and meta["vocab_size"] == 300
    for split in ("train", "val"):
        tokens, labels = load_split(out, split)
        assert tokens.dtype == np.uint16 and labels.dtype == np.uint8
        assert tokens.shape == labels.shape == (meta["tokens"][split],)
        assert tokens.max() < meta["vocab_size"]
        counts = np.bincount(labels, minlength=2)
        assert counts.tolist() == [s["tokens"][split] for s in meta["sources"]]


def test_budget_and_split_per_source(tmp_path, two_sources):
    _, _, meta = build(tmp_path, two_sources, chars_per_source=12_000, val_fraction=0.1)
    for source in meta["sources"]:
        total = source["chars"]["train"] + source["chars"]["val"]
        assert 11_000 <= total <= 12_000  # cut at a line end, never above the budget
        assert source["chars"]["val"] / total == pytest.approx(0.1, abs=0.02)


def test_labels_align_with_tokens(tmp_path, two_sources):
    _, out, meta = build(tmp_path, two_sources, chars_per_source=8_000)
    tok = tokenizer.load(out)
    tokens, labels = load_split(out, "train")
    eot = meta["eot_id"]
    # Each source's tokens are contiguous and decode to that source's own text.
    for source in meta["sources"]:
        ids = tokens[labels == source["id"]]
        text = tok.decode([int(t) for t in ids if t != eot], skip_special_tokens=False)
        assert len(text) == source["chars"]["train"]
    verse = tok.decode([int(t) for t in tokens[labels == 0] if t != eot])
    code = tok.decode([int(t) for t in tokens[labels == 1] if t != eot])
    assert "def function_" not in verse and "thou" in verse
    assert "def function_" in code and "thou" not in code


def test_end_of_text_between_documents(tmp_path, two_sources):
    _, out, meta = build(tmp_path, two_sources, chars_per_source=100_000)
    tokens, labels = load_split(out, "train")
    eot = meta["eot_id"]
    code_docs = [s for s in meta["sources"] if s["name"] == "code"][0]["documents"]
    # Six code files; the train split holds at least five whole ones, each followed by EOT.
    assert code_docs == 6
    assert int((tokens[labels == 1] == eot).sum()) >= 5
    assert tokens[-1] == eot


@pytest.mark.parametrize("text", [
    "plain ascii\n", "multi-byte: café — ñ 日本語 😀\n", "code: if a < b && c > d: print('<&>')\n",
    "\ttabs\r\nand crlf\n", "  leading and trailing spaces  ",
])
def test_round_trip_exact(tmp_path, two_sources, text):
    _, out, _ = build(tmp_path, two_sources, chars_per_source=8_000)
    tok = tokenizer.load(out)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_round_trip_whole_split(tmp_path, two_sources):
    """Decoding the stored tokens gives back exactly the characters that went in."""
    _, out, meta = build(tmp_path, two_sources, chars_per_source=8_000)
    tok = tokenizer.load(out)
    tokens, _ = load_split(out, "val")
    text = tok.decode([int(t) for t in tokens], skip_special_tokens=True)
    assert len(text) == sum(s["chars"]["val"] for s in meta["sources"])


def test_deterministic_for_a_seed(tmp_path, two_sources):
    a = build(tmp_path / "a", two_sources, chars_per_source=9_000, seed=3)[1]
    b = build(tmp_path / "b", two_sources, chars_per_source=9_000, seed=3)[1]
    for name in ("train.bin", "val.bin", "train.src.bin", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_seed_changes_sampled_files(tmp_path):
    code = write_code_source(tmp_path, files=12)
    text = write_text_source(tmp_path, "verse", 5_000)
    specs = (f"verse={text}", f"code={code}")
    a = build(tmp_path / "a", specs, chars_per_source=4_000, seed=1)[1]
    b = build(tmp_path / "b", specs, chars_per_source=4_000, seed=2)[1]
    assert (a / "train.bin").read_bytes() != (b / "train.bin").read_bytes()


def test_python_stdlib_source(tmp_path):
    text = write_text_source(tmp_path, "verse", 6_000)
    _, out, meta = build(tmp_path, (f"verse={text}", "python"), chars_per_source=5_000)
    python = meta["sources"][1]
    assert python["name"] == "python" and "standard library" in python["origin"]
    assert python["chars"]["train"] + python["chars"]["val"] <= 5_000


def test_uint32_tokens(tmp_path, two_sources):
    _, out, meta = build(tmp_path, two_sources, chars_per_source=5_000, token_dtype="uint32")
    assert meta["token_dtype"] == "uint32"
    assert load_split(out, "train").tokens.dtype == np.uint32


def test_glob_source(tmp_path):
    code = write_code_source(tmp_path)
    text = write_text_source(tmp_path, "verse", 6_000)
    _, _, meta = build(tmp_path, (f"verse={text}", f"code={code}/*.py"), chars_per_source=3_000)
    assert meta["sources"][1]["documents"] >= 1


# --- errors ---------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build(tmp_path, ("a=/nonexistent/monofast.txt", "python"))


def test_empty_source(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        build(tmp_path, (f"e={empty}", "python"), chars_per_source=2_000)


def test_glob_matches_nothing(tmp_path):
    with pytest.raises(UserError, match="matches no files"):
        build(tmp_path, (f"g={tmp_path}/*.nothing", "python"))


def test_unknown_builtin(tmp_path):
    with pytest.raises(UserError, match="not built in"):
        build(tmp_path, ("klingon", "python"))


def test_not_utf8(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf8" * 200)
    with pytest.raises(DataError, match="not UTF-8"):
        build(tmp_path, (f"bad={bad}", "python"))


def test_unreachable_url_without_cache(tmp_path):
    with pytest.raises(UserError, match="cannot download"):
        build(tmp_path, ("web=https://example.invalid/corpus.txt", "python"))


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab_size": 100}, "below 257"),
    ({"vocab_size": 70_000, "token_dtype": "uint16"}, "uint32"),
    ({"token_dtype": "int8"}, "auto, uint16 or uint32"),
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"chars_per_source": 10}, "too small"),
    ({"sources": ()}, "no sources"),
    ({"sources": ("a=x", "a=y")}, "distinct"),
    ({"sources": ("bad name=x",)}, "letters"),
], ids=["vocab-small", "vocab-uint16", "dtype", "val", "budget", "no-sources", "dup", "bad-name"])
def test_config_errors(kwargs, match):
    with pytest.raises((ValueError, UserError), match=match):
        DataConfig(**kwargs)


def test_one_source_warns(tmp_path, caplog):
    text = write_text_source(tmp_path, "verse", 6_000)
    import logging

    logging.getLogger("monofast").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="monofast"):
            build(tmp_path, (f"verse={text}",), chars_per_source=5_000)
    finally:
        logging.getLogger("monofast").propagate = False
    assert "only one source" in caplog.text


def test_truncated_split_is_named(tmp_path, two_sources):
    _, out, _ = build(tmp_path, two_sources, chars_per_source=5_000)
    path = out / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="train.bin"):
        load_split(out, "train")


def test_missing_meta(tmp_path):
    with pytest.raises(UserError, match="meta.json"):
        load_meta(tmp_path)
