"""`monofast hooks --model PATH_OR_ID`: a Hugging Face model's hooks, with the module each
reads and its width."""

from __future__ import annotations

import argparse
from pathlib import Path

from monofast.common.errors import UserError


class HooksCommand:
    """`monofast hooks --model PATH_OR_ID`."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, metavar="PATH_OR_ID",
                            help="a Hugging Face causal LM: a local folder, or a hub id in the local cache")
        parser.add_argument("--allow-download", action="store_true",
                            help="let the model download from the hub when it is not in the local cache")

    def main(self, args: argparse.Namespace) -> int:
        import torch

        from monofast.common.hf import load_lm, model_name
        from monofast.gpt.hf import list_hooks

        check_model_name(args.model)
        lm = load_lm(args.model, torch.device("cpu"), torch.float32, args.allow_download)
        hooks = list_hooks(lm)
        params = sum(p.numel() for p in lm.parameters())
        print(f"{model_name(args.model)}: {type(lm).__name__}, {lm.config.num_hidden_layers} layers, "
              f"{params:,} parameters")
        width = max(len(h.name) for h in hooks) + 2
        print(f"  {'hook'.ljust(width)}{'width':>7s}  module")
        for h in hooks:
            print(f"  {h.name.ljust(width)}{h.width:7d}  {h.module}")
        print("Harvest one with `monofast run --model MODEL --hook NAME` (or `monofast harvest --model MODEL "
              "--hook NAME`).")
        return 0


def check_model_name(model: str) -> None:
    """Refuse, before the loader looks in the Hugging Face cache, an empty name and a folder
    that holds no model (the loader would call either one missing from the cache)."""
    if not model.strip():
        raise UserError("--model is empty; give a Hugging Face model: a local folder or a hub id "
                        "(e.g. --model gpt2)")
    folder = Path(model).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(f"{folder} is a folder but not a Hugging Face model folder (it holds no config.json); "
                        f"give the folder a model was saved into, or a hub id")
