"""The one batched pass: every context through the GPT to the hooked layer, every token
through the SAE encoder, every statistic, selection and store updated from that batch.

Per batch of n tokens and F features it costs the GPT forward, one (n, D) x (D, F)
product, one scan of the (n, F) result for its nonzero entries, and bincounts and sorts
over those entries; the (n, F) matrix itself is never copied. What needs the later
layers (ablation effects) is computed once at the end, for the selected examples only,
from the final residual of each token kept here (4 * n_embd bytes per token).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from monofast.analysis.config import AnalysisConfig
from monofast.analysis.contexts import Batch
from monofast.analysis.forward import Encoder, final_residual
from monofast.analysis.stats import FeatureStats, NeuronStats, firings, log_edges
from monofast.analysis.streaming import CellReservoir, StreamingTopK
from monofast.common.errors import UserError
from monofast.gpt.model import GPT


class TokenStore:
    """What the end of the pass needs of every analysed token, by global row
    (context * T + position)."""

    def __init__(self, n_rows: int, d_model: Optional[int]):
        self.tokens = torch.empty(n_rows, dtype=torch.int32)  # (N,)
        self.targets = torch.empty(n_rows, dtype=torch.int64)  # (N,)
        self.sources = torch.empty(n_rows, dtype=torch.int64)  # (N,)
        self.resid = torch.empty(n_rows, d_model) if d_model else None  # (N, C) final residuals

    def put(self, first: int, tokens: Tensor, targets: Tensor, sources: Tensor, resid: Optional[Tensor]) -> None:
        rows = slice(first, first + len(tokens))
        self.tokens[rows] = tokens.to("cpu", torch.int32)
        self.targets[rows] = targets.cpu()
        self.sources[rows] = sources.cpu()
        if self.resid is not None and resid is not None:
            self.resid[rows] = resid.to("cpu", torch.float32)


class ScanCounts(NamedTuple):
    """Work done by the pass, for the log and the benchmark."""

    tokens: int
    firings: int
    top_entries: int
    sample_entries: int


class Scan:
    """Accumulators of the pass; `add(batch)` once per batch, then read the fields."""

    def __init__(self, cfg: AnalysisConfig, model: GPT, encoder: Encoder, layer: int, n_contexts: int,
                 context_size: int, n_sources: int, device: torch.device, autocast_dtype: torch.dtype,
                 seed: int):
        if cfg.too_wide(context_size):  # context_size 0 in the config: the model's, known only now
            raise UserError(f"analysis: {cfg.too_wide(context_size)}")
        self.cfg, self.model, self.encoder, self.layer = cfg, model, encoder, layer
        self.T, self.device, self.autocast_dtype = context_size, device, autocast_dtype
        self.last_layer = layer == model.config.n_layer - 1 and model.residual_shortcut
        n_features = encoder.d_sae
        self.edges = log_edges(cfg.bins_per_decade).to(device)
        self.n_bins = len(self.edges) + 1
        self.offsets = torch.arange(-cfg.window_radius, cfg.window_radius + 1, device=device)  # (W,)
        self.stats = FeatureStats(n_features, n_sources, self.n_bins, model.config.vocab_size, device)
        self.neurons = NeuronStats(model.config.d_mlp, n_sources, device)
        self.top = StreamingTopK(n_features, cfg.top_k, {"acts": ((cfg.window,), torch.float32)}, device)
        # Samples keep their windows in float16: display only (their own values stay float32).
        self.samples = CellReservoir(n_features * self.n_bins, cfg.quantile_samples,
                                     {"acts": ((cfg.window,), torch.float16)}, device)
        self.store = TokenStore(n_contexts * context_size, model.config.n_embd if self.last_layer else None)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.counts = ScanCounts(0, 0, 0, 0)

    def _windows(self, acts: Tensor, features: Tensor, rows: Tensor) -> dict[str, Tensor]:
        """Payload of new entries: feature features[i]'s activation on the window around batch
        row rows[i], NaN outside the row's context."""
        pos = rows % self.T  # (m,)
        win = pos[:, None] + self.offsets  # (m, W)
        inside = (win >= 0) & (win < self.T)
        win_rows = (rows - pos)[:, None] + win.clamp(0, self.T - 1)  # (m, W)
        values = acts[win_rows, features[:, None]]  # (m, W)
        return {"acts": values.masked_fill(~inside, float("nan"))}

    @torch.inference_mode()
    def add(self, batch: Batch) -> None:
        idx = torch.from_numpy(batch.idx).to(self.device)  # (b, T)
        targets = torch.from_numpy(batch.targets).to(self.device)  # (b, T)
        sources = torch.from_numpy(batch.sources).to(self.device).reshape(-1)  # (n,)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype != torch.float32):
            mlp, resid = final_residual(self.model, idx, self.layer)  # (b, T, d_mlp), (b, T, C)
        self.neurons.update(mlp, sources.view(idx.shape))
        n = idx.numel()
        mlp = mlp.reshape(n, -1)  # (n, d_mlp)
        first_row = batch.first * self.T
        self.store.put(first_row, idx.reshape(-1), targets.reshape(-1), sources,
                       resid.reshape(n, -1) if self.last_layer else None)
        acts = self.encoder(mlp)  # (n, F), a reused buffer
        fired = firings(acts, self.edges)
        self.stats.update(fired, sources, idx.reshape(-1))

        def windows(features: Tensor, rows: Tensor) -> dict[str, Tensor]:
            return self._windows(acts, features, rows)

        above = int((fired.values > self.top.threshold()[fired.features]).sum())
        if above > 8 * self.top.values.numel():
            # Many entries can still enter (the first batch): one dense top-k beats sorting them.
            top_new = self.top.update_dense(acts, first_row, windows)
        else:
            top_new = self.top.update_sparse(fired.features, fired.values, fired.rows, first_row, windows)
        # Multiples of 2^-24 exactly, on every device (the reservoir packs them into integers).
        keys = torch.randint(0, 2**24, (len(fired.values),), generator=self.generator,
                             device=self.device).float() * 2**-24
        cells = fired.features * self.n_bins + fired.bins
        sample_new = self.samples.update(cells, keys, fired.values, fired.rows, first_row, fired.features,
                                         windows)
        c = self.counts
        self.counts = ScanCounts(c.tokens + n, c.firings + len(fired.values), c.top_entries + top_new,
                                 c.sample_entries + sample_new)
