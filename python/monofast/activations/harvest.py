"""Stage 3: harvest MLP activations into an activation store (`monofast activations harvest`).

Runs the trained GPT over contexts of the training split and stores, for N sampled
positions of each context, the post-GELU MLP activation of one layer together with the
token id, source id, context id and position (see `monofast.activations.store`).

- Contexts are non-overlapping windows of the split, drawn without repeats while the split
  has enough of them (beyond that, extra windows at random offsets, with a warning).
- Positions are a seeded function of (seed, context id), so a resumed harvest recomputes
  exactly the rows it lost, whatever the batch size.
- The forward pass stops at the hooked layer, under `torch.inference_mode`; the Rust writer
  writes and checksums on its own thread while the next batch computes.
- Before starting it prints the disk space it needs and refuses when the disk lacks it.
- Killed half-way, it resumes from the last finished shard on the next run.
- Every batch is checked for NaN and Inf before the writer gets it (on the device, read
  back with the batch's own copy to the host): a broken GPT stops the harvest with a
  `DataError` naming the contexts, and the writer is aborted, so no shard holding them is
  ever finished.
- Under torchrun (`monofast.common.distributed`) each rank harvests its own run of whole shards
  (`share`) and writes them under their final names; once all are done, rank 0 joins
  their records into the one `index.json`, so the store is the one a single process
  writes, shard for shard. The run directory must then be on a filesystem every rank sees.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

from monofast import _native
from monofast.activations import store
from monofast.common import distributed, files
from monofast.common.errors import DataError, UserError
from monofast.common.log import logger, progress
from monofast.data.splits import SPLITS, Split, load_meta, load_split

if TYPE_CHECKING:
    import torch

    from monofast.gpt.model import GPT

CONTEXTS_FILE = "contexts.npy"
HOOK = "mlp.post_gelu"


@dataclass
class HarvestConfig:
    """Options of the activations stage (`monofast activations harvest`)."""

    RUNTIME: ClassVar[frozenset[str]] = frozenset({"device"})
    """Fields that do not change the results (the manifest ignores them)."""

    contexts: int = 7_500
    """Contexts (windows of tokens) to run through the GPT; the seed recipe used 7,500."""
    positions_per_context: int = 200
    """Positions sampled from each context without replacement (the seed: 200 of 256)."""
    context_length: int = 0
    """Tokens per context; 0 means the GPT's block size (256 for a Hugging Face model, not its limit)."""
    layer: int = -1
    """MLP layer whose post-GELU activations are stored; negative counts from the last."""
    hook: str = ""
    """Where to read instead, by hook name: blocks.L.mlp.hook_post (what layer picks), and for a
    Hugging Face model (--model) also blocks.L.hook_resid_post and blocks.L.hook_attn_out;
    `monofast hooks --model ...` lists them with their widths. Empty: the layer's MLP."""
    skip_first: bool = True
    """Never sample position 0: with nothing before it to attend to, its activations are outliers that no other position resembles."""
    split: str = "train"
    """Data split the contexts come from (train or val)."""
    dtype: str = "fp32"
    """Stored precision: fp32, fp16 or bf16 (half the disk; streams can widen to fp32)."""
    batch_size: int = 32
    """Contexts per forward pass."""
    shard_mb: float = 256.0
    """Largest shard file, in MiB."""
    seed: int = 0
    """Seed of the context draw and the position sampling."""
    device: str = "auto"
    """Where the GPT runs: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."""

    def __post_init__(self) -> None:
        if self.contexts < 1:
            raise ValueError(f"contexts={self.contexts}; harvest at least 1 context")
        if self.positions_per_context < 1:
            raise ValueError(f"positions_per_context={self.positions_per_context}; sample at least 1")
        if self.context_length < 0:
            raise ValueError(f"context_length={self.context_length}; use 0 (the block size) or a positive length")
        if self.hook:
            from monofast.common.hf import parse_hook

            parse_hook(self.hook)
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r}; choose train or val")
        if self.dtype not in store.DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose fp32, fp16 or bf16")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}; use e.g. 32")
        if not self.shard_mb > 0:
            raise ValueError(f"shard_mb={self.shard_mb}; use e.g. 256")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0 (numpy takes only non-negative seeds), e.g. 0")


