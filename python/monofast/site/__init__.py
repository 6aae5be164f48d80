"""Stage 7: the static feature browser (`monofast site`).

Modules: config (SiteConfig), text (whole-window decoding and escaping), svg (charts),
pages (the HTML), build (the stage driver); assets/ holds the CSS and the two scripts.
"""

from monofast.site.config import SiteConfig

__all__ = ["SiteConfig"]
