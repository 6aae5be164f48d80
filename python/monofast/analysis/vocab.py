"""The bytes behind every token id, so that text is decoded from whole windows.

A byte-level BPE vocabulary stores each token as printable characters, one per byte,
through GPT-2's byte-to-character table (the 188 printable Latin-1 bytes map to
themselves, the other 68 to U+0100 onwards). Inverting that table gives each token's
bytes; a token may hold part of a multi-byte character, so text is only decoded from
runs of tokens, never token by token.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def token_table(tok: Any) -> dict[str, Any]:
    """tokens.json: for each id its bytes (hex) and whether it is a special token, whose
    text (e.g. <|endoftext|>) is not content and is shown as a marker."""
    table = _char_to_byte()
    special = set(tok.get_added_tokens_decoder()) if hasattr(tok, "get_added_tokens_decoder") else set()
    hexes, specials = [], []
    for i in range(tok.get_vocab_size()):
        text = tok.id_to_token(i) or ""
        if i in special or any(ch not in table for ch in text):
            specials.append(i)
            hexes.append(text.encode("utf-8").hex())
        else:
            hexes.append(bytes(table[ch] for ch in text).hex())
    return {"format": 1, "bytes": hexes, "special": specials,
            "special_text": {str(i): tok.id_to_token(i) for i in specials}}
