"""The lab page's model: `lab/model.js`, the run's GPT and SAE in fp16, as one script.

The lab runs the GPT and the SAE encoder in the browser (`assets/lab/engine.js`) from a
page opened as a file, where nothing can be fetched: the weights have to arrive as a
script. `model_script` returns the text of lab/model.js,

    window.MONOFAST_MODEL = {"format": ..., "config": {...}, "encoding": {...},
                             "tensors": [{"name", "shape", "offset"}, ...], "count": N,
                             "data": "<N fp16 words, encoded>"};

- config: n_layer, n_head, n_embd, block_size, vocab_size, bias (the GPT), layer (the
  hooked MLP layer), d_mlp, d_sae, sae_variant, k (top-k SAEs; null otherwise).
- tensors: the GPT's state dict without the tied lm_head (torch names and layouts,
  Linear weights (out, in)), then the SAE as it acts on the unscaled activation x:
  `sae.W_enc` (d_mlp, d_sae) and `sae.b_enc` (d_sae,) with the input scale s and the
  decoder bias folded in, f = act(x W_enc + b_enc), and `sae.W_dec` (d_sae, d_mlp) =
  W_dec / s, the rows clamping adds (`monofast.sae.steer.clamp_hook`). `offset` counts
  fp16 words from the start of the data.
- dtype fp16 rather than bf16: 11 significant bits against 8, so a weight's rounding error
  is 2^-11 (bf16: 2^-8) and the page's logits stay within ~2e-3 of the fp32 model's (the
  worst element against the tensor's RMS, measured on runs/quick, with the same argmax);
  fp16's range (6e-8 .. 65504) holds every weight and bias these models train (one that
  does not is refused, naming it).
- encoding: the words form a little-endian bit stream cut into 13-bit groups, each written
  as two characters of a 91-character alphabet (printable ASCII without `"`, `\\` and
  `<`, so the data is a plain string literal that can never close a script tag),
  low digit first: 16/13 = 1.23 bytes per byte, the density of basE91, against base64's
  4/3. For the laptop preset's 5.85M weights (11.7 MB of fp16) that is 14.4 MB where
  base64 would take 15.6. Every group has the same width, so the page decodes it in one
  pass of shifts (60-100 ms for 14 MB in Chromium).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from monofast.common.errors import DataError, UserError
from monofast.gpt.model import GPT, GPTConfig
from monofast.sae.model import CONFIG_FILE, SAEConfig, SparseAutoencoder, weights_path

FORMAT = "monofast-lab-1"
ALPHABET = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\<')
"""The 91 digits, in order; every one is safe inside a double-quoted JavaScript string."""
GROUP_BITS = 13
"""Bits per two characters: 2^13 = 8192 <= 91^2 = 8281."""
HALF_MAX = 65504.0


class LabWeights(NamedTuple):
    """What the page computes with: the config and every tensor, already rounded to fp16."""

    config: dict[str, Any]
    """The `config` of model.js (see the module docstring)."""
    tensors: dict[str, np.ndarray]
    """float16 arrays by name, in file order and layout."""


class LabScript(NamedTuple):
    """The text of lab/model.js and what its parts weigh."""

    script: str
    """The whole file (ASCII)."""
    sizes: dict[str, int]
    """Bytes each part takes in the file: gpt, sae_encoder, sae_decoder (the encoded weights,
    to within a byte), header (the JSON and the script around the data) and total."""


# ---------------------------------------------------------------------------------------
# The encoding


def encoded_chars(count: int) -> int:
    """Characters that `count` fp16 words take."""
    return 2 * -(-16 * count // GROUP_BITS)


def encode_words(words: np.ndarray) -> str:
    """fp16 bit patterns (uint16, any shape) -> the ASCII text of the data string."""
    flat = np.ascontiguousarray(words, dtype="<u2").reshape(-1)
    blocks = -(-flat.size // GROUP_BITS)  # 13 words = 208 bits = 16 groups
    padded = np.zeros(blocks * GROUP_BITS, dtype=np.uint32)
    padded[:flat.size] = flat
    block = padded.reshape(blocks, GROUP_BITS)  # (blocks, 13)
    groups = np.empty((blocks, 16), dtype=np.uint32)  # (blocks, 16)
    for g in range(16):
        word, shift = divmod(g * GROUP_BITS, 16)
        value = block[:, word] >> shift
        if shift + GROUP_BITS > 16:
            value |= block[:, word + 1] << (16 - shift)
        groups[:, g] = value & 0x1FFF
    used = groups.reshape(-1)[:encoded_chars(flat.size) // 2]
    digits = np.empty((used.size, 2), dtype=np.uint8)  # (groups, 2): low digit first
    digits[:, 0] = used % 91
    digits[:, 1] = used // 91
    table = np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)
    return table[digits.reshape(-1)].tobytes().decode("ascii")


def decode_words(text: str, count: int) -> np.ndarray:
    """The inverse of `encode_words`: `count` uint16 words of `text` (a `DataError` when the
    text is not such an encoding)."""
    if len(text) != encoded_chars(count):
        raise DataError(f"the data holds {len(text)} characters where {count} fp16 words take "
                        f"{encoded_chars(count)}; rebuild the site")
    lookup = np.full(256, 255, dtype=np.uint8)
    lookup[np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)] = np.arange(91, dtype=np.uint8)
    digits = lookup[np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)]
    if (digits == 255).any():
        raise DataError("the data has characters outside the alphabet; rebuild the site")
    values = digits[0::2].astype(np.uint32) + 91 * digits[1::2].astype(np.uint32)  # (groups,)
    blocks = -(-values.size // 16)
    groups = np.zeros(blocks * 16, dtype=np.uint32)
    groups[:values.size] = values
    group = groups.reshape(blocks, 16)  # (blocks, 16)
    words = np.zeros((blocks, GROUP_BITS), dtype=np.uint32)  # (blocks, 13)
    for w in range(GROUP_BITS):
        for g in range(16 * w // GROUP_BITS, (16 * w + 15) // GROUP_BITS + 1):
            shift = GROUP_BITS * g - 16 * w
            words[:, w] |= group[:, g] << shift if shift >= 0 else group[:, g] >> -shift
    return (words.reshape(-1)[:count] & 0xFFFF).astype(np.uint16)


# ---------------------------------------------------------------------------------------
# The weights


def _half(name: str, tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if not np.isfinite(array).all():
        raise DataError(f"{name} holds NaN or infinite values: the model is corrupt; retrain it")
    peak = float(np.abs(array).max(initial=0.0))
    if peak > HALF_MAX:
        raise DataError(f"{name} holds |w| up to {peak:.4g}, past fp16's largest value 65504, in which the lab "
                        f"ships the model; retrain it (weights this large mean training diverged)")
    return array.astype(np.float16)


def lab_weights(model: GPT, sae: SparseAutoencoder, layer: int) -> LabWeights:
    """The config and fp16 tensors of model.js for `model` with `sae` hooked at `layer`."""
    cfg = model.config
    if not 0 <= layer < cfg.n_layer:
        raise DataError(f"the SAE reads layer {layer} but the GPT has layers 0..{cfg.n_layer - 1}; "
                        f"train the SAE on this GPT (`monofast run --run RUN --from activations`)")
    if sae.cfg.d_in != cfg.d_mlp:
        raise DataError(f"the SAE reads d_in={sae.cfg.d_in} but the GPT's MLP is {cfg.d_mlp} wide; "
                        f"train the SAE on this GPT (`monofast run --run RUN --from activations`)")
    tensors = {name: _half(name, t) for name, t in model.state_dict().items() if name != "lm_head.weight"}
    with torch.no_grad():
        w = {k: v.float() for k, v in sae.folded_weights().items()}  # acting on unscaled inputs
        folded = {
            "sae.W_enc": w["W_enc"],  # (D, F)
            "sae.b_enc": w["b_enc"] - w["b_dec"] @ w["W_enc"],  # (F,): x W + b == (x - b_dec) W + b_enc
            "sae.W_dec": w["W_dec"],  # (F, D): decode's slope in the input space
        }
    tensors.update({name: _half(name, t) for name, t in folded.items()})
    config = {
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "block_size": cfg.block_size,
        "vocab_size": cfg.vocab_size, "bias": cfg.bias, "layer": layer, "d_mlp": cfg.d_mlp,
        "d_sae": sae.cfg.d_sae, "sae_variant": sae.cfg.variant, "k": sae.cfg.top_k,
    }
    return LabWeights(config, tensors)


def render(weights: LabWeights) -> LabScript:
    """The text of lab/model.js for `weights`, and its sizes."""
    entries, words, offset = [], [], 0
    parts = {"gpt": 0, "sae_encoder": 0, "sae_decoder": 0}
    for name, array in weights.tensors.items():
        entries.append({"name": name, "shape": list(array.shape), "offset": offset})
        words.append(array.reshape(-1).view(np.uint16))
        offset += array.size
        part = "sae_decoder" if name == "sae.W_dec" else "sae_encoder" if name.startswith("sae.") else "gpt"
        parts[part] += array.size
    data = encode_words(np.concatenate(words) if words else np.zeros(0, np.uint16))
    head = {"format": FORMAT, "config": weights.config,
            "encoding": {"dtype": "float16", "scheme": "13 bits per 2 characters, little-endian",
                         "alphabet": ALPHABET},
            "tensors": entries, "count": offset}
    prefix = ("/* The run's GPT and SAE for the lab page, fp16 (monofast.site.lab_model); "
              "read by lab/engine.js. */\nwindow.MONOFAST_MODEL = ")
    body = json.dumps(head, separators=(",", ":"))
    script = f'{prefix}{body[:-1]},"data":"{data}"}};\n'
    sizes = {part: round(len(data) * count / max(offset, 1)) for part, count in parts.items()}
    sizes["header"] = len(script) - len(data)
    sizes["total"] = len(script)
    return LabScript(script, sizes)


def model_script(gpt_dir: str | Path, sae_dir: str | Path) -> LabScript:
    """lab/model.js for the GPT in `gpt_dir` and the SAE in `sae_dir` (the layer it reads
    from its cfg.json). Missing stages are a `UserError` naming the command that makes
    them; unreadable or mismatched files a `DataError` naming the file."""
    from monofast.gpt.weights import load_model
    from monofast.sae.steer import sae_layer

    model = load_model(gpt_dir)
    sae_dir = Path(sae_dir)
    for path in (sae_dir / CONFIG_FILE, weights_path(sae_dir)):
        if not path.is_file():
            raise UserError(f"no trained SAE: {path} is missing; run the sae stage first "
                            f"(`monofast run --run {sae_dir.parent} --to sae`)")
    from safetensors import SafetensorError

    try:
        sae = SparseAutoencoder.load(sae_dir)
    except (SafetensorError, OSError, KeyError, TypeError) as err:
        raise DataError(f"{weights_path(sae_dir)} is unreadable ({err}); re-run the sae stage "
                        f"(`monofast run --run {sae_dir.parent} --from sae`)") from None
    return render(lab_weights(model, sae, sae_layer(sae_dir)))


# ---------------------------------------------------------------------------------------
# The models the page computes, in PyTorch


def shipped_models(weights: LabWeights) -> tuple[GPT, SparseAutoencoder]:
    """A GPT and an SAE in fp32 carrying exactly the fp16 weights of `weights`, in eval mode:
    what lab/engine.js computes, for checking it (and for measuring what fp16 costs)."""
    cfg = weights.config
    shape = {key: cfg[key] for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")}
    model = GPT(GPTConfig(**shape))
    state = {name: torch.from_numpy(array.astype(np.float32)) for name, array in weights.tensors.items()
             if not name.startswith("sae.")}
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, strict=True)
    sae_cfg = SAEConfig(d_in=cfg["d_mlp"], d_sae=cfg["d_sae"], variant=cfg["sae_variant"],
                        k=cfg["k"] or 32, scale_inputs=False)
    sae = SparseAutoencoder(sae_cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(weights.tensors["sae.W_enc"].astype(np.float32)))
        sae.b_enc.copy_(torch.from_numpy(weights.tensors["sae.b_enc"].astype(np.float32)))
        sae.W_dec.copy_(torch.from_numpy(weights.tensors["sae.W_dec"].astype(np.float32)))
        sae.b_dec.zero_()
    return model.eval(), sae.eval()
