"""What a feature does to the model's output: logit weights, next-token ablation effects,
and the features whose decoder directions it most resembles.

Removing feature f from the hooked MLP activation at one token changes that activation by
-a_f W_dec[f] and, through the MLP's output projection (linear, its bias cancels), the
residual stream by -a_f d_f with d_f = W_proj W_dec[f]. When the hooked MLP is the last
one, nothing but the final LayerNorm and the unembedding follows, so the ablated next-token
log-probability is log_softmax(W_U ln_f(x - a_f d_f)) at the token's final residual x:
exact, from the residual stream, with no re-run of the model. It is also the same whether
the feature is removed at that token only or at every token of the context, because no
attention runs after the last MLP. For an earlier layer the later blocks mix positions,
so `rerun_effects` re-runs the model with the feature removed from the whole context,
many (context, feature) pairs per forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from monofast.gpt.model import GPT

PAIR_CHUNK = 4096
"""(token, feature) pairs whose ablated logits are held at once: 4096 x V floats (16 MB at V 1,024)."""


def residual_directions(model: GPT, layer: int, w_dec: Tensor) -> Tensor:
    """(F, C) each feature's unit of activation as a residual-stream direction, W_dec W_projᵀ
    (a Hugging Face model hooked outside an MLP: W_dec itself)."""
    return model.output_directions(layer, w_dec)  # (F, C)


class LogitWeights(NamedTuple):
    """The tokens whose logits a feature's direction raises and lowers most."""

    top_ids: Tensor
    """(F, n) token ids, largest weight first."""
    top_values: Tensor
    """(F, n) their weights (median-subtracted logits per unit activation)."""
    bottom_ids: Tensor
    """(F, n) token ids, most negative weight first."""
    bottom_values: Tensor
    """(F, n) their weights."""


def logit_weights(model: GPT, directions: Tensor, n: int, chunk: int = 1024) -> LogitWeights:
    """The direct path of each direction (F, C) to the logits: the final LayerNorm taken as
    linear (centre, times its gain; its division by the residual norm scales every token
    alike and is left out), then the unembedding; each feature's weights are shifted by
    their median over the vocabulary, as in the seed. Later blocks are not followed (exact
    only up to that linearisation for the last layer, the direct path for earlier ones)."""
    n = min(n, model.config.vocab_size)
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, directions.shape[0], chunk):
        weights = model.direct_logits(directions[start:start + chunk])  # (f, V)
        weights -= weights.median(dim=1, keepdim=True).values
        top = weights.topk(n, dim=1)
        bottom = weights.topk(n, dim=1, largest=False)
        parts.append((top.indices, top.values, bottom.indices, bottom.values))
    return LogitWeights(*(torch.cat(p) for p in zip(*parts)))


