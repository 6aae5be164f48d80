"""The trained GPT on disk: `gpt/model.safetensors` + `gpt/config.json`, written and read
back by every stage that needs the model (harvest, SAE evaluation, analysis, sampling)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from monofast.common import files
from monofast.common.errors import DataError, UserError
from monofast.gpt.model import GPT, GPTConfig

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_model(folder: Path, model: GPT) -> None:
    """`model.safetensors` (the tied unembedding stored once) and `config.json`, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    metadata = {"format": "pt", "config": json.dumps(asdict(model.config))}  # self-describing
    files.write_bytes(folder / MODEL_FILE, files.canonical_safetensors(save(state, metadata=metadata)))
    files.write_json(folder / CONFIG_FILE, asdict(model.config))


def _model_folder(folder: Path) -> Path:
    if not (folder / CONFIG_FILE).is_file() and (folder / "gpt" / CONFIG_FILE).is_file():
        return folder / "gpt"
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The trained GPT in eval mode, from a gpt stage folder (or a run directory holding one).

    Missing files are a `UserError` saying which stage to run; unreadable or mismatched
    ones a `DataError` naming the file.
    """
    folder = _model_folder(Path(folder))
    config_path, weights_path = folder / CONFIG_FILE, folder / MODEL_FILE
    run_root = folder.parent if folder.name == "gpt" else folder
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"no trained model: {path} is missing; run `monofast gpt train "
                            f"--run {run_root}` first")
    files.verify_recorded(weights_path)
    raw = files.read_json(files.verify_recorded(config_path), "model config")
    try:
        cfg = GPTConfig(**raw)
    except (TypeError, ValueError) as err:
        raise DataError(f"{config_path} is not a valid GPTConfig ({err}); "
                        f"re-run `monofast gpt train --force`") from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{weights_path} is unreadable ({err}); "
                        f"re-run `monofast gpt train --force`") from None
    model = GPT(cfg)
    if "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(f"{weights_path} does not match {config_path}: {str(err).splitlines()[0]} "
                        f"...; re-run `monofast gpt train --force`") from None
    return model.to(device).eval()
