"""Stage 2: train the tiny GPT (`monofast gpt train`).

Reads `data/` (through `monofast.data.splits`) and writes `gpt/`:

- `model.safetensors`, `config.json`: the weights and their `GPTConfig` (`monofast.gpt.weights`)
- `metrics.jsonl`: one line per evaluation: step, learning rate, train loss, validation
  loss overall and per source (Python vs Shakespeare), tokens/s, and the precision used
- `samples.txt`: a few samples from each of the configured prompts (`monofast.gpt.sample`)
- `checkpoint.pt`: weights, optimizer state, step and metrics so far, for `--resume`

A run whose loss stops being finite (it diverged) ends with a `UserError` naming the step,
the last good checkpoint and what to change. It is noticed where the loop reads the loss
back anyway (every `LOG_EVERY` steps and at each evaluation), so it costs no extra device
synchronisation, and it is checked before anything is saved: a non-finite model never
replaces the last good model or checkpoint.

Every random choice of a training step (its batch windows and its dropout masks) is keyed
on (seed, step) rather than drawn from a stream, so a run resumed from a checkpoint takes
exactly the steps the uninterrupted run would have taken.

Under torchrun (`monofast.common.distributed`) the model is wrapped in
DistributedDataParallel: every rank draws the same global batch of `batch_size` windows and
trains on its own `batch_size / world` consecutive rows of it, so the global batch, the
schedule and the checkpoints are those of a single process (a run may resume with another
number of processes). Evaluation is split over the ranks; rank 0 writes every file.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from monofast.common import checkpoint, config, distributed, files
from monofast.common.checkpoint import CHECKPOINT_FILE
from monofast.common.device import dtype_name, matmul_precision, pick_device, pick_dtype
from monofast.common.errors import UserError
from monofast.common.log import logger, progress
from monofast.data import tokenizer
from monofast.data.splits import Split, load_meta, load_split
from monofast.gpt.batches import check_data, evaluate, get_batch, rank_rows
from monofast.gpt.config import GPTTrainConfig
from monofast.gpt.model import GPT
from monofast.gpt.sample import SAMPLES_FILE, write_samples
from monofast.gpt.trainer import Trainer, lr_at
from monofast.gpt.weights import CONFIG_FILE, MODEL_FILE, save_model

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FORMAT = 2
LOG_EVERY = 10
"""Steps between progress-bar refreshes: each one reads the loss back from the device,
which on a GPU is a synchronisation point, so it is not done every step."""


# ---------------------------------------------------------------------------------------
# Files: checkpoint, metrics


class TrainState(NamedTuple):
    """Where a run stands: steps done and the metrics logged so far."""

    step: int
    metrics: list[dict[str, Any]]


def save_checkpoint(folder: Path, trainer: Trainer, state: TrainState) -> None:
    """Weights, optimizer state, step and metrics in one atomically written file."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "config": config.identity(trainer.cfg),
        "model": {k: v.detach().to("cpu") for k, v in trainer.model.state_dict().items()},
        "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
        "scaler": trainer.scaler.state_dict(),
        "metrics": state.metrics,
    }
    checkpoint.save(folder / CHECKPOINT_FILE, payload)