def neighbours(w_dec: Tensor, n: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(F, n) ids and cosine similarities of the features with the most similar decoder
    directions, the feature itself excluded; computed in chunks of rows (F x F never exists)."""
    unit = F.normalize(w_dec.float(), dim=1)  # (F, D)
    n = min(n, unit.shape[0] - 1)
    ids, sims = [], []
    for start in range(0, unit.shape[0], chunk):
        cos = unit[start:start + chunk] @ unit.T  # (f, F)
        rows = torch.arange(cos.shape[0], device=cos.device)
        cos[rows, rows + start] = float("-inf")
        top = cos.topk(n, dim=1)
        ids.append(top.indices)
        sims.append(top.values)
    return torch.cat(ids), torch.cat(sims)


LN_EPS = 1e-5
"""The final LayerNorm's epsilon (monofast.gpt.model.LayerNorm)."""
ROW_CHUNK = 4096
"""Distinct tokens whose clean logits are held at once: 4096 x V floats (16 MB at V 1,024)."""


@torch.no_grad()
def last_layer_effects(model: GPT, directions: Tensor, resid: Tensor, targets: Tensor, pair_rows: Tensor,
                       features: Tensor, acts: Tensor) -> Tensor:
    """(P,) change in log p(next token) when the hooked (last) layer's feature is removed: log p
    with -acts * directions[features] added to the final residual, minus log p without.

    resid (R, C) final residuals of R distinct tokens and targets (R,) their next tokens; each
    pair p is (token pair_rows[p], feature features[p], activation acts[p]).

    The final LayerNorm is written out so that the unembedding runs once per token, not once
    per pair: with x~ and d~ the centred residual and direction, gain g and unembedding W_U,
    logits(x - a d) = W_U (g * (x~ - a d~)) / s' + W_U b = (U - a G) / s' + c, where
    U = W_U (g * x~) is the token's, G = W_U (g * d~) the feature's, and
    s'^2 = mean((x~ - a d~)^2) + eps = var(x) - 2a x~.d~ / C + a^2 |d~|^2 / C + eps.
    Per pair that leaves one V-wide subtraction and a log-sum-exp (2.0x faster than an
    unembedding product per pair, measured at C 192, V 1,024).
    """
    w_u = model.lm_head.weight.float()  # (V, C)
    gain = model.ln_f.weight.float()  # (C,)
    shift = w_u @ model.ln_f.bias.float() if model.ln_f.bias is not None else torch.zeros(w_u.shape[0], device=w_u.device)
    C = w_u.shape[1]
    d = directions.float()
    d_c = d - d.mean(1, keepdim=True)  # (F, C)
    g_feat = (d_c * gain) @ w_u.T  # (F, V)
    d_sq = d_c.square().sum(1)  # (F,)
    order = torch.argsort(pair_rows)
    sorted_rows = pair_rows[order]
    out = torch.empty(len(pair_rows), dtype=torch.float32, device=resid.device)
    for start in range(0, len(resid), ROW_CHUNK):
        x_c = resid[start:start + ROW_CHUNK].float()
        x_c = x_c - x_c.mean(1, keepdim=True)  # (r, C)
        u_tok = (x_c * gain) @ w_u.T  # (r, V)
        var = x_c.square().mean(1)  # (r,)
        y = targets[start:start + ROW_CHUNK]
        logits = u_tok / (var + LN_EPS).sqrt()[:, None] + shift  # (r, V)
        clean = logits.gather(1, y[:, None]).squeeze(1) - logits.logsumexp(1)  # (r,)
        lo, hi = torch.searchsorted(sorted_rows, torch.tensor([start, start + ROW_CHUNK], device=sorted_rows.device))
        for p0 in range(int(lo), int(hi), PAIR_CHUNK):
            idx = order[p0:min(p0 + PAIR_CHUNK, int(hi))]
            r = pair_rows[idx] - start
            f, a = features[idx], acts[idx].float()
            cross = (x_c[r] * d_c[f]).sum(1)  # (p,)
            var_ablated = var[r] - 2 * a * cross / C + a.square() * d_sq[f] / C
            z = (u_tok[r] - a[:, None] * g_feat[f]) / (var_ablated + LN_EPS).sqrt()[:, None] + shift  # (p, V)
            ablated = z.gather(1, y[r][:, None]).squeeze(1) - z.logsumexp(1)
            out[idx] = ablated - clean[r]
    return out


@torch.no_grad()
def rerun_effects(model: GPT, layer: int, encode_one, w_dec: Tensor, contexts: Tensor, targets: Tensor,
                  features: Tensor, batch: int = 32) -> Tensor:
    """(R, T) change in log p(next token) at every position of each row's context when the
    row's feature is removed from the hooked layer at every position where it fires.

    contexts, targets (R, T) tokens; features (R,); `encode_one(acts (B, T, d_mlp), features
    (B,)) -> (B, T)` the activation of each row's feature. Many rows (different features,
    different contexts) share each forward: the cost is R / batch forwards of the model."""
    out = torch.empty(contexts.shape, dtype=torch.float32, device=contexts.device)
    for start in range(0, len(features), batch):
        part = slice(start, start + batch)
        idx, tgt, feats = contexts[part], targets[part], features[part]
        clean = F.log_softmax(model(idx).logits.float(), dim=-1).gather(2, tgt[..., None])[..., 0]

        def remove(act: Tensor, feats: Tensor = feats) -> Tensor:
            a = encode_one(act, feats)  # (b, T)
            return act - a[..., None].to(act.dtype) * w_dec[feats][:, None, :].to(act.dtype)

        with model.hook_mlp(layer, remove):
            logits = model(idx).logits.float()
        ablated = F.log_softmax(logits, dim=-1).gather(2, tgt[..., None])[..., 0]
        out[part] = ablated - clean
    return out
