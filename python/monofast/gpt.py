"""Stage 2: train the tiny GPT (`monofast gpt train`) and sample from it (`monofast gpt sample`).

Reads `data/` (through `monofast.data.load_meta` / `load_split`) and writes `gpt/`:

- `model.safetensors`, `config.json`: the weights and their `GPTConfig` (`load_model` reads them)
- `metrics.jsonl`: one line per evaluation: step, learning rate, train loss, validation
  loss overall and per source (Python vs Shakespeare), tokens/s
- `samples.txt`: a few samples from each of the configured prompts
- `checkpoint.pt`: weights, optimizer state, step and metrics so far, for `--resume`

Every random choice of a training step (its batch windows and its dropout masks) is keyed
on (seed, step) rather than drawn from a stream, so a run resumed from a checkpoint takes
exactly the steps the uninterrupted run would have taken.

Under torchrun (`monofast.distributed`) the model is wrapped in DistributedDataParallel:
every rank draws the same global batch of `batch_size` windows and trains on its own
`batch_size / world` consecutive rows of it, so the global batch, the schedule and the
checkpoints are those of a single process (a run may resume with another number of
processes). Evaluation is split over the ranks; rank 0 writes every file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from monofast import checkpoint, data, distributed, files
from monofast.errors import DataError, UserError
from monofast.log import logger, progress
from monofast.model import GPT, GPTConfig

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.txt"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
LOG_EVERY = 10
"""Steps between progress-bar refreshes: each one reads the loss back from the device,
which on a GPU is a synchronisation point, so it is not done every step."""


@dataclass
class GPTTrainConfig:
    """Options of the GPT stage. The defaults are the seed laptop recipe."""

    # Options that change how a run executes or what it writes after training, not which
    # steps it takes: a run may resume with other values of these (the manifest ignores them).
    RUNTIME: ClassVar[frozenset[str]] = frozenset({
        "device", "dtype", "compile", "resume", "eval_batches", "sample_prompts",
        "sample_tokens", "num_samples", "temperature", "top_k"})

    n_layer: int = 2
    """Number of transformer blocks."""
    n_head: int = 2
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 192
    """Width of the residual stream; the hooked MLP activation is 4x as wide."""
    block_size: int = 256
    """Context length in tokens, for training windows and the position embedding."""
    dropout: float = 0.2
    """Dropout probability during training (0 for none)."""
    bias: bool = False
    """Biases in the Linear and LayerNorm layers."""
    batch_size: int = 24
    """Training windows per step."""
    max_iters: int = 7500
    """Optimizer steps; the cosine schedule decays over exactly this many."""
    learning_rate: float = 1e-3
    """Peak learning rate, reached after the warm-up."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_iters: int = 100
    """Steps of linear warm-up from 0 to learning_rate."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to weight matrices and embeddings only (not to biases or norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2 (0.99 rather than 0.999 suits small models and small batches)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 turns clipping off)."""
    eval_interval: int = 250
    """Evaluate on the validation split, write metrics and save a checkpoint every this many
    steps (and at the end)."""
    eval_batches: int = 20
    """Validation batches per evaluation (each of batch_size windows, spread evenly over the
    split)."""
    device: str = "auto"
    """Device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """Autocast precision: auto (bfloat16 where it is faster), float32, bfloat16 or float16
    (CUDA/MPS only)."""
    compile: str = "auto"
    """torch.compile the model: auto (on CUDA only, and in one process with CUDA graphs,
    torch.compile's reduce-overhead mode: the small models here are launch-bound there; on
    CPU compiling measured 0.9-1.1x eager after 10-40 s), true (the default mode, any
    device) or false."""
    resume: bool = False
    """Continue from gpt/checkpoint.pt (a killed run) on the same schedule instead of starting over."""
    seed: int = 1337
    """Seed of the initial weights, the training windows, dropout and the samples."""
    sample_prompts: tuple[str, ...] = field(default=("def run", "ROMEO:"), metadata={"metavar": "PROMPT,..."})
    """Prompts for samples.txt, comma-separated: by default one Python and one Shakespeare prompt."""
    sample_tokens: int = 200
    """Tokens generated per sample in samples.txt (0 writes no samples)."""
    num_samples: int = 2
    """Samples per prompt in samples.txt."""
    temperature: float = 0.8
    """Sampling temperature for samples.txt (0 is greedy)."""
    top_k: int = 50
    """Sample only among the k likeliest tokens (0 for no limit)."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
                     "eval_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"choose --n-embd a multiple of --n-head (e.g. --n-embd "
                             f"{self.n_head * max(1, round(self.n_embd / self.n_head))})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1), e.g. 0.0 or 0.2")
        if not 0.0 < self.learning_rate:
            raise ValueError(f"learning_rate={self.learning_rate} must be positive, e.g. 1e-3")
        if not 0.0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} must be in [0, learning_rate={self.learning_rate}]")
        if not 0 <= self.warmup_iters < self.max_iters:
            raise ValueError(f"warmup_iters={self.warmup_iters} must be in [0, max_iters={self.max_iters}); "
                             f"lower --warmup-iters or raise --max-iters")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1={self.beta1} and beta2={self.beta2} must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be non-negative (0 turns them off)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {', '.join(DTYPES)}")
        self.compile = str(self.compile).lower()
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile={self.compile!r}; choose auto, true or false")
        _parse_device(self.device)
        if self.sample_tokens < 0 or self.num_samples < 0 or self.top_k < 0 or self.temperature < 0:
            raise ValueError("sample_tokens, num_samples, top_k and temperature must be non-negative")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias)


