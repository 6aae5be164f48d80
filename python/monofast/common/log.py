"""Logging and progress bars, one place for both so they do not garble each other."""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

logger = logging.getLogger("monofast")
_silenced = False


class _Stderr(logging.StreamHandler):
    """A handler that writes to `sys.stderr` as it is when a record comes, not as it was
    when the handler was made (test runners and embedding tools replace it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup(verbose: bool = False) -> None:
    """Log to stderr as `monofast: message`; called once by the CLI."""
    if any(isinstance(h, _Stderr) for h in logger.handlers):
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if _silenced else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def silence() -> None:
    """Errors only and no progress bars from this process: the torchrun ranks other than 0,
    whose rank 0 logs for the whole job."""
    global _silenced
    _silenced = True
    logger.setLevel(logging.ERROR)


def progress_enabled() -> bool:
    """Bars on an interactive terminal unless MONOFAST_PROGRESS=0; =1 forces them."""
    if _silenced:
        return False
    forced = os.environ.get("MONOFAST_PROGRESS")
    if forced is not None:
        return forced not in ("0", "", "false", "no")
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, **kwargs) -> Iterator[T]:
    """A tqdm bar on stderr (disabled when not interactive)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, file=sys.stderr, **kwargs)
