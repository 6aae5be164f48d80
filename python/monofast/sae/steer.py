"""Steering: clamp SAE features at the hooked MLP activation while the GPT runs.

The hook encodes the post-GELU activation x (B, T, d_mlp) with the SAE, sets the clamped
features to their values at every position, and puts back what the SAE does not explain:

    out = decode(f with f[c] := v[c]) + (x - decode(f))

Since `decode` is affine, that is x + (v - f[c]) W_dec[c] exactly (the bias and the
unclamped features cancel), which is how it is computed: with no clamps, or clamps at the
values the features already hold, the output is x itself, bit for bit. Only the clamped
features' activations are needed, so a ReLU SAE encodes just those columns.

`parse_clamps` reads the command line's `FEATURE=VALUE` (an activation) and `FEATURE=Nx`
(N times the feature's largest activation in the analysis); `sample_clamped` samples
continuations of a batch of prompts with and without clamps from one seed, so the two
samples differ only by the intervention.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch

from monofast.common import files
from monofast.common.errors import DataError, UserError
from monofast.gpt.model import GPT, MLPHook
from monofast.kernels.reference import jump_relu
from monofast.sae.model import CONFIG_FILE, SparseAutoencoder

SPEC = re.compile(r"^\s*(\d+)\s*=\s*(\S+?)\s*(x?)\s*$")
"""`FEATURE=VALUE` or `FEATURE=Nx`; the value itself is checked by `float`."""


class ClampSpec(NamedTuple):
    """One `FEATURE=VALUE` of the command line, parsed but not yet checked against an SAE."""

    feature: int
    """The feature's index in the SAE."""
    value: float
    """The activation to hold it at, or the multiple of its maximum when `relative`."""
    relative: bool
    """True for `Nx`: `value` times the feature's largest activation in the analysis."""


# ---------------------------------------------------------------------------------------
# Parsing


def parse_clamp(spec: str) -> ClampSpec:
    """`"12=5.5"` -> feature 12 at activation 5.5; `"12=3x"` -> 3 times its maximum."""
    match = SPEC.match(spec)
    value = math.nan
    if match:
        try:
            value = float(match.group(2))
        except ValueError:
            pass
    if not match or not math.isfinite(value):
        raise UserError(f"--clamp {spec!r} is not FEATURE=VALUE; write e.g. --clamp 12=5.5 (activation 5.5) "
                        f"or --clamp 12=3x (3 times the feature's largest activation)")
    return ClampSpec(int(match.group(1)), value, bool(match.group(3)))


def resolve_clamps(specs: Sequence[ClampSpec], d_sae: int,
                   max_act: Optional[np.ndarray] = None) -> dict[int, float]:
    """{feature: activation} of parsed clamps: ids checked against the SAE's `d_sae`,
    `Nx` values scaled by `max_act` (F,), the analysis maxima (None: not available).
    A feature clamped twice keeps its last value, as repeated flags do."""
    clamps: dict[int, float] = {}
    for spec in specs:
        if not 0 <= spec.feature < d_sae:
            raise UserError(f"--clamp {spec.feature}=...: feature {spec.feature} does not exist; this SAE has "
                            f"features 0..{d_sae - 1}")
        if not spec.relative:
            clamps[spec.feature] = spec.value
            continue
        if max_act is None:
            raise UserError(f"--clamp {spec.feature}={spec.value:g}x needs the features' largest activations, "
                            f"and this run has no analysis; run `monofast analysis` first or give an "
                            f"activation (e.g. --clamp {spec.feature}=10)")
        if len(max_act) != d_sae:
            raise DataError(f"the analysis has {len(max_act)} features but the SAE {d_sae}; the analysis is "
                            f"stale: re-run `monofast analysis --force`")
        clamps[spec.feature] = spec.value * float(max_act[spec.feature])
    return clamps


def parse_clamps(specs: Sequence[str], d_sae: int, max_act: Optional[np.ndarray] = None) -> dict[int, float]:
    """`resolve_clamps` of command-line strings."""
    return resolve_clamps([parse_clamp(s) for s in specs], d_sae, max_act)


def sae_layer(sae_dir: str | Path, activations_dir: str | Path | None = None) -> int:
    """The GPT layer an SAE reads: `hook_layer` in its cfg.json, else the layer the
    activation store it was trained on was harvested from."""
    sae_dir = Path(sae_dir)
    raw = files.read_json(files.verify_recorded(sae_dir / CONFIG_FILE), "SAE config")
    layer = raw.get("hook_layer", raw.get("metadata", {}).get("hook_layer"))
    if layer is None and activations_dir is not None and (Path(activations_dir) / "index.json").is_file():
        index = files.read_json(Path(activations_dir) / "index.json", "activation store index")
        layer = index.get("gpt", {}).get("layer")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise DataError(f"{sae_dir / CONFIG_FILE} does not say which GPT layer the SAE reads (no hook_layer); "
                        f"re-run `monofast sae --force`")
    return layer


