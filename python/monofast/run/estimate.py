"""Rough time and disk estimates of a run, from its configs and this machine's speed.

The model is deliberately simple, and everything that shows its numbers calls them
estimates. Each stage's work is counted in floating-point operations (GPT training:
6N + 12·L·T·C per token, PaLM's count; an SAE step: five (B, D) × (D, F) sized products
per SAE; harvest and analysis: forward passes), divided by the device's matrix-product
rate (measured in a fraction of a second when asked) times the share of that rate the
stage reaches, plus a fixed cost per step (kernel launches, the Python loop) and per
item for the parts that are not matrix products (tokenizing, writing rows and pages).
An L1 SAE's step, once it is sparse (`monofast.sae.crossover`), counts as two products
instead of five. The shares and per-item costs were fitted to the `quick` and `laptop`
presets on a 2-core CPU; on other machines, and for shapes far from these, expect errors
of 2× or more.

Disk use is counted from what each stage keeps: tokens, weights and optimizer state,
activation rows × dimension × bytes per value, example windows and pages.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

# Bytes per stored activation value, by the harvest's dtype.
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
ROW_META_BYTES = 13
"""Per activation row: context id, token id, position (int32 each) and source id (uint8)."""


class Device(NamedTuple):
    """Where the matrix products of a run happen, and how fast."""

    kind: str
    """cpu, cuda or mps."""
    name: str
    """For people: "CPU, 2 threads", "NVIDIA H100 80GB HBM3"."""
    gflops: float
    """Best matrix-product rate of fp32 and bf16, GFLOP/s."""
    measured: bool
    """False when `gflops` is an assumption (nothing could be measured)."""
    precision: str = "fp32"
    """What `auto` computes in there: bf16 where the device multiplies it natively, else fp32."""


@dataclass(frozen=True)
class Rates:
    """How one kind of device spends its time, besides the matrix products it measures."""

    gpt_share: float
    """Share of the matrix-product rate GPT training reaches."""
    gpt_step_s: float
    """Fixed cost of a GPT training step (launches, optimizer, Python)."""
    forward_share: float
    """Share reached by inference forward passes (harvest, CE-loss evaluation)."""
    sae_share: float
    """Share reached by the SAE step."""
    sae_step_s: float
    """Fixed cost of one SAE's step (a sweep pays it per member)."""
    harvest_row_s: float
    """Per stored activation row: gathering, converting and writing it."""
    analysis_share: float
    """Share reached by the analysis pass (forward, encoder and the per-feature bookkeeping)."""
    analysis_token_s: float
    """Per analysed token: top-k, reservoirs and histograms on the CPU."""


# CPU: fitted to a quick and a laptop run on a quiet 2-core AVX2 CPU, everything in fp32
# (products measured at 180 GFLOP/s; quick: GPT 190 s, harvest 3.5 s, SAE 119 s, analysis
# 9.9 s, site 7.8 s; laptop: GPT 531 s, harvest 35 s, SAE 190 s, analysis 52 s, site 12 s;
# each stage's estimate within 30% of both). GPT training reached 60-65% of the fp32 rate
# in both. Where the CPU's best rate is bf16 (AVX-512 BF16, AMX) the shares are scaled by
# `BF16_CPU_SCALE`: the GPT reached 27-40% of the bf16 rate on such a 2-core CPU, its
# elementwise work not sped up by bf16 products. GPU numbers are assumptions (small models
# are bound by kernel launches) until measured on a GPU.
RATES = {
    "cpu": Rates(gpt_share=0.62, gpt_step_s=0.002, forward_share=0.9, sae_share=0.9, sae_step_s=0.002,
                 harvest_row_s=5e-6, analysis_share=0.7, analysis_token_s=8e-6),
    "cuda": Rates(gpt_share=0.30, gpt_step_s=0.008, forward_share=0.20, sae_share=0.5, sae_step_s=0.0015,
                  harvest_row_s=1e-6, analysis_share=0.10, analysis_token_s=4e-6),
    "mps": Rates(gpt_share=0.30, gpt_step_s=0.015, forward_share=0.20, sae_share=0.4, sae_step_s=0.004,
                 harvest_row_s=3e-6, analysis_share=0.10, analysis_token_s=10e-6),
}
ASSUMED_GFLOPS = {"cpu": 200.0, "cuda": 100_000.0, "mps": 5_000.0}
BF16_CPU_SCALE = 0.53
"""The CPU shares' factor where the device computes in bf16 (GPT training: 0.33 / 0.62)."""
SAE_DENSE_STEPS = 100
"""Steps an L1 SAE trains in the dense form before its firing falls below the crossover
(the laptop and quick runs switched at steps 75-150)."""
SAE_SPARSE_PRODUCTS = 2.0
"""The sparse step's cost in (B, D) × (D, F) products: its dense encoder product and the
firing-sized rest (0.31 of the five-product step at 1% firing, 0.53 at 8%, laptop shape)."""