class Plan(NamedTuple):
    """What a harvest will compute, resolved against the model and the data."""

    layer: int
    """Hooked layer, counted from 0."""
    length: int
    """Tokens per context."""
    positions: int
    """Rows per context."""
    skip: int
    """Positions below this are never sampled (1 with skip_first)."""
    starts: np.ndarray
    """(contexts,) int64 start of each context in the split's token array."""
    dim: int
    """Width of a stored row (d_mlp)."""

    @property
    def rows(self) -> int:
        return len(self.starts) * self.positions


class HarvestResult(NamedTuple):
    rows: int
    """Rows in the finished store."""
    resumed_rows: int
    """Rows kept from an interrupted earlier run (not recomputed)."""
    shards: int
    bytes: int
    seconds: float
    """Wall time of this run."""
    rows_per_second: float
    """Rows computed and written by this run, per second."""


# ---------------------------------------------------------------------------------------
# Sampling

def choose_contexts(n_tokens: int, length: int, count: int, seed: int) -> np.ndarray:
    """(count,) int64 starts of contexts of `length` tokens in a split of `n_tokens`:
    distinct non-overlapping windows while there are enough, then random offsets. They come
    in random order, so any run of the store's rows (the held-out tail that SAE training
    keeps for evaluation) is a fair sample of every source, not the corpus's last document."""
    windows = n_tokens // length
    if windows == 0:
        raise DataError(f"the split has {n_tokens} tokens, fewer than one context of {length}; "
                        f"use a shorter --context-length or more data")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x636F6E74]))
    if count <= windows:
        return rng.choice(windows, size=count, replace=False).astype(np.int64) * length
    logger.warning("activations: the split has only %d non-overlapping contexts of %d tokens; the other "
                   "%d contexts overlap them (more data avoids repeats)", windows, length, count - windows)
    extra = rng.integers(0, n_tokens - length + 1, size=count - windows)
    return rng.permutation(np.concatenate([np.arange(windows) * length, extra])).astype(np.int64)


def sample_positions(seed: int, context_ids: np.ndarray, length: int, count: int, skip: int) -> np.ndarray:
    """(B, count) int64 sorted positions in [skip, length), distinct within a row, a pure
    function of (seed, context id): a resumed run draws the same positions in any batch
    layout. Each row keeps the positions with the smallest SplitMix64 keys, drawn by the
    same generator as the store's shuffles (`_native.sample_positions`)."""
    ids = np.ascontiguousarray(context_ids, dtype=np.uint64)  # (B,); ids and seed wrap to 64 bits
    return _native.sample_positions(seed & (2**64 - 1), ids, length, count, skip)


def hooked_layer(cfg: HarvestConfig) -> int:
    """The layer the harvest reads: the hook's, else `layer` (negative: from the last)."""
    if cfg.hook:
        from monofast.common.hf import parse_hook

        return parse_hook(cfg.hook)[0]
    return cfg.layer


def plan(cfg: HarvestConfig, model_cfg: Any, n_tokens: int) -> Plan:
    n_layer = model_cfg.n_layer
    requested = hooked_layer(cfg)
    layer = requested + n_layer if requested < 0 else requested
    if not 0 <= layer < n_layer:
        raise UserError(f"layer={requested}: the model has layers 0..{n_layer - 1} (or -1 for the last)")
    length = cfg.context_length or model_cfg.default_context  # a Hugging Face model's: 256, not its limit
    if length > model_cfg.block_size:
        raise UserError(f"context_length={length} exceeds the GPT's block size {model_cfg.block_size}")
    skip = 1 if cfg.skip_first else 0
    if cfg.positions_per_context > length - skip:
        raise UserError(f"positions_per_context={cfg.positions_per_context} but a context has only "
                        f"{length - skip} positions to sample; lower it or raise context_length")
    starts = choose_contexts(n_tokens, length, cfg.contexts, cfg.seed)
    return Plan(layer, length, cfg.positions_per_context, skip, starts, model_cfg.d_mlp)


class Share(NamedTuple):
    """One rank's part of a harvest: whole shards, so the ranks can write them side by side."""

    first_shard: int
    end_shard: int
    """Shards [first_shard, end_shard); empty when there are fewer shards than ranks."""
    first_row: int
    end_row: int
    """Rows [first_row, end_row) of the store."""


