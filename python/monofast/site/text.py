"""Token windows as correct, escaped, visible text.

Byte-level BPE tokens may hold part of a UTF-8 character (an emoji's four bytes can
straddle two tokens), so a window is decoded as one byte stream: an incremental decoder
takes each token's bytes in turn and emits the characters they complete. A token that
completes no character joins the next one in a display *group*; a group shows its
characters once and carries every member token's activation and effect. Bytes that are
not valid UTF-8 show as U+FFFD, never as an exception.

Everything that reaches HTML goes through `html.escape` (Python code is full of `<`, `&`
and quotes); newlines and tabs get a visible mark beside the real character, so code keeps
its layout inside a `white-space: pre-wrap` block.
"""

from __future__ import annotations

import codecs
import functools
import html
from typing import Any, NamedTuple, Optional, Sequence

NEWLINE_MARK = "⏎"
TAB_MARK = "⇥"


class Vocab:
    """Token ids to bytes (from analysis/tokens.json)."""

    def __init__(self, table: dict[str, Any]):
        self.bytes = [bytes.fromhex(h) for h in table["bytes"]]
        self.special = {int(i) for i in table.get("special", [])}
        self.special_text = {int(k): v for k, v in table.get("special_text", {}).items()}
        self.whole: list[Optional[str]] = [_whole_text(b) for b in self.bytes]
        """Each token's text when its bytes are whole UTF-8 characters on their own, else None."""

    def label(self, token: int) -> str:
        """One token on its own, for lists: partial characters as \\x escapes, whitespace visible."""
        if token in self.special:
            return self.special_text.get(token, f"<special {token}>")
        text = self.bytes[token].decode("utf-8", errors="backslashreplace")
        return visible(text)


def _whole_text(data: bytes) -> Optional[str]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def visible(text: str) -> str:
    """Spaces as ·, newlines as ⏎ and tabs as ⇥, for a token shown alone."""
    return text.replace(" ", "·").replace("\n", NEWLINE_MARK).replace("\t", TAB_MARK) or "∅"


class Group(NamedTuple):
    """Consecutive tokens of a window shown as one piece of text."""

    text: str
    """Decoded characters (may be empty only for a window's trailing partial bytes)."""
    members: tuple[int, ...]
    """Positions in the window of the tokens that make it up."""
    special: bool
    """A special token (end of text), shown as a marker rather than as content."""


def decode_window(vocab: Vocab, tokens: Sequence[int]) -> list[Group]:
    """Groups of a window's tokens (ids; -1 marks positions outside the context, skipped)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    groups: list[Group] = []
    pending: list[int] = []
    buffered = False
    for pos, token in enumerate(tokens):
        token = int(token)
        if token < 0:
            continue
        if token in vocab.special:
            tail = decoder.decode(b"", final=True)
            decoder.reset()
            buffered = False
            if pending or tail:
                groups.append(Group(tail, tuple(pending), False))
                pending = []
            groups.append(Group(vocab.special_text.get(token, ""), (pos,), True))
            continue
        whole = vocab.whole[token]
        if whole and not pending and not buffered:  # the common case: whole characters
            groups.append(Group(whole, (pos,), False))
            continue
        pending.append(pos)
        text = decoder.decode(vocab.bytes[token])
        buffered = bool(decoder.getstate()[0])  # bytes of an unfinished character held back
        if text:
            groups.append(Group(text, tuple(pending), False))
            pending = []
    tail = decoder.decode(b"", final=True)
    if pending or tail:
        groups.append(Group(tail, tuple(pending), False))
    return groups


@functools.lru_cache(maxsize=1 << 16)
def escape(text: str) -> str:
    return html.escape(text, quote=True)


@functools.lru_cache(maxsize=1 << 16)
def display(text: str) -> str:
    """Escaped text with newlines and tabs marked (the real characters kept for layout)."""
    out = escape(text)
    return out.replace("\n", f'<span class="ws">{NEWLINE_MARK}</span>\n').replace(
        "\t", f'<span class="ws">{TAB_MARK}</span>\t')


def fmt(value: float, digits: int = 3) -> str:
    """A short number for tooltips and tables: 3 significant digits, no exponent clutter."""
    if value != value:  # NaN
        return "–"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000 or magnitude < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"
