"""The run's tokenizer as a data script for the lab (`lab/tokenizer.js`), read by
`assets/lab/tokenizer.js`, which encodes exactly as `tokenizers` does.

Only a byte-level BPE like `monofast.data.tokenizer.train` makes is accepted. The script
holds no token strings the JavaScript can rebuild: the 256 byte tokens are GPT-2's byte
alphabet and every merged token is its two parts joined, so the vocabulary travels as the
merges alone, ids in rank order in fixed-width base 36. For runs/quick's 1024 tokens the
script is 7.0 kB (its tokenizer.json: 53 kB): 3.1 kB of merges, 3.7 kB of character classes.

The classes are the letters, numbers and whitespace of GPT-2's split pattern (`\\p{L}`,
`\\p{N}`, `\\s`) as the installed `tokenizers` has them, read off its pre-tokenizer as code
point ranges. A browser's own classes differ: its Unicode is newer (Node 20's, Unicode 17,
has 4,657 letters and numbers that tokenizers 0.23's Oniguruma lacks) and JavaScript's `\\s`
takes U+FEFF where Oniguruma's takes U+0085.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from monofast.data.tokenizer import EOT

FORMAT = 1
"""Bumped when the script's layout changes; assets/lab/tokenizer.js refuses other versions."""

CLASSES = ("L", "N", "S")
"""Letters, numbers and whitespace as GPT-2's split pattern sees them; the rest is "other"."""


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map: byte b's character in token strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tokenizer_script(tokenizer_json: str | dict[str, Any]) -> str:
    """`lab/tokenizer.js`: `window.MONOFAST_TOKENIZER = {...};` for a byte-level BPE
    `tokenizer.json` (its text or parsed); `ValueError` for any other kind."""
    spec = json.loads(tokenizer_json) if isinstance(tokenizer_json, str) else tokenizer_json
    _check_pipeline(spec)
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    added = [_added(token) for token in spec.get("added_tokens") or []]
    eot = [token[0] for token in added if token[1] == EOT]
    if not eot:
        raise ValueError(f"tokenizer.json has no {EOT} token; the lab needs it (train one with `monofast data`)")

    alphabet = byte_alphabet()
    missing = [b for b, c in enumerate(alphabet) if c not in vocab]
    if missing:
        raise ValueError(f"tokenizer.json lacks byte tokens for bytes {missing[:8]}: not a byte-level BPE")
    pairs, merge_ids = _merge_ids(vocab, merges)
    built = {*alphabet, *(a + b for a, b in merges), *(token[1] for token in added)}
    others = sorted([i, s] for s, i in vocab.items() if s not in built)  # tokens no merge makes (rare)

    width = len(_base36(max([*vocab.values(), *(token[0] for token in added)])))
    data = {
        "format": FORMAT,
        "eot": eot[0],
        "bytes": _byte_ids(vocab, alphabet),
        "width": width,
        "merges": "".join(_base36(i).rjust(width, "0") for pair in pairs for i in pair),
        "mergeIds": _first_if_consecutive(merge_ids),
        "tokens": others,
        "added": added,
        "ignoreMerges": bool(model.get("ignore_merges", False)),
        "classes": {k: _ranges_text(r) for k, r in character_classes().items()},
    }
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=True)  # ASCII: whatever charset the page has
    return f"window.MONOFAST_TOKENIZER = {text};\n"


def _check_pipeline(spec: Any) -> None:
    """Refuse every tokenizer.json the JavaScript would not encode exactly as the library."""
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ValueError("tokenizer.json has no model: not a `tokenizers` file")
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json's model is {model.get('type')!r}; the lab runs only a byte-level BPE")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise ValueError(f"tokenizer.json's pre-tokenizer is {pre or None}; the lab runs only "
                         "ByteLevel(add_prefix_space=False) with GPT-2's split pattern")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"tokenizer.json's decoder is {spec.get('decoder')}; the lab runs only a ByteLevel decoder")
    for key in ("normalizer", "truncation", "padding"):
        if spec.get(key):
            raise ValueError(f"tokenizer.json has a {key} ({spec[key]}); the lab runs none")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("tokenizer.json's BPE has dropout or subword affixes; the lab runs a plain byte-level BPE")
    # The post-processor is left out on purpose: it adds tokens only with add_special_tokens=True,
    # and the project always encodes with add_special_tokens=False.


