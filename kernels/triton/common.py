"""What the kernels share: autotuning that steps aside under the interpreter, tile order, the
K-loop of every product (`gemm_tile`), sums.

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


@triton.jit
def tile_offsets(n_m, n_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """(o_m, o_n, m_m, m_n): the row and column offsets of this program's output tile (in
    `tile_ids` order) and their masks, the in-bounds rows (< n_m) and columns (< n_n)."""
    i_m, i_n = tile_ids(n_m, n_n, BLOCK_M, BLOCK_N, GROUP)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return o_m, o_n, o_m < n_m, o_n < n_n


@triton.jit
def gemm_tile(
    a_ptr,  # [M, K] as read: A[i, k] at a_ptr + i * stride_am + k * stride_ak
    b_ptr,  # [K, N] as read: B[k, j] at b_ptr + k * stride_bk + j * stride_bn
    bias_ptr,  # [K] when BIAS == "k", [M] when BIAS == "m", subtracted from A; unread when None
    o_m, o_n,  # [BLOCK_M], [BLOCK_N] the output tile's rows and columns (`tile_offsets`)
    m_m, m_n,  # [BLOCK_M], [BLOCK_N] their masks
    n_k,  # K, the length of the reduction
    stride_am, stride_ak, stride_bk, stride_bn,
    BIAS: tl.constexpr,  # None, "k" (one bias per column of A) or "m" (one per row of A)
    UPCAST: tl.constexpr,  # multiply in float32 (the interpreter's bf16 dot is wrong)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The float32 [BLOCK_M, BLOCK_N] tile (A - bias)[o_m, :] @ B[:, o_n]: the K-loop of every
    product in the step. The strides let it read an operand transposed in place (w_dec^T, a^T
    of the weight gradients), and the bias centres A (x - b_dec) as each block is loaded, so
    no centred copy is stored. Rows and columns outside m_m, m_n hold no meaningful values
    (padded rows are -bias @ B when BIAS == "k"): the caller's masked stores drop them."""
    if BIAS == "m":
        # Constant along the reduction: loaded once.
        b_bias_m = tl.load(bias_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < n_k
        p_a = a_ptr + o_m[:, None] * stride_am + o_k[None, :] * stride_ak
        b_a = tl.load(p_a, mask=m_m[:, None] & m_k[None, :], other=0.0)
        if BIAS == "k":
            # Padded columns stay zero: both loads give 0 there.
            b_bias_k = tl.load(bias_ptr + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_a = b_a.to(tl.float32) - b_bias_k[None, :]
        p_b = b_ptr + o_k[:, None] * stride_bk + o_n[None, :] * stride_bn
        b_b = tl.load(p_b, mask=m_k[:, None] & m_n[None, :], other=0.0)
        if BIAS == "m":
            # Padded columns (batch rows of the weight gradients) must stay zero after
            # centring, or they would add -bias.
            b_a = tl.where(m_k[None, :], b_a.to(tl.float32) - b_bias_m[:, None], 0.0).to(b_a.dtype)
        if UPCAST:
            b_a = b_a.to(tl.float32)
            b_b = b_b.to(tl.float32)
        else:
            # A centred block is float32: multiply in B's dtype (a no-op cast otherwise).
            b_a = b_a.to(b_b.dtype)
        acc = tl.dot(b_a, b_b, acc)
    return acc
