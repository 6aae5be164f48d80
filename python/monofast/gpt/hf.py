"""A Hugging Face causal LM in the tiny GPT's place (`--model PATH_OR_ID`).

`HFModel` wraps a `transformers` causal LM and answers what the later stages ask of the
GPT (`monofast.gpt.model.GPT`): the activation at a hook (`mlp_activations`), a forward
pass with that activation replaced (`run_to_mlp` / `logits_from_mlp`, `hook_mlp`), its
logits and sampling, and the directions and unembedding that the analysis's logit weights
read. Everything after the harvest runs unchanged on it.

Hooks are named as TransformerLens and SAELens name them, one site per block:

- `blocks.L.mlp.hook_post`: the MLP's activation after its nonlinearity, the input of its
  output projection (for a gated MLP such as Llama's: act(gate) * up);
- `blocks.L.hook_resid_post`: the residual stream after block L;
- `blocks.L.hook_attn_out`: the output of block L's attention.

They are found by structure, not by a table of model types: the decoder blocks are the
module list as long as the config's layer count; a block's attention is its child named
*attn* or *attention*, its MLP the child named `mlp` (or `feed_forward`), and the MLP's
output projection its child named c_proj, dense_4h_to_h, down_proj, fc2, fc_out or w2.
GPT-2, GPT-NeoX (Pythia), Llama, Qwen, Mistral and Gemma are laid out so.

Loading (local only unless downloads are allowed; refused when it cannot fit) is
`monofast.common.hf`'s, shared with the data stage's tokenizer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from monofast.common.errors import DataError, UserError
from monofast.common.hf import SITES
from monofast.gpt.model import GPTOutput

MODEL_RECORD = "hf_model.json"
"""What the gpt stage writes instead of weights when it names a Hugging Face model."""
DEFAULT_CONTEXT = 256
"""Tokens per context when a stage's length option is 0 (the model's own limit is far longer)."""
PROJ_NAMES = ("c_proj", "dense_4h_to_h", "down_proj", "fc2", "fc_out", "w2")
NORM_NAMES = ("ln_f", "norm", "final_layer_norm", "final_norm")

MLPHook = Callable[[torch.Tensor], Optional[torch.Tensor]]


# ---------------------------------------------------------------------------------------
# Finding the hooks


class _Stop(Exception):
    """Raised by a capturing hook: the rest of the forward pass is not needed."""


def decoder_blocks(lm: nn.Module) -> tuple[str, nn.ModuleList]:
    """The (name, list) of the model's decoder blocks: the module list with one entry per layer."""
    n = getattr(lm.config, "num_hidden_layers", None)
    for name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return name, module
    raise DataError(f"cannot find the decoder blocks of {type(lm).__name__} (no list of {n} modules); "
                    f"this model's layout is not supported")


def _child(parent: nn.Module, names: tuple[str, ...], contains: tuple[str, ...] = ()) -> Optional[str]:
    children = dict(parent.named_children())
    for name in names:
        if name in children:
            return name
    return next((n for n in children if any(c in n for c in contains)), None)


class Site(NamedTuple):
    """Where a hook reads: a module's first input (`on_input`) or its (first) output."""

    path: str
    """The module's name in the model."""
    module: nn.Module
    on_input: bool


def find_site(lm: nn.Module, layer: int, site: str) -> Site:
    prefix, blocks = decoder_blocks(lm)
    if not 0 <= layer < len(blocks):
        raise UserError(f"layer {layer} does not exist: the model has layers 0..{len(blocks) - 1}")
    block, path = blocks[layer], f"{prefix}.{layer}"
    if site == "hook_resid_post":
        return Site(path, block, False)
    if site == "hook_attn_out":
        name = _child(block, ("attn", "self_attn", "attention"), ("attn", "attention"))
        if name is None:
            raise DataError(f"block {path} of {type(lm).__name__} has no attention child; use another hook")
        return Site(f"{path}.{name}", getattr(block, name), False)
    name = _child(block, ("mlp", "feed_forward"))
    if name is None:
        raise DataError(f"block {path} of {type(lm).__name__} has no MLP child; use another hook")
    mlp = getattr(block, name)
    proj = _child(mlp, PROJ_NAMES)
    if proj is None:
        raise DataError(f"cannot find the output projection of {path}.{name} ({type(mlp).__name__}); "
                        f"use blocks.{layer}.hook_resid_post instead")
    return Site(f"{path}.{name}.{proj}", getattr(mlp, proj), True)


