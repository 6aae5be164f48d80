"""The findings' one pass over a token sample: both models, every SAE, the sums behind the
correlations and the per-source statistics.

For each batch of contexts: the hooked MLP activations of model A (the run's GPT) and model
B (the twin), the features of every family member (the run's SAE among them) and of B's
SAE; then the running sums of
- the correlation of every A feature with every B feature, and of every A neuron with
  every B neuron (`CrossMoments`);
- the correlation of each family feature with its decoder-matched parent (`PairMoments`);
- firing counts, activation mass per source and per token of every SAE's features and of
  both models' neurons (`monofast.analysis.stats`, as the analysis counts them);
- per activation level and source, the firings of A's features and neurons (`Levels`).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np
import torch
from torch import Tensor

from monofast.analysis.forward import Encoder
from monofast.analysis.stats import FeatureStats, NeuronStats, firings
from monofast.findings.matching import CrossMoments, PairMoments
from monofast.gpt.model import GPT


class Levels:
    """Firings per (unit, activation bin, source): bins of equal width from 0 to each unit's
    maximum (a larger value falls in the last bin); a unit fires where its activation is > 0."""

    def __init__(self, maxima: np.ndarray, bins: int, n_sources: int):
        self.top = torch.as_tensor(maxima, dtype=torch.float32).clamp(min=1e-12)  # (U,)
        self.bins, self.n_sources = bins, n_sources
        self.counts = torch.zeros(len(maxima) * bins * n_sources, dtype=torch.int64)  # (U * NB * S,)

    def add(self, acts: Tensor, sources: Tensor) -> None:
        """acts (n, U), sources (n,) of the same tokens."""
        acts = acts.float().cpu()
        rows, units = (acts > 0).nonzero().unbind(1)  # (m,) each
        level = (acts[rows, units] / self.top[units] * self.bins).long().clamp(max=self.bins - 1)
        cell = (units * self.bins + level) * self.n_sources + sources[rows]
        self.counts += torch.bincount(cell, minlength=self.counts.numel())

    def table(self) -> np.ndarray:
        """(U, NB, S) firing counts."""
        return self.counts.view(-1, self.bins, self.n_sources).numpy()


class Models(NamedTuple):
    """What the pass runs: both GPTs at their hooked layer and every SAE's encoder."""

    a: GPT
    b: GPT
    layer: int
    family: Mapping[str, Encoder]
    """Family members by name, the run's own SAE among them."""
    main: str
    """The family member that is the run's SAE."""
    twin: Encoder
    """Model B's SAE."""


class Scan:
    """Running sums of the pass; `add` one batch of contexts at a time."""

    def __init__(self, models: Models, parents: Mapping[str, tuple[str, np.ndarray]], n_sources: int,
                 vocab_size: int, feature_max: np.ndarray, neuron_max: np.ndarray, bins: int,
                 device: torch.device, dtype: torch.dtype):
        self.models, self.device, self.dtype = models, device, dtype
        d_a, d_b = models.family[models.main].d_sae, models.twin.d_sae
        d_mlp = models.a.config.d_mlp
        self.features = CrossMoments(d_a, d_b, sparse=True)
        self.neurons = CrossMoments(d_mlp, d_mlp)
        self.parents = {name: (small, PairMoments(parent.clip(min=0)))
                        for name, (small, parent) in parents.items()}
        self.no_edges = torch.empty(0)  # one histogram bin: the counts here need none
        self.stats = {name: FeatureStats(enc.d_sae, n_sources, 1, vocab_size, torch.device("cpu"))
                      for name, enc in {**models.family, "twin": models.twin}.items()}
        cpu = torch.device("cpu")
        self.neuron_stats = {"a": NeuronStats(d_mlp, n_sources, cpu), "b": NeuronStats(d_mlp, n_sources, cpu)}
        self.feature_levels = Levels(feature_max, bins, n_sources)
        self.neuron_levels = Levels(neuron_max, bins, n_sources)
        self.tokens = 0
        self.tokens_by_source = torch.zeros(n_sources, dtype=torch.int64)  # (S,)

    @torch.no_grad()
    def add(self, idx: np.ndarray, sources: np.ndarray) -> None:
        """One batch of contexts: idx, sources (b, T)."""
        x = torch.from_numpy(idx).to(self.device)
        src = torch.from_numpy(sources).reshape(-1)  # (n,)
        tok = torch.from_numpy(idx).reshape(-1)  # (n,)
        acts_a = self._mlp(self.models.a, x)  # (n, d_mlp)
        acts_b = self._mlp(self.models.b, x)  # (n, d_mlp)
        self.tokens += acts_a.shape[0]
        self.tokens_by_source += torch.bincount(src, minlength=len(self.tokens_by_source))
        self.neurons.add(acts_a, acts_b)
        self.neuron_levels.add(acts_a, src)
        by_context = torch.from_numpy(sources)  # (b, T)
        self.neuron_stats["a"].update(acts_a.view(*sources.shape, -1), by_context)
        self.neuron_stats["b"].update(acts_b.view(*sources.shape, -1), by_context)
        # Each encoder writes into its own buffer, overwritten only by its next call (the next batch).
        encoded: dict[str, Tensor] = {}
        for name, encoder in self.models.family.items():
            encoded[name] = encoder(acts_a.to(self.device)).float().cpu()  # (n, F)
        feats_b = self.models.twin(acts_b.to(self.device)).float().cpu()  # (n, F_b)
        main = encoded[self.models.main]
        self.features.add(main, feats_b)
        self.feature_levels.add(main, src)
        for name, feats in [*encoded.items(), ("twin", feats_b)]:
            self.stats[name].update(firings(feats, self.no_edges), src, tok)
        for name, (small, pairs) in self.parents.items():
            pairs.add(encoded[small], encoded[name])

    def _mlp(self, model: GPT, x: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            acts = model.mlp_activations(x, self.models.layer)  # (b, T, d_mlp)
        return acts.reshape(-1, acts.shape[-1]).float().cpu()  # (n, d_mlp)


def top_tokens(stats: FeatureStats, n: int) -> np.ndarray:
    """(F, n) ids of the tokens each feature fires on most often (-1 pads)."""
    counts = stats.token_counts()
    top = counts.topk(min(n, counts.shape[1]), dim=1)
    return torch.where(top.values > 0, top.indices, torch.full_like(top.indices, -1)).int().numpy()

