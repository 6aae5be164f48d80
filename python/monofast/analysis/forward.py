"""The analysis pass's view of the models: the hooked layer, the residual stream after it,
and the SAE encoder applied to whole batches.

The encoder folds the decoder-bias subtraction into its bias once,
(x - b_dec) W_enc + b_enc = x W_enc + (b_enc - b_dec W_enc), so a batch costs one
matrix product written into a reused buffer (touching fresh pages for a 100 MB matrix
every batch costs about as much as the product's epilogue on a CPU).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from monofast.common import files
from monofast.common.errors import DataError, UserError
from monofast.gpt.model import GPT
from monofast.sae.model import SparseAutoencoder


def _recorded_layer(sae_dir: Path, activations_dir: Optional[Path]) -> Optional[int]:
    """The hooked layer as recorded by the SAE (SAELens `hook_layer`, or the layer number in
    `hook_name`), else by the activation store's index.json; None when neither says."""
    cfg = files.read_json(sae_dir / "cfg.json", "SAE config")
    for where in (cfg, cfg.get("metadata", {})):
        if isinstance(where.get("hook_layer"), int):
            return int(where["hook_layer"])
        match = re.search(r"(?:blocks|h|layers)\.(\d+)\.", str(where.get("hook_name", "")))
        if match:
            return int(match.group(1))
    index = activations_dir / "index.json" if activations_dir is not None else None
    if index is not None and index.is_file():
        raw = files.read_json(index, "activation index")
        for where in (raw.get("gpt", {}), raw):  # harvest records it under "gpt"
            if isinstance(where, dict) and isinstance(where.get("layer"), int):
                return int(where["layer"])
    return None


def resolve_layer(requested: int, model: GPT, sae_dir: Path, activations_dir: Optional[Path] = None) -> int:
    """The MLP layer to hook: the one the SAE records, checked against an explicit request;
    else the request; else the last layer (harvest's default)."""
    n_layer = model.config.n_layer
    recorded = _recorded_layer(sae_dir, activations_dir)
    if recorded is not None and requested >= 0 and recorded != requested:
        raise UserError(f"--layer {requested} but the SAE in {sae_dir} was trained on layer {recorded}; "
                        f"drop --layer (or pass --layer {recorded})")
    layer = recorded if recorded is not None else (requested if requested >= 0 else n_layer - 1)
    if not 0 <= layer < n_layer:
        raise UserError(f"layer {layer} does not exist: the GPT has layers 0..{n_layer - 1}")
    return layer


def final_residual(model: GPT, idx: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """Run blocks 0..layer on idx (B, T): the hooked post-GELU activation (B, T, d_mlp) and the
    residual stream after block `layer` (B, T, C) — the final residual when it is the last."""
    if not model.residual_shortcut:  # a Hugging Face model: the activation alone (effects re-run)
        return model.mlp_activations(idx, layer), idx
    seen: list[Tensor] = []
    with model.hook_mlp(layer, seen.append):
        x = model._embed(idx)  # (B, T, C)
        for block in model.h[:layer + 1]:
            x = block(x)
    return seen[0], x


class Encoder:
    """Feature activations of whole batches, equal to `SparseAutoencoder.encode`."""

    def __init__(self, sae: SparseAutoencoder, compute_dtype: torch.dtype):
        # encode(x) = act((x s - b_dec) W_enc + b_enc) = act(x (s W_enc) + (b_enc - b_dec W_enc))
        raw = sae.W_enc.detach().float()  # (D, F)
        w_enc = raw * sae.input_scale.float()  # (D, F)
        self.k = sae.cfg.top_k
        threshold = sae.inference_threshold()  # batchtopk, matryoshka: JumpReLU at inference
        self.threshold = None if threshold is None else threshold.float().clamp_min(0)  # (F,)
        self.bias = sae.b_enc.detach().float() - sae.b_dec.detach().float() @ raw  # (F,)
        self.w_enc = w_enc.to(compute_dtype)  # (D, F)
        self.w_enc_f32 = w_enc  # (D, F)
        self.compute_dtype = compute_dtype
        self._buffer: Optional[Tensor] = None

    @property
    def d_sae(self) -> int:
        return self.w_enc.shape[1]

    def __call__(self, x: Tensor) -> Tensor:
        """(n, F) float32 activations of x (n, D). The result lives in a reused buffer: it is
        overwritten by the next call."""
        n = x.shape[0]
        if self._buffer is None or self._buffer.shape[0] < n or self._buffer.device != x.device:
            self._buffer = torch.empty(n, self.d_sae, device=x.device)
        out = self._buffer[:n]  # (n, F)
        if self.compute_dtype == torch.float32:
            torch.addmm(self.bias, x.float(), self.w_enc, out=out)
        else:
            torch.add(x.to(self.compute_dtype) @ self.w_enc, self.bias, out=out)
        if self.threshold is not None:
            return out.masked_fill_(out <= self.threshold, 0.0)
        if self.k is None:
            return out.relu_()
        values, indices = out.topk(self.k, dim=1, sorted=False)
        return out.zero_().scatter_(1, indices, values.relu_())

    def one(self, x: Tensor, features: Tensor) -> Tensor:
        """(B, T) activation of feature features[b] at every token of x (B, T, D)."""
        if self.k is not None:  # top-k depends on every feature: encode whole rows
            B, T, D = x.shape
            full = self(x.reshape(B * T, D)).view(B, T, -1)  # (B, T, F)
            return full.gather(2, features.view(B, 1, 1).expand(B, T, 1)).squeeze(2).clone()
        w = self.w_enc_f32[:, features].T  # (B, D)
        pre = torch.einsum("btd,bd->bt", x.float(), w) + self.bias[features][:, None]  # (B, T)
        if self.threshold is not None:
            return pre.masked_fill_(pre <= self.threshold[features][:, None], 0.0)
        return pre.relu()


def check_shapes(model: GPT, sae: SparseAutoencoder, vocab_size: int, sae_dir: Path) -> None:
    """Refuse, naming the fix, an SAE or GPT that does not fit the data and each other."""
    if sae.cfg.d_in != model.config.d_mlp:
        raise DataError(f"the SAE in {sae_dir} reads d_in={sae.cfg.d_in} but the GPT's MLP is "
                        f"{model.config.d_mlp} wide; train the SAE on this GPT's activations")
    if not model.config.accepts_vocab(vocab_size):
        raise DataError(f"the GPT has {model.config.vocab_size} tokens but the data's tokenizer "
                        f"{vocab_size}; re-run `monofast gpt train --force`")