def saelens_hook_name(lm: nn.Module, layer: int, site: str) -> Optional[str]:
    """The module whose output is the hook's activation, as SAELens names a hook of a
    Hugging Face model; None where no module outputs it (a gated MLP's activation)."""
    where = find_site(lm, layer, site)
    if not where.on_input:
        return where.path
    mlp_path = where.path.rsplit(".", 1)[0]
    mlp = lm.get_submodule(mlp_path)
    gated = any(n in dict(mlp.named_children()) for n in ("gate_proj", "w1", "w3", "gate_up_proj"))
    act = _child(mlp, ("act", "act_fn", "activation_fn"))
    return None if gated or act is None else f"{mlp_path}.{act}"


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


def attach(site: Site, fn: MLPHook) -> torch.utils.hooks.RemovableHandle:
    """Call `fn(activation)` at `site` in every forward pass; a tensor it returns replaces it."""
    if site.on_input:
        def pre(module: nn.Module, args: tuple) -> Optional[tuple]:
            out = fn(args[0])
            return None if out is None else (out, *args[1:])

        return site.module.register_forward_pre_hook(pre)

    def post(module: nn.Module, args: tuple, output: Any) -> Any:
        out = fn(_first(output))
        return None if out is None else _replace_first(output, out)

    return site.module.register_forward_hook(post)


# ---------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class HFConfig:
    """What the stages read of a model's config (the names `GPTConfig` gives them)."""

    name: str
    n_layer: int
    block_size: int
    """The longest context the model takes."""
    d_mlp: int
    """Width of the hooked activation (d_mlp at an MLP hook, d_model at the others)."""
    n_embd: int
    vocab_size: int
    default_context: int = DEFAULT_CONTEXT

    def accepts_vocab(self, size: int) -> bool:
        """Can a tokenizer of `size` tokens feed the model? Its unembedding may be padded past it."""
        return size <= self.vocab_size


