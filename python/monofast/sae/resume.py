"""Checkpoints of the SAE stage, and where a run starts: fresh, or resumed with --resume.

`checkpoint.pt` holds every SAE's weights and optimizer state, the step, the metrics so
far, the stream's position (each rank's under torchrun), the random state and the lambda
search's, in one atomically written file; it is removed once the stage's files are written.
A checkpoint resumes only under the same options (the runtime ones aside:
`SAETrainConfig.RUNTIME`) on the same store, with as many processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

from monofast.activations.store import ActivationStore
from monofast.common import checkpoint, config, distributed, files
from monofast.common.checkpoint import CHECKPOINT_FILE
from monofast.common.errors import UserError
from monofast.common.log import logger
from monofast.sae import search as sae_search
from monofast.sae.batches import TrainingBatches
from monofast.sae.config import SAETrainConfig
from monofast.sae.evaluate import METRICS_FILE
from monofast.sae.sweep import Member, set_lambdas

CHECKPOINT_FORMAT = 3
"""3: the held-out rows end at a context boundary, so a format-2 checkpoint trained on other rows."""


class TrainState(NamedTuple):
    """Where a run stands: a fresh one at step 0, a resumed one where its checkpoint was made."""

    step: int
    """Training steps done."""
    records: list[dict[str, Any]]
    """Lines of metrics.jsonl written so far."""
    seconds: float
    """Training time so far (for the rows/s of the metrics)."""
    sparse: Optional[dict[str, Any]] = None
    """Which SAE takes the sparse step, and its switches so far (`SparseSwitch.state`)."""


def checkpoint_identity(cfg: SAETrainConfig, store: ActivationStore) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: every option but the runtime ones
    (device, compute precision, ...: `config.identity`), and the store it read (its
    fingerprint and shard checksums: a store written without a fingerprint is still told
    apart)."""
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
        "sparse": state.sparse,
    }
    if positions is not None:
        payload.update(batches=positions, world_size=here.size)
    checkpoint.save(out / CHECKPOINT_FILE, payload)


def load_checkpoint(out: Path, cfg: SAETrainConfig, store: ActivationStore, members: list[Member],
                    batches: TrainingBatches, rng: np.random.Generator,
                    search: Optional[sae_search.LambdaSearch] = None) -> TrainState:
    """Restore a checkpoint made with the same options on the same store; refuse any other."""
    payload = checkpoint.load(out / CHECKPOINT_FILE, CHECKPOINT_FORMAT, "identity", checkpoint_identity(cfg, store),
                              runtime=SAETrainConfig.RUNTIME)
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
    return TrainState(int(payload["step"]), list(payload["records"]), float(payload["seconds"]),
                      payload.get("sparse"))


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
