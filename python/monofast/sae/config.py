"""The SAE stage's options (`monofast sae train`): `SAETrainConfig` and its checks.

`RUNTIME` lists the options that change how a run executes, not what it computes: the
device, `--resume`, CUDA graphs, the compute precision (`compute_dtype`, chosen at run
time like the device: `monofast.common.device`) and the shard checksum checks (`verify`).
Changing one of them neither re-runs a finished stage nor blocks `--resume`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from monofast.common.errors import UserError
from monofast.common.hf import available_memory
from monofast.sae.model import K_VARIANTS, VARIANTS
from monofast.sae.select import RULES


@dataclass
class SAETrainConfig:
    RUNTIME: ClassVar[frozenset[str]] = frozenset({"device", "resume", "cuda_graphs", "compute_dtype", "verify",
                                                      "sparse_step"})
    """Fields that change how a run executes, not what it computes: the manifest and the
    checkpoint's identity ignore them."""

    variant: str = "anthropic2023"
    """anthropic2023 (unit-norm decoder, L1, resampling), april2024 (L1 x decoder norm,
    lambda warm-up, LR decay), topk (k largest pre-activations, AuxK), batchtopk (k x batch
    largest of the whole batch, AuxK, a learned threshold at inference) or matryoshka
    (batchtopk with its loss summed over nested prefixes of the dictionary)."""
    expansion: int = 8
    """Features per activation dimension: d_sae = expansion x d_in (unless d_sae is set)."""
    d_sae: int = 0
    """Number of features; 0 means expansion x d_in."""
    l1_coeff: tuple[float, ...] = (5.0,)
    """L1 coefficient(s); several (1,3,10) train one SAE each on the same batches. Inputs are
    scaled to E|x| = sqrt(d_in), so the April 2024 update's 5 is a sensible start."""
    k: tuple[int, ...] = (32,)
    """topk: features kept per row (batchtopk, matryoshka: per row on average over a batch);
    several train one SAE each."""
    aux_coeff: float = 1 / 32
    """topk, batchtopk, matryoshka: weight of the AuxK loss."""
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
    """Rows at the end of the store kept out of training for the evaluation, as whole contexts
    (at most 10% of the store)."""
    target_l0: float = 0.0
    """When > 0, the L1 variants steer the sweep's lambdas toward this L0 while training
    (`monofast.sae.search`); `--select target_l0` publishes the SAE whose held-out L0 is
    nearest (as does `quality` when CE-loss recovered is not measured)."""
    select: str = "quality"
    """Which SAE of the sweep `sae/` publishes (`monofast.sae.select`): quality (the lowest
    L0 that meets the goal below on every source; else the best, with a warning), target_l0
    or first."""
    goal_ce_recovered: float = 0.85
    """The quality goal: least CE-loss recovered on every source."""
    goal_dead: float = 0.10
    """The quality goal: dead features must be fewer than this fraction."""
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
    """Dtype of the matrix products: auto (bfloat16 on CUDA and bf16-capable CPUs, else the
    parameters' float32), float32, bfloat16, float16 (GPUs only). A runtime choice:
    eval.json records the one used."""
    device: str = "auto"
    """Where to train: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."""
    cuda_graphs: bool = True
    """On CUDA, replay the whole training step as one CUDA graph after a few eager steps
    (anthropic2023 and april2024 in one process; the same arithmetic, far fewer launches)."""
    sparse_step: str = "auto"
    """auto: each SAE takes the sparse form of the step (the same results, computed over the
    firing features only) once its firing density is below the crossover measured on this
    machine (`monofast.sae.crossover`); on: always; off: never (ReLU and TopK variants)."""
    seed: int = 0
    """Seed of the initialisation, the data order and the resampling."""
    verify: bool = True
    """Check every shard's checksum as it is first read (--no-verify skips it, for stores you
    have just verified)."""

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
        if not (self.aux_coeff >= 0 and math.isfinite(self.aux_coeff)):
            raise ValueError(f"aux_coeff is a weight of the AuxK loss, >= 0 (0 turns it off), got {self.aux_coeff}; "
                             f"e.g. --aux-coeff 0.03125")
        if self.resample_every < -1:
            raise ValueError(f"resample_every={self.resample_every}: give a number of steps, 0 (a quarter of "
                             f"the run) or -1 (never)")
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
        if self.select not in RULES:
            raise ValueError(f"select {self.select!r} is unknown; choose one of {', '.join(RULES)}")
        if not (0 <= self.goal_ce_recovered <= 1 and 0 < self.goal_dead <= 1):
            raise ValueError(f"goal_ce_recovered is a fraction in [0, 1] and goal_dead one in (0, 1], got "
                             f"{self.goal_ce_recovered}, {self.goal_dead}")
        if self.sparse_step not in ("auto", "on", "off"):
            raise ValueError(f"sparse_step {self.sparse_step!r} is unknown; choose auto, on or off")
        if self.ce_eval_tokens < 0 or self.checkpoint_every < 0:
            raise ValueError(f"ce_eval_tokens and checkpoint_every must be >= 0 (0 turns them off), got "
                             f"{self.ce_eval_tokens}, {self.checkpoint_every}")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0 (numpy takes only non-negative seeds), e.g. 0")

    def sweep(self) -> list[tuple[str, float, Optional[int]]]:
        """(name, l1 coefficient, k) of every SAE to train."""
        if self.variant in K_VARIANTS:
            return [(f"k{k}", 0.0, k) for k in self.k]
        return [(f"l1_{c:g}", c, None) for c in self.l1_coeff]

    def members(self, d_in: int) -> list[tuple[str, float, Optional[int], int]]:
        """(name, l1 coefficient, k, features) of every SAE to train on inputs of `d_in`:
        the sweep, all of one width (a family of widths overrides this)."""
        d_sae = self.d_sae or self.expansion * d_in
        return [(name, l1, k, d_sae) for name, l1, k in self.sweep()]

    def memory_needed(self, d_in: int) -> int:
        """Bytes that training the sweep on inputs of `d_in` holds at the least: each SAE's
        float32 weights, their gradients and Adam's two moments, and a batch's pre-activations
        and features; the step's temporaries come on top."""
        total = 0
        for _, _, _, d_sae in self.members(d_in):
            params = 2 * d_in * d_sae + d_sae + d_in  # W_enc, W_dec, b_enc, b_dec
            total += 4 * (4 * params + 2 * self.batch_size * d_sae)
        return total

    def check_memory(self, d_in: int, device: Any) -> None:
        """Refuse, before anything is allocated, a sweep that cannot fit in the memory free on
        `device` (a UserError with the numbers); nothing is checked where that is unknown."""
        need, free = self.memory_needed(d_in), available_memory(device)
        if free is None or need <= free:
            return
        widths = "/".join(f"{w:,}" for w in sorted({m[3] for m in self.members(d_in)}))
        raise UserError(f"sae: {len(self.members(d_in))} SAE(s) of {widths} features on inputs of {d_in} need "
                        f"at least {need / 2**30:.1f} GiB (weights, gradients, Adam state and a batch) but {device} "
                        f"has {free / 2**30:.1f} GiB free; lower the width (--expansion or --d-sae; --expansions "
                        f"for the family) or --batch-size, or train fewer SAEs at once")

    def warmup_fraction(self) -> float:
        return self.l1_warmup if self.l1_warmup != -1.0 else (0.05 if self.variant == "april2024" else 0.0)

    def decay_fraction(self) -> float:
        return self.lr_decay if self.lr_decay != -1.0 else (0.2 if self.variant == "april2024" else 0.0)