RUNTIME_FIELDS = GPTTrainConfig.RUNTIME


# ---------------------------------------------------------------------------------------
# Device and precision

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name!r}: monofast trains on cpu, cuda or mps")
    return device


def pick_device(name: str = "auto") -> torch.device:
    """`auto` prefers CUDA, then Apple MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return distributed.local_device(torch.device("cuda"))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = _parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device auto or cpu")
    return distributed.local_device(device)


def _cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX-512 BF16 or AMX); without it bf16 is emulated and slow."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast precision. `auto`: bf16 on CUDA GPUs that have it, and on CPUs with native
    bf16 (a whole training step 1.6-2.0x faster than fp32 at the quick and laptop shapes on a
    2-core AVX-512 BF16 CPU, benches/bench_gpt.py); fp32 elsewhere, MPS included (bf16 there is not measured here)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and _cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    dtype = DTYPES[name]
    assert dtype is not None  # "auto" returned above
    if dtype is torch.float16 and device.type == "cpu":
        raise UserError("--dtype float16 is very slow on CPUs; use bfloat16 or float32 there")
    return dtype


MATMUL_PRECISION = {"cuda": "high", "cpu": "medium"}
"""fp32 matrix-product precision while training. CUDA "high": TF32 tensor cores (10-bit
mantissa products, fp32 accumulation), as nanoGPT. CPU "medium": oneDNN may split fp32 into
bf16 pieces; measured at 7.7e-7 relative error against float64 (3.9e-7 at "highest") and
1.1-1.2x the fp32 product rate on a 2-core AVX-512 BF16 CPU. MPS keeps the default."""


@contextlib.contextmanager
def matmul_precision(device: torch.device) -> Iterator[None]:
    """Set `MATMUL_PRECISION` for the device within the block, restoring the caller's after."""
    before = torch.get_float32_matmul_precision()
    if device.type in MATMUL_PRECISION:
        torch.set_float32_matmul_precision(MATMUL_PRECISION[device.type])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# ---------------------------------------------------------------------------------------
# Data

def check_data(cfg: GPTTrainConfig, meta: dict[str, Any], train: data.Split, val: data.Split) -> None:
    """Refuse, naming the fix, when the data cannot feed this config."""
    for name, split in (("train", train), ("val", val)):
        if len(split.tokens) < cfg.block_size + 1:
            raise DataError(f"the {name} split has {len(split.tokens)} tokens, fewer than block_size + 1 "
                            f"= {cfg.block_size + 1}; lower --block-size or give the data stage more "
                            f"text (--chars-per-source)")
    if meta["vocab_size"] < 2:
        raise DataError(f"the tokenizer has {meta['vocab_size']} tokens; re-run `monofast data --force`")


