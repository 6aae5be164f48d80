"""Sampling from the trained GPT: `samples.txt` of the GPT stage and `monofast gpt sample`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from monofast.common import files
from monofast.common.errors import DataError
from monofast.data.tokenizer import EOT
from monofast.gpt.config import GPTTrainConfig
from monofast.gpt.model import GPT

SAMPLES_FILE = "samples.txt"


def sample(model: GPT, tok: Any, prompt: str, tokens: int, temperature: float = 0.8,
           top_k: Optional[int] = 50, seed: int = 1337, device: str | torch.device = "cpu",
           eot_id: Optional[int] = None) -> str:
    """One sample continuing `prompt`, cut at the first end-of-text (`eot_id`, default the
    tokenizer's <|endoftext|>); the same seed gives the same text. An empty prompt starts a
    new document."""
    eot = tok.token_to_id(EOT) if eot_id is None else eot_id
    ids = tok.encode(prompt, add_special_tokens=False).ids or [eot]
    if not model.config.accepts_vocab(tok.get_vocab_size()):
        raise DataError(f"the tokenizer has {tok.get_vocab_size()} tokens but the model "
                        f"{model.config.vocab_size}; the model was trained on other data: "
                        f"re-run `monofast gpt train --force`")
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k or None,
                         generator=generator)[0, len(ids):].tolist()
    if eot in out:
        out = out[:out.index(eot)]
    return prompt + tok.decode(out, skip_special_tokens=True)


def write_samples(out: Path, model: GPT, tok: Any, cfg: GPTTrainConfig, device: torch.device) -> None:
    """samples.txt: `num_samples` samples from each prompt, with the settings that made them."""
    parts = []
    for prompt in cfg.sample_prompts:
        for i in range(cfg.num_samples):
            text = sample(model, tok, prompt, cfg.sample_tokens, cfg.temperature, cfg.top_k,
                          seed=cfg.seed + i, device=device)
            parts.append(f"=== prompt {prompt!r}, sample {i + 1} of {cfg.num_samples}: "
                         f"{cfg.sample_tokens} tokens, temperature {cfg.temperature}, top-k "
                         f"{cfg.top_k or 'off'}, seed {cfg.seed + i} ===\n{text}\n\n")
    files.write_text(out / SAMPLES_FILE, "".join(parts))