DATA_CHAR_S = 3e-7
"""Reading, normalising and tokenizing one character (2M characters: 0.9 s measured, 1.1 s
estimated with the stage's fixed 0.5 s)."""
PAGE_S = 0.004
"""Writing one feature page (2,048 pages: 7.8 s; 3,072: 12 s)."""
WRITE_BYTES_S = 1.0e9
"""Sustained file writing, bytes per second."""


class StageEstimate(NamedTuple):
    seconds: float
    disk_bytes: int


# ---------------------------------------------------------------------------------------
# Measuring the device

def measure_device(name: str = "auto") -> Device:
    """Time a few square matrix products in fp32, and in bf16 where the device multiplies it
    natively (the precision `auto` then picks), on the device `name` (as the stages choose
    it: auto prefers CUDA, then MPS, then the CPU). Takes well under a second. (A CPU
    without native bf16 emulates it at ~1 GFLOP/s: timing it there took 26 s.)"""
    import torch

    from monofast.common.device import native_bf16, pick_device

    device = pick_device(name)
    n = 1536 if device.type == "cpu" else 8192  # 1,024 under-reports a 2-core CPU by ~30%
    bf16 = native_bf16(device)
    best = 0.0
    for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
        try:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            seconds = math.inf
            for _ in range(3):  # the first product pays for the kernel choice
                _sync(device)
                start = time.perf_counter()
                a @ b
                _sync(device)
                seconds = min(seconds, time.perf_counter() - start)
            best = max(best, 2 * n**3 / seconds / 1e9)
        except (RuntimeError, TypeError):  # a dtype this device cannot multiply
            continue
    kind = device.type if device.type in RATES else "cpu"
    measured = best > 0
    precision = "bf16" if bf16 else "fp32"  # what the stages' `auto` picks there
    return Device(kind, _device_name(device), best if measured else ASSUMED_GFLOPS[kind], measured, precision)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------
# The model of each stage

def chars_per_token(vocab_size: int) -> float:
    """Characters per byte-level BPE token on the Shakespeare + Python mix: 1.5 at a
    vocabulary of 320 and 2.3 at 1,024 (measured), logarithmic in between and beyond."""
    return max(1.0, 2.33 + 0.70 * math.log(vocab_size / 1024))


@dataclass(frozen=True)
class Shapes:
    """The sizes the estimates need, derived from the stages' configs."""

    tokens: float
    """Tokens in both splits."""
    vocab: int
    n_layer: int
    n_embd: int
    block: int
    d_sae: int

    @property
    def d_mlp(self) -> int:
        return 4 * self.n_embd

    def gpt_params(self) -> float:
        """Weights without the position embedding, tied token embedding counted once."""
        return 12 * self.n_layer * self.n_embd**2 + self.vocab * self.n_embd

    def forward_flops(self, layers: int | None = None, head: bool = True) -> float:
        """Forward FLOPs per token through `layers` blocks (all by default) and the head."""
        layers = self.n_layer if layers is None else layers
        flops = 2 * 12 * layers * self.n_embd**2 + 2 * 2 * layers * self.block * self.n_embd
        return flops + (2 * self.vocab * self.n_embd if head else 0)


def shapes(configs: Mapping[str, Any]) -> Shapes:
    d, g, s = configs.get("data"), configs.get("gpt"), configs.get("sae")
    chars = len(getattr(d, "sources", ("a", "b"))) * getattr(d, "chars_per_source", 1_000_000)
    vocab = getattr(d, "vocab_size", 1024)
    n_embd = getattr(g, "n_embd", 192)
    d_mlp = 4 * n_embd
    d_sae = (getattr(s, "d_sae", 0) or getattr(s, "expansion", 8) * d_mlp) if s is not None else 0
    return Shapes(tokens=chars / chars_per_token(vocab), vocab=vocab, n_layer=getattr(g, "n_layer", 2),
                  n_embd=n_embd, block=getattr(g, "block_size", 256), d_sae=d_sae)


