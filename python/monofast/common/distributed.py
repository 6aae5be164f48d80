"""Several processes, one job: torchrun's ranks as the stages see them.

`torchrun --nproc_per_node=N -m monofast COMMAND ...` starts N copies of the command line
with RANK, WORLD_SIZE and LOCAL_RANK set. The CLI joins them into one process group
(gloo for tensors on the CPU, NCCL for tensors on CUDA GPUs) and rank 0 runs the command
as a single process would: it decides which stages are up to date, logs, shows progress
and writes every manifest, checkpoint and metrics file. The other ranks follow it: when
rank 0 starts a stage that can share its work (`Stage.distributed`: GPT training, the
harvest, SAE training) it sends them the stage's config and they run it alongside, each
on its own part; rank 0 records the stage as finished only once every rank is done.
Every other stage runs on rank 0 alone while the rest wait.

Launched without torchrun, or with one process, nothing here changes anything: `world()`
is rank 0 of 1 and every collective is a no-op, so single-process runs stay bit-for-bit
what they were.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

from monofast.common import log
from monofast.common.errors import UserError

if TYPE_CHECKING:
    import torch

TIMEOUT = datetime.timedelta(hours=2)
"""How long a rank waits in one collective. The followers wait in one while rank 0 runs a
stage alone (the analysis of a large preset takes many minutes), so it is long; a rank
that dies does not leave the others waiting this long: torchrun stops them all."""


class World(NamedTuple):
    """This process's place among the ranks of the job."""

    rank: int
    """0 .. size - 1; rank 0 writes the files and the logs."""
    size: int
    """Number of processes (1 without torchrun)."""
    local_rank: int
    """Rank among the processes of this machine: the GPU it uses."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World(0, 1, 0)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world() -> World:
    """The current world: the process group's when one is running, else `SINGLE`."""
    if "torch" not in sys.modules or not _initialized():  # the CLI imports torch only when it needs it
        return SINGLE
    dist = _dist()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def is_main() -> bool:
    return world().is_main


def launched() -> bool:
    """True when torchrun started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start several "
                        f"processes with `torchrun --nproc_per_node=N -m monofast -- COMMAND ...`") from None


# ---------------------------------------------------------------------------------------
# Process group


def init() -> World:
    """Join the process group torchrun described in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Picks this rank's GPU by LOCAL_RANK; ranks
    other than 0 log errors only and show no progress bars."""
    import torch

    if _initialized():
        return world()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"{', '.join(missing)} not set; start several processes with "
                        f"`torchrun --nproc_per_node=N -m monofast ...`")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if _gpu_each():
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"  # CPU tensors (metrics, objects, barriers) go through gloo
    _dist().init_process_group(backend=backend, init_method="env://", timeout=TIMEOUT)
    here = world()
    if not here.is_main:
        log.silence()
    return here


def shutdown() -> None:
    """Leave the process group (a no-op without one)."""
    if "torch" in sys.modules and _initialized():
        _dist().destroy_process_group()


def _gpu_each() -> bool:
    """Does every process on this machine have a GPU of its own (LOCAL_WORLD_SIZE of them)?"""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """A bare `cuda` device as this rank's own GPU (`cuda:LOCAL_RANK`) under torchrun."""
    import torch

    here = world()
    if device.type != "cuda" or here.size == 1:
        return device
    if not _gpu_each():
        count = torch.cuda.device_count()
        raise UserError(f"{os.environ.get('LOCAL_WORLD_SIZE')} processes on this machine but {count} GPU(s): "
                        f"use --nproc_per_node {count}, or --device cpu")
    return torch.device("cuda", here.local_rank) if device.index is None else device


def check_divides(batch_size: int, flag: str) -> World:
    """The world, after checking that its ranks can split a global batch evenly."""
    here = world()
    if batch_size % here.size:
        lower = max(here.size, batch_size // here.size * here.size)
        raise UserError(f"{flag} {batch_size} does not split evenly over {here.size} processes; use a "
                        f"multiple of {here.size} (e.g. {flag} {lower}) or another --nproc_per_node")
    return here


# ---------------------------------------------------------------------------------------
# Collectives (no-ops on one process)


def barrier() -> None:
    if world().size > 1:
        _dist().barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place."""
    if world().size > 1:
        _dist().all_reduce(tensor)
    return tensor


def mean(values: Sequence[float]) -> list[float]:
    """Each value averaged over the ranks (float64 on the host)."""
    import torch

    here = world()
    if here.size == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    _dist().all_reduce(t)
    return (t / here.size).tolist()


def broadcast_(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite `tensors` on every rank with rank 0's, in place."""
    if world().size > 1:
        for t in tensors:
            _dist().broadcast(t, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (any picklable value) on every rank."""
    if world().size == 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    here = world()
    if here.size == 1:
        return [obj]
    out: list[Any] = [None] * here.size
    _dist().all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------
# The CLI under torchrun: rank 0 leads, the others follow


_in_stage = False
"""True on rank 0 between `lead` and `stage_done`: the followers are inside the stage."""


def join(follow: Callable[[str, Any, Path], None]) -> int | None:
    """Called by the CLI first. Without torchrun: None (run the command). Under torchrun:
    joins the process group; rank 0 gets None and runs the command, every other rank runs
    `follow(stage, cfg, run_root)` for each stage rank 0 shares (`lead`) until it is
    released, then gets its exit code."""
    if not launched():
        return None
    here = init()
    if here.is_main:
        return None
    try:
        return _follow(follow)
    finally:
        shutdown()


def leave() -> None:
    """Called by the CLI last, on rank 0: release the followers (unless they are still
    inside a stage that failed here: torchrun stops them) and leave the process group."""
    if not (launched() and _initialized()):
        return
    if is_main() and not _in_stage:
        broadcast_object(("stop",))
    shutdown()


def lead(stage: str, cfg: Any, root: Path) -> None:
    """On rank 0: have the followers run `stage` with `cfg` in the run directory `root`."""
    global _in_stage
    if world().size > 1:
        broadcast_object(("stage", stage, cfg, str(root)))
        _in_stage = True


def stage_done() -> None:
    """On every rank, after a shared stage: wait until all ranks have written their part."""
    global _in_stage
    barrier()
    _in_stage = False


def run_shared(stage: Any, cfg: Any, run: Any, runner: Callable[[Any, Any], None]) -> None:
    """Run a pipeline stage's `runner(cfg, run)`: on every rank when the stage shares its
    work (`stage.distributed`), else on rank 0 alone."""
    if world().size > 1 and getattr(stage, "distributed", False):
        lead(run.folder_name(stage.name), cfg, run.root)  # `twin/gpt` for the second model
        runner(cfg, run)
        stage_done()
    else:
        runner(cfg, run)


def _follow(follow: Callable[[str, Any, Path], None]) -> int:
    while True:
        message = broadcast_object(None)
        if message[0] == "stop":
            return 0
        _, name, cfg, root = message
        follow(name, cfg, Path(root))
        stage_done()