class HFModel(nn.Module):
    """A `transformers` causal LM behind the tiny GPT's interface, hooked at one site per layer."""

    residual_shortcut = False
    """The analysis's exact last-layer effects read the tiny GPT's residual stream; here it re-runs."""

    def __init__(self, lm: nn.Module, site: str, name: str):
        super().__init__()
        if site not in SITES:
            raise UserError(f"site {site!r}: choose one of {', '.join(SITES)}")
        self.lm = lm
        self.site = site
        self.name = name
        self._sites: dict[int, Site] = {}
        c = lm.config
        n_layer = int(c.num_hidden_layers)
        d_model = int(getattr(c, "hidden_size", 0) or getattr(c, "n_embd"))
        limit = int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048)
        vocab = int(lm.get_output_embeddings().weight.shape[0])
        device = next(lm.parameters()).device
        with torch.no_grad():  # the width as a forward pass of one token measures it, whatever the config calls it
            width = int(self.mlp_activations(torch.zeros(1, 1, dtype=torch.long, device=device), 0).shape[-1])
        self.config = HFConfig(name, n_layer, limit, width, d_model, vocab, min(limit, DEFAULT_CONTEXT))

    def _site(self, layer: int) -> Site:
        """Where `layer`'s hook reads, found once (every forward pass of the harvest and the
        CE evaluation attaches there)."""
        if layer not in self._sites:
            self._sites[layer] = find_site(self.lm, layer, self.site)
        return self._sites[layer]

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.site}"

    def block(self, layer: int) -> nn.Module:
        """Block `layer`, or a ValueError naming the layers that exist."""
        if not 0 <= layer < self.config.n_layer:
            raise ValueError(f"layer={layer} does not exist; this model has layers 0..{self.config.n_layer - 1}")
        return decoder_blocks(self.lm)[1][layer]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None) -> GPTOutput:
        """idx (B, T) token ids -> logits (B, T, V), and the loss against targets (-1 ignored)."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than the model's limit "
                             f"{self.config.block_size}")
        logits = self.lm(input_ids=idx, use_cache=False).logits  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-1)
        return GPTOutput(logits, loss)

    def mlp_activations(self, idx: torch.Tensor, layer: int) -> torch.Tensor:
        """(B, T, width) activation at the hook of `layer`; the model stops there (the blocks
        after it and the unembedding never run). Active hooks there apply first."""
        seen: list[torch.Tensor] = []

        def capture(act: torch.Tensor) -> None:
            seen.append(act)
            raise _Stop

        handle = attach(self._site(layer), capture)
        try:
            self.lm(input_ids=idx, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise DataError(f"the hook {self.hook_name(layer)} never ran in a forward pass of {self.name}")
        return seen[0]

    def run_to_mlp(self, idx: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx, the activation at `layer`): `logits_from_mlp` re-runs the model from the
        tokens with another activation in its place (a Hugging Face model cannot be resumed
        half-way in general; the first half runs again, the logits are the same)."""
        return idx, self.mlp_activations(idx, layer)

    def logits_from_mlp(self, idx: torch.Tensor, act: torch.Tensor, layer: int) -> torch.Tensor:
        """(B, T, V) logits with `act` as the activation at `layer`'s hook."""
        with self.hook_mlp(layer, lambda _: act):
            return self(idx).logits

    @contextlib.contextmanager
    def hook_mlp(self, layer: int, fn: MLPHook) -> Iterator[None]:
        """Within the block, call `fn(act)` on `layer`'s activation in every forward pass; a
        tensor it returns replaces it. Hooks nest and run in the order they were entered."""
        handle = attach(self._site(layer), fn)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Extend idx (B, T) by `max_new_tokens` sampled tokens, as `GPT.generate` does."""
        from monofast.gpt.model import GPT

        return GPT.generate(self, idx, max_new_tokens, temperature, top_k, generator)  # type: ignore[arg-type]

    # The analysis's logit weights: the direct path of a direction to the logits.

    def output_directions(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        """(F, C) residual-stream direction of a unit of each hooked vector (F, width): through
        the MLP's output projection at an MLP hook (its bias cancels), as they are elsewhere."""
        if self.site != "mlp.hook_post":
            return vectors.float()
        proj = self._site(layer).module
        weight = proj.weight.float()
        if isinstance(proj, nn.Linear):
            return vectors.float() @ weight.T  # weight (C, width)
        return vectors.float() @ weight  # GPT-2's Conv1D: weight (width, C)

    def final_norm(self) -> Optional[nn.Module]:
        base = getattr(self.lm, getattr(self.lm, "base_model_prefix", ""), None) or self.lm
        name = _child(base, NORM_NAMES)
        return None if name is None else getattr(base, name)

    def direct_logits(self, directions: torch.Tensor) -> torch.Tensor:
        """(F, V) logits per unit of each direction (F, C): the final norm taken as linear
        (a LayerNorm centres, then its gain; an RMSNorm only scales by its gain), then the
        unembedding."""
        d = directions.float()
        norm = self.final_norm()
        if norm is not None:
            kind = type(norm).__name__
            if "RMS" not in kind:
                d = d - d.mean(1, keepdim=True)
            weight = getattr(norm, "weight", None)
            if weight is not None:
                gain = weight.float() + (1.0 if "Gemma" in kind else 0.0)  # Gemma's RMSNorm scales by 1 + w
                d = d * gain
        return d @ self.lm.get_output_embeddings().weight.float().T


# ---------------------------------------------------------------------------------------
# `monofast hooks`


class HookInfo(NamedTuple):
    name: str
    module: str
    width: int


@torch.no_grad()
def list_hooks(lm: nn.Module) -> list[HookInfo]:
    """Every hook of the model with the module it reads and its width, measured by a forward
    pass of two tokens."""
    n = int(lm.config.num_hidden_layers)
    sites = [(layer, site, find_site(lm, layer, site)) for layer in range(n) for site in SITES]
    widths: dict[tuple[int, str], int] = {}
    handles = []
    for layer, site, where in sites:
        def record(act: torch.Tensor, key: tuple[int, str] = (layer, site)) -> None:
            widths[key] = int(act.shape[-1])

        handles.append(attach(where, record))
    try:
        device = next(lm.parameters()).device
        lm(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [HookInfo(f"blocks.{layer}.{site}", where.path + (" (input)" if where.on_input else ""),
                     widths.get((layer, site), 0)) for layer, site, where in sites]
