"""Options of the findings stages: the family of SAEs (`FamilyConfig`) and the measurements,
with the seed of the second model (`FindingsConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from monofast.common.device import DTYPE_CHOICES
from monofast.sae.config import SAETrainConfig
from monofast.sae.model import K_VARIANTS


@dataclass
class FamilyConfig(SAETrainConfig):
    """A family of SAEs of growing width trained side by side in one pass over the store
    (`monofast family`), with the SAE stage's recipe: every other option means what it
    means there, and presets copy the SAE stage's values."""

    expansions: tuple[int, ...] = field(default=(1, 2, 8), metadata={"metavar": "E,..."})
    """Widths of the family as multiples of the activation width, besides the SAE stage's own
    (which joins the family as it is, not trained again)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.expansions or any(e < 1 for e in self.expansions):
            raise ValueError(f"expansions must be one or more integers >= 1, got {self.expansions}; "
                             f"e.g. --expansions 1,2,8")
        if len(set(self.expansions)) != len(self.expansions):
            raise ValueError(f"expansions {self.expansions} repeat a width; give each once")
        if self.variant in K_VARIANTS and len(self.k) not in (1, len(self.expansions)):
            raise ValueError(f"k: give one value or one per expansion ({len(self.expansions)}), got {self.k}")
        if self.variant not in K_VARIANTS and len(self.l1_coeff) not in (1, len(self.expansions)):
            raise ValueError(f"l1_coeff: give one value or one per expansion ({len(self.expansions)}), "
                             f"got {self.l1_coeff}")

    def members(self, d_in: int) -> list[tuple[str, float, Optional[int], int]]:
        """One SAE per width, named `w<features>`, smallest first."""
        out = []
        for i, e in enumerate(sorted(self.expansions)):
            if self.variant in K_VARIANTS:
                out.append((f"w{e * d_in}", 0.0, self.k[min(i, len(self.k) - 1)], e * d_in))
            else:
                out.append((f"w{e * d_in}", self.l1_coeff[min(i, len(self.l1_coeff) - 1)], None, e * d_in))
        return out


@dataclass
class FindingsConfig:
    """What the findings stage measures (`monofast findings`): saved in findings/findings.json."""

    RUNTIME: ClassVar[frozenset[str]] = frozenset({"device", "dtype"})
    """Fields that do not change the results (the manifest ignores them)."""

    twin_seed_offset: int = 1
    """The second model (`twin/`): the run's GPT, harvest and SAE recipe again, with this added
    to the GPT's and the SAE's seeds (the data and the harvested positions are the same)."""
    tokens: int = 131_072
    """Tokens (source-balanced contexts of the validation and training splits) on which the
    activations of both models, every family member and the neurons are compared."""
    batch_contexts: int = 64
    """Contexts per forward pass."""
    clear_parent: float = 0.0
    """Decoder cosine above which a feature has a clear parent in the next smaller SAE; 0 picks
    it from the data (the valley of the best-match distribution, never below the best match of
    random directions)."""
    map_points: int = 3_000
    """Decoder directions placed on the family map (`monofast.findings.layout`), an equal share
    from every width."""
    specificity_bins: int = 10
    """Activation bins (equal width, 0 to the feature's maximum) of the specificity plots."""
    steer_features: int = 4
    """Source-pure features steered per source."""
    steer_prompts: int = 8
    """Prompts (from the other sources' validation text) per steered feature."""
    steer_tokens: int = 40
    """Tokens generated per continuation."""
    steer_multiple: float = 0.0
    """Clamp value as a multiple of the feature's maximum activation; 0: the steering module's default."""
    device: str = "auto"
    """Device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """Precision of the forward passes; correlations are always accumulated in float64."""
    seed: int = 1337
    """Seed of the token sample, the map and the steering prompts."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        if self.twin_seed_offset < 1:  # 0 trains the same model again; below, the twin's seeds may go negative
            raise ValueError(f"twin_seed_offset={self.twin_seed_offset} must be >= 1 (0 would train the same "
                             f"model again), e.g. 1")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0 (numpy takes only non-negative seeds), e.g. 1337")
        if self.tokens < 1_000:
            raise ValueError(f"tokens={self.tokens} is too few to correlate activations; give 100000 or more")
        for name in ("batch_contexts", "specificity_bins", "steer_prompts", "steer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.steer_features < 0 or self.map_points < 0:
            raise ValueError("steer_features and map_points must be >= 0 (0 skips them)")
        if not 0.0 <= self.clear_parent < 1.0:
            raise ValueError(f"clear_parent={self.clear_parent} is a cosine in [0, 1) (0: from the data)")
        if not (self.steer_multiple >= 0 and math.isfinite(self.steer_multiple)):
            raise ValueError(f"steer_multiple={self.steer_multiple} must be >= 0 (0: the default)")
