"""The trained GPT on disk: `gpt/model.safetensors` + `gpt/config.json`, written and read
back by every stage that needs the model (harvest, SAE evaluation, analysis, sampling).

With `--model`, the gpt stage trains nothing: `gpt/hf_model.json` names the Hugging Face
model (`record_hf`), and `load_model` loads that model behind the same interface
(`monofast.gpt.hf.HFModel`), hooked at the site the caller names."""

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


def record_hf(folder: Path, model: str, dtype: str, allow_download: bool, data_dir: Path) -> dict:
    """The gpt stage with `--model`: check the model's config is there and that the data was
    tokenized with its tokenizer, then write `hf_model.json` naming it. The weights load
    where they are used (the harvest on): here a shell on the meta device counts them."""
    from monofast.common.hf import load_config, meta_model, model_name
    from monofast.data.splits import load_meta
    from monofast.gpt import hf

    name = model_name(model)
    meta = load_meta(data_dir)
    origin = meta.get("tokenizer", {})
    if origin.get("model") != name:
        used = f"the tokenizer of {origin['model']}" if origin.get("model") else "its own BPE"
        raise UserError(f"the data in {data_dir} was tokenized with {used}, not {name}'s; run "
                        f"`monofast data --tokenizer {model}` (or `monofast run --model {model}`)")
    lm = meta_model(load_config(model, allow_download))
    vocab = int(lm.get_output_embeddings().weight.shape[0])
    if vocab < meta["vocab_size"]:
        raise DataError(f"{name} predicts {vocab} tokens but its tokenizer has {meta['vocab_size']}")
    c = lm.config
    record = {"model": name, "dtype": dtype, "allow_download": allow_download,
              "architecture": type(lm).__name__, "commit": getattr(c, "_commit_hash", None),
              "n_layer": int(c.num_hidden_layers), "vocab_size": vocab,
              "parameters": sum(p.numel() for p in lm.parameters())}
    folder.mkdir(parents=True, exist_ok=True)
    files.write_json(folder / hf.MODEL_RECORD, record)
    return record


def load_hf(folder: Path, device: torch.device, site: str):
    """The Hugging Face model `folder/hf_model.json` names, hooked at `site`, in eval mode."""
    from monofast.common.device import pick_dtype
    from monofast.common.hf import load_lm
    from monofast.gpt import hf

    path = folder / hf.MODEL_RECORD
    record = files.read_json(files.verify_recorded(path), "model record")
    if not isinstance(record, dict) or not isinstance(record.get("model"), str):
        raise DataError(f"{path} does not name a model; re-run `monofast gpt train --force`")
    dtype = pick_dtype(str(record.get("dtype", "auto")), device) or torch.float32
    lm = load_lm(record["model"], device, dtype, bool(record.get("allow_download", False)))
    return hf.HFModel(lm, site, record["model"]).eval()


def _model_folder(folder: Path) -> Path:
    from monofast.gpt.hf import MODEL_RECORD

    if (folder / MODEL_RECORD).is_file():
        return folder
    if (folder / "gpt" / MODEL_RECORD).is_file():
        return folder / "gpt"
    if not (folder / CONFIG_FILE).is_file() and (folder / "gpt" / CONFIG_FILE).is_file():
        return folder / "gpt"
    return folder


def hook_site(hook: str | None) -> str:
    """The site (`mlp.hook_post`, ...) of a hook name; None and "" are the MLP's."""
    if not hook:
        return "mlp.hook_post"
    from monofast.common.hf import parse_hook

    return parse_hook(hook)[1]


def load_model(folder: str | Path, device: str | torch.device = "cpu", hook: str | None = None) -> GPT:
    """The trained GPT in eval mode, from a gpt stage folder (or a run directory holding one);
    or the Hugging Face model the folder names, hooked at the site of `hook` (a name such as
    `blocks.3.hook_resid_post`; None: the MLP's). The tiny GPT has only the MLP's.

    Missing files are a `UserError` saying which stage to run; unreadable or mismatched
    ones a `DataError` naming the file.
    """
    folder = _model_folder(Path(folder))
    site = hook_site(hook)
    from monofast.gpt.hf import MODEL_RECORD

    if (folder / MODEL_RECORD).is_file():
        return load_hf(folder, torch.device(device), site)  # type: ignore[return-value]
    if site != "mlp.hook_post":
        raise UserError(f"hook {hook}: the tiny GPT is hooked at its MLPs only (blocks.L.mlp.hook_post); "
                        f"other sites are for Hugging Face models (--model)")
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
