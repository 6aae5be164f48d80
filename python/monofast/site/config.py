"""Options of the site stage (`monofast site`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SiteConfig:
    """How the feature browser is built. Everything it shows comes from analysis/."""

    title: str = "monofast feature browser"
    """Title of the index page (and suffix of every feature page's title)."""
    lab: bool = True
    """Build the lab (lab.html): the run's tokenizer, GPT and SAE running in the page, where
    a reader types text, sees features fire and steers generation (--no-lab leaves it out)."""
    max_pages: int = 0
    """Feature pages to write: 0 writes one for every feature; N writes features 0..N-1 only
    (the index still lists them all), and as many of each other family width's."""

    def __post_init__(self) -> None:
        if self.max_pages < 0:
            raise ValueError(f"max_pages={self.max_pages} must be >= 0 (0 writes every page)")
        if not self.title.strip():
            raise ValueError("title is empty; give the site a title, e.g. --title 'quick run'")
