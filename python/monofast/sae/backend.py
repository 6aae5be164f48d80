"""One dispatch point for the fused SAE step: which kernels run it on which device.

Backends (all implement the contract in `monofast.kernels.reference`):

- `triton`: fused Triton kernels, chosen automatically on CUDA devices;
- `metal`: Metal epilogue kernels around MPS matrix products, chosen on Apple MPS;
- `torch`: plain PyTorch (`monofast.kernels.eager`), chosen on the CPU and the fallback
  everywhere else.

Each backend also has a sparse form of the step (`sparse=True`: the same results, computed
over the firing features only; `monofast.kernels.sparse`): Triton's own kernels on CUDA,
plain PyTorch (with native CPU kernels where built) everywhere else. The trainer picks the
form by the crossover it measures (`monofast.sae.crossover`).

`MONOFAST_BACKEND=torch|triton|metal` forces one. A forced backend that cannot run on the
tensors' device raises `BackendError` saying why; an automatically chosen one that fails
to import or to launch falls back to `torch` and says so once in the log.

Unforced, an accelerator's kernels are not taken on trust: at the first step of each shape
(and precision, TopK k, form) they race the torch backend on that step, forward and
backward, and the faster one runs it from then on. The winner is logged and kept in the
cache folder's `backends.json` (`monofast.common.measured`), so later runs on the machine
make the same choice without timing again.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from monofast.common.errors import UserError
from monofast.common.log import logger
from monofast.common.measured import machine, race, remembered

ENV = "MONOFAST_BACKEND"

StepFn = Callable[..., Any]
"""A backend's `sae_step`, returning `monofast.kernels.reference.StepOut`."""


class BackendError(UserError):
    """A requested backend cannot run here; the message names the reason and the fix."""


@dataclass(frozen=True)
class Backend:
    """A backend: where its `sae_step` lives and which devices it can run on."""

    name: str
    """The value of MONOFAST_BACKEND that selects it."""
    module: str
    """Import path of the module defining `sae_step(x, w_enc, b_enc, w_dec, b_dec, k, dec_norm)`."""
    device_types: tuple[str, ...]
    """torch device types it accepts; empty means any."""
    casts_inputs: bool
    """True when it takes a single dtype for everything, so a compute dtype is applied by
    casting the inputs (differentiably) before the call."""
    sparse_module: str = "monofast.kernels.sparse"
    """Import path of the module defining its `sparse_step` (same signature as `sae_step`)."""
    sparse_casts_inputs: bool = False
    """`casts_inputs` of the sparse form."""

    def unavailable(self, device: torch.device) -> Optional[str]:
        """Why this backend cannot run on `device` (None when it can)."""
        if self.device_types and device.type not in self.device_types and not self._interpreted(device):
            return (f"the {self.name} backend runs on {' or '.join(self.device_types)} devices, "
                    f"not {device.type}")
        if self.name == "metal":
            if not torch.backends.mps.is_available():
                return "MPS is not available in this PyTorch build or on this machine"
            if not hasattr(torch.mps, "compile_shader"):
                return f"torch {torch.__version__} has no torch.mps.compile_shader (needs torch >= 2.6)"
        try:
            importlib.import_module(self.module)
        except ImportError as err:
            return f"{self.module} cannot be imported ({err})"
        return None

    def _interpreted(self, device: torch.device) -> bool:
        # TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (how the tests check them).
        return self.name == "triton" and device.type == "cpu" and \
            os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

    def step_fn(self, sparse: bool = False) -> StepFn:
        if sparse:
            return importlib.import_module(self.sparse_module).sparse_step
        return importlib.import_module(self.module).sae_step

    def casts(self, sparse: bool) -> bool:
        return self.sparse_casts_inputs if sparse else self.casts_inputs


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", "monofast.kernels.eager", (), casts_inputs=False),
    "triton": Backend("triton", "monofast.kernels.triton", ("cuda",), casts_inputs=True,
                      sparse_module="monofast.kernels.triton.sparse", sparse_casts_inputs=True),
    "metal": Backend("metal", "monofast.kernels.metal", ("mps",), casts_inputs=True),
}

_AUTOMATIC = {"cuda": "triton", "mps": "metal"}
"""The backend chosen by device type when none is forced; anything else runs `torch`."""

_fallen_back: dict[tuple[str, str], str] = {}
"""(backend, device type) pairs that failed automatically, with the reason (logged once)."""

RACE_FILE = "backends.json"
RACE_ROUNDS = 3
"""Timed steps per backend in a race (after one untimed), the best kept."""
_raced: dict[tuple, str] = {}
"""This process's race winners, by device, shapes, dtypes, form and contender."""


