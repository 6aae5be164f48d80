"""Stage 4: train sparse autoencoders on the harvested activations (`monofast sae train`).

One pass over the activation store by default, as in the paper. Several SAEs (one per L1
coefficient, or per k for TopK) train side by side on the same batches, so a sweep costs
one read of the data. The last `held_out` rows of the store (whole contexts, never seen in
training) are kept for the evaluation.

Writes into `sae/`:
    sae.safetensors, cfg.json     the selected SAE (nearest to --target-l0, else the first)
                                  (--target-l0 also steers the L1 coefficients: `monofast.sae_search`)
    <name>/...                    every SAE of the sweep (l1_5, k32, ...), same layout
    metrics.jsonl                 training curves, one JSON object per logged step
    eval.json                     held-out MSE, FVU, L0, dead / dense fractions, density histogram,
                                  and CE-loss recovered on held-out tokens (`monofast.sae_eval`)
    checkpoint.pt                 while training only: weights, optimizer and stream state for
                                  --resume; removed once the files above are written

Under torchrun (`monofast.distributed`) each rank streams its own disjoint part of every
epoch of the training rows (the store's rank split) in batches of batch_size / world rows,
so a step's global batch has batch_size rows and the run takes the steps and schedule of a
single process, though its batches hold other rows. One all-reduce per SAE and step
averages the gradients and adds up which features fired (`reduce_step`), so the decoder
constraint and the dead-feature counts see the global batch; resampling runs alike on
every rank and rank 0's result is kept. Rank 0 logs, checkpoints (with every rank's stream
position: resume with as many processes), evaluates and writes the files.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, NamedTuple, Optional

import numpy as np
import torch

from monofast.activations.store import ActivationStore, DeviceFeeder, open_store, read_index
from monofast.common import checkpoint
from monofast.common import config
from monofast.common import distributed
from monofast.common import files
from monofast.sae import evaluate as sae_eval
from monofast.sae import graph as sae_graph
from monofast.sae import search as sae_search
from monofast.common.errors import DataError, UserError
from monofast.common.log import logger, progress
from monofast.sae.model import VARIANTS, SAEConfig, SparseAutoencoder

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 2


@dataclass
class SAETrainConfig:
    RUNTIME: ClassVar[frozenset[str]] = frozenset({"device", "resume", "cuda_graphs"})
    """Fields that change how a run executes, not what it computes: the manifest ignores them."""

    variant: str = "anthropic2023"
    """anthropic2023 (unit-norm decoder, L1, resampling), april2024 (L1 x decoder norm,
    lambda warm-up, LR decay) or topk (k largest pre-activations, AuxK)."""
    expansion: int = 8
    """Features per activation dimension: d_sae = expansion x d_in (unless d_sae is set)."""
    d_sae: int = 0
    """Number of features; 0 means expansion x d_in."""
    l1_coeff: tuple[float, ...] = (5.0,)
    """L1 coefficient(s); several (1,3,10) train one SAE each on the same batches. Inputs are
    scaled to E|x| = sqrt(d_in), so the April 2024 update's 5 is a sensible start."""
    k: tuple[int, ...] = (32,)
    """topk: features kept per row; several train one SAE each."""
    aux_coeff: float = 1 / 32
    """topk: weight of the AuxK loss."""
    batch_size: int = 2048
    """Rows per step (the seed recipe's 2,048)."""
    epochs: int = 1
    """Passes over the training rows (the paper makes one)."""
    lr: float = 1e-3
    """Adam learning rate."""
    l1_warmup: float = -1.0
    """Fraction of the steps over which lambda ramps up from 0; -1: 0.05 for april2024, else 0."""
    lr_decay: float = -1.0
    """Fraction of the steps at the end over which the LR decays linearly to 0; -1: 0.2 for
    april2024, else 0."""
    resample_every: int = 0
    """anthropic2023: resample features dead for this many steps, at every multiple of it
    before the last quarter; 0: a quarter of the run (runs of 100+ steps); -1: never."""
    resample_rows: int = 16_384
    """Rows scored for resampling (inputs are drawn with probability proportional to their
    squared loss)."""
    b_dec_init: str = "geometric_median"
    """Initial decoder bias: geometric_median, mean or zeros (of a sample of the data)."""
    held_out: int = 20_000
    """Rows at the end of the store kept out of training for the evaluation (at most 10%)."""
    target_l0: float = 0.0
    """When > 0, the L1 variants steer the sweep's lambdas toward this L0 while training
    (`monofast.sae_search`), and the SAE whose held-out L0 is nearest (any variant) becomes
    `sae/sae.safetensors`."""
    log_every: int = 25
    """Steps between lines of metrics.jsonl."""
    ce_eval_tokens: int = 65_536
    """Held-out tokens (windows of data/'s validation split) on which CE-loss recovered is
    measured after training; 0 skips it."""
    checkpoint_every: int = 500
    """Steps between checkpoints (sae/checkpoint.pt, for --resume); 0: none."""
    resume: bool = False
    """Continue from sae/checkpoint.pt (a killed run) exactly where it stopped, instead of starting over."""
    compute_dtype: str = "auto"
    """Dtype of the matrix products: auto (bfloat16 on CUDA and bf16-capable CPUs), float32,
    bfloat16, float16."""
    device: str = "auto"
    """Where to train: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."""
    cuda_graphs: bool = True
    """On CUDA, replay the whole training step as one CUDA graph after a few eager steps
    (anthropic2023 and april2024 in one process; the same arithmetic, far fewer launches)."""
    seed: int = 0
    """Seed of the initialisation, the data order and the resampling."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
        if self.expansion < 1 or self.d_sae < 0:
            raise ValueError(f"expansion must be >= 1 and d_sae >= 0 (0: expansion x d_in), got "
                             f"expansion={self.expansion}, d_sae={self.d_sae}")
        if not self.l1_coeff or any(not (c >= 0 and math.isfinite(c)) for c in self.l1_coeff):
            raise ValueError(f"l1_coeff must be one or more finite values >= 0, got {self.l1_coeff}; "
                             f"e.g. --l1-coeff 1,3,10")
        if not self.k or any(k < 1 for k in self.k):
            raise ValueError(f"k must be one or more positive integers, got {self.k}; e.g. --k 16,32")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self.batch_size}, {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("l1_warmup", "lr_decay"):
            value = getattr(self, name)
            if value != -1.0 and not 0 <= value <= 1:
                raise ValueError(f"{name} is a fraction of the run between 0 and 1 (or -1 for the "
                                 f"variant's default), got {value}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec_init {self.b_dec_init!r}: choose geometric_median, mean or zeros")
        if self.held_out < 0 or self.log_every < 1 or self.resample_rows < 1:
            raise ValueError("held_out must be >= 0, log_every and resample_rows >= 1")
        if not self.target_l0 >= 0 or not math.isfinite(self.target_l0):
            raise ValueError(f"target_l0 must be >= 0 (0: no target), got {self.target_l0}")
        if self.ce_eval_tokens < 0 or self.checkpoint_every < 0:
            raise ValueError(f"ce_eval_tokens and checkpoint_every must be >= 0 (0 turns them off), got "
                             f"{self.ce_eval_tokens}, {self.checkpoint_every}")

    def sweep(self) -> list[tuple[str, float, Optional[int]]]:
        """(name, l1 coefficient, k) of every SAE to train."""
        if self.variant == "topk":
            return [(f"k{k}", 0.0, k) for k in self.k]
        return [(f"l1_{c:g}", c, None) for c in self.l1_coeff]

    def warmup_fraction(self) -> float:
        return self.l1_warmup if self.l1_warmup != -1.0 else (0.05 if self.variant == "april2024" else 0.0)

    def decay_fraction(self) -> float:
        return self.lr_decay if self.lr_decay != -1.0 else (0.2 if self.variant == "april2024" else 0.0)


class Member(NamedTuple):
    """One SAE of the sweep with its optimizer and L1 coefficient."""

    name: str
    sae: SparseAutoencoder
    optimizer: torch.optim.Optimizer
    l1_coeff: float


# ---------------------------------------------------------------------------------------
# Data


def split_rows(store: ActivationStore, held_out: int) -> int:
    """The first row of the held-out tail (rows before it train); at most 10% is held out."""
    if store.rows == 0:
        raise DataError(f"the activation store {store.folder} is empty; re-run the harvest")
    return store.rows - min(held_out, store.rows // 10)


class TrainingBatches:
    """Float32 batches of exactly `batch_size` training rows (held-out rows filtered out, the
    remainder carried into the next batch; the last partial batch of the run is dropped).
    `state()` and `restore()` resume at the exact row, carried remainder included."""

    def __init__(self, store: ActivationStore, cfg: SAETrainConfig, cutoff: int,
                 device: torch.device):
        here = distributed.world()
        if here.size == 1:
            self.stream = store.stream(cfg.batch_size, shuffle="exact", seed=cfg.seed, epochs=cfg.epochs,
                                       to_float32=True)
            self.batch_size = cfg.batch_size
        else:
            # This rank's part of each epoch of the training rows only; endless, as the run's
            # steps are counted over all ranks' rows (a rank may start one more epoch by a
            # few rows when the training rows do not split evenly).
            self.batch_size = cfg.batch_size // here.size
            self.stream = store.stream(self.batch_size, shuffle="exact", seed=cfg.seed, epochs=None,
                                       to_float32=True, rank=here.rank, world_size=here.size, rows=cutoff)
        self.cutoff, self.device = cutoff, device
        self.feed = DeviceFeeder(device)  # pinned ring on CUDA, plain .to elsewhere
        self.pending = torch.zeros(0, store.dim)  # (R, d_in) rows read but not yet yielded

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.stream:
            rows = batch.tensor()  # (b, d_in)
            keep = batch.row < self.cutoff
            if not keep.all():
                rows = rows[torch.from_numpy(keep)]
            self.pending = torch.cat([self.pending, rows])  # (R + b', d_in)
            while self.pending.shape[0] >= self.batch_size:
                x, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
                yield self.feed(x)  # (batch_size, d_in)

    def state(self) -> dict[str, Any]:
        """The stream's position and the rows read past it but not yet yielded."""
        return {"stream": self.stream.state(), "pending": self.pending.clone()}

    def restore(self, state: dict[str, Any]) -> None:
        self.stream.restore(state["stream"])
        self.pending = state["pending"]

    def close(self) -> None:
        self.stream.close()


