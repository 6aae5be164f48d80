"""What the kernels share: autotuning that steps aside under the interpreter, tile order, sums.

`@triton.autotune` times every config on a device, and the interpreter (TRITON_INTERPRET=1,
how the tests run these kernels on a CPU) has none. Whether a kernel is interpreted is
decided when `@triton.jit` decorates it, so this module reads the same switch at import
time: interpreted kernels are left untuned and the launchers pass `INTERPRET_META`, small
blocks that make even the tests' tiny odd shapes span several tiles and exercise every mask.

The kernels call only Triton builtins and jit functions of this package, never the
jit-compiled helpers of `triton.language` (`tl.sum` is one): those are compiled or
interpreted once, when Triton is imported, while these follow the switch when this package
is imported. So a process that imported Triton normally can still interpret these kernels
(the tests do exactly that, and leave no trace of it for other tests).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import triton
import triton.language as tl

INTERPRET_META: dict[str, int] = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
"""Block sizes under the interpreter: the smallest `tl.dot` accepts."""


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter instead of compiling them."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gemm_configs(small_k: bool = False) -> list[triton.Config]:
    """A short list of tile shapes for the SAE products, from common Hopper/Ampere choices.

    Keyed on the three problem sizes, so each (B, D, F) is timed once per process.
    `small_k`: the reduction dimension is the model width D (hundreds), so long K blocks
    and deep pipelines buy little.
    """
    shapes = [
        # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (128, 256, 64, 8, 3),  # the large bf16 tiles Hopper favours (too big for fp32: skipped there)
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 3),
    ]
    if small_k:
        shapes = [s for s in shapes if s[2] <= 64]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def autotune(configs: Sequence[triton.Config], key: list[str],
             reset_to_zero: list[str] | None = None) -> Callable[[Any], Any]:
    """`triton.autotune`, or the identity under the interpreter."""
    if interpreting():
        return lambda fn: fn
    return triton.autotune(configs=list(configs), key=key, reset_to_zero=reset_to_zero)


def launch_meta() -> dict[str, int]:
    """Extra launch arguments: the fixed blocks under the interpreter, none when autotuned."""
    return dict(INTERPRET_META) if interpreting() else {}


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def block_sum(b_x, AXIS: tl.constexpr):
    """`tl.sum` of a block along AXIS, through the builtin `tl.reduce` (see the module docstring)."""
    return tl.reduce(b_x, AXIS, _add)


GROUP_M = 8
"""Row tiles per group in the launch order: programs running together share GROUP_M row
tiles and their column tiles, so the operands they read stay in L2 (Triton's matmul
tutorial order; ~10% on large products)."""


@triton.jit
def tile_ids(n_m, n_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """(row tile, column tile) of this program in a 1-D grid of cdiv(n_m) x cdiv(n_n) tiles,
    grouped GROUP row tiles at a time."""
    i_pid = tl.program_id(0)
    tiles_m = (n_m + BLOCK_M - 1) // BLOCK_M
    tiles_n = (n_n + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP * tiles_n
    first_m = (i_pid // per_group) * GROUP
    size_m = tl.minimum(tiles_m - first_m, GROUP)
    i_m = first_m + (i_pid % per_group) % size_m
    i_n = (i_pid % per_group) // size_m
    return i_m, i_n


def grid_1d(n_m: int, n_n: int) -> Callable[[dict[str, Any]], tuple[int]]:
    """Launch grid for `tile_ids`: one program per output tile."""
    return lambda meta: (triton.cdiv(n_m, meta["BLOCK_M"]) * triton.cdiv(n_n, meta["BLOCK_N"]),)