def _data(cfg: Any, sh: Shapes, device: Device, rates: Rates) -> StageEstimate:
    chars = len(cfg.sources) * cfg.chars_per_source
    token_bytes = 2 if sh.vocab <= 65_536 else 4
    disk = sh.tokens * (token_bytes + 1) + 60 * sh.vocab + 4_096
    return StageEstimate(chars * DATA_CHAR_S + 0.5, int(disk))


def _gpt(cfg: Any, sh: Shapes, device: Device, rates: Rates) -> StageEstimate:
    tokens_per_step = cfg.batch_size * cfg.block_size
    train_flops = (6 * sh.gpt_params() + 12 * sh.n_layer * sh.block * sh.n_embd) * tokens_per_step
    evals = cfg.max_iters // cfg.eval_interval + 1
    eval_flops = evals * cfg.eval_batches * tokens_per_step * sh.forward_flops()
    sample_flops = (len(cfg.sample_prompts) * cfg.num_samples * cfg.sample_tokens
                    * sh.block * sh.forward_flops())  # no KV cache: each new token re-reads its context
    rate = device.gflops * 1e9
    seconds = (cfg.max_iters * (train_flops / (rate * rates.gpt_share) + rates.gpt_step_s)
               + (eval_flops + sample_flops) / (rate * rates.forward_share) + 1.0)
    disk = 16 * (sh.gpt_params() + sh.block * sh.n_embd)  # weights 4 B + checkpoint (weights, Adam) 12 B
    return StageEstimate(seconds, int(disk))


def _activations(cfg: Any, sh: Shapes, device: Device, rates: Rates) -> StageEstimate:
    length = cfg.context_length or sh.block
    layers = (cfg.layer % sh.n_layer) + 1 if sh.n_layer else 1
    rows = cfg.contexts * cfg.positions_per_context
    row_bytes = sh.d_mlp * DTYPE_BYTES.get(cfg.dtype, 4) + ROW_META_BYTES
    flops = cfg.contexts * length * sh.forward_flops(layers, head=False)
    seconds = (flops / (device.gflops * 1e9 * rates.forward_share) + rows * rates.harvest_row_s
               + rows * row_bytes / WRITE_BYTES_S + 0.5)
    return StageEstimate(seconds, int(rows * row_bytes + 8 * cfg.contexts))


