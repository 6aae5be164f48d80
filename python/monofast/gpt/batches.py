"""Windows of the token splits: the training batches of each step and the validation loss,
overall and per source."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from monofast.common import distributed
from monofast.common.device import autocast
from monofast.common.errors import DataError
from monofast.data.splits import Split
from monofast.gpt.config import GPTTrainConfig
from monofast.gpt.model import GPT


def check_data(cfg: GPTTrainConfig, meta: dict[str, Any], train: Split, val: Split) -> None:
    """Refuse, naming the fix, when the data cannot feed this config."""
    for name, split in (("train", train), ("val", val)):
        if len(split.tokens) < cfg.block_size + 1:
            raise DataError(f"the {name} split has {len(split.tokens)} tokens, fewer than block_size + 1 "
                            f"= {cfg.block_size + 1}; lower --block-size or give the data stage more "
                            f"text (--chars-per-source)")
    if meta["vocab_size"] < 2:
        raise DataError(f"the tokenizer has {meta['vocab_size']} tokens; re-run `monofast data --force`")


def get_batch(split: Split, step: int, cfg: GPTTrainConfig, device: torch.device,
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


def tiling_starts(n_tokens: int, block_size: int) -> np.ndarray:
    """Starts of back-to-back windows over the whole split: every token but the last
    window's remainder is a target exactly once, whatever the batch size (to compare
    models trained with different ones)."""
    return np.arange(0, n_tokens - block_size, block_size, dtype=np.int64)


@torch.no_grad()
def evaluate(model: GPT, split: Split, source_names: list[str], cfg: GPTTrainConfig,
             device: torch.device, dtype: torch.dtype, starts: np.ndarray | None = None) -> EvalResult:
    """Validation loss overall and per source, from the per-token source labels, over the
    windows at `starts` (default `eval_starts`), batch_size at a time. Under torchrun each
    rank evaluates every world-th batch and the sums are added up."""
    was_training = model.training
    model.eval()
    n = len(source_names)
    sums, counts = np.zeros(n), np.zeros(n)  # (S,) float64 on the host (MPS has no float64)
    starts = eval_starts(len(split.tokens), cfg) if starts is None else starts
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
