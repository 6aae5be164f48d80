"""Stage 5: feature analysis (`monofast analysis`).

One batched pass over a source-balanced sample of the data: the GPT runs to the hooked
MLP layer, the SAE encodes every token, and every per-feature statistic is accumulated
from that pass alone (density, mean and max activation, log-spaced histogram, exact
streaming top-k windows, reservoir samples from activation quantile bins, firings and
activation mass per source, the tokens that make it fire), with the same density and
source purity for the layer's raw MLP neurons. Then, for the selected examples only, the
next-token ablation effect of each firing token (exact and without re-running the model
when the hooked layer is the last), the logit weights and decoder neighbours of every
feature, and a summary comparing features with neurons.

Modules, in reading order: config, contexts, forward, stats, streaming, scan, effects,
examples, summary, vocab, output, run.
"""

from monofast.analysis.config import AnalysisConfig

__all__ = ["AnalysisConfig"]
