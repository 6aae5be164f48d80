"""Byte-level BPE tokenizer (HF `tokenizers`), trained on the training split.

Byte-level means every string round-trips exactly, multi-byte characters included,
provided whole token sequences are decoded (a single token may hold half a character).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from monofast.common import files
from monofast.common.errors import DataError

EOT = "<|endoftext|>"
BYTE_ALPHABET = 256


def train(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE with `vocab_size` entries; the end-of-text token is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load(path: str | Path):
    """Load `tokenizer.json`, with a clear error when it is missing or unreadable."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path}; run `monofast data` first")
    files.verify_recorded(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise DataError(f"tokenizer {path} is unreadable ({err}); re-run `monofast data --force`") from None


def chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """Split long text after newlines into ~`size`-character pieces so that encoding runs
    in parallel; the pieces concatenate back to `text` exactly."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            nl = text.find("\n", end)
            end = len(text) if nl < 0 else nl + 1
        yield text[start:end]
        start = end
