"""The SAE training step as one CUDA graph: captured once, replayed for every batch.

At the seed recipe's shapes a step is a few dozen small kernels and the GPU waits on the
Python that launches them (about 2 ms of launching for 0.3 ms of work on an H100). A
CUDA graph records the whole step (forward, backward, the gradient projection, Adam, the
decoder renormalisation, for every SAE of the sweep) and replays it with one launch.

What stays the same: the first `WARMUP_STEPS` steps run eagerly (they are ordinary
training steps, run on a side stream so that lazy initialisation, Triton's autotuning and
the optimizer's state happen outside the capture); the step after them is captured and
replayed, and so is every later one, on the same memory: each batch is copied into one
static input, and the learning rate and each SAE's L1 coefficient live in device tensors
that are refilled before every replay. Everything that changes the SAEs between steps
(resampling, the lambda search, checkpoint restores before training) writes into the same
tensors in place, so the graph sees it.

Used on CUDA, in one process, for the variants whose step has fixed shapes (anthropic2023,
april2024); TopK's AuxK loss picks a data-dependent number of dead features, so it stays
eager. A capture that fails logs why once and training continues eagerly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from monofast.common.log import logger
from monofast.sae.model import K_VARIANTS

if TYPE_CHECKING:
    from monofast.sae.sweep import Member

WARMUP_STEPS = 3
"""Eager steps before the capture."""

Stats = dict[str, torch.Tensor]
EagerStep = Callable[[], list[Stats]]


def unavailable(enabled: bool, variant: str, device: torch.device, world_size: int) -> Optional[str]:
    """Why the step cannot be graphed here (None when it can)."""
    if not enabled:
        return "turned off (--cuda-graphs false)"
    if device.type != "cuda":
        return f"graphs are for CUDA devices, not {device.type}"
    if world_size > 1:
        return "several processes: gradients are all-reduced between the steps' halves"
    if variant in K_VARIANTS:
        return "the AuxK loss of the k variants has data-dependent shapes"
    return None


class GraphedSteps:
    """Runs training steps for a sweep of SAEs, eagerly at first, then by graph replay."""

    def __init__(self, members: Sequence[Member], batch_size: int, d_in: int, device: torch.device,
                 aux_coeff: float):
        self.members = members
        """The sweep (a list the caller may update in place, e.g. new L1 coefficients)."""
        self.aux_coeff = aux_coeff
        self.device = device
        self.x = torch.zeros(batch_size, d_in, device=device)
        """The static input every replay reads."""
        self.coeff = torch.zeros(len(members), device=device)
        """Per SAE: its L1 coefficient times the lambda schedule, refilled every step."""
        self.lr = torch.zeros((), device=device)
        """The learning rate every parameter group reads, refilled every step."""
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.outputs: list[Stats] = []
        self.eager_steps = 0
        self.failed: Optional[str] = None
        self.side = torch.cuda.Stream(device)

    @property
    def active(self) -> bool:
        """True once steps are replays of the captured graph."""
        return self.graph is not None

    def step(self, x: torch.Tensor, lam: float, lr: float, eager: EagerStep) -> list[Stats]:
        """One training step on `x` for every SAE; `eager` runs it the ordinary way (used
        for the warm-up steps and after a failed capture). Returns each SAE's statistics."""
        if self.failed is not None:
            return eager()
        if self.graph is None and self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side):
                stats = eager()
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            return stats
        self._fill(x, lam, lr)
        if self.graph is None:
            try:
                self._capture()
            except Exception as err:  # an op that cannot be captured: train eagerly instead
                self._give_up(f"{type(err).__name__}: {err}")
                return eager()
        assert self.graph is not None
        self.graph.replay()
        return [{name: value.clone() for name, value in out.items()} for out in self.outputs]

    def _fill(self, x: torch.Tensor, lam: float, lr: float) -> None:
        self.x.copy_(x, non_blocking=True)
        for i, member in enumerate(self.members):  # fills from Python scalars: no host-device sync
            self.coeff[i].fill_(member.l1_coeff * lam)
        self.lr.fill_(lr)

    def _body(self) -> list[Stats]:
        outputs = []
        for i, member in enumerate(self.members):
            out = member.sae(self.x)
            loss = out.mse + self.coeff[i] * out.l1 + self.aux_coeff * out.aux
            loss.backward()
            member.sae.optimizer_step(member.optimizer)
            outputs.append({"loss": loss.detach(), "mse": out.mse.detach(), "l1": out.l1.detach(),
                            "l0": out.l0, "aux": out.aux.detach()})
        return outputs

    def _capture(self) -> None:
        saved = []
        for member in self.members:
            member.optimizer.zero_grad(set_to_none=True)
            for group in member.optimizer.param_groups:
                saved.append((group, group["lr"], group.get("capturable", False)))
                group["lr"] = self.lr  # the fused Adam kernel reads this tensor at every replay
                group["capturable"] = True
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.outputs = self._body()
        finally:
            # The graph keeps its pointer to `self.lr`; the groups go back to plain values, so
            # checkpoints hold the same optimizer state with graphs or without.
            for group, lr, capturable in saved:
                group["lr"], group["capturable"] = lr, capturable
        self.graph = graph
        logger.info("sae: training steps are now replays of one CUDA graph (after %d eager steps)",
                    self.eager_steps)

    def _give_up(self, reason: str) -> None:
        self.failed = reason
        self.graph = None
        self.outputs = []
        for member in self.members:
            member.optimizer.zero_grad(set_to_none=True)
        logger.warning("sae: the training step could not be captured as a CUDA graph (%s); training "
                       "continues without one (set --cuda-graphs false to skip the attempt)", reason)


def describe(steps: Optional[GraphedSteps]) -> dict[str, Any]:
    """For the metrics: whether the steps ran as graph replays."""
    if steps is None:
        return {"cuda_graph": False}
    return {"cuda_graph": steps.active, **({"cuda_graph_failed": steps.failed} if steps.failed else {})}