def load_checkpoint(folder: Path, trainer: Trainer) -> TrainState:
    """Restore a checkpoint made with the same schedule; refuse one from other options."""
    payload = checkpoint.load(folder / CHECKPOINT_FILE, CHECKPOINT_FORMAT, "config", config.identity(trainer.cfg),
                              runtime=GPTTrainConfig.RUNTIME)
    trainer.model.load_state_dict(payload["model"])
    for optimizer, saved in zip(trainer.optimizers, payload["optimizers"], strict=True):
        optimizer.load_state_dict(saved)
    if payload["scaler"] and trainer.scaler.is_enabled():  # a checkpoint of another precision has none
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
    meta = load_meta(data_dir)
    train_split = load_split(data_dir, "train", meta)
    val_split = load_split(data_dir, "val", meta)
    check_data(cfg, meta, train_split, val_split)
    sources = [s["name"] for s in sorted(meta["sources"], key=lambda s: s["id"])]
    here = distributed.check_divides(cfg.batch_size, "--batch-size")
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device, half_fallback=True)  # fp16 with a loss scaler on older GPUs
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with matmul_precision(device):
        trainer = Trainer(cfg, meta["vocab_size"], device, dtype)
        state = _start_state(cfg, out, trainer)
        precision = str(dtype).removeprefix("torch.") + ("" if dtype == torch.float32 else " autocast")
        logger.info("gpt: %.2fM parameters, %s, %s, %s, %s schedule, steps %d..%d of batch %d x %d%s",
                    trainer.model.num_params() / 1e6, device, precision,
                    "Muon + AdamW" if cfg.optimizer == "muon" else "AdamW", cfg.schedule,
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
        self.unread: list[torch.Tensor] = []
        """The losses added since the last `mean_loss` (to name the first non-finite one)."""

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss_sum += loss
        self.unread.append(loss)
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def mean_loss(self) -> float:
        return self.loss_sum.item() / max(self.steps, 1)  # a device sync

    def checked_mean_loss(self, step: int, trainer: Trainer, saved: int | None, out: Path) -> float:
        """`mean_loss` after `step` steps, refusing a non-finite one (`_diverged`): the sum
        is finite only if every loss added to it was."""
        mean = self.mean_loss()
        if not math.isfinite(mean):
            first, value = step, mean
            losses = torch.stack(self.unread).float().cpu() if self.unread else torch.zeros(0)
            bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
            if bad:  # the first non-finite loss since the last read-back, and its step
                first, value = step - len(self.unread) + 1 + bad[0], float(losses[bad[0]])
            raise _diverged(trainer, first, f"the training loss is {value}", saved, out)
        self.unread = []
        return mean

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _diverged(trainer: Trainer, step: int, what: str, saved: int | None, out: Path) -> UserError:
    """The error that ends a diverged run: the step, the last good checkpoint, what to change."""
    cfg = trainer.cfg
    if saved is None:
        kept = "no checkpoint was written before it"
    else:
        kept = (f"the last good checkpoint is {out / CHECKPOINT_FILE} at step {saved} "
                f"(with the model of that step beside it)")
    tries = [f"a lower --learning-rate (now {cfg.learning_rate:g})"]
    tries.append("--grad-clip 1.0 (now off)" if cfg.grad_clip <= 0 else f"a lower --grad-clip (now {cfg.grad_clip:g})")
    if trainer.dtype != torch.float32:
        tries.append(f"--dtype float32 (now {dtype_name(trainer.dtype)})")
    return UserError(f"gpt: the run diverged: {what} at step {step}; {kept}. Re-run `monofast gpt train "
                     f"--force` with {', '.join(tries[:-1])} or {tries[-1]}")


def _check_model(trainer: Trainer, step: int, saved: int | None, out: Path) -> None:
    """Refuse to save a model with a non-finite parameter (one device sync)."""
    params = list(trainer.model.parameters())
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise _diverged(trainer, step, "the weights hold NaN or Inf", saved, out)


def _train_loop(trainer: Trainer, state: TrainState, train_split: Split, val_split: Split,
                sources: list[str], out: Path) -> TrainState:
    cfg = trainer.cfg
    step, metrics = state
    saved = metrics[-1]["step"] if metrics else None  # the step the checkpoint holds, if any
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
            if step % LOG_EVERY == 0:  # a device sync, timed with the step
                shown["loss"] = f"{window.checked_mean_loss(step, trainer, saved, out):.3f}"
            window.seconds += time.perf_counter() - tick
            shown["tok/s"] = f"{window.tokens_per_s():.0f}"
            bar.update(1)
            if _is_eval_step(step, cfg):
                record = _evaluate_and_save(trainer, step, window, val_split, sources, out, metrics, saved)
                metrics = metrics + [record]
                saved = step
                shown["val"] = f"{record['val_loss']:.3f}"
                _log_eval(bar, record)
                window = _Window(trainer.device)
            if step % LOG_EVERY == 0:
                bar.set_postfix(shown, refresh=False)
    finally:
        bar.close()
    _check_model(trainer, step, saved, out)
    if trainer.world.is_main:
        save_model(out, trainer.model)  # also after a resume that had nothing left to do
        write_metrics(out, metrics)
    return TrainState(step, metrics)


def _evaluate_and_save(trainer: Trainer, step: int, window: _Window, val_split: Split,
                       sources: list[str], out: Path, metrics: list[dict[str, Any]],
                       saved: int | None) -> dict[str, Any]:
    """Evaluate, then write the model, the metrics so far and a checkpoint (rank 0; the
    training loss is the mean over the ranks, the throughput rank 0's measure of all of them).
    Nothing is written when a loss or a weight is not finite (`saved`: the step the
    checkpoint holds, for the error)."""
    cfg = trainer.cfg
    result = evaluate(trainer.model, val_split, sources, cfg, trainer.device, trainer.dtype)
    train_loss, = distributed.mean([window.mean_loss()])  # every rank sees a non-finite one
    if not math.isfinite(train_loss):
        window.checked_mean_loss(step, trainer, saved, out)  # raises, naming this rank's first bad step
        raise _diverged(trainer, step, f"the training loss is {train_loss}", saved, out)  # another rank's
    if not math.isfinite(result.loss):
        raise _diverged(trainer, step, f"the validation loss is {result.loss}", saved, out)
    _check_model(trainer, step, saved, out)
    record = {"step": step, "lr": lr_at(step - 1, cfg), "train_loss": train_loss,
              "val_loss": result.loss, "val_loss_by_source": result.by_source,
              "tokens_per_s": window.tokens_per_s(), "dtype": dtype_name(trainer.dtype)}
    if trainer.world.is_main:
        save_model(out, trainer.model)
        write_metrics(out, metrics + [record])
        save_checkpoint(out, trainer, TrainState(step, metrics + [record]))
    return record


# ---------------------------------------------------------------------------------------
# Entry points

def run_stage(cfg: GPTTrainConfig, run: Any) -> None:
    """Pipeline entry point: train `gpt/` from `data/` inside the run directory."""
    data_dir = run.require("data")
    out = run.stage("gpt")
    if cfg.model:  # a Hugging Face model in the tiny GPT's place: nothing to train
        if distributed.is_main():
            from monofast.gpt.weights import record_hf

            record = record_hf(out, cfg.model, cfg.dtype, cfg.allow_download, data_dir)
            logger.info("gpt: using %s (%s, %d layers, %s parameters)", record["model"],
                        record["architecture"], record["n_layer"], f"{record['parameters']:,}")
        return
    from monofast.gpt.hf import MODEL_RECORD

    (out / MODEL_RECORD).unlink(missing_ok=True)  # this folder no longer names a Hugging Face model
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


