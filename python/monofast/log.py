"""Logging and progress bars, one place for both so they do not garble each other."""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

logger = logging.getLogger("monofast")


def setup(verbose: bool = False) -> None:
    """Log to stderr as `monofast: message`; called once by the CLI."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def progress_enabled() -> bool:
    """Bars on an interactive terminal unless MONOFAST_PROGRESS=0; =1 forces them."""
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
