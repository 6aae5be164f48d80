"""`monofast gpt sample`: continue a prompt with the trained GPT, optionally with SAE
features clamped at the hooked MLP (`--clamp FEATURE=VALUE`, `monofast.sae.steer`)."""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from typing import ContextManager, Optional, Sequence

import numpy as np
import torch

from monofast.analysis.output import FEATURES
from monofast.cli.options import DEFAULT_PRESET, args_run_dir
from monofast.common import files
from monofast.common.config import not_utf8
from monofast.common.device import pick_device
from monofast.common.errors import DataError, UserError
from monofast.common.log import logger
from monofast.data import tokenizer
from monofast.data.splits import load_meta
from monofast.gpt.model import GPT
from monofast.gpt.sample import sample
from monofast.gpt.weights import load_model
from monofast.run import presets
from monofast.run.manifest import require_current
from monofast.run.stages import RunDir
from monofast.sae.model import SparseAutoencoder
from monofast.sae.steer import ClampSpec, clamped, parse_clamp, resolve_clamps, sae_hook, sae_layer


class SampleCommand:
    """`monofast gpt sample`: continue a prompt with the trained model."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                            help="text to continue (repeatable; default: 'def run')")
        parser.add_argument("--tokens", type=int, default=200, metavar="N",
                            help="tokens to generate (default: 200)")
        parser.add_argument("--temperature", type=float, default=0.8, metavar="T",
                            help="sampling temperature; 0 is greedy (default: 0.8)")
        parser.add_argument("--top-k", type=int, default=50, metavar="K",
                            help="sample among the k likeliest tokens; 0 for all (default: 50)")
        parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                            help="samples per prompt (default: 1)")
        parser.add_argument("--seed", type=int, default=1337, metavar="N",
                            help="seed; the same seed gives the same text (default: 1337)")
        parser.add_argument("--device", default="auto", metavar="DEVICE",
                            help="auto, cpu, cuda, cuda:N or mps (default: auto)")
        parser.add_argument("--clamp", action="append", default=None, metavar="FEATURE=VALUE",
                            help="hold the run's SAE feature FEATURE at activation VALUE at every position "
                                 "(VALUE Nx: N times its largest activation in the analysis), keeping the "
                                 "SAE's error term; repeatable. The same --seed without --clamp gives the "
                                 "unclamped sample to compare")
        group = parser.add_argument_group("run options")
        group.add_argument("--preset", default=DEFAULT_PRESET, choices=presets.names(),
                           help=f"preset whose run directory is the default (default: {DEFAULT_PRESET})")
        group.add_argument("--run", type=Path, default=None, metavar="DIR",
                           help="run directory holding data/ and gpt/ (default: runs/<preset>)")

    def main(self, args: argparse.Namespace) -> int:
        if not math.isfinite(args.temperature):
            raise UserError(f"--temperature {args.temperature} is not a finite number; give e.g. 0.8 (0 is greedy)")
        if args.tokens < 0 or args.num_samples < 1 or args.top_k < 0 or args.temperature < 0:
            raise UserError("--tokens, --top-k and --temperature must be non-negative and "
                            "--num-samples at least 1")
        for prompt in args.prompt or []:
            if (shown := not_utf8(prompt)) is not None:
                raise UserError(f"--prompt '{shown}' holds bytes that are not UTF-8 text; "
                                f"give the prompt as UTF-8")
        specs = [parse_clamp(spec) for spec in args.clamp or []]  # bad syntax fails before anything loads
        device = pick_device(args.device)
        run = args_run_dir(args)
        # Finished, intact and made from the files the run holds now (not a GPT trained on an
        # earlier tokenizer, an SAE of another GPT's activations).
        hook = sae_hook(require_current(run, "sae")) if specs else None
        model = load_model(require_current(run, "gpt"), device, hook)
        tok = tokenizer.load(run.stage("data"))
        eot_id = load_meta(run.stage("data"))["eot_id"]
        with clamp_context(run, model, specs, device) if specs else contextlib.nullcontext():
            for prompt in args.prompt or ["def run"]:
                for i in range(args.num_samples):
                    text = sample(model, tok, prompt, args.tokens, args.temperature, args.top_k,
                                  seed=args.seed + i, device=device, eot_id=eot_id)
                    print(text + "\n", flush=True)
        return 0


def clamp_context(run: RunDir, model: GPT, specs: Sequence[ClampSpec], device: torch.device) -> ContextManager[None]:
    """The run's SAE loaded and `specs` applied at the layer it reads, for a `with` block."""
    sae_dir = require_current(run, "sae")
    sae = SparseAutoencoder.load(sae_dir, device)
    sae.eval()
    layer = sae_layer(sae_dir, run.stage("activations"))
    if not 0 <= layer < model.config.n_layer or sae.cfg.d_in != model.config.d_mlp:
        raise DataError(f"the SAE in {sae_dir} reads layer {layer} of width {sae.cfg.d_in}, but the GPT has "
                        f"{model.config.n_layer} layers of MLP width {model.config.d_mlp}; re-run "
                        f"`monofast run --run {run.root}` so the SAE matches the GPT")
    maxima = analysis_maxima(run.stage("analysis")) if any(spec.relative for spec in specs) else None
    clamps = resolve_clamps(specs, sae.cfg.d_sae, maxima)
    for feature, value in clamps.items():
        of_max = f" ({value / float(maxima[feature]):g}x its largest activation {float(maxima[feature]):.4g})" \
            if maxima is not None and maxima[feature] > 0 else ""
        logger.info("sample: feature %d clamped at %.4g%s at layer %d", feature, value, of_max, layer)
    return clamped(model, layer, sae, clamps)


def analysis_maxima(folder: Path) -> Optional[np.ndarray]:
    """(F,) largest activation of each feature from the run's analysis, or None without one."""
    path = folder / FEATURES
    if not path.is_file():
        return None
    files.verify_recorded(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return np.asarray(arrays["max_act"], dtype=np.float64)
    except (KeyError, ValueError, OSError) as err:
        raise DataError(f"{path} is unreadable ({err}); re-run `monofast analysis --force`") from None