def _sae(cfg: Any, sh: Shapes, device: Device, rates: Rates, rows: int) -> StageEstimate:
    import torch  # here: listing presets' estimates imports no torch until asked

    from monofast.sae import graph as sae_graph
    from monofast.sae.model import K_VARIANTS

    members = len(cfg.k) if cfg.variant in K_VARIANTS else len(cfg.l1_coeff)
    held = min(cfg.held_out, rows // 10)
    steps = math.ceil(max(rows - held, 0) * cfg.epochs / cfg.batch_size)
    # A step replayed as a CUDA graph stays dense (one process assumed).
    graphed = sae_graph.unavailable(cfg.cuda_graphs, cfg.variant, torch.device(device.kind), 1) is None
    if cfg.variant in K_VARIANTS:
        products = 3.0 * steps  # TopK decodes k rows per token, not all F
    elif cfg.sparse_step == "off" or graphed:
        products = 5.0 * steps
    else:  # dense until the penalty makes it sparse (from the start with --sparse-step on)
        dense = 0 if cfg.sparse_step == "on" else min(steps, SAE_DENSE_STEPS)
        products = 5.0 * dense + SAE_SPARSE_PRODUCTS * (steps - dense)
    product_flops = 2 * cfg.batch_size * sh.d_mlp * sh.d_sae
    ce_flops = 3 * cfg.ce_eval_tokens * (sh.forward_flops() + members * 4 * sh.d_mlp * sh.d_sae)
    rate = device.gflops * 1e9
    seconds = (members * (products * product_flops / (rate * rates.sae_share) + steps * rates.sae_step_s)
               + ce_flops / (rate * rates.forward_share) + 1.0)
    weights = 4 * (2 * sh.d_mlp * sh.d_sae + sh.d_sae + sh.d_mlp)
    return StageEstimate(seconds, int((members + 1) * weights))


def _family(cfg: Any, sh: Shapes, device: Device, rates: Rates, rows: int) -> StageEstimate:
    """The family's widths train side by side: one SAE of their summed width, one member."""
    one = dataclasses.replace(cfg, l1_coeff=cfg.l1_coeff[:1], k=cfg.k[:1])
    return _sae(one, dataclasses.replace(sh, d_sae=sum(cfg.expansions) * sh.d_mlp), device, rates, rows)


def _findings(cfg: Any, sh: Shapes, device: Device, rates: Rates, family: Any) -> StageEstimate:
    """Two models and every family member over the tokens, the correlations, the map and the
    steering continuations (no KV cache: each new token re-reads its context)."""
    widths = sh.d_sae + sum(getattr(family, "expansions", ())) * sh.d_mlp
    tokens = min(cfg.tokens, sh.tokens)
    flops = tokens * (2 * sh.forward_flops(head=False) + 2 * sh.d_mlp * (widths + sh.d_sae)
                      + 2 * (sh.d_sae**2 + sh.d_mlp**2))
    steered = 2 * cfg.steer_features * 3 * cfg.steer_prompts * cfg.steer_tokens * 64 * sh.forward_flops()
    seconds = (flops + steered) / (device.gflops * 1e9 * rates.analysis_share) + min(cfg.map_points, widths) * 0.01 + 5
    # ~40 B per feature of every width (family.npz), the specificity table, the JSON files
    return StageEstimate(seconds, int(widths * 40 + sh.d_sae * 12 + 40_000))


def _analysis(cfg: Any, sh: Shapes, device: Device, rates: Rates) -> StageEstimate:
    tokens = min(cfg.tokens, sh.tokens)
    flops = tokens * (sh.forward_flops() + 2 * sh.d_mlp * sh.d_sae)
    seconds = flops / (device.gflops * 1e9 * rates.analysis_share) + tokens * rates.analysis_token_s + 1.0
    width = 2 * cfg.window_radius + 1
    samples = cfg.quantile_bins * cfg.quantile_samples
    per_unit = cfg.top_k * (width * 12 + 20) + samples * (width * 8 + 24) + 900
    disk = sh.d_sae * per_unit + sh.d_mlp * 500 + 40 * sh.vocab
    return StageEstimate(seconds, int(disk))


def _site(cfg: Any, sh: Shapes, analysis: Any) -> StageEstimate:
    pages = min(cfg.max_pages or sh.d_sae, sh.d_sae)
    width = 2 * getattr(analysis, "window_radius", 12) + 1
    slots = (getattr(analysis, "top_k", 20)
             + getattr(analysis, "quantile_bins", 12) * getattr(analysis, "quantile_samples", 5)) * width
    disk = pages * (15_000 + 16 * slots) + sh.d_sae * 150 + 50_000  # 18 kB a smoke page, 46 kB a quick one
    return StageEstimate(pages * PAGE_S + 0.5, int(disk))


def estimate(configs: Mapping[str, Any], device: Device) -> dict[str, StageEstimate]:
    """An estimate for every stage in `configs` (stage name -> resolved config). Stages
    the model does not know get none."""
    sh = shapes(configs)
    rates = RATES.get(device.kind, RATES["cpu"])
    if device.kind == "cpu" and device.precision == "bf16":
        rates = dataclasses.replace(rates, **{f: getattr(rates, f) * BF16_CPU_SCALE for f in
                                              ("gpt_share", "forward_share", "sae_share", "analysis_share")})
    out: dict[str, StageEstimate] = {}
    harvest = configs.get("activations")
    rows = harvest.contexts * harvest.positions_per_context if harvest is not None else 0
    for name, cfg in configs.items():
        if name == "data":
            out[name] = _data(cfg, sh, device, rates)
        elif name == "gpt":
            out[name] = _gpt(cfg, sh, device, rates)
        elif name == "activations":
            out[name] = _activations(cfg, sh, device, rates)
        elif name == "sae":
            out[name] = _sae(cfg, sh, device, rates, rows)
        elif name == "analysis":
            out[name] = _analysis(cfg, sh, device, rates)
        elif name == "family":
            out[name] = _family(cfg, sh, device, rates, rows)
        elif name == "findings":
            out[name] = _findings(cfg, sh, device, rates, configs.get("family"))
        elif name == "site":
            out[name] = _site(cfg, sh, configs.get("analysis"))
    return out


# ---------------------------------------------------------------------------------------
# Formatting

def duration(seconds: float) -> str:
    """3 s, 2 min 05 s, 1 h 02 min."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        m, s = divmod(round(seconds), 60)
        return f"{m} min {s:02d} s"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m:02d} min"


def size(nbytes: float) -> str:
    """1.2 MB, 630 MB, 4.3 GB (powers of 1,000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{nbytes:.0f} B"