def _added(token: dict[str, Any]) -> list[Any]:
    """[id, content, special, normalized] of an added token, which the library splits out
    of the text before pre-tokenizing."""
    if not token.get("content"):
        raise ValueError(f"added token {token.get('id')} is empty; the lab cannot cut it out of text")
    for flag in ("lstrip", "rstrip", "single_word"):
        if token.get(flag):
            raise ValueError(f"added token {token['content']!r} has {flag}=true; the lab does not run it")
    return [int(token["id"]), token["content"], int(bool(token.get("special"))), int(bool(token.get("normalized")))]


def _merge_ids(vocab: dict[str, int], merges: list[tuple[str, ...]]) -> tuple[list[tuple[int, int]], list[int]]:
    """The merges as (left id, right id) in rank order, and each one's result id; checks
    that no merge uses a later merge's token, as the JavaScript rebuilds the strings in order."""
    for rank, merge in enumerate(merges):
        if len(merge) != 2 or merge[0] not in vocab or merge[1] not in vocab or merge[0] + merge[1] not in vocab:
            raise ValueError(f"tokenizer.json's merge {rank} {merge!r} is not two vocabulary tokens making a third")
    known = set(byte_alphabet()) | (set(vocab) - {a + b for a, b in merges})
    pairs, ids = [], []
    for rank, merge in enumerate(merges):
        if merge[0] not in known or merge[1] not in known:
            raise ValueError(f"tokenizer.json's merge {rank} {merge!r} uses a token only a later merge makes")
        known.add(merge[0] + merge[1])
        pairs.append((vocab[merge[0]], vocab[merge[1]]))
        ids.append(vocab[merge[0] + merge[1]])
    return pairs, ids


def _byte_ids(vocab: dict[str, int], alphabet: list[str]) -> int | list[int]:
    """The byte tokens' ids: the first one's when they run consecutively over the alphabet's
    characters in code point order (as the trainer numbers them), else the id of each byte."""
    first = _first_if_consecutive([vocab[c] for c in sorted(alphabet)])
    return first if isinstance(first, int) else [vocab[c] for c in alphabet]


def _first_if_consecutive(ids: list[int]) -> int | list[int]:
    """`ids[0]` when the ids count up by one from it (0 for none), else all of them."""
    start = ids[0] if ids else 0
    return start if ids == list(range(start, start + len(ids))) else ids


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, d = divmod(n, 36)
        out = digits[d] + out
        if n == 0:
            return out


def _ranges_text(ranges: list[tuple[int, int]]) -> str:
    """Ranges as base-36 numbers: the gap since the last range's end, then its length - 1."""
    out, after = [], 0
    for lo, hi in ranges:
        out += [_base36(lo - after), _base36(hi - lo)]
        after = hi + 1
    return ",".join(out)


@functools.lru_cache(maxsize=1)
def character_classes() -> dict[str, list[tuple[int, int]]]:
    """Code point ranges (inclusive) of letters, numbers and whitespace, as the installed
    `tokenizers` pre-tokenizer splits text: every code point goes through it once, in order,
    so each split piece is a run of one class (~1 s; kept for the process)."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    ranges: dict[str, list[tuple[int, int]]] = {k: [] for k in CLASSES}
    for lo, hi in ((0, 0xD800), (0xE000, 0x110000)):  # no lone surrogates in a Rust string
        text = "".join(map(chr, range(lo, hi)))
        for _, (start, end) in split(text):
            if end - start > 1 and text[start] == " ":  # ' ?\p{L}+' and its kin take a space in front
                _extend(ranges["S"], lo + start, lo + start)
                start += 1
            kind = _kind(split, text[start])
            if kind in ranges:
                _extend(ranges[kind], lo + start, lo + end - 1)
    return ranges


def _kind(split: Callable[[str], list[Any]], c: str) -> str:
    """One character's class: the piece it forms between two letters, digits or tabs."""
    for kind, probe in (("L", "a"), ("N", "1"), ("S", "\t")):
        if len(split(probe + c + probe)) == 1:
            return kind
    return "O"


def _extend(ranges: list[tuple[int, int]], lo: int, hi: int) -> None:
    if ranges and ranges[-1][1] + 1 == lo:
        ranges[-1] = (ranges[-1][0], hi)
    else:
        ranges.append((lo, hi))
