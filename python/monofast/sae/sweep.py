"""The sweep: the SAEs that train side by side on the same batches, and one step of each.

`build_sweep` makes one SAE (with its Adam optimizer) per L1 coefficient, or per k for
TopK; `train_step` takes one optimizer step of one of them; `schedules` gives the lambda
warm-up and learning-rate decay; with --target-l0 the lambda search (`monofast.sae.search`)
moves the members' L1 coefficients while they train.

Under torchrun (`monofast.common.distributed`) each rank steps on its own rows of the
global batch: `reduce_step` averages the gradients and adds up which features fired in one
all-reduce, `reduce_stats` averages the logged statistics, and `share_member` gives every
rank rank 0's copy after a change made on every rank alike.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from monofast.common import distributed
from monofast.common.errors import UserError
from monofast.sae import search as sae_search
from monofast.sae.config import SAETrainConfig
from monofast.sae.model import K_VARIANTS, SAEConfig, SparseAutoencoder


class Member(NamedTuple):
    """One SAE of the sweep with its optimizer and L1 coefficient."""

    name: str
    sae: SparseAutoencoder
    optimizer: torch.optim.Optimizer
    l1_coeff: float


def build_sweep(cfg: SAETrainConfig, d_in: int, sample: torch.Tensor, steps: int,
                device: torch.device) -> list[Member]:
    """One SAE and its optimizer per member of `cfg.members()`, on `device`: input scale and
    decoder bias set from `sample`, dead after a quarter of the run's tokens (at most 10M)."""
    dead_tokens = max(cfg.batch_size, min(10_000_000, steps * cfg.batch_size // 4))
    members = []
    for i, (name, l1_coeff, k, d_sae) in enumerate(cfg.members(d_in)):
        try:
            sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, variant=cfg.variant, k=k or 32,
                                dead_tokens=dead_tokens, compute_dtype=cfg.compute_dtype)
        except ValueError as err:
            raise UserError(f"SAE {name}: {err}") from None
        sae = SparseAutoencoder(sae_cfg, device=device, generator=torch.Generator().manual_seed(cfg.seed + i))
        sae.set_input_scale(sample)
        sae.init_b_dec(sample.to(device), cfg.b_dec_init)
        fused = device.type in ("cuda", "cpu")
        optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
        members.append(Member(name, sae, optimizer, l1_coeff))
    return members


def schedules(cfg: SAETrainConfig, step: int, steps: int) -> tuple[float, float]:
    """(lambda multiplier, learning rate) at `step` of `steps`."""
    warm = cfg.warmup_fraction() * steps
    lam = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    decay_start = steps * (1 - cfg.decay_fraction())
    lr = cfg.lr if step < decay_start else cfg.lr * max(0.0, (steps - step) / max(1.0, steps - decay_start))
    return lam, lr


def train_step(member: Member, x: torch.Tensor, lam: float, lr: float, aux_coeff: float,
               here: distributed.World = distributed.SINGLE) -> dict[str, float]:
    """One optimizer step on `x`: the whole batch, or under torchrun this rank's rows of it."""
    for group in member.optimizer.param_groups:
        group["lr"] = lr
    before = member.sae.tokens_since_fired.clone() if here.size > 1 else None
    out = member.sae(x)
    loss = out.mse + (member.l1_coeff * lam) * out.l1 + aux_coeff * out.aux
    loss.backward()
    if before is not None:
        reduce_step(member.sae, before, out.fired, x.shape[0] * here.size, here)
    member.sae.optimizer_step(member.optimizer)
    member.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.detach(), "mse": out.mse.detach(), "l1": out.l1.detach(), "l0": out.l0,
            "aux": out.aux.detach()}


def lambda_search(cfg: SAETrainConfig, members: list[Member], steps: int) -> Optional[sae_search.LambdaSearch]:
    """The lambda search of --target-l0 for the L1 variants (the k variants' L0 is their k: none)."""
    if cfg.target_l0 <= 0:
        return None
    sae_search.check_target(cfg.target_l0, min(m.sae.cfg.d_sae for m in members))
    if cfg.variant in K_VARIANTS:
        return None
    return sae_search.LambdaSearch(cfg.target_l0, [m.l1_coeff for m in members], steps)


def set_lambdas(members: list[Member], lambdas: list[float]) -> None:
    """Give the members (in place) the lambdas the search chose."""
    for i, lam in enumerate(lambdas):
        members[i] = members[i]._replace(l1_coeff=lam)


# ---------------------------------------------------------------------------------------
# Several processes (torchrun)


@torch.no_grad()
def reduce_step(sae: SparseAutoencoder, before: torch.Tensor, fired: torch.Tensor, rows: int,
                here: distributed.World) -> None:
    """What DistributedDataParallel does, by hand, so that the SAE's own step (gradient
    projection, decoder renormalisation) and its dead-feature counts work unchanged: one
    all-reduce carries the gradients and the per-feature firing counts. Each rank's loss is
    a mean over as many rows, so the mean of the gradients is the global batch's; and
    `tokens_since_fired` (`before` this step) counts the global batch's `rows`, reset where
    a feature fired on any rank."""
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [fired.float()])  # (params + d_sae,)
    distributed.all_reduce_sum_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g)).div_(here.size)
        offset += g.numel()
    sae.tokens_since_fired.copy_((before + rows).masked_fill_(flat[offset:] > 0, 0))


def reduce_stats(stats: list[dict[str, Any]], here: distributed.World) -> list[dict[str, Any]]:
    """Every SAE's step statistics averaged over the ranks: the global batch's (one small
    all-reduce per step, so the lambda search and the logs see the same values everywhere)."""
    if here.size == 1:
        return stats
    keys = list(stats[0])
    table = torch.stack([torch.stack([torch.as_tensor(s[k]).float() for k in keys]) for s in stats])  # (M, K)
    distributed.all_reduce_sum_(table).div_(here.size)
    return [dict(zip(keys, row.unbind())) for row in table]


def share_member(member: Member) -> None:
    """Give every rank rank 0's weights, buffers and optimizer state of `member` (after a
    change every rank made alike, so that rounding cannot make them drift apart)."""
    if distributed.world().size == 1:
        return
    tensors = list(member.sae.state_dict().values())  # share storage with the parameters
    for p in member.sae.parameters():
        state = member.optimizer.state.get(p, {})
        tensors += [value for _, value in sorted(state.items()) if torch.is_tensor(value)]
    distributed.broadcast_(tensors)
