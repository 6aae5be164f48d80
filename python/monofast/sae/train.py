"""Stage 4: train sparse autoencoders on the harvested activations (`monofast sae train`).

One pass over the activation store by default, as in the paper. Several SAEs (one per L1
coefficient, or per k for TopK) train side by side on the same batches, so a sweep costs
one read of the data (`monofast.sae.sweep`). The last `held_out` rows of the store, whole
contexts never seen in training, are kept for the evaluation (`monofast.sae.batches`).

Writes into `sae/`:
    sae_weights.safetensors, cfg.json  the published SAE (`--select`: by the quality goal, by default)
                                  (--target-l0 also steers the L1 coefficients: `monofast.sae.search`)
    <name>/...                    every SAE of the sweep (l1_5, k32, ...), same layout
    metrics.jsonl                 training curves, one JSON object per logged step
    eval.json                     held-out MSE, FVU, L0, dead / dense fractions, density histogram,
                                  CE-loss recovered on held-out tokens (`monofast.sae.evaluate`),
                                  the selection (rule, published SAE, each one's verdict) and
                                  how training ran: the compute precision, CUDA graphs
    checkpoint.pt                 while training only: weights, optimizer and stream state for
                                  --resume (`monofast.sae.resume`); removed once the files above
                                  are written

A loss, weight or input that is not finite stops the run with a named error (the step, the
SAE and its L1 coefficient or k, what to change) before anything is logged, checkpointed or
published. It is checked where the loop reads values back anyway (every --log-every steps,
at checkpoints, lambda-search control points and resamplings): no extra device sync per
step; the inputs in between are summed on the device, which is non-finite once any was.

Under torchrun (`monofast.common.distributed`) each rank streams its own disjoint part of
every epoch of the training rows (the store's rank split) in batches of batch_size / world
rows, so a step's global batch has batch_size rows and the run takes the steps and schedule
of a single process, though its batches hold other rows. One all-reduce per SAE and step
averages the gradients and adds up which features fired (`sweep.reduce_step`), so the
decoder constraint and the dead-feature counts see the global batch; resampling runs alike
on every rank and rank 0's result is kept. Rank 0 logs, checkpoints (with every rank's
stream position: resume with as many processes), evaluates and writes the files.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from monofast.activations.store import ActivationStore, open_store, read_index
from monofast.common import distributed, files
from monofast.common.device import dtype_name, pick_device, pick_dtype
from monofast.common.errors import DataError, UserError
from monofast.common.log import logger, progress
from monofast.sae import graph as sae_graph
from monofast.sae.crossover import SparseSwitch
from monofast.sae import search as sae_search
from monofast.sae import select as selection
from monofast.sae.select import Goal
from monofast.sae.batches import (
    TrainingBatches,
    check_finite,
    probe_rows,
    sample_rows,
    split_rows,
)
from monofast.sae.config import SAETrainConfig
from monofast.sae.evaluate import (
    EVAL_FILE,
    METRICS_FILE,
    add_ce,
    held_out_metrics,
    log_record,
    prepare_ce,
    probe_l0,
)
from monofast.sae.resample import dead_window, resample, resample_steps
from monofast.sae.resume import (
    CHECKPOINT_FILE,
    TrainState,
    save_checkpoint,
    start_state,
)
from monofast.sae.sweep import (
    Member,
    build_sweep,
    lambda_search,
    reduce_stats,
    schedules,
    set_lambdas,
    share_member,
    train_step,
)


def run_steps(cfg: SAETrainConfig, members: list[Member], batches: TrainingBatches,
              store: ActivationStore, cutoff: int, steps: int, state: TrainState,
              rng: np.random.Generator, out: Path,
              search_and_probe: tuple[Optional[sae_search.LambdaSearch], Optional[torch.Tensor]] = (None, None)
              ) -> dict[str, Any]:
    """Train from `state.step` to `steps`, logging metrics and writing checkpoints; with a
    lambda search (and its probe rows), steer the members' lambdas at its control points.
    Returns how the steps ran: as CUDA graph replays or not (`sae_graph.describe`), and
    which SAE took the sparse step when (`SparseSwitch.report`)."""
    search, probe = search_and_probe
    resample_at = set(resample_steps(cfg, steps))
    window = dead_window(cfg, steps)
    records = list(state.records)
    started = time.perf_counter() - state.seconds
    bar: Any = progress(total=steps, initial=state.step, desc="sae", unit="step")
    here = distributed.world()
    graphs = None
    reason = sae_graph.unavailable(cfg.cuda_graphs, cfg.variant, batches.device, here.size)
    if reason is None:
        graphs = sae_graph.GraphedSteps(members, cfg.batch_size, store.dim, batches.device, cfg.aux_coeff)
    switch = SparseSwitch(cfg.sparse_step, [m.sae for m in members], [m.name for m in members],
                          cfg.batch_size // here.size, start=state.step, resumed=state.sparse,
                          unavailable="the dense step replays as a CUDA graph" if graphs is not None else None)
    input_sum = torch.zeros((), device=batches.device)
    checked = state.step  # the last step whose losses and weights were seen finite
    with open(out / METRICS_FILE if here.is_main else os.devnull, "a", encoding="utf-8") as log_file:
        for step, x in enumerate(batches, start=state.step):
            if step >= steps:
                break
            lam, lr = schedules(cfg, step, steps)

            def eager(x: torch.Tensor = x, lam: float = lam, lr: float = lr) -> list[dict[str, Any]]:
                return [train_step(m, x, lam, lr, cfg.aux_coeff, here) for m in members]

            stats = reduce_stats(graphs.step(x, lam, lr, eager) if graphs is not None else eager(), here)
            input_sum += x.sum(dtype=torch.float32)  # non-finite once any input was: no sync here
            if _reads_back(cfg, step + 1, steps, resample_at, search):
                check_training(cfg, members, stats, x, input_sum, step + 1, checked, here)
                checked = step + 1
                input_sum.zero_()
                switch.update(step + 1, [float(s["l0"]) for s in stats])
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
                record = log_record(members, stats, step + 1, cfg.batch_size, lam, lr, started)
                records.append(record)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                first = record["saes"][members[0].name]
                bar.set_postfix(mse=f"{first['mse']:.3g}", l0=f"{first['l0']:.1f}",
                                dead=first["dead"], rows_s=f"{record['rows_per_s']:.0f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                done = TrainState(step + 1, records, time.perf_counter() - started, switch.state())
                save_checkpoint(out, cfg, store, members, batches, rng, done, search=search)
    bar.close()
    return {**sae_graph.describe(graphs), "sparse_step": switch.report()}


def _reads_back(cfg: SAETrainConfig, done: int, steps: int, resample_at: set[int],
                search: Optional[sae_search.LambdaSearch]) -> bool:
    """Whether the loop reads values back from the device after `done` steps anyway (to log,
    checkpoint, steer lambda or resample): where finiteness is checked at no extra cost."""
    return (done % cfg.log_every == 0 or done == steps or done in resample_at
            or bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            or (search is not None and search.due(done)))


def check_training(cfg: SAETrainConfig, members: list[Member], stats: Optional[list[dict[str, Any]]],
                   x: Optional[torch.Tensor], input_sum: Optional[torch.Tensor], done: int, checked: int,
                   here: distributed.World = distributed.SINGLE) -> None:
    """Stop (before anything is logged, checkpointed or published) when a loss, a weight or
    an input since step `checked` is not finite, naming the step and the SAE. `stats`: the
    step's (reduced) statistics; `input_sum`: the sum of the inputs since `checked`."""
    weights_ok = [torch.stack([torch.isfinite(p).all() for p in m.sae.parameters()]).all() for m in members]
    losses = [torch.as_tensor(s["loss"]).float().reshape(()) for s in stats] if stats else []
    flags = torch.stack(weights_ok + [torch.isfinite(v).to(weights_ok[0].device) for v in losses])
    inputs_ok = True if input_sum is None else bool(torch.isfinite(input_sum))
    if bool(flags.all()) and inputs_ok:  # one sync for the losses and weights
        return
    if x is not None:
        check_finite(x, f"the batch of step {done}")
    if input_sum is not None:
        bad = torch.tensor([0.0 if inputs_ok else 1.0], device=input_sum.device)
        if float(distributed.all_reduce_sum_(bad)[0]) > 0:  # on any rank: the same error everywhere
            raise DataError(f"a training batch of steps {checked + 1}..{done} contains NaN or Inf; the harvested "
                            f"activations are corrupt: check them with `monofast activations verify` and re-run "
                            f"`monofast activations harvest --force`")
    for i, m in enumerate(members):
        loss = float(losses[i]) if losses else math.nan
        if bool(flags[i]) and (not losses or math.isfinite(loss)):
            continue
        what = f"k={m.sae.cfg.k}" if m.sae.cfg.uses_k else f"L1 coefficient {m.l1_coeff:g}"
        found = f"its loss is {loss}" if losses and not math.isfinite(loss) else "its weights hold NaN or Inf"
        since = f" (finite at step {checked})" if checked > 0 else ""
        fixes = [f"a lower --lr (now {cfg.lr:g})"]
        if (m.sae.compute_dtype or torch.float32) != torch.float32:
            fixes.append(f"--compute-dtype float32 (now {dtype_name(m.sae.compute_dtype)})")
        raise UserError(f"sae: SAE {m.name} ({what}) diverged: {found} at step {done}{since}; re-run with "
                        f"{' or '.join(fixes)}. Nothing was published")


