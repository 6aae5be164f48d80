"""Every metric of the SAE stage: training curves, held-out reconstruction, CE-loss recovered.

metrics.jsonl (`log_record`, every --log-every steps): each SAE's loss, MSE, L1, L0 and
AuxK loss on the step's batch, its dead features, the lambda and learning rate, rows/s.

eval.json, on the held-out rows of the activation store (`held_out_metrics`, in the
store's own units): MSE, fraction of variance unexplained, L0, dead and dense fractions
and the log10 feature-density histogram of every SAE.

eval.json, CE-loss recovered: on held-out tokens (windows of the data's validation split)
the GPT's next-token loss is measured three ways at the hooked MLP layer:

    clean         the activation as it is
    spliced       the activation replaced by the SAE's reconstruction
    zero-ablated  the activation replaced by zeros

and CE-loss recovered = (zero - spliced) / (zero - clean): 1 for a perfect reconstruction,
0 for one no better than deleting the layer's MLP output. Every number is given overall
and per source, a token counting for the source of the token it predicts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monofast.activations.store import ActivationStore
from monofast.common.errors import DataError
from monofast.data.splits import load_meta, load_split
from monofast.gpt.model import GPT, MLPHook
from monofast.sae.batches import check_finite
from monofast.sae.model import SparseAutoencoder
from monofast.sae.sweep import Member

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"

TOKENS_PER_FORWARD = 16_384
"""Tokens per forward pass of the evaluation (bounds the (B, T, vocab) logits in memory)."""


class HeldOutTokens(NamedTuple):
    """Windows of the validation split, evenly spread over it (so every source is in)."""

    idx: torch.Tensor
    """(N, T) int64 input token ids."""
    targets: torch.Tensor
    """(N, T) int64 next-token ids."""
    sources: torch.Tensor
    """(N, T) int64 source id of each target token."""
    source_names: tuple[str, ...]
    """Name of each source id."""


class SourceLoss(NamedTuple):
    """One quantity overall and per source."""

    overall: float
    """Over every evaluated token."""
    by_source: dict[str, float]
    """Per source name (sources without evaluated tokens are left out)."""


class CEResult(NamedTuple):
    """Next-token losses and CE-loss recovered for every hook evaluated."""

    tokens: int
    """Target tokens evaluated."""
    clean: SourceLoss
    """Mean next-token loss of the unmodified GPT."""
    zero: SourceLoss
    """Mean next-token loss with the MLP activation zero-ablated."""
    spliced: dict[str, SourceLoss]
    """Mean next-token loss with each named replacement spliced in."""
    recovered: dict[str, SourceLoss]
    """(zero - spliced) / (zero - clean) of each named replacement (NaN where zero == clean)."""
    kl: dict[str, SourceLoss]
    """Mean KL(clean || hooked) of the next-token distributions, nats per token, of each named
    replacement: unlike the recovered fraction, informative where the zero-ablation gap is small."""
    kl_zero: SourceLoss
    """The same of zero-ablation."""


# ---------------------------------------------------------------------------------------
# Training curves


def log_record(members: list[Member], stats: list[dict[str, Any]], step: int, batch_size: int,
               lam: float, lr: float, started: float) -> dict[str, Any]:
    """One line of metrics.jsonl: each SAE's step statistics (`stats`, on the step's batch),
    dead features and L1 coefficient, after `step` steps of `batch_size` rows."""
    seconds = time.perf_counter() - started
    saes = {}
    for m, s in zip(members, stats):
        saes[m.name] = {key: round(float(value), 6) for key, value in s.items()}
        saes[m.name]["dead"] = int(m.sae.dead_mask().sum())
        saes[m.name]["l1_coeff"] = m.l1_coeff
    return {"step": step, "rows": step * batch_size, "seconds": round(seconds, 3),
            "rows_per_s": round(step * batch_size / max(seconds, 1e-9), 1),
            "lr": lr, "l1_scale": lam, "saes": saes}


@torch.no_grad()
def probe_l0(members: list[Member], rows: torch.Tensor, batch_size: int) -> list[float]:
    """Each member's mean L0 on `rows`, through the inference encoder the evaluation uses."""
    result = []
    for m in members:
        device = m.sae.W_enc.device
        fired = sum(float((m.sae.encode(chunk.to(device)) > 0).sum()) for chunk in rows.split(batch_size))
        result.append(fired / rows.shape[0])
    return result


# ---------------------------------------------------------------------------------------
# Held-out rows