def requested() -> Optional[str]:
    """The backend forced by MONOFAST_BACKEND, or None (unset or empty)."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise BackendError(f"{ENV}={value!r} is not a backend; choose one of {', '.join(BACKENDS)} "
                           f"or unset it to choose by device")
    return value


def _fall_back(name: str, device: torch.device, reason: str) -> Backend:
    key = (name, device.type)
    if key not in _fallen_back:
        _fallen_back[key] = reason
        logger.warning("the %s backend cannot run on %s (%s); using the torch backend instead "
                       "(set %s=%s to make this an error)", name, device.type, reason, ENV, name)
    return BACKENDS["torch"]


def resolve(device: torch.device | str) -> Backend:
    """The backend for tensors on `device`: the forced one (checked), else by device type."""
    device = torch.device(device)
    forced = requested()
    if forced is not None:
        backend = BACKENDS[forced]
        reason = backend.unavailable(device)
        if reason is not None:
            raise BackendError(f"{ENV}={forced} was requested but {reason}; unset {ENV} to choose "
                               f"by device, or move the data to a device it supports")
        return backend
    name = _AUTOMATIC.get(device.type, "torch")
    if (name, device.type) in _fallen_back:
        return BACKENDS["torch"]
    backend = BACKENDS[name]
    reason = backend.unavailable(device)
    return _fall_back(name, device, reason) if reason is not None else backend


def sae_step(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor,
             b_dec: torch.Tensor, k: Optional[int] = None, dec_norm: bool = False,
             compute_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None,
             sparse: bool = False):
    """The fused SAE step (`monofast.kernels.reference` documents the contract) on the
    backend for x's device, or on `backend` when named (checked like MONOFAST_BACKEND);
    `sparse` takes its sparse form (the same results).

    `compute_dtype` (e.g. torch.bfloat16) runs the products in that dtype while the
    parameters and their gradients keep theirs, like autocast.
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise BackendError(f"no backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        chosen = BACKENDS[backend]
        reason = chosen.unavailable(x.device)
        if reason is not None:
            raise BackendError(f"backend {backend} was requested but {reason}")
        forced = True
    else:
        chosen = resolve(x.device)
        forced = requested() is not None
        if not forced and chosen.name != "torch":
            chosen = _race_winner(chosen, x, w_enc, b_enc, w_dec, b_dec, k, dec_norm, compute_dtype, sparse)
    try:
        return _call(chosen, x, w_enc, b_enc, w_dec, b_dec, k, dec_norm, compute_dtype, sparse)
    except (ValueError, TypeError):
        raise  # bad inputs: the same on every backend
    except Exception as err:  # a compiler or driver failure in an automatic choice
        if forced or chosen.name == "torch" or _capturing(x):
            raise  # (while a CUDA graph is captured, the capture failed, not the backend)
        fallback = _fall_back(chosen.name, x.device, f"{type(err).__name__}: {err}")
        return _call(fallback, x, w_enc, b_enc, w_dec, b_dec, k, dec_norm, compute_dtype, sparse)


def _race_winner(chosen: Backend, x, w_enc, b_enc, w_dec, b_dec, k, dec_norm, compute_dtype, sparse) -> Backend:
    """`chosen` or the torch backend, whichever took this step faster here (see the module
    docstring); a kernel that fails to launch falls back as an automatic choice does."""
    here = (x.device, tuple(x.shape), w_enc.shape[1], k, dec_norm, x.dtype, compute_dtype, sparse, chosen.name)
    if here not in _raced:  # (a tuple per step; the key below only once per shape)
        if _capturing(x):
            return chosen  # inside a graph capture nothing can be timed; the warm-up steps raced
        key = (f"{machine(x.device)} | B{x.shape[0]} D{x.shape[1]} F{w_enc.shape[1]}"
               f"{f' k{k}' if k is not None else ''}{' l1norm' if dec_norm else ''} | {x.dtype} params with "
               f"{compute_dtype or x.dtype} products | {'sparse' if sparse else 'dense'} | {chosen.name} or torch")
        result = remembered(RACE_FILE, key, lambda: _race(
            (chosen, BACKENDS["torch"]), x, w_enc, b_enc, w_dec, b_dec, k, dec_norm, compute_dtype, sparse),
            keep=lambda result: "failed" not in result)  # a failed launch is tried again next run
        _raced[here] = result["backend"]
        if "failed" not in result:
            logger.info("sae: the %s backend takes the %s step of B %d x D %d -> F %d here (%s)", result["backend"],
                        "sparse" if sparse else "dense", x.shape[0], x.shape[1], w_enc.shape[1],
                        ", ".join(f"{name} {ms:.2f} ms" for name, ms in result["ms"].items()))
    return BACKENDS[_raced[here]]


def _race(candidates: tuple[Backend, ...], x, w_enc, b_enc, w_dec, b_dec, k, dec_norm, compute_dtype,
          sparse) -> dict:
    """Each candidate's best time for the step (forward and the parameters' gradients) on
    copies of the inputs (`measured.race`); a candidate that fails to launch falls back as
    an automatic choice does and leaves the race."""
    leaves = [t.detach().clone().requires_grad_() for t in (w_enc, b_enc, w_dec, b_dec)]
    xs = x.detach()
    failed: set[str] = set()

    def step(backend: Backend) -> Callable[[], None]:
        def run() -> None:
            if backend.name in failed:
                return
            try:
                with torch.enable_grad():
                    out = _call(backend, xs, *leaves, k, dec_norm, compute_dtype, sparse)
                    torch.autograd.grad(out.mse + out.l1, leaves)
            except (ValueError, TypeError):
                raise  # bad inputs: the same on every backend
            except Exception as err:  # a compiler or driver failure: out of the race
                _fall_back(backend.name, xs.device, f"{type(err).__name__}: {err}")
                failed.add(backend.name)
        return run

    times = race({b.name: step(b) for b in candidates}, RACE_ROUNDS, xs.device)
    best = {name: min(ms) for name, ms in times.items() if name not in failed}
    result = {"backend": min(best, key=best.__getitem__), "ms": best}
    return {**result, "failed": sorted(failed)} if failed else result


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _call(backend: Backend, x, w_enc, b_enc, w_dec, b_dec, k, dec_norm, compute_dtype, sparse=False):
    step = backend.step_fn(sparse)
    if not backend.casts(sparse):
        return step(x, w_enc, b_enc, w_dec, b_dec, k=k, dec_norm=dec_norm, compute_dtype=compute_dtype)
    dtype = compute_dtype or x.dtype
    x, w_enc, b_enc, w_dec, b_dec = (t.to(dtype) for t in (x, w_enc, b_enc, w_dec, b_dec))
    return step(x, w_enc, b_enc, w_dec, b_dec, k=k, dec_norm=dec_norm)
