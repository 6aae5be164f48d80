"""The one place that chooses a device and a compute precision for every stage.

Precision rule (every stage): the *compute* precision (`--dtype` of the GPT and the
analysis, `--compute-dtype` of the SAE: the dtype products and autocast run in) is a
runtime choice like the device. `auto` resolves to what this machine does fastest, so the
same config means bf16 on one machine and fp32 on another; changing it neither re-runs a
finished stage nor blocks a resume, and each stage records the precision it actually used
in its outputs (metrics, eval.json, summary.json). The *storage* precision (`dtype` of the
harvested activations, of the SAE parameters) changes what a file holds, and is config.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Optional

from monofast.common import distributed
from monofast.common.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: configs read the names without it
    import torch

PRECISION_NAMES = ("float32", "bfloat16", "float16")
"""Compute precisions by name (torch dtypes of the same names)."""
DTYPE_CHOICES = ("auto",) + PRECISION_NAMES
"""Values of a `dtype` / `compute_dtype` option."""


def parse_device(name: str) -> torch.device:
    """A device name as a `torch.device` (`auto` reads as the CPU); `ValueError` names the fix."""
    import torch

    if name == "auto":
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name!r}: monofast runs on cpu, cuda or mps")
    return device


def pick_device(name: str = "auto") -> torch.device:
    """`auto` prefers CUDA, then Apple MPS, then the CPU; an explicit device must exist.
    Under torchrun a bare `cuda` is this rank's own GPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return distributed.local_device(torch.device("cuda"))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = parse_device(name)
    except ValueError as err:
        raise UserError(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device auto or cpu")
    return distributed.local_device(device)


def native_bf16(device: torch.device) -> bool:
    """Does `device` multiply bfloat16 natively? CUDA GPUs from Ampere on; CPUs with
    AVX-512 BF16 or AMX (elsewhere bf16 is emulated and slower than fp32); MPS: not measured
    here, so no."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def pick_dtype(name: str, device: torch.device, half_fallback: bool = False,
               otherwise: Optional[str] = "float32", flag: str = "--dtype") -> Optional[torch.dtype]:
    """The compute precision for `--dtype name` on `device`.

    `auto`: bfloat16 where the device has it natively (a GPT training step 1.6-2.0x faster
    than fp32 at the quick and laptop shapes on a 2-core AVX-512 BF16 CPU,
    benches/bench_gpt.py); else float16 on CUDA when `half_fallback` (autocast with a loss
    scaler), else `otherwise` (the SAE passes None: its parameters' own dtype). float16 on
    a CPU is refused: it is emulated there and very slow. `flag` is the option's name in
    the errors."""
    import torch

    if name == "auto":
        if native_bf16(device):
            return torch.bfloat16
        if half_fallback and device.type == "cuda":
            return torch.float16
        return None if otherwise is None else getattr(torch, otherwise)
    if name not in PRECISION_NAMES:
        raise UserError(f"{flag} {name}: choose one of {', '.join(DTYPE_CHOICES)}")
    if name == "float16" and device.type == "cpu":
        raise UserError(f"{flag} float16 is very slow on CPUs; use bfloat16 or float32 there")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype | None) -> str:
    """`torch.bfloat16` -> `bfloat16`, as the options and output files spell it."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


MATMUL_PRECISION = {"cuda": "high", "cpu": "medium"}
"""fp32 matrix-product precision while training. CUDA "high": TF32 tensor cores (10-bit
mantissa products, fp32 accumulation), as nanoGPT. CPU "medium": oneDNN may split fp32 into
bf16 pieces; measured at 7.7e-7 relative error against float64 (3.9e-7 at "highest") and
1.1-1.2x the fp32 product rate on a 2-core AVX-512 BF16 CPU. MPS keeps the default."""


@contextlib.contextmanager
def matmul_precision(device: torch.device) -> Iterator[None]:
    """Set `MATMUL_PRECISION` for the device within the block, restoring the caller's after."""
    import torch

    before = torch.get_float32_matmul_precision()
    if device.type in MATMUL_PRECISION:
        torch.set_float32_matmul_precision(MATMUL_PRECISION[device.type])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Autocast to `dtype` on `device` (off for float32)."""
    import torch

    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