@torch.no_grad()
def held_out_metrics(members: list[Member], store: ActivationStore, cutoff: int, batch_size: int,
                     device: torch.device) -> dict[str, Any]:
    """Held-out MSE, fraction of variance unexplained, L0, dead / dense fractions and the
    log10 feature-density histogram of every SAE (errors in the store's own units)."""
    rows = store.rows - cutoff
    if rows == 0:
        return {"rows": 0, "saes": {}}
    totals: dict[str, dict[str, Any]] = {m.name: {"sq_err": 0.0, "l0": 0.0, "fired": 0} for m in members}
    sum_x = torch.zeros(store.dim, dtype=torch.float64)
    sum_sq = 0.0
    for m in members:
        m.sae.eval()
    for begin in range(cutoff, store.rows, batch_size):
        x = store.take(np.arange(begin, min(begin + batch_size, store.rows)), to_float32=True).tensor().to(device)
        check_finite(x, "a held-out batch")
        sum_x += x.double().sum(0).cpu()
        sum_sq += float(x.double().square().sum())
        for m in members:
            feats = m.sae.encode(x)
            x_hat = m.sae.decode(feats)
            t = totals[m.name]
            t["sq_err"] += float((x_hat.double() - x.double()).square().sum())
            firing = feats > 0
            t["l0"] += float(firing.sum())
            t["fired"] = t["fired"] + firing.sum(0).cpu().long()
    for m in members:
        m.sae.train()
    variance = sum_sq - float(sum_x.square().sum()) / rows  # sum over rows of |x - mean|^2
    result: dict[str, Any] = {"rows": rows, "saes": {}}
    for m in members:
        t = totals[m.name]
        density = t["fired"].double() / rows
        log_density = torch.log10(density.clamp_min(1e-10))
        edges = [-10.0] + [x / 2 for x in range(-16, 1)]  # -10 catches the dead, then half-decades
        counts = torch.histogram(log_density.float(), bins=torch.tensor(edges))[0]
        result["saes"][m.name] = {
            "l1_coeff": m.l1_coeff,
            "k": m.sae.cfg.k if m.sae.cfg.uses_k else None,
            "mse": t["sq_err"] / rows,
            "fvu": t["sq_err"] / variance if variance > 0 else float("nan"),
            "l0": t["l0"] / rows,
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > 0.1).double().mean()),
            "log10_density_histogram": {"edges": edges, "counts": [int(c) for c in counts]},
        }
    return result


# ---------------------------------------------------------------------------------------
# Held-out tokens