def train(cfg: SAETrainConfig, store_dir: str | Path, out: str | Path,
          metadata: Optional[dict[str, Any]] = None, gpt_dir: str | Path | None = None,
          data_dir: str | Path | None = None) -> dict[str, Any]:
    """Train the sweep on the store in `store_dir`, evaluate it, write everything into `out`.

    With `gpt_dir` and `data_dir` (and ce_eval_tokens > 0) the evaluation includes CE-loss
    recovered on held-out tokens of the data's validation split.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = open_store(store_dir)
    here = distributed.check_divides(cfg.batch_size, "--batch-size")
    device = pick_device(cfg.device)
    pick_dtype(cfg.compute_dtype, device, flag="--compute-dtype")  # refuse a bad precision before any work
    cfg.check_memory(store.dim, device)  # and a sweep too large for the memory free there
    cutoff = split_rows(store, cfg.held_out)
    steps = cutoff * cfg.epochs // cfg.batch_size
    if steps < 1:
        raise DataError(f"the store has {cutoff} training rows, fewer than one batch of {cfg.batch_size}; "
                        f"lower --batch-size or harvest more")
    # Rank 0 measures CE-loss recovered; loading its GPT and tokens now makes their errors come early.
    ce = prepare_ce(store, cfg.ce_eval_tokens, gpt_dir, data_dir, device) if here.is_main else None
    rng = np.random.default_rng(cfg.seed)
    sample = sample_rows(store, min(cutoff, 8 * cfg.batch_size), cutoff, rng)
    check_finite(sample, "the activation sample")
    torch.manual_seed(cfg.seed)
    members = build_sweep(cfg, store.dim, sample, steps, device)
    for m in members:
        share_member(m)
    search = lambda_search(cfg, members, steps)
    probe = probe_rows(store, cutoff, rng) if search is not None else None
    widths = sorted({m.sae.cfg.d_sae for m in members})
    logger.info("sae: %d SAE(s) of %s features on %d rows of %d (%d held out), %d steps of %d, on %s%s",
                len(members), "/".join(f"{w:,}" for w in widths), cutoff, store.dim, store.rows - cutoff, steps,
                cfg.batch_size, device, f" and {here.size - 1} more processes" if here.size > 1 else "")
    batches = TrainingBatches(store, cfg, cutoff, device)
    try:
        state = start_state(cfg, out, store, members, batches, rng, search)
        replays = run_steps(cfg, members, batches, store, cutoff, steps, state, rng, out, (search, probe))
    finally:
        batches.close()
    check_training(cfg, members, None, None, None, steps, 0, here)  # nothing non-finite is published
    if not here.is_main:
        return distributed.broadcast_object(None)  # rank 0 evaluates and writes

    evaluation = held_out_metrics(members, store, cutoff, cfg.batch_size, device)
    evaluation["training"] = training_report(members, replays)
    if search is not None:
        evaluation["lambda_search"] = search.report()
    if ce is not None:
        add_ce(evaluation, ce.run({m.name: m.sae for m in members}))
    published = select([m.name for m in members], evaluation, cfg)
    files.write_json(out / EVAL_FILE, evaluation)
    save_all(members, out, evaluation, published, metadata or {})
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # the finished files replace it
    return distributed.broadcast_object(evaluation)


def training_report(members: list[Member], replays: dict[str, Any]) -> dict[str, Any]:
    """How the steps ran, for eval.json: the compute precision of the matrix products (a
    runtime choice, `monofast.common.device`) and whether they were CUDA graph replays."""
    sae = members[0].sae
    return {"compute_dtype": dtype_name(sae.compute_dtype or sae.W_enc.dtype), **replays}


def select(names: list[str], evaluation: dict[str, Any], cfg: SAETrainConfig) -> str:
    """The member to publish by `cfg.select` (`monofast.sae.select`), recorded in
    `evaluation["selection"]`; a sweep that misses the quality goal warns once."""
    goal = Goal(cfg.goal_ce_recovered, cfg.goal_dead)
    choice = selection.select(evaluation["saes"], names, cfg.select, cfg.target_l0, goal)
    evaluation["selection"] = choice.record()
    if choice.warning:
        logger.warning("sae: %s", choice.warning)
    return choice.published


def save_all(members: list[Member], out: Path, evaluation: dict[str, Any], chosen: str,
             metadata: dict[str, Any]) -> None:
    for m in members:
        m.sae.save(out / m.name, **metadata, sweep_member=m.name)
        if m.name == chosen:
            m.sae.save(out, **metadata, sweep_member=m.name)
    logger.info("sae: published %s (%s)", chosen,
                ", ".join(f"{k}={v:.4g}" for k, v in evaluation["saes"].get(chosen, {}).items()
                          if isinstance(v, float)))


def hook_metadata(store_dir: str | Path) -> dict[str, Any]:
    """What cfg.json records of where the activations come from (the names SAELens reads)."""
    extra = read_index(store_dir).extra
    gpt = extra.get("gpt", {})
    layer = gpt.get("layer")
    hook = gpt.get("hook_name") or (f"blocks.{layer}.mlp.hook_post" if layer is not None else None)
    out = {
        "model_name": "monofast-gpt",
        "hook_name": hook,
        "hook_layer": layer,
        "context_size": extra.get("context_length"),
        "monofast_hook_name": hook,
    }
    if gpt.get("model"):  # a Hugging Face model: named as SAELens loads one (the module whose output it reads)
        out.update(model_name=gpt["model"], model_class_name="AutoModelForCausalLM",
                   hook_name=gpt.get("hook_module") or hook)
    return out


def run_stage(cfg: SAETrainConfig, run: Any, stage: str = "sae") -> None:
    """Pipeline entry point: fill `sae/` (or the folder of `stage`) from `activations/`,
    measuring CE-loss recovered with the GPT of `gpt/` on the validation split of `data/`."""
    store_dir = run.require("activations")
    gpt_dir = run.require("gpt")
    data_dir = run.require("data") if cfg.ce_eval_tokens else None
    train(cfg, store_dir, run.stage(stage), hook_metadata(store_dir), gpt_dir=gpt_dir, data_dir=data_dir)
