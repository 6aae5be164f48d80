"""Named presets: per-stage overrides of the config dataclasses' defaults.

Each preset maps a stage name to the fields it changes; everything else keeps the
dataclass default. `monofast presets` prints them.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "about": "seconds, for tests: tiny corpus and model",
        "data": {"chars_per_source": 40_000, "vocab_size": 320},
    },
    "quick": {
        "about": "the whole pipeline on a 2-core CPU in a few minutes",
        "data": {"chars_per_source": 1_000_000, "vocab_size": 1024},
    },
    "laptop": {
        "about": "the seed laptop recipe, with its bugs fixed",
        "data": {"chars_per_source": 1_000_000, "vocab_size": 1024},
    },
    "paper": {
        "about": "Anthropic's shape: one layer, 512 MLP neurons, 4,096+ features, more data",
        "data": {"chars_per_source": 5_000_000, "vocab_size": 1024},
    },
}


def names() -> list[str]:
    return list(PRESETS)


def stage_values(preset: str, stage: str) -> dict[str, Any]:
    """The overrides `preset` makes for `stage` (empty when it makes none)."""
    from monofast.errors import UserError

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[preset].get(stage, {}))
