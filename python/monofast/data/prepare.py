"""Stage 1: corpus and tokenizer (`monofast data`).

Reads the named text sources, cuts each to its character budget, splits each 90/10
into train and validation, trains a byte-level BPE on the training text, and writes:

- `tokenizer.json`
- `train.bin`, `val.bin`: tokens (uint16, or uint32 when the vocabulary needs it),
  documents separated by the end-of-text token
- `train.src.bin`, `val.src.bin`: uint8 source id of every token, aligned with the tokens
- `meta.json`: sources (name, id, origin, documents, characters and tokens per split),
  vocabulary size, token dtype, end-of-text id, tokenizer digest
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np

from monofast.common import files
from monofast.common.errors import DataError
from monofast.common.log import logger, progress
from monofast.data import corpus, tokenizer
from monofast.data.splits import META_FORMAT, SPLITS

MAX_SOURCES = 256  # source ids are uint8


@dataclass
class DataConfig:
    RUNTIME: ClassVar[frozenset[str]] = frozenset({"allow_download"})
    """Fields that do not change the results (the manifest ignores them)."""

    sources: tuple[str, ...] = field(default=("shakespeare", "python"),
                                     metadata={"flag": "--source", "repeat": True,
                                               "metavar": "NAME[=PATH_OR_URL_OR_GLOB]"})
    """A text source: a built-in name (shakespeare, python) or NAME=PATH_OR_URL_OR_GLOB. Repeat the flag for several sources; giving any replaces the default list."""
    chars_per_source: int = 1_000_000
    """Character budget of each source (train + validation); a smaller source is used whole."""
    val_fraction: float = 0.1
    """Fraction of each source's characters held out for validation."""
    vocab_size: int = 1024
    """BPE vocabulary size, the end-of-text token and the 256 byte tokens included (own BPE only)."""
    tokenizer: str = "bpe"
    """bpe (train a byte-level BPE on the training text) or a Hugging Face model (local folder or
    hub id in the local cache) whose own tokenizer to use: `monofast run --model` sets it."""
    allow_download: bool = False
    """Let a Hugging Face tokenizer download from the hub when it is not in the local cache."""
    token_dtype: str = "auto"
    """Token file dtype: auto (uint16 when the vocabulary fits), uint16 or uint32."""
    seed: int = 1337
    """Seed of the deterministic file sampling."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("no sources: give at least one --source (e.g. --source shakespeare)")
        names = [corpus.parse_spec(s)[0] for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names repeat in {names}; give each --source a distinct NAME")
        if len(names) > MAX_SOURCES:
            raise ValueError(f"{len(names)} sources; at most {MAX_SOURCES} fit the uint8 source ids")
        if self.chars_per_source < 1_000:
            raise ValueError(f"chars_per_source={self.chars_per_source} is too small; use at least 1000")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 0.5), e.g. 0.1")
        if self.vocab_size < tokenizer.BYTE_ALPHABET + 1:
            raise ValueError(f"vocab_size={self.vocab_size} is below {tokenizer.BYTE_ALPHABET + 1} "
                             f"(256 byte tokens + end-of-text); use e.g. 1024")
        if not self.tokenizer.strip():
            raise ValueError("tokenizer is empty; use bpe or a Hugging Face model (a folder or hub id)")
        if self.token_dtype not in ("auto", "uint16", "uint32"):
            raise ValueError(f"token_dtype={self.token_dtype!r}; choose auto, uint16 or uint32")
        if self.token_dtype == "uint16" and self.vocab_size > 2**16:
            raise ValueError(f"vocab_size={self.vocab_size} does not fit uint16 tokens; "
                             f"use --token-dtype uint32 (or auto)")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0 (numpy takes only non-negative seeds), e.g. 1337")

    def resolved_dtype(self) -> str:
        if self.token_dtype == "auto":
            return "uint16" if self.vocab_size <= 2**16 else "uint32"
        return self.token_dtype


# ---------------------------------------------------------------------------------------
# Building

def load_sources(cfg: DataConfig) -> list[corpus.Source]:
    loaded = []
    for spec in cfg.sources:
        source = corpus.load_source(spec, cfg.chars_per_source, cfg.seed)
        if source.chars == 0:
            raise DataError(f"source {source.name!r} ({source.origin}) is empty; point it at text files")
        if source.chars < cfg.chars_per_source:
            logger.info("%s: %d characters, fewer than the budget of %d: using all of it",
                        source.name, source.chars, cfg.chars_per_source)
        loaded.append(corpus.cut_to_budget(source, cfg.chars_per_source))
    if len(loaded) < 2:
        logger.warning("only one source (%s): the source-share analysis needs two or more "
                       "to tell features apart", loaded[0].name)
    return loaded


def encode_documents(tok: Any, documents: list[corpus.Document], eot_id: int) -> np.ndarray:
    """Token ids of the documents, each followed by the end-of-text token."""
    pieces: list[str] = []
    ends: list[int] = []  # index in `pieces` after which an end-of-text goes
    for doc in documents:
        pieces.extend(tokenizer.chunks(doc.text))
        ends.append(len(pieces))
    encoded = tok.encode_batch_fast(pieces, add_special_tokens=False) if hasattr(
        tok, "encode_batch_fast") else tok.encode_batch(pieces, add_special_tokens=False)
    out: list[int] = []
    end_iter = iter(ends)
    next_end = next(end_iter, None)
    for i, enc in enumerate(encoded, start=1):
        out.extend(enc.ids)
        while next_end == i:
            out.append(eot_id)
            next_end = next(end_iter, None)
    return np.asarray(out, dtype=np.int64)


def run_stage(cfg: DataConfig, run) -> None:
    """Pipeline entry point: build `data/` inside the run directory."""
    build(cfg, run.stage("data"))


def build(cfg: DataConfig, out: Path) -> dict[str, Any]:
    """Build the dataset into `out` and return its meta.json contents."""
    out = Path(out)
    sources = load_sources(cfg)
    splits = {s.name: corpus.split(s, cfg.val_fraction) for s in sources}
    for source in sources:
        train, val = splits[source.name]
        if not train or not val:
            raise DataError(f"source {source.name!r} is too small to split into train and validation "
                            f"({source.chars} characters); give it more text")

    tok, eot_id, origin = _tokenizer(cfg, (d.text for s in sources for d in splits[s.name][0]))
    vocab = tok.get_vocab_size()
    # auto: by the tokenizer's real size (a Hugging Face model's may exceed uint16's 65,536)
    dtype = np.dtype(cfg.resolved_dtype() if cfg.token_dtype != "auto" else
                     "uint16" if vocab <= 2**16 else "uint32")
    if vocab > np.iinfo(dtype).max + 1:
        raise DataError(f"the tokenizer has {vocab} tokens, too many for {dtype}; use --token-dtype uint32")

    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.json"
    files.write_text(tok_path, tok.to_str(pretty=True))

    meta_sources = []
    arrays: dict[str, list[tuple[np.ndarray, int]]] = {split: [] for split in SPLITS}
    for sid, source in enumerate(progress(sources, desc="tokenize", unit="source")):
        entry: dict[str, Any] = {"id": sid, "name": source.name, "origin": source.origin,
                                 "documents": len(source.documents), "chars": {}, "tokens": {}}
        for split, docs in zip(SPLITS, splits[source.name]):
            ids = encode_documents(tok, docs, eot_id)
            arrays[split].append((ids, sid))
            entry["chars"][split] = sum(len(d.text) for d in docs)
            entry["tokens"][split] = int(ids.size)
        meta_sources.append(entry)
        logger.info("data: %-12s %9d chars -> %8d train + %7d val tokens (%s)", source.name,
                    source.chars, entry["tokens"]["train"], entry["tokens"]["val"], source.origin)

    totals = {}
    for split in SPLITS:
        tokens = np.concatenate([ids for ids, _ in arrays[split]]).astype(dtype)
        labels = np.concatenate([np.full(ids.size, sid, dtype=np.uint8) for ids, sid in arrays[split]])
        files.write_bytes(out / f"{split}.bin", tokens.tobytes())
        files.write_bytes(out / f"{split}.src.bin", labels.tobytes())
        totals[split] = int(tokens.size)

    meta = {
        "format": META_FORMAT,
        "vocab_size": vocab,
        "eot_id": eot_id,
        "token_dtype": dtype.name,
        "tokenizer_digest": files.hash_file(tok_path),
        "tokenizer": origin,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "tokens": totals,
        "sources": meta_sources,
    }
    files.write_json(out / "meta.json", meta)
    return meta


def _tokenizer(cfg: DataConfig, texts: Iterable[str]) -> tuple[Any, int, dict[str, Any]]:
    """(tokenizers.Tokenizer, end-of-text id, what meta.json records of where it came from):
    a BPE trained on `texts`, or a Hugging Face model's own."""
    if cfg.tokenizer == "bpe":
        texts = list(texts)
        logger.info("data: training a %d-token byte-level BPE on %d characters", cfg.vocab_size,
                    sum(len(t) for t in texts))
        tok = tokenizer.train(texts, cfg.vocab_size)
        return tok, tok.token_to_id(tokenizer.EOT), {"kind": "bpe"}
    from monofast.common import hf

    model = hf.model_name(cfg.tokenizer)
    wrapped = hf.load_tokenizer(cfg.tokenizer, cfg.allow_download)
    eot_id = wrapped.eos_token_id if wrapped.eos_token_id is not None else wrapped.bos_token_id
    if eot_id is None:
        raise DataError(f"the tokenizer of {cfg.tokenizer!r} has no end-of-sequence (or beginning) token to "
                        f"separate documents with")
    tok = wrapped.backend_tokenizer
    tok.no_truncation()
    tok.no_padding()
    logger.info("data: the tokenizer of %s (%d tokens; documents end with %r)", model, tok.get_vocab_size(),
                tok.id_to_token(eot_id))
    return tok, int(eot_id), {"kind": "hf", "model": model}


# ---------------------------------------------------------------------------------------
# Reading (used by later stages)