def held_out_tokens(data_dir: str | Path, length: int, max_tokens: int) -> HeldOutTokens:
    """Up to `max_tokens` target tokens in non-overlapping windows of `length` tokens, taken
    evenly spaced across the validation split of `data_dir`."""
    meta = load_meta(data_dir)
    split = load_split(data_dir, "val", meta)
    windows = (len(split.tokens) - 1) // length  # each window needs one extra token as its last target
    if windows < 1:
        raise DataError(f"the validation split of {data_dir} has {len(split.tokens)} tokens, fewer than one "
                        f"window of {length + 1}; build more data or set --ce-eval-tokens 0 to skip the "
                        f"CE-loss evaluation")
    count = min(windows, max(1, -(-max_tokens // length)))
    starts = (np.arange(count) * windows // count) * length  # (N,) evenly spaced windows
    offsets = np.arange(length + 1)  # (T + 1,)
    positions = starts[:, None] + offsets[None, :]  # (N, T + 1)
    tokens = torch.from_numpy(np.asarray(split.tokens[positions], dtype=np.int64))  # (N, T + 1)
    sources = torch.from_numpy(np.asarray(split.sources[positions[:, 1:]], dtype=np.int64))  # (N, T)
    names = tuple(s["name"] for s in sorted(meta["sources"], key=lambda s: s["id"]))
    return HeldOutTokens(tokens[:, :-1], tokens[:, 1:], sources, names)


# ---------------------------------------------------------------------------------------
# Hooks


def zero_hook(act: torch.Tensor) -> torch.Tensor:
    """Zero-ablation: (B, T, d_mlp) zeros in place of the activation."""
    return torch.zeros_like(act)


def splice_hook(sae: SparseAutoencoder) -> MLPHook:
    """Replace the activation (B, T, d_mlp) with `sae`'s reconstruction of it. `encode` and
    `decode` work in the activation's own units whether the input scale is folded into the
    weights (a loaded SAE) or kept beside them (one still in training)."""

    def hook(act: torch.Tensor) -> torch.Tensor:
        flat = act.reshape(-1, act.shape[-1])  # (B * T, d_mlp)
        x_hat = sae.decode(sae.encode(flat))  # (B * T, d_mlp)
        return x_hat.view(act.shape).to(act.dtype)  # (B, T, d_mlp)

    return hook


# ---------------------------------------------------------------------------------------
# Losses


@torch.no_grad()
def token_losses(model: GPT, layer: int, hooks: Sequence[Optional[MLPHook]],
                 tokens: HeldOutTokens) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per hook, (N * T,) float64 next-token loss of every held-out token with that hook on
    `layer`'s MLP (None: the clean model), and (N * T,) KL(clean || hooked) of its
    next-token distribution. The blocks up to that MLP run once per batch for all the
    hooks (`GPT.run_to_mlp`), the rest once per hook: the same losses as a full forward
    pass per hook, for less."""
    device = next(model.parameters()).device
    per_forward = max(1, TOKENS_PER_FORWARD // tokens.idx.shape[1])
    losses: list[list[torch.Tensor]] = [[] for _ in hooks]
    kls: list[list[torch.Tensor]] = [[] for _ in hooks]
    for first in range(0, tokens.idx.shape[0], per_forward):
        idx = tokens.idx[first:first + per_forward].to(device)  # (B, T)
        targets = tokens.targets[first:first + per_forward].to(device).flatten()  # (B * T,)
        resid, act = model.run_to_mlp(idx, layer)  # (B, T, C), (B, T, d_mlp)
        clean = F.log_softmax(model.logits_from_mlp(resid, act, layer).flatten(0, 1).float(), dim=-1)  # (B*T, V)
        for i, hook in enumerate(hooks):
            logp = clean  # the clean model's, computed once for every hook's KL
            if hook is not None:
                replaced = hook(act)
                logits = model.logits_from_mlp(resid, act if replaced is None else replaced, layer)  # (B, T, V)
                logp = F.log_softmax(logits.flatten(0, 1).float(), dim=-1)  # (B * T, V)
            losses[i].append(F.nll_loss(logp, targets, reduction="none").double().cpu())  # (B * T,)
            kls[i].append((clean.exp() * (clean - logp)).sum(-1).clamp_min(0).double().cpu())  # (B * T,)
    return [torch.cat(parts) for parts in losses], [torch.cat(parts) for parts in kls]


def by_source(losses: torch.Tensor, tokens: HeldOutTokens) -> SourceLoss:
    """Mean of per-token `losses` (N * T,) overall and per source of the target token."""
    sources = tokens.sources.flatten()  # (N * T,)
    per = {name: float(losses[sources == i].mean()) for i, name in enumerate(tokens.source_names)
           if bool((sources == i).any())}
    return SourceLoss(float(losses.mean()), per)


def recovered_fraction(clean: float, spliced: float, zero: float) -> float:
    """(zero - spliced) / (zero - clean); NaN when zero-ablation changes nothing."""
    gap = zero - clean
    return (zero - spliced) / gap if gap != 0 else float("nan")


def recovered(clean: SourceLoss, spliced: SourceLoss, zero: SourceLoss) -> SourceLoss:
    per = {name: recovered_fraction(clean.by_source[name], spliced.by_source[name], zero.by_source[name])
           for name in spliced.by_source}
    return SourceLoss(recovered_fraction(clean.overall, spliced.overall, zero.overall), per)


def evaluate_hooks(model: GPT, layer: int, hooks: Mapping[str, MLPHook], tokens: HeldOutTokens) -> CEResult:
    """Clean, zero-ablated and spliced losses, and CE-loss recovered, of every named hook."""
    was_training = model.training
    model.eval()
    try:
        losses, kls = token_losses(model, layer, [None, zero_hook, *hooks.values()], tokens)
        clean, zero, *hooked = (by_source(loss, tokens) for loss in losses)
        spliced = dict(zip(hooks, hooked))
        kl_zero, *kl_hooked = (by_source(k, tokens) for k in kls[1:])
    finally:
        model.train(was_training)
    return CEResult(tokens.targets.numel(), clean, zero, spliced,
                    {name: recovered(clean, s, zero) for name, s in spliced.items()}, dict(zip(hooks, kl_hooked)),
                    kl_zero)


def evaluate_saes(model: GPT, layer: int, saes: Mapping[str, SparseAutoencoder],
                  tokens: HeldOutTokens) -> CEResult:
    """`evaluate_hooks` with each SAE's reconstruction spliced in (SAEs in eval mode)."""
    modes = {name: sae.training for name, sae in saes.items()}
    for sae in saes.values():
        sae.eval()
    try:
        return evaluate_hooks(model, layer, {name: splice_hook(sae) for name, sae in saes.items()}, tokens)
    finally:
        for name, sae in saes.items():
            sae.train(modes[name])


# ---------------------------------------------------------------------------------------
# eval.json


def summary(result: CEResult) -> dict[str, float | int | dict[str, float]]:
    """The numbers shared by every SAE, for the top level of eval.json."""
    gap = {name: result.zero.by_source[name] - result.clean.by_source[name] for name in result.clean.by_source}
    return {"ce_eval_tokens": result.tokens,
            "ce_loss_clean": result.clean.overall, "ce_loss_clean_by_source": result.clean.by_source,
            "ce_loss_zero_ablated": result.zero.overall, "ce_loss_zero_ablated_by_source": result.zero.by_source,
            # The denominator of CE-loss recovered: where it is small the ratio says little.
            "ce_loss_gap": result.zero.overall - result.clean.overall, "ce_loss_gap_by_source": gap,
            "kl_div_zero_ablated": result.kl_zero.overall, "kl_div_zero_ablated_by_source": result.kl_zero.by_source}


def per_sae(result: CEResult, name: str) -> dict[str, float | dict[str, float]]:
    """One SAE's numbers, for its entry under "saes" in eval.json."""
    spliced, rec = result.spliced[name], result.recovered[name]
    kl = result.kl[name]
    return {"ce_loss_spliced": spliced.overall, "ce_loss_spliced_by_source": spliced.by_source,
            "ce_loss_recovered": rec.overall, "ce_loss_recovered_by_source": rec.by_source,
            "kl_div": kl.overall, "kl_div_by_source": kl.by_source}


class CEEvaluation(NamedTuple):
    """What the SAE stage needs to measure CE-loss recovered after training."""

    model: GPT
    """The GPT in eval mode, on the training device."""
    layer: int
    """The hooked MLP layer (the one the activation store was harvested from)."""
    tokens: HeldOutTokens
    """The held-out windows."""

    def run(self, saes: Mapping[str, SparseAutoencoder]) -> CEResult:
        return evaluate_saes(self.model, self.layer, saes, self.tokens)


def prepare(gpt_dir: str | Path, data_dir: str | Path, layer: int, d_in: int, max_tokens: int,
            device: torch.device, length: Optional[int] = None, hook: Optional[str] = None) -> CEEvaluation:
    """Load the GPT (hooked at `hook`'s site; None: the MLP's) and the held-out windows of
    `length` tokens (the harvest's context length; None: the GPT's block size), checking the
    layer and width match the activation store."""
    from monofast.gpt.weights import load_model

    model = load_model(gpt_dir, device, hook)
    model.eval()
    try:
        model.block(layer)
    except ValueError as err:
        raise DataError(f"the activation store was harvested at layer {layer} but the GPT in {gpt_dir}: "
                        f"{err}; re-run `monofast activations harvest --force`") from None
    if model.config.d_mlp != d_in:
        raise DataError(f"the activation store rows have width {d_in} but the GPT in {gpt_dir} has MLP width "
                        f"{model.config.d_mlp}; re-run `monofast activations harvest --force` with this GPT")
    length = min(length or model.config.default_context, model.config.block_size)
    return CEEvaluation(model, layer, held_out_tokens(data_dir, length, max_tokens))


# ---------------------------------------------------------------------------------------
# CE-loss recovered in the SAE stage


def prepare_ce(store: ActivationStore, max_tokens: int, gpt_dir: str | Path | None,
               data_dir: str | Path | None, device: torch.device) -> Optional[CEEvaluation]:
    """The GPT of `gpt_dir` and up to `max_tokens` held-out tokens of `data_dir` for CE-loss
    recovered at the layer `store` was harvested from, or None when it is not measured."""
    if max_tokens == 0 or gpt_dir is None or data_dir is None:
        return None
    layer = store.index.extra.get("gpt", {}).get("layer")
    if layer is None:
        raise DataError(f"the activation store {store.folder} does not record the GPT layer it was harvested "
                        f"from; re-run `monofast activations harvest --force`, or set --ce-eval-tokens 0")
    length = store.index.extra.get("contexts", {}).get("length")  # the contexts the SAE's rows came from
    hook = store.index.extra.get("gpt", {}).get("hook_name")
    return prepare(gpt_dir, data_dir, int(layer), store.dim, max_tokens, device, length, hook)


def add_ce(evaluation: dict[str, Any], result: CEResult) -> None:
    """Put CE-loss recovered into eval.json: the shared losses at the top, each SAE's in its entry."""
    evaluation.update(summary(result))
    for name in result.spliced:
        evaluation["saes"].setdefault(name, {}).update(per_sae(result, name))