def sample_rows(store: ActivationStore, count: int, below: int,
                rng: np.random.Generator) -> torch.Tensor:
    """`count` random rows from [0, below) as float32 (sorted reads: the store is memory-mapped)."""
    count = min(count, below)
    indices = np.sort(rng.choice(below, size=count, replace=False))
    return store.take(indices, to_float32=True).tensor().clone()


def check_finite(x: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).any(1).nonzero().flatten()[:5].tolist()
        raise DataError(f"{where} contains NaN or Inf (rows {bad} of the batch); the harvested activations are "
                        f"corrupt: check them with `monofast activations verify` and re-run the harvest")


# ---------------------------------------------------------------------------------------
# Training


def build_sweep(cfg: SAETrainConfig, d_in: int, sample: torch.Tensor, steps: int,
                device: torch.device) -> list[Member]:
    d_sae = cfg.d_sae or cfg.expansion * d_in
    dead_tokens = max(cfg.batch_size, min(10_000_000, steps * cfg.batch_size // 4))
    members = []
    for i, (name, l1_coeff, k) in enumerate(cfg.sweep()):
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


MIN_AUTO_RESAMPLE_STEPS = 100
"""Runs shorter than this do not resample unless --resample-every asks: a window of a few
batches cannot tell a dead feature from a rare one."""


def resample_steps(cfg: SAETrainConfig, steps: int) -> list[int]:
    """Steps after which anthropic2023 resamples dead features (none in the last quarter)."""
    if cfg.variant != "anthropic2023" or cfg.resample_every < 0:
        return []
    if cfg.resample_every == 0 and steps < MIN_AUTO_RESAMPLE_STEPS:
        return []
    every = cfg.resample_every or steps // 4
    return [s for s in range(every, int(steps * 0.75) + 1, every)]


@torch.no_grad()
def resample(member: Member, store: ActivationStore, cutoff: int, window_tokens: int,
             cfg: SAETrainConfig, rng: np.random.Generator, device: torch.device) -> int:
    """Anthropic's resampling of the features that did not fire in the last window."""
    sae = member.sae
    dead = (sae.tokens_since_fired >= window_tokens).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    rows = sample_rows(store, max(cfg.resample_rows, dead.numel()), cutoff, rng).to(device)
    sae.eval()
    losses = torch.cat([(sae(chunk).x_hat.float() - chunk).square().sum(1)
                        for chunk in rows.split(cfg.batch_size)])
    sae.train()
    weights = losses.square().double()
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    gen = torch.Generator(device=weights.device).manual_seed(int(rng.integers(2**31)))
    picks = torch.multinomial(weights, dead.numel(), replacement=dead.numel() > rows.shape[0], generator=gen)
    sae.resample(dead, rows[picks], member.optimizer)
    return dead.numel()


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


class TrainState(NamedTuple):
    """Where a run stands: a fresh one at step 0, a resumed one where its checkpoint was made."""

    step: int
    """Training steps done."""
    records: list[dict[str, Any]]
    """Lines of metrics.jsonl written so far."""
    seconds: float
    """Training time so far (for the rows/s of the metrics)."""


def train(cfg: SAETrainConfig, store_dir: str | Path, out: str | Path,
          metadata: Optional[dict[str, Any]] = None, gpt_dir: str | Path | None = None,
          data_dir: str | Path | None = None) -> dict[str, Any]:
    """Train the sweep on the store in `store_dir`, evaluate it, write everything into `out`.

    With `gpt_dir` and `data_dir` (and ce_eval_tokens > 0) the evaluation includes CE-loss
    recovered on held-out tokens of the data's validation split.
    """
    from monofast.common.device import pick_device

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = open_store(store_dir)
    here = distributed.check_divides(cfg.batch_size, "--batch-size")
    device = pick_device(cfg.device)
    cutoff = split_rows(store, cfg.held_out)
    steps = cutoff * cfg.epochs // cfg.batch_size
    if steps < 1:
        raise DataError(f"the store has {cutoff} training rows, fewer than one batch of {cfg.batch_size}; "
                        f"lower --batch-size or harvest more")
    ce = prepare_ce(cfg, store, gpt_dir, data_dir, device) if here.is_main else None  # its errors come early
    rng = np.random.default_rng(cfg.seed)
    sample = sample_rows(store, min(cutoff, 8 * cfg.batch_size), cutoff, rng)
    check_finite(sample, "the activation sample")
    torch.manual_seed(cfg.seed)
    members = build_sweep(cfg, store.dim, sample, steps, device)
    for m in members:
        share_member(m)
    search = lambda_search(cfg, members, steps)
    probe = probe_rows(store, cutoff, rng) if search is not None else None
    logger.info("sae: %d SAE(s) of %d features on %d rows of %d (%d held out), %d steps of %d, on %s%s",
                len(members), members[0].sae.cfg.d_sae, cutoff, store.dim, store.rows - cutoff, steps,
                cfg.batch_size, device, f" and {here.size - 1} more processes" if here.size > 1 else "")
    batches = TrainingBatches(store, cfg, cutoff, device)
    try:
        state = start_state(cfg, out, store, members, batches, rng, search)
        replays = run_steps(cfg, members, batches, store, cutoff, steps, state, rng, out, (search, probe))
    finally:
        batches.close()
    if not here.is_main:
        return distributed.broadcast_object(None)  # rank 0 evaluates and writes

    evaluation = evaluate(members, store, cutoff, cfg.batch_size, device)
    evaluation["training"] = replays  # {"cuda_graph": bool, ...}: how the steps ran
    if search is not None:
        evaluation["lambda_search"] = search.report()
    if ce is not None:
        add_ce(evaluation, ce.run({m.name: m.sae for m in members}))
    files.write_json(out / EVAL_FILE, evaluation)
    save_all(members, out, evaluation, cfg.target_l0, metadata or {})
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # the finished files replace it
    return distributed.broadcast_object(evaluation)


def lambda_search(cfg: SAETrainConfig, members: list[Member], steps: int) -> Optional[sae_search.LambdaSearch]:
    """The lambda search of --target-l0 for the L1 variants (TopK's L0 is its k: none)."""
    if cfg.target_l0 <= 0:
        return None
    sae_search.check_target(cfg.target_l0, members[0].sae.cfg.d_sae)
    if cfg.variant == "topk":
        return None
    return sae_search.LambdaSearch(cfg.target_l0, [m.l1_coeff for m in members], steps)


PROBE_ROWS = 4096
"""Rows on which the lambda search measures L0 at its control points (1-2% noise at L0 ~ 30)."""


def probe_rows(store: ActivationStore, cutoff: int, rng: np.random.Generator) -> torch.Tensor:
    """Rows on which the search measures L0: held-out rows spread over the tail, the rows whose
    L0 the evaluation reports (a sample of training rows when nothing is held out)."""
    if store.rows == cutoff:
        return sample_rows(store, PROBE_ROWS, cutoff, rng)
    picks = np.unique(np.linspace(cutoff, store.rows - 1, min(PROBE_ROWS, store.rows - cutoff)).astype(np.int64))
    return store.take(picks, to_float32=True).tensor().clone()


@torch.no_grad()
def probe_l0(members: list[Member], rows: torch.Tensor, batch_size: int) -> list[float]:
    """Each member's mean L0 on `rows`, through the inference encoder the evaluation uses."""
    result = []
    for m in members:
        device = m.sae.W_enc.device
        fired = sum(float((m.sae.encode(chunk.to(device)) > 0).sum()) for chunk in rows.split(batch_size))
        result.append(fired / rows.shape[0])
    return result


def set_lambdas(members: list[Member], lambdas: list[float]) -> None:
    """Give the members (in place) the lambdas the search chose."""
    for i, lam in enumerate(lambdas):
        members[i] = members[i]._replace(l1_coeff=lam)


def run_steps(cfg: SAETrainConfig, members: list[Member], batches: TrainingBatches,
              store: ActivationStore, cutoff: int, steps: int, state: TrainState,
              rng: np.random.Generator, out: Path,
              search_and_probe: tuple[Optional[sae_search.LambdaSearch], Optional[torch.Tensor]] = (None, None)
              ) -> dict[str, Any]:
    """Train from `state.step` to `steps`, logging metrics and writing checkpoints; with a
    lambda search (and its probe rows), steer the members' lambdas at its control points.
    Returns whether the steps ran as CUDA graph replays (`sae_graph.describe`)."""
    search, probe = search_and_probe
    resample_at = set(resample_steps(cfg, steps))
    window = (cfg.resample_every or max(1, steps // 4)) * cfg.batch_size  # tokens without firing = dead
    records = list(state.records)
    started = time.perf_counter() - state.seconds
    bar: Any = progress(total=steps, initial=state.step, desc="sae", unit="step")
    here = distributed.world()
    graphs = None
    reason = sae_graph.unavailable(cfg.cuda_graphs, cfg.variant, batches.device, here.size)
    if reason is None:
        graphs = sae_graph.GraphedSteps(members, cfg.batch_size, store.dim, batches.device, cfg.aux_coeff)
    with open(out / METRICS_FILE if here.is_main else os.devnull, "a", encoding="utf-8") as log_file:
        for step, x in enumerate(batches, start=state.step):
            if step >= steps:
                break
            lam, lr = schedules(cfg, step, steps)

            def eager(x: torch.Tensor = x, lam: float = lam, lr: float = lr) -> list[dict[str, Any]]:
                return [train_step(m, x, lam, lr, cfg.aux_coeff, here) for m in members]

            stats = reduce_stats(graphs.step(x, lam, lr, eager) if graphs is not None else eager(), here)
            if not all(math.isfinite(float(s["loss"])) for s in stats):
                check_finite(x, f"the batch of step {step}")
                raise UserError(f"the loss became NaN/Inf at step {step} with finite inputs; lower --lr "
                                f"(now {cfg.lr:g}) or use --compute-dtype float32. Nothing was saved.")
            if search is not None and probe is not None and search.due(step + 1):
                l0s = probe_l0(members, probe, cfg.batch_size)  # same weights, same rows on every rank
                # Rank 0's lambdas everywhere: devices may round the probe differently.
                set_lambdas(members, distributed.broadcast_object(search.control(step + 1, l0s)))
                last = search.history[-1]
                logger.info("sae: step %d, lambda search: L0 %s at lambda %s, aiming at %s -> lambda %s", step + 1,
                            *(", ".join(f"{v:.3g}" for v in last[key])
                              for key in ("l0", "l1_coeff", "aimed_l0", "next_l1_coeff")))
            if step + 1 in resample_at:
                for m in members:
                    n = resample(m, store, cutoff, window, cfg, rng, x.device)
                    share_member(m)
                    logger.info("sae %s: resampled %d dead features after step %d", m.name, n, step + 1)
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                record = log_record(members, stats, step + 1, cfg, lam, lr, started)
                records.append(record)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                first = record["saes"][members[0].name]
                bar.set_postfix(mse=f"{first['mse']:.3g}", l0=f"{first['l0']:.1f}",
                                dead=first["dead"], rows_s=f"{record['rows_per_s']:.0f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                done = TrainState(step + 1, records, time.perf_counter() - started)
                save_checkpoint(out, cfg, store, members, batches, rng, done, search=search)
    bar.close()
    return sae_graph.describe(graphs)


# ---------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_identity(cfg: SAETrainConfig, store: ActivationStore) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: every option but the runtime ones, and
    the store it read (its fingerprint and shard checksums: a store written without a
    fingerprint is still told apart)."""
    shards = [shard.get("checksum") for shard in store.index.shards]
    digest = files.hash_bytes(json.dumps([store.index.fingerprint, store.rows, shards]).encode())
    return {**config.identity(cfg), "activation_store": digest}


def save_checkpoint(out: Path, cfg: SAETrainConfig, store: ActivationStore, members: list[Member],
                    batches: TrainingBatches, rng: np.random.Generator, state: TrainState,
                    search: Optional[sae_search.LambdaSearch] = None) -> None:
    """Every SAE's weights and optimizer state, the step, the stream's position, the random
    state and the lambda search's, in one atomically written file. Under torchrun every
    rank calls it; rank 0 writes, with each rank's stream position."""
    here = distributed.world()
    positions = distributed.all_gather_object(batches.state()) if here.size > 1 else None
    if not here.is_main:
        return
    payload = {
        "format": CHECKPOINT_FORMAT,
        "identity": checkpoint_identity(cfg, store),
        "step": state.step,
        "records": state.records,
        "seconds": state.seconds,
        "members": {m.name: {"sae": {k: v.detach().cpu() for k, v in m.sae.state_dict().items()},
                             "optimizer": m.optimizer.state_dict()} for m in members},
        "batches": batches.state(),
        "rng": json.dumps(rng.bit_generator.state),  # JSON: PCG64's state holds 128-bit integers
        "search": search.state() if search is not None else None,
    }
    if positions is not None:
        payload.update(batches=positions, world_size=here.size)
    checkpoint.save(out / CHECKPOINT_FILE, payload)


def load_checkpoint(out: Path, cfg: SAETrainConfig, store: ActivationStore, members: list[Member],
                    batches: TrainingBatches, rng: np.random.Generator,
                    search: Optional[sae_search.LambdaSearch] = None) -> TrainState:
    """Restore a checkpoint made with the same options on the same store; refuse any other."""
    payload = checkpoint.load(out / CHECKPOINT_FILE, CHECKPOINT_FORMAT, "identity", checkpoint_identity(cfg, store))
    here, made_by = distributed.world(), int(payload.get("world_size", 1))
    if made_by != here.size:
        raise UserError(f"{out / CHECKPOINT_FILE} was made by {made_by} process(es) and this run has {here.size}; "
                        f"resume with torchrun --nproc_per_node {made_by} (in all), or drop --resume to start over")
    for m in members:
        m.sae.load_state_dict(payload["members"][m.name]["sae"])
        m.optimizer.load_state_dict(payload["members"][m.name]["optimizer"])
    batches.restore(payload["batches"] if here.size == 1 else payload["batches"][here.rank])
    rng.bit_generator.state = json.loads(payload["rng"])
    if search is not None:
        search.restore(payload["search"])
        set_lambdas(members, search.lambdas)
    return TrainState(int(payload["step"]), list(payload["records"]), float(payload["seconds"]))


def start_state(cfg: SAETrainConfig, out: Path, store: ActivationStore, members: list[Member],
                batches: TrainingBatches, rng: np.random.Generator,
                search: Optional[sae_search.LambdaSearch] = None) -> TrainState:
    """The checkpoint's state under --resume, else step 0 with any stale checkpoint removed;
    metrics.jsonl is rewritten to hold exactly the lines up to that step."""
    path = out / CHECKPOINT_FILE
    main = distributed.is_main()
    if cfg.resume and distributed.broadcast_object(path.is_file()):
        state = load_checkpoint(out, cfg, store, members, batches, rng, search)
        logger.info("sae: resuming from %s at step %d", path, state.step)
    else:
        if cfg.resume:
            logger.warning("sae: --resume given but %s does not exist; starting from step 0", path)
        if main:
            path.unlink(missing_ok=True)
        state = TrainState(0, [], 0.0)
    if main:
        files.write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in state.records))
    return state


# ---------------------------------------------------------------------------------------
# CE-loss recovered


def prepare_ce(cfg: SAETrainConfig, store: ActivationStore, gpt_dir: str | Path | None,
               data_dir: str | Path | None, device: torch.device) -> Optional[sae_eval.CEEvaluation]:
    """The GPT and held-out tokens for CE-loss recovered, or None when it is not measured."""
    if cfg.ce_eval_tokens == 0 or gpt_dir is None or data_dir is None:
        return None
    layer = store.index.extra.get("gpt", {}).get("layer")
    if layer is None:
        raise DataError(f"the activation store {store.folder} does not record the GPT layer it was harvested "
                        f"from; re-run the harvest, or set --ce-eval-tokens 0")
    length = store.index.extra.get("contexts", {}).get("length")  # the contexts the SAE's rows came from
    return sae_eval.prepare(gpt_dir, data_dir, int(layer), store.dim, cfg.ce_eval_tokens, device, length)


def add_ce(evaluation: dict[str, Any], result: sae_eval.CEResult) -> None:
    """Put CE-loss recovered into eval.json: the shared losses at the top, each SAE's in its entry."""
    evaluation.update(sae_eval.summary(result))
    for name in result.spliced:
        evaluation["saes"].setdefault(name, {}).update(sae_eval.per_sae(result, name))


def log_record(members: list[Member], stats: list[dict[str, Any]], step: int, cfg: SAETrainConfig,
               lam: float, lr: float, started: float) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    saes = {}
    for m, s in zip(members, stats):
        saes[m.name] = {key: round(float(value), 6) for key, value in s.items()}
        saes[m.name]["dead"] = int(m.sae.dead_mask().sum())
        saes[m.name]["l1_coeff"] = m.l1_coeff
    return {"step": step, "rows": step * cfg.batch_size, "seconds": round(seconds, 3),
            "rows_per_s": round(step * cfg.batch_size / max(seconds, 1e-9), 1),
            "lr": lr, "l1_scale": lam, "saes": saes}


# ---------------------------------------------------------------------------------------
# Evaluation and files


@torch.no_grad()
def evaluate(members: list[Member], store: ActivationStore, cutoff: int, batch_size: int,
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
            "k": m.sae.cfg.top_k,
            "mse": t["sq_err"] / rows,
            "fvu": t["sq_err"] / variance if variance > 0 else float("nan"),
            "l0": t["l0"] / rows,
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > 0.1).double().mean()),
            "log10_density_histogram": {"edges": edges, "counts": [int(c) for c in counts]},
        }
    return result


def choose(evaluation: dict[str, Any], names: list[str], target_l0: float) -> str:
    """The SAE to publish: held-out L0 nearest the target, else the first of the sweep."""
    if target_l0 > 0 and evaluation["saes"]:
        return min(names, key=lambda n: abs(evaluation["saes"][n]["l0"] - target_l0))
    return names[0]


def save_all(members: list[Member], out: Path, evaluation: dict[str, Any], target_l0: float,
             metadata: dict[str, Any]) -> None:
    chosen = choose(evaluation, [m.name for m in members], target_l0)
    for m in members:
        m.sae.save(out / m.name, **metadata, sweep_member=m.name)
        if m.name == chosen:
            m.sae.save(out, **metadata, sweep_member=m.name)
    logger.info("sae: published %s (%s)", chosen,
                ", ".join(f"{k}={v:.4g}" for k, v in evaluation["saes"].get(chosen, {}).items()
                          if isinstance(v, float)))


def run_stage(cfg: SAETrainConfig, run: Any) -> None:
    """Pipeline entry point: fill `sae/` from `activations/`, measuring CE-loss recovered with
    the GPT of `gpt/` on the validation split of `data/`."""
    store_dir = run.require("activations")
    gpt_dir = run.require("gpt")
    extra = read_index(store_dir).extra
    gpt_info = extra.get("gpt", {})
    layer = gpt_info.get("layer")
    metadata = {
        "model_name": "monofast-gpt",
        "hook_name": f"blocks.{layer}.mlp.hook_post" if layer is not None else None,
        "hook_layer": layer,
        "context_size": extra.get("context_length"),
    }
    data_dir = run.require("data") if cfg.ce_eval_tokens else None
    train(cfg, store_dir, run.stage("sae"), metadata, gpt_dir=gpt_dir, data_dir=data_dir)
