"""`monofast gpt sample`: continue a prompt with the trained GPT."""

from __future__ import annotations

import argparse
from pathlib import Path

from monofast.cli.options import DEFAULT_PRESET, args_run_dir
from monofast.common.device import pick_device
from monofast.common.errors import UserError
from monofast.data import tokenizer
from monofast.gpt.sample import sample
from monofast.gpt.weights import load_model
from monofast.run import presets


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
        group = parser.add_argument_group("run options")
        group.add_argument("--preset", default=DEFAULT_PRESET, choices=presets.names(),
                           help=f"preset whose run directory is the default (default: {DEFAULT_PRESET})")
        group.add_argument("--run", type=Path, default=None, metavar="DIR",
                           help="run directory holding data/ and gpt/ (default: runs/<preset>)")

    def main(self, args: argparse.Namespace) -> int:
        if args.tokens < 0 or args.num_samples < 1 or args.top_k < 0 or args.temperature < 0:
            raise UserError("--tokens, --top-k and --temperature must be non-negative and "
                            "--num-samples at least 1")
        device = pick_device(args.device)
        run = args_run_dir(args)
        model = load_model(run.stage("gpt"), device)
        tok = tokenizer.load(run.stage("data"))
        for prompt in args.prompt or ["def run"]:
            for i in range(args.num_samples):
                text = sample(model, tok, prompt, args.tokens, args.temperature, args.top_k,
                              seed=args.seed + i, device=device)
                print(text + "\n", flush=True)
        return 0
