"""Options of the analysis stage (`monofast analysis`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from monofast.common.device import DTYPE_CHOICES
from monofast.data.splits import SPLITS


@dataclass
class AnalysisConfig:
    """What the analysis pass reads and how much it keeps. Saved in analysis/summary.json."""

    RUNTIME: ClassVar[frozenset[str]] = frozenset({"device", "dtype"})
    """Fields that do not change the results (the manifest ignores them)."""

    tokens: int = 1_000_000
    """Token budget of the pass, shared equally between the sources (capped by the data)."""
    splits: tuple[str, ...] = field(default=("train", "val"), metadata={"metavar": "SPLIT,..."})
    """Data splits the contexts come from, comma-separated: train, val or both."""
    context_size: int = 0
    """Tokens per context (0: the GPT's block_size; 256 for a Hugging Face model). Contexts tile the data without overlap."""
    batch_contexts: int = 64
    """Contexts per forward pass; 64 x 256 tokens is a 16k-row batch (about 150 MB of activations
    at 1,536 features)."""
    top_k: int = 20
    """Top-activating windows kept per feature (exact, over every analysed token)."""
    window_radius: int = 12
    """Tokens shown on each side of an example's peak token."""
    quantile_bins: int = 12
    """Activation bins of equal firing mass per feature, for the random samples."""
    quantile_samples: int = 5
    """Random samples kept per quantile bin (reservoir-sampled over every analysed token)."""
    bins_per_decade: int = 8
    """Resolution of the log-spaced activation histogram (the quantile bins snap to its edges)."""
    top_tokens: int = 10
    """Tokens listed per feature: those it fires on most often."""
    logit_tokens: int = 10
    """Tokens listed per feature whose logits its decoder direction raises (and lowers) most."""
    neighbours: int = 10
    """Features listed per feature with the most similar decoder directions (cosine)."""
    ultralow_density: float = 1e-5
    """A feature firing on fewer than this fraction of tokens (but at least once) is 'ultralow'."""
    pure_share: float = 0.9
    """A feature (or neuron) is pure when one source holds more than this share of its activation mass."""
    rerun_examples: int = 5
    """Hooked layer before the last only: top windows per feature whose ablation effects come
    from re-running the later blocks (the last layer needs no re-run: every example is exact)."""
    layer: int = -1
    """MLP layer the SAE reads; -1 takes it from sae/cfg.json (hook_layer), else the last layer."""
    sae_name: str = ""
    """Sub-folder of sae/ holding the SAE to analyse, when several were trained ('' = sae/ itself)."""
    device: str = "auto"
    """Device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """Precision of the GPT forward and the SAE encoder products: auto (bfloat16 where the
    device multiplies it natively, else float32), float32, bfloat16 or float16 (GPUs only).
    Statistics and ablation effects are always accumulated in float32/float64."""
    seed: int = 1337
    """Seed of the context choice and the reservoir samples."""

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens={self.tokens} must be at least 1, e.g. 1000000")
        bad = [s for s in self.splits if s not in SPLITS]
        if not self.splits or bad:
            raise ValueError(f"splits={self.splits!r}: choose train, val or both (e.g. --splits train,val)")
        if self.context_size < 0 or self.context_size == 1:
            raise ValueError(f"context_size={self.context_size} must be 0 (the model's block size) or >= 2")
        for name in ("batch_contexts", "top_k", "quantile_bins", "quantile_samples", "bins_per_decade"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("window_radius", "top_tokens", "logit_tokens", "neighbours", "rerun_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.top_k > self.tokens:  # each top window is a token of the pass: more never fill
            raise ValueError(f"top_k={self.top_k} is more windows per feature than the {self.tokens} tokens "
                             f"analysed; lower --top-k (e.g. 20) or raise --tokens")
        if self.context_size and self.too_wide(self.context_size):
            raise ValueError(self.too_wide(self.context_size))
        if not 0.0 <= self.ultralow_density < 1.0:
            raise ValueError(f"ultralow_density={self.ultralow_density} must be in [0, 1), e.g. 1e-5")
        if not 0.5 <= self.pure_share < 1.0:
            raise ValueError(f"pure_share={self.pure_share} must be in [0.5, 1), e.g. 0.9")
        if self.layer < -1:
            raise ValueError(f"layer={self.layer}: give a layer index, or -1 to read it from the SAE")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        if "/" in self.sae_name or self.sae_name.startswith("."):
            raise ValueError(f"sae_name={self.sae_name!r} must be a plain sub-folder name of sae/")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0 (numpy takes only non-negative seeds), e.g. 1337")

    def too_wide(self, context_size: int) -> str | None:
        """What is wrong when the example windows are wider than the contexts they are cut
        from (`context_size` tokens; a radius of context_size - 1 already shows a whole
        context around any peak), else None."""
        if self.window_radius < context_size:
            return None
        return (f"window_radius={self.window_radius} is wider than the contexts of {context_size} tokens it "
                f"windows; give at most --window-radius {context_size - 1}")

    @property
    def window(self) -> int:
        """Tokens per example window: the peak and `window_radius` on each side."""
        return 2 * self.window_radius + 1