def share(rows: int, rows_per_shard: int, rank: int, world_size: int) -> Share:
    """Rank `rank`'s shards of a store of `rows` rows: consecutive runs as even as whole
    shards allow, the last rank's ending with the store's short last shard."""
    shards = -(-rows // rows_per_shard)
    first, end = shards * rank // world_size, shards * (rank + 1) // world_size
    return Share(first, end, min(first * rows_per_shard, rows), min(end * rows_per_shard, rows))


# ---------------------------------------------------------------------------------------
# The stage

def run_stage(cfg: HarvestConfig, run: Any) -> None:
    """Pipeline entry point: fill `activations/` from `data/` and `gpt/`."""
    harvest(cfg, run.require("data"), run.require("gpt"), run.stage("activations"))


def harvest(cfg: HarvestConfig, data_dir: str | Path, gpt_dir: str | Path, out: str | Path) -> HarvestResult:
    """Harvest into `out`, resuming an interrupted harvest of the same inputs and config."""
    from monofast.common.device import pick_device
    from monofast.gpt.hf import MODEL_RECORD, HFModel, saelens_hook_name
    from monofast.gpt.weights import (  # imports torch: only here, so the CLI starts without it
        MODEL_FILE,
        load_model,
    )

    data_dir, gpt_dir, out = Path(data_dir), Path(gpt_dir), Path(out)
    device = pick_device(cfg.device)
    model = load_model(gpt_dir, device, cfg.hook or None)
    meta = load_meta(data_dir)
    split = load_split(data_dir, cfg.split, meta)
    the_plan = plan(cfg, model.config, len(split.tokens))
    weights = gpt_dir / (MODEL_RECORD if (gpt_dir / MODEL_RECORD).is_file() else MODEL_FILE)
    gpt_info = {"checkpoint": f"{gpt_dir.name}/{weights.name}", "checksum": files.hash_file(weights),
                "layer": the_plan.layer, "hook": HOOK, "n_layer": model.config.n_layer,
                "d_mlp": model.config.d_mlp, "hook_name": f"blocks.{the_plan.layer}.mlp.hook_post"}
    if isinstance(model, HFModel):  # its name, and the module SAELens would hook
        gpt_info.update(hook=model.site, hook_name=model.hook_name(the_plan.layer), model=model.config.name,
                        hook_module=saelens_hook_name(model.lm, the_plan.layer, model.site))
    data_info = {"split": cfg.split,
                 "tokens_checksum": files.hash_file(data_dir / f"{cfg.split}.bin"),
                 "sources": [s["name"] for s in meta["sources"]]}
    return harvest_model(model, split, cfg, the_plan, out, {"gpt": gpt_info, "data": data_info})


def fingerprint(cfg: HarvestConfig, the_plan: Plan, inputs: dict[str, Any]) -> str:
    """What determines the rows: inputs, layer, sampling. Batch size and device do not."""
    content = {k: v for k, v in vars(cfg).items() if k not in ("batch_size", "device", "shard_mb")}
    content.update(layer=the_plan.layer, length=the_plan.length, inputs=inputs, order="shuffled")
    return files.hash_bytes(json.dumps(content, sort_keys=True).encode())


def harvest_model(model: GPT, split: Split, cfg: HarvestConfig, the_plan: Plan, out: Path,
                  inputs: dict[str, Any]) -> HarvestResult:
    """Run `model` over the planned contexts of `split` and write the store into `out`.
    `inputs` (JSON-ready: checkpoint and data checksums) goes into the fingerprint and the index."""
    import torch

    here = distributed.world()
    if here.size > 1:
        return _harvest_shared(model, split, cfg, the_plan, out, inputs, here)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    np_save_atomic(out / CONTEXTS_FILE, the_plan.starts)
    shard_bytes = int(cfg.shard_mb * 2**20)
    writer = store.ActivationWriter(out, the_plan.dim, cfg.dtype, shard_bytes=shard_bytes,
                                          fingerprint=fingerprint(cfg, the_plan, inputs), resume=True)
    with writer:
        resumed = writer.rows
        _announce(cfg, the_plan, writer, out)
        device = next(model.parameters()).device
        bar: Any = progress(total=the_plan.rows, initial=resumed, unit="row", unit_scale=True, desc="harvest")
        with torch.inference_mode():
            for batch in _batches(model, split, cfg, the_plan, device, resumed):
                writer.append(*batch)
                bar.update(len(batch.token_id))
        bar.close()
        index = writer.finish(**index_extra(cfg, the_plan, inputs))
    seconds = time.perf_counter() - started
    done = index.rows - resumed
    logger.info("activations: %d rows (%d resumed) in %.1f s, %.0f rows/s -> %s", index.rows, resumed, seconds,
                done / max(seconds, 1e-9), out)
    return HarvestResult(index.rows, resumed, len(index.shards), sum(s["bytes"] for s in index.shards),
                         seconds, done / max(seconds, 1e-9))


def index_extra(cfg: HarvestConfig, the_plan: Plan, inputs: dict[str, Any]) -> dict[str, Any]:
    """What `index.json` records beside the shards: the inputs and how the contexts were drawn."""
    extra = dict(inputs)
    extra["contexts"] = {"file": CONTEXTS_FILE, "count": len(the_plan.starts), "length": the_plan.length,
                         "positions_per_context": the_plan.positions, "skip_first": cfg.skip_first,
                         "seed": cfg.seed}
    return extra


def _harvest_shared(model: GPT, split: Split, cfg: HarvestConfig, the_plan: Plan, out: Path,
                    inputs: dict[str, Any], here: distributed.World) -> HarvestResult:
    """`harvest_model` as one of several ranks: harvest this rank's `share` into its part
    of the store (resuming its own interrupted part), then rank 0 merges the parts."""
    import torch

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if here.is_main:
        np_save_atomic(out / CONTEXTS_FILE, the_plan.starts)
    shard_bytes = int(cfg.shard_mb * 2**20)
    rows_per_shard = store.rows_per_shard(the_plan.dim, cfg.dtype, shard_bytes)
    mine = share(the_plan.rows, rows_per_shard, here.rank, here.size)
    resumed = written = 0
    if mine.end_shard > mine.first_shard:
        writer = store.ActivationWriter(out, the_plan.dim, cfg.dtype, shard_bytes=shard_bytes,
                                              fingerprint=fingerprint(cfg, the_plan, inputs), resume=True,
                                              part=(mine.first_shard, mine.end_shard))
        with writer:
            resumed = writer.resumed_rows
            if here.is_main:
                _announce(cfg, the_plan, writer, out)
            device = next(model.parameters()).device
            bar: Any = progress(total=mine.end_row - mine.first_row, initial=resumed, unit="row",
                                unit_scale=True, desc=f"harvest (rank 0 of {here.size})")
            with torch.inference_mode():
                for batch in _batches(model, split, cfg, the_plan, device, writer.rows, mine.end_row):
                    writer.append(*batch)
                    bar.update(len(batch.token_id))
            bar.close()
            written = writer.finish().rows
    resumed_all, written_all = distributed.all_reduce_sum_(torch.tensor([resumed, written])).tolist()
    starts = [s.first_shard for r in range(here.size)
              if (s := share(the_plan.rows, rows_per_shard, r, here.size)).end_shard > s.first_shard]
    if here.is_main:  # every part is finished: the all-reduce above waited for them
        index = store.merge_parts(out, starts, **index_extra(cfg, the_plan, inputs))
        logger.info("activations: %d rows (%d resumed) from %d processes in %.1f s -> %s", index.rows, resumed_all,
                    here.size, time.perf_counter() - started, out)
    distributed.barrier()  # the index exists when any rank returns
    index = store.read_index(out)
    seconds = time.perf_counter() - started
    done = written_all - resumed_all
    return HarvestResult(index.rows, resumed_all, len(index.shards), sum(sh["bytes"] for sh in index.shards),
                         seconds, done / max(seconds, 1e-9))


def np_save_atomic(path: Path, array: np.ndarray) -> None:
    with files.atomic_open(path, "wb") as fh:
        np.save(fh, array)


def _announce(cfg: HarvestConfig, the_plan: Plan, writer: store.ActivationWriter, out: Path) -> None:
    """Log the plan and refuse early when the disk cannot hold the rest of the store."""
    row_bytes = the_plan.dim * store.ITEMSIZE[cfg.dtype] + store.META_ROW_BYTES
    shards = -(-the_plan.rows // writer.rows_per_shard)
    total = the_plan.rows * row_bytes + shards * store.HEADER_BYTES
    left = (the_plan.rows - writer.rows) * row_bytes + (shards - writer.rows // writer.rows_per_shard) * store.HEADER_BYTES
    logger.info("activations: %d contexts x %d positions = %d rows x %d (%s), layer %d: %.2f GiB in %d shards%s",
                len(the_plan.starts), the_plan.positions, the_plan.rows, the_plan.dim, cfg.dtype, the_plan.layer,
                total / 2**30, shards,
                f"; resuming after {writer.rows} rows, {left / 2**30:.2f} GiB to go" if writer.rows else "")
    files.check_free_space(out, left, "harvest")


class Rows(NamedTuple):
    """One batch of rows for the writer."""

    activations: torch.Tensor
    """(R, d_mlp) in the store's dtype, on the CPU."""
    token_id: np.ndarray
    """(R,) int32."""
    source_id: np.ndarray
    """(R,) uint8."""
    context_id: np.ndarray
    """(R,) int32."""
    position: np.ndarray
    """(R,) int32."""


def _batches(model: GPT, split: Split, cfg: HarvestConfig, the_plan: Plan, device: torch.device,
             resumed: int, end: int | None = None):
    """Yield `Rows` from row `resumed` on, up to row `end` (default: the last). On a GPU the
    next batch is queued before the previous one is handed over, so the device computes
    while the host writes."""
    import torch

    store_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.dtype]
    first_context, skip_rows = divmod(resumed, the_plan.positions)
    n = len(the_plan.starts) if end is None else -(-end // the_plan.positions)
    offsets = np.arange(the_plan.length)
    pending = None
    for begin in range(first_context, n, cfg.batch_size):
        ids = np.arange(begin, min(begin + cfg.batch_size, n))  # (B,)
        starts = the_plan.starts[ids]
        window = np.asarray(split.tokens[starts[:, None] + offsets[None, :]], dtype=np.int64)  # (B, T)
        pos = sample_positions(cfg.seed, ids, the_plan.length, the_plan.positions, the_plan.skip)  # (B, N)
        x = torch.from_numpy(window).to(device, non_blocking=True)
        acts = model.mlp_activations(x, the_plan.layer)  # (B, T, d_mlp)
        index = torch.from_numpy(pos).to(device)[:, :, None].expand(-1, -1, acts.shape[-1])  # (B, N, d_mlp)
        rows = acts.gather(1, index).reshape(-1, acts.shape[-1]).to(store_dtype)  # (B * N, d_mlp)
        cut = skip_rows if begin == first_context else 0
        stop = len(ids) * the_plan.positions if end is None else min(len(ids) * the_plan.positions,
                                                                     end - begin * the_plan.positions)
        finite = torch.isfinite(rows[cut:stop]).all()  # as stored: also an fp16 overflow; no sync yet
        event = None
        if device.type == "cuda":
            rows = rows.to("cpu", non_blocking=True)  # into pinned memory, asynchronously
            finite = finite.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        elif device.type != "cpu":
            rows = rows.to("cpu")
        meta = (
            np.take_along_axis(window, pos, axis=1).reshape(-1).astype(np.int32),  # (B * N,) token_id
            np.asarray(split.sources[(starts[:, None] + pos).reshape(-1)], dtype=np.uint8),  # (B * N,)
            np.repeat(ids, the_plan.positions).astype(np.int32),  # (B * N,) context_id
            pos.reshape(-1).astype(np.int32),  # (B * N,) position
        )
        if pending is not None:
            yield _ready(*pending)
        pending = (Rows(rows[cut:stop], *(m[cut:stop] for m in meta)), finite, event, cfg, the_plan)
    if pending is not None:
        yield _ready(*pending)


def _ready(rows: Rows, finite: torch.Tensor, event: Any, cfg: HarvestConfig, the_plan: Plan) -> Rows:
    """Wait for the batch's device-to-host copy (not for the batch queued after it); refuse
    a batch with NaN or Inf in it (`finite`, computed on the device before the copy)."""
    if event is not None:
        event.synchronize()
    if not bool(finite):
        raise _non_finite(rows, cfg, the_plan)
    return rows


def _non_finite(rows: Rows, cfg: HarvestConfig, the_plan: Plan) -> DataError:
    """The error for a batch whose activations hold NaN or Inf: which contexts, and the fix."""
    import torch

    acts = rows.activations.float()  # (R, d_mlp) on the CPU
    bad = (~torch.isfinite(acts)).any(1).numpy()  # (R,)
    contexts = sorted(set(rows.context_id[bad].tolist()))
    shown = ", ".join(str(c) for c in contexts[:5]) + (f" and {len(contexts) - 5} more" if len(contexts) > 5 else "")
    overflow = ""
    if cfg.dtype == "fp16":
        overflow = " (or, if they overflow fp16 only, store them with --dtype fp32 or bf16)"
    return DataError(f"activations: the GPT's layer-{the_plan.layer} MLP activations are NaN or Inf for "
                     f"context{'s' if len(contexts) > 1 else ''} {shown}; the GPT is broken (its training "
                     f"diverged): re-run `monofast gpt train --force` with a lower --learning-rate, then "
                     f"harvest again{overflow}. No shard holding these rows was written")