def sae_hook(sae_dir: str | Path) -> str | None:
    """The hook an SAE reads, by monofast's name (`blocks.3.hook_resid_post`); None when its
    cfg.json does not say (written before hooks had names: the MLP's)."""
    raw = files.read_json(files.verify_recorded(Path(sae_dir) / CONFIG_FILE), "SAE config")
    hook = raw.get("monofast_hook_name", raw.get("metadata", {}).get("monofast_hook_name"))
    return hook if isinstance(hook, str) and hook else None


# ---------------------------------------------------------------------------------------
# The hook


def feature_acts(sae: SparseAutoencoder, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(N, len(features)) activations of `features` on x (N, d_in), as `sae.encode(x)[:, features]`.

    A ReLU SAE needs only those encoder columns (an (N, d_in) x (d_in, c) product where
    the full encoding is (d_in, d_sae): at d_sae = 2048 that is most of a clamped sample's
    cost), and so does a BatchTopK one, whose inference threshold is per feature; a top-k
    SAE must rank all pre-activations, so it encodes in full."""
    if sae.cfg.top_k is not None:
        return sae.encode(x)[:, features]
    with torch.no_grad():
        w = sae.W_enc
        xs = x.to(w.dtype) * sae.input_scale.to(w.dtype)  # (N, d_in)
        pre = (xs - sae.b_dec) @ w[:, features] + sae.b_enc[features]  # (N, c)
        threshold = sae.inference_threshold()  # batchtopk, matryoshka: a per-feature JumpReLU
        if threshold is not None:
            return jump_relu(pre, threshold[features].to(pre.dtype))
        return torch.relu(pre)


def clamp_hook(sae: SparseAutoencoder, clamps: Mapping[int, float]) -> MLPHook:
    """A `GPT.hook_mlp` hook that holds each feature of `clamps` at its value at every
    position and leaves the rest of the activation, the SAE's error term included, as it was."""
    ids = sorted(clamps)
    for f in ids:
        if not 0 <= f < sae.cfg.d_sae:
            raise UserError(f"feature {f} does not exist; this SAE has features 0..{sae.cfg.d_sae - 1}")
    device = sae.W_dec.device
    features = torch.tensor(ids, dtype=torch.long, device=device)  # (c,)
    values = torch.tensor([clamps[f] for f in ids], dtype=sae.W_dec.dtype, device=device)  # (c,)
    with torch.no_grad():
        directions = sae.W_dec[features] / sae.input_scale.to(sae.W_dec.dtype)  # (c, d_in): decode's slope

    def hook(act: torch.Tensor) -> Optional[torch.Tensor]:
        if not ids:
            return None
        flat = act.reshape(-1, act.shape[-1])  # (B * T, d_mlp)
        current = feature_acts(sae, flat, features)  # (B * T, c)
        shift = (values - current) @ directions  # (B * T, d_mlp)
        return (flat + shift.to(flat.dtype)).view(act.shape)  # (B, T, d_mlp)

    return hook


@contextlib.contextmanager
def clamped(model: GPT, layer: int, sae: SparseAutoencoder, clamps: Mapping[int, float]) -> Iterator[None]:
    """Within the block, every forward pass of `model` runs with `clamps` applied at `layer`."""
    with model.hook_mlp(layer, clamp_hook(sae, clamps)):
        yield


# ---------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def sample_clamped(model: GPT, prompts: torch.Tensor, tokens: int, sae: Optional[SparseAutoencoder] = None,
                   layer: Optional[int] = None, clamps: Optional[Mapping[int, float]] = None,
                   temperature: float = 0.8, top_k: Optional[int] = 50, seed: int = 0) -> torch.Tensor:
    """(B, tokens) continuations of prompts (B, T), sampled in one batch with the model in
    eval mode and `clamps` applied at `layer` (none: the clean model).

    The generator is seeded with `seed` on the model's device for each call, so a clean
    and a clamped call with the same seed draw the same random numbers: the two samples
    part only where the clamp moves the next-token distribution.

    `GPT.generate` has no KV cache and reruns the whole context at every step. At the quick
    run's size that costs little: 40 tokens for 8 prompts of 24 take 0.28 s on 2 CPU cores
    (a forward pass over 24 positions 3.7 ms, over 63 positions 6.8 ms), the clamp ~10% more."""
    if prompts.dim() != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be (B, T) token ids with T >= 1, got shape {tuple(prompts.shape)}")
    device = next(model.parameters()).device
    prompts = prompts.to(device=device, dtype=torch.long)  # (B, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            if clamps:
                if sae is None or layer is None:
                    raise ValueError("clamping needs the SAE and the layer it reads")
                stack.enter_context(clamped(model, layer, sae, clamps))
            out = model.generate(prompts, tokens, temperature=temperature, top_k=top_k or None,
                                 generator=generator)  # (B, T + tokens)
    finally:
        model.train(was_training)
    return out[:, prompts.shape[1]:]  # (B, tokens)