def get_batch(split: data.Split, step: int, cfg: GPTTrainConfig, device: torch.device,
              rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s random training windows: inputs and next-token targets, (B, T) each;
    `rows` of them only (a rank's share of the global batch)."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(split.tokens) - cfg.block_size, size=cfg.batch_size)[rows]  # (B,)
    window = starts[:, None] + np.arange(cfg.block_size + 1)  # (B, T + 1)
    chunk = torch.from_numpy(split.tokens[window].astype(np.int64))  # (B, T + 1)
    if device.type == "cuda":
        chunk = chunk.pin_memory().to(device, non_blocking=True)
    else:
        chunk = chunk.to(device)
    return chunk[:, :-1], chunk[:, 1:]


class EvalResult(NamedTuple):
    """Mean next-token loss on the validation windows."""

    loss: float
    """Over every target token."""
    by_source: dict[str, float]
    """Per source name, over the target tokens that source produced."""
    tokens: dict[str, int]
    """Target tokens counted per source."""


def rank_rows(batch_size: int, here: distributed.World) -> slice:
    """This rank's rows of a global batch: `batch_size / world` consecutive ones."""
    share = batch_size // here.size
    return slice(here.rank * share, (here.rank + 1) * share) if here.size > 1 else slice(None)


def eval_starts(n_tokens: int, cfg: GPTTrainConfig) -> np.ndarray:
    """Window starts spread evenly over the split: fixed from one evaluation to the next,
    and every source represented in proportion to its share of the split."""
    count = cfg.eval_batches * cfg.batch_size
    return np.unique(np.linspace(0, n_tokens - cfg.block_size - 1, count).astype(np.int64))


@torch.no_grad()
def evaluate(model: GPT, split: data.Split, source_names: list[str], cfg: GPTTrainConfig,
             device: torch.device, dtype: torch.dtype) -> EvalResult:
    """Validation loss overall and per source, from the per-token source labels. Under
    torchrun each rank evaluates every world-th batch and the sums are added up."""
    was_training = model.training
    model.eval()
    n = len(source_names)
    sums, counts = np.zeros(n), np.zeros(n)  # (S,) float64 on the host (MPS has no float64)
    starts = eval_starts(len(split.tokens), cfg)
    here = distributed.world()
    for i in range(here.rank * cfg.batch_size, len(starts), here.size * cfg.batch_size):
        window = starts[i:i + cfg.batch_size, None] + np.arange(cfg.block_size + 1)  # (b, T + 1)
        chunk = torch.from_numpy(split.tokens[window].astype(np.int64)).to(device)  # (b, T + 1)
        with autocast(device, dtype):
            logits = model(chunk[:, :-1]).logits  # (b, T, V)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(),
                                 reduction="none")  # (b * T,)
        src = split.sources[window][:, 1:].ravel()  # (b * T,) source of each target token
        sums += np.bincount(src, weights=losses.cpu().double().numpy(), minlength=n)[:n]
        counts += np.bincount(src, minlength=n)[:n]
    if here.size > 1:
        both = distributed.all_reduce_sum_(torch.from_numpy(np.concatenate([sums, counts])))  # (2S,)
        sums, counts = both[:n].numpy(), both[n:].numpy()
    model.train(was_training)
    by_source = {name: float(sums[s] / counts[s]) for s, name in enumerate(source_names) if counts[s]}
    return EvalResult(float(sums.sum() / max(counts.sum(), 1.0)), by_source,
                      {name: int(counts[s]) for s, name in enumerate(source_names)})


# ---------------------------------------------------------------------------------------
# Optimisation

def lr_at(step: int, cfg: GPTTrainConfig) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    progress_ = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: GPT, cfg: GPTTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only; the fused kernel where the
    device has one (one kernel for every parameter instead of a loop of small ones)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": cfg.learning_rate, "betas": (cfg.beta1, cfg.beta2)}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused AdamW for this device or torch version
        return torch.optim.AdamW(groups, **kwargs)


def step_seed(cfg: GPTTrainConfig, step: int, rank: int = 0) -> int:
    """Seed of the global torch generator (dropout masks) for training step `step` on
    `rank` (each rank's rows get their own masks)."""
    if rank == 0:
        return cfg.seed * 1_000_003 + step
    return int(np.random.SeedSequence([cfg.seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


COMPILE_CHOICES = ("auto", "true", "false")


def use_compile(choice: str, device: torch.device) -> bool:
    """Whether `--compile choice` compiles on `device` (auto: on CUDA)."""
    return choice == "true" or (choice == "auto" and device.type == "cuda")


class Trainer:
    """The model, its optimizer and the step function, on one device (under torchrun, one
    rank's: `forward` is then the DistributedDataParallel wrapper, which averages the
    gradients over the ranks during `backward`)."""

    def __init__(self, cfg: GPTTrainConfig, vocab_size: int, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.world = distributed.world()
        torch.manual_seed(cfg.seed)
        self.model = GPT(cfg.model_config(vocab_size)).to(device)
        self.optimizer = make_optimizer(self.model, cfg)
        # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        forward: Any = self.model  # the model, or under torchrun its DistributedDataParallel wrapper
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.eager_forward = forward
        self.compile_pending = use_compile(cfg.compile, device)
        """True until the first compiled step has run (auto falls back to eager if it fails)."""
        self.forward = forward
        if self.compile_pending:
            graphs = cfg.compile == "auto" and self.world.size == 1
            self.forward = torch.compile(forward, mode="reduce-overhead" if graphs else None)

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step at schedule position `step`; returns the (detached) loss."""
        cfg = self.cfg
        if cfg.dropout > 0:
            torch.manual_seed(step_seed(cfg, step, self.world.rank))  # dropout masks keyed on the step
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss = self._forward_backward(step, x, y)
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # A copy: with CUDA graphs the output's memory is rewritten by the next step.
        return loss.detach().clone()

    def _forward_backward(self, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward; the loss. The first compiled step is where torch.compile
        builds the forward, the backward (at the first `.backward()`) and, with CUDA graphs,
        records them: under `--compile auto` a failure anywhere in it trains eagerly instead."""
        if not self.compile_pending:
            return self._forward_loss_backward(x, y)
        try:
            loss = self._forward_loss_backward(x, y)
        except Exception as err:  # the compiler failed on this machine
            if self.cfg.compile == "true":
                raise
            logger.warning("gpt: torch.compile failed (%s: %s); training without it (--compile false "
                           "skips the attempt)", type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            self.optimizer.zero_grad(set_to_none=True)  # whatever a half-done backward left
            self.forward = self.eager_forward
            if self.cfg.dropout > 0:
                torch.manual_seed(step_seed(self.cfg, step, self.world.rank))  # the same masks
            loss = self._forward_loss_backward(x, y)
        self.compile_pending = False
        return loss

    def _forward_loss_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            loss = self.forward(x, y).loss
        self.scaler.scale(loss).backward()
        return loss


# ---------------------------------------------------------------------------------------
# Files: model, checkpoint, metrics

def save_model(folder: Path, model: GPT) -> None:
    """`model.safetensors` (the tied unembedding stored once) and `config.json`, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    metadata = {"format": "pt", "config": json.dumps(asdict(model.config))}  # self-describing
    files.write_bytes(folder / MODEL_FILE, files.canonical_safetensors(save(state, metadata=metadata)))
    files.write_json(folder / CONFIG_FILE, asdict(model.config))


def _model_folder(folder: Path) -> Path:
    if not (folder / CONFIG_FILE).is_file() and (folder / "gpt" / CONFIG_FILE).is_file():
        return folder / "gpt"
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The trained GPT in eval mode, from a gpt stage folder (or a run directory holding one).

    Missing files are a `UserError` saying which stage to run; unreadable or mismatched
    ones a `DataError` naming the file.
    """
    folder = _model_folder(Path(folder))
    config_path, weights_path = folder / CONFIG_FILE, folder / MODEL_FILE
    run_root = folder.parent if folder.name == "gpt" else folder
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"no trained model: {path} is missing; run `monofast gpt train "
                            f"--run {run_root}` first")
    raw = files.read_json(config_path, "model config")
    try:
        cfg = GPTConfig(**raw)
    except (TypeError, ValueError) as err:
        raise DataError(f"{config_path} is not a valid GPTConfig ({err}); "
                        f"re-run `monofast gpt train --force`") from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{weights_path} is unreadable ({err}); "
                        f"re-run `monofast gpt train --force`") from None
    model = GPT(cfg)
    if "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(f"{weights_path} does not match {config_path}: {str(err).splitlines()[0]} "
                        f"...; re-run `monofast gpt train --force`") from None
    return model.to(device).eval()


class TrainState(NamedTuple):
    """Where a run stands: steps done and the metrics logged so far."""

    step: int
    metrics: list[dict[str, Any]]


def _schedule_dict(cfg: GPTTrainConfig) -> dict[str, Any]:
    from monofast import config

    return {k: v for k, v in config.to_dict(cfg).items() if k not in RUNTIME_FIELDS}


def save_checkpoint(folder: Path, trainer: Trainer, state: TrainState) -> None:
    """Weights, optimizer state, step and metrics in one atomically written file."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "config": _schedule_dict(trainer.cfg),
        "model": {k: v.detach().to("cpu") for k, v in trainer.model.state_dict().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "metrics": state.metrics,
    }
    checkpoint.save(folder / CHECKPOINT_FILE, payload)


def load_checkpoint(folder: Path, trainer: Trainer) -> TrainState:
    """Restore a checkpoint made with the same schedule; refuse one from other options."""
    payload = checkpoint.load(folder / CHECKPOINT_FILE, CHECKPOINT_FORMAT, "config", _schedule_dict(trainer.cfg))
    trainer.model.load_state_dict(payload["model"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    trainer.scaler.load_state_dict(payload["scaler"])
    return TrainState(int(payload["step"]), list(payload["metrics"]))


def write_metrics(folder: Path, metrics: list[dict[str, Any]]) -> None:
    files.write_text(folder / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics))


# ---------------------------------------------------------------------------------------
# The training loop

class TrainResult(NamedTuple):
    """What `train` returns."""

    model: GPT
    """The trained model (eval mode)."""
    metrics: list[dict[str, Any]]
    """Every evaluation, as written to metrics.jsonl."""
    seconds: float
    """Wall time of this call (a resumed run counts only its own part)."""


def _is_eval_step(step: int, cfg: GPTTrainConfig) -> bool:
    return step % cfg.eval_interval == 0 or step == cfg.max_iters


def _log_eval(bar: Any, record: dict[str, Any]) -> None:
    per_source = ", ".join(f"{k} {v:.3f}" for k, v in record["val_loss_by_source"].items())
    message = (f"gpt: step {record['step']}: train {record['train_loss']:.3f}, "
               f"val {record['val_loss']:.3f} ({per_source}), {record['tokens_per_s']:.0f} tok/s")
    with bar.external_write_mode(file=sys.stderr):
        logger.info(message)


def train(cfg: GPTTrainConfig, data_dir: str | Path, out: str | Path) -> TrainResult:
    """Train on `data_dir`'s splits, writing model, metrics and checkpoints into `out`."""
    data_dir, out = Path(data_dir), Path(out)
    meta = data.load_meta(data_dir)
    train_split = data.load_split(data_dir, "train", meta)
    val_split = data.load_split(data_dir, "val", meta)
    check_data(cfg, meta, train_split, val_split)
    sources = [s["name"] for s in sorted(meta["sources"], key=lambda s: s["id"])]
    here = distributed.check_divides(cfg.batch_size, "--batch-size")
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with matmul_precision(device):
        trainer = Trainer(cfg, meta["vocab_size"], device, dtype)
        state = _start_state(cfg, out, trainer)
        logger.info("gpt: %.2fM parameters, %s, %s autocast, steps %d..%d of batch %d x %d%s",
                    trainer.model.num_params() / 1e6, device, str(dtype).removeprefix("torch."),
                    state.step, cfg.max_iters, cfg.batch_size, cfg.block_size,
                    f" over {here.size} processes" if here.size > 1 else "")
        state = _train_loop(trainer, state, train_split, val_split, sources, out)
    trainer.model.eval()
    distributed.barrier()  # rank 0's files are written when any rank returns
    return TrainResult(trainer.model, state.metrics, time.perf_counter() - started)


def _start_state(cfg: GPTTrainConfig, out: Path, trainer: Trainer) -> TrainState:
    """The checkpoint's state under --resume, else step 0 with the stale outputs removed
    (the pipeline hashes every file in the folder, so none may outlive the run it came from)."""
    stale = [SAMPLES_FILE]
    if cfg.resume and distributed.broadcast_object((out / CHECKPOINT_FILE).is_file()):
        state = load_checkpoint(out, trainer)
        logger.info("gpt: resuming from %s at step %d", out / CHECKPOINT_FILE, state.step)
    else:
        if cfg.resume:
            logger.warning("gpt: --resume given but %s does not exist; starting from step 0",
                           out / CHECKPOINT_FILE)
        state = TrainState(0, [])
        stale += [CHECKPOINT_FILE, MODEL_FILE, CONFIG_FILE, METRICS_FILE]
    distributed.barrier()  # every rank has read the checkpoint before rank 0 removes anything
    if trainer.world.is_main:
        for name in stale:
            (out / name).unlink(missing_ok=True)
    return state


class _Window:
    """Training-loss and throughput accounting between two evaluations."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
        self.steps, self.tokens, self.seconds = 0, 0, 0.0

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss_sum += loss
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def mean_loss(self) -> float:
        return self.loss_sum.item() / max(self.steps, 1)  # a device sync

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _train_loop(trainer: Trainer, state: TrainState, train_split: data.Split, val_split: data.Split,
                sources: list[str], out: Path) -> TrainState:
    cfg = trainer.cfg
    step, metrics = state
    window = _Window(trainer.device)
    shown: dict[str, str] = {}
    bar: Any = progress(total=cfg.max_iters, initial=step, desc="gpt", unit="step")  # a tqdm
    rows = rank_rows(cfg.batch_size, trainer.world)
    try:
        while step < cfg.max_iters:
            tick = time.perf_counter()
            x, y = get_batch(train_split, step, cfg, trainer.device, rows)
            window.add(trainer.step(step, x, y), x.numel() * trainer.world.size)
            step += 1
            if step % LOG_EVERY == 0:
                shown["loss"] = f"{window.mean_loss():.3f}"  # a device sync, timed with the step
            window.seconds += time.perf_counter() - tick
            shown["tok/s"] = f"{window.tokens_per_s():.0f}"
            bar.update(1)
            if _is_eval_step(step, cfg):
                record = _evaluate_and_save(trainer, step, window, val_split, sources, out, metrics)
                metrics = metrics + [record]
                shown["val"] = f"{record['val_loss']:.3f}"
                _log_eval(bar, record)
                window = _Window(trainer.device)
            if step % LOG_EVERY == 0:
                bar.set_postfix(shown, refresh=False)
    finally:
        bar.close()
    if trainer.world.is_main:
        save_model(out, trainer.model)  # also after a resume that had nothing left to do
        write_metrics(out, metrics)
    return TrainState(step, metrics)


def _evaluate_and_save(trainer: Trainer, step: int, window: _Window, val_split: data.Split,
                       sources: list[str], out: Path, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Evaluate, then write the model, the metrics so far and a checkpoint (rank 0; the
    training loss is the mean over the ranks, the throughput rank 0's measure of all of them)."""
    cfg = trainer.cfg
    result = evaluate(trainer.model, val_split, sources, cfg, trainer.device, trainer.dtype)
    train_loss, = distributed.mean([window.mean_loss()])
    record = {"step": step, "lr": lr_at(step - 1, cfg), "train_loss": train_loss,
              "val_loss": result.loss, "val_loss_by_source": result.by_source,
              "tokens_per_s": window.tokens_per_s()}
    if trainer.world.is_main:
        save_model(out, trainer.model)
        write_metrics(out, metrics + [record])
        save_checkpoint(out, trainer, TrainState(step, metrics + [record]))
    return record


# ---------------------------------------------------------------------------------------
# Sampling

def sample(model: GPT, tok: Any, prompt: str, tokens: int, temperature: float = 0.8,
           top_k: Optional[int] = 50, seed: int = 1337, device: str | torch.device = "cpu") -> str:
    """One sample continuing `prompt`, cut at the first end-of-text; the same seed gives the
    same text. An empty prompt starts a new document."""
    from monofast.tokenizer import EOT

    eot = tok.token_to_id(EOT)
    ids = tok.encode(prompt, add_special_tokens=False).ids or [eot]
    if tok.get_vocab_size() != model.config.vocab_size:
        raise DataError(f"the tokenizer has {tok.get_vocab_size()} tokens but the model "
                        f"{model.config.vocab_size}; the model was trained on other data: "
                        f"re-run `monofast gpt train --force`")
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k or None,
                         generator=generator)[0, len(ids):].tolist()
    if eot in out:
        out = out[:out.index(eot)]
    return prompt + tok.decode(out, skip_special_tokens=True)


def write_samples(out: Path, model: GPT, tok: Any, cfg: GPTTrainConfig, device: torch.device) -> None:
    """samples.txt: `num_samples` samples from each prompt, with the settings that made them."""
    parts = []
    for prompt in cfg.sample_prompts:
        for i in range(cfg.num_samples):
            text = sample(model, tok, prompt, cfg.sample_tokens, cfg.temperature, cfg.top_k,
                          seed=cfg.seed + i, device=device)
            parts.append(f"=== prompt {prompt!r}, sample {i + 1} of {cfg.num_samples}: "
                         f"{cfg.sample_tokens} tokens, temperature {cfg.temperature}, top-k "
                         f"{cfg.top_k or 'off'}, seed {cfg.seed + i} ===\n{text}\n\n")
    files.write_text(out / SAMPLES_FILE, "".join(parts))


# ---------------------------------------------------------------------------------------
# Entry points

def run_stage(cfg: GPTTrainConfig, run: Any) -> None:
    """Pipeline entry point: train `gpt/` from `data/` inside the run directory."""
    from monofast import tokenizer

    data_dir = run.require("data")
    out = run.stage("gpt")
    result = train(cfg, data_dir, out)
    last = result.metrics[-1]
    by_source = ", ".join(f"{k} {v:.3f}" for k, v in last["val_loss_by_source"].items())
    logger.info("gpt: %d steps in %.1f s; val loss %.3f (%s)", last["step"], result.seconds,
                last["val_loss"], by_source)
    if cfg.sample_tokens and cfg.num_samples and cfg.sample_prompts and distributed.is_main():
        started = time.perf_counter()
        device = next(result.model.parameters()).device
        write_samples(out, result.model, tokenizer.load(data_dir), cfg, device)
        logger.info("gpt: wrote %s in %.1f s", out / SAMPLES_FILE, time.perf_counter() - started)


class SampleCommand:
    """`monofast gpt sample`: continue a prompt with the trained model."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from monofast import presets

        parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                            help="text to continue (repeatable; default: 'def run')")
        parser.add_argument("--tokens", type=int, default=200, metavar="N",
                            help="tokens to generate (default: 200)")
        parser.add_argument("--temperature", type=float, default=0.8, metavar="T",
                            help="sampling temperature; 0 is greedy (default: 0.8)")
        parser.add_argument("--top-k", type=int, default=50, metavar="K",
                            help="sample among the k likeliest tokens; 0 for all (default: 50)")
        parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                            help="samples per prompt (default: 1)")
        parser.add_argument("--seed", type=int, default=1337, metavar="N",
                            help="seed; the same seed gives the same text (default: 1337)")
        parser.add_argument("--device", default="auto", metavar="DEVICE",
                            help="auto, cpu, cuda, cuda:N or mps (default: auto)")
        group = parser.add_argument_group("run options")
        group.add_argument("--preset", default="quick", choices=presets.names(),
                           help="preset whose run directory is the default (default: quick)")
        group.add_argument("--run", type=Path, default=None, metavar="DIR",
                           help="run directory holding data/ and gpt/ (default: runs/<preset>)")

    def main(self, args: argparse.Namespace) -> int:
        from monofast import cli, tokenizer

        if args.tokens < 0 or args.num_samples < 1 or args.top_k < 0 or args.temperature < 0:
            raise UserError("--tokens, --top-k and --temperature must be non-negative and "
                            "--num-samples at least 1")
        try:
            device = pick_device(args.device)
        except ValueError as err:
            raise UserError(f"--device: {err}") from None
        run = cli.run_dir(args)
        model = load_model(run.stage("gpt"), device)
        tok = tokenizer.load(run.stage("data"))
        for prompt in args.prompt or ["def run"]:
            for i in range(args.num_samples):
                text = sample(model, tok, prompt, args.tokens, args.temperature, args.top_k,
                              seed=args.seed + i, device=device)
                print(text + "\n", flush=True)
        return 0
