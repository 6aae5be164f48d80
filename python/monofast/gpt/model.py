"""The tiny GPT: a nanoGPT-style pre-LayerNorm transformer with a hookable MLP.

Read top to bottom: the config, then LayerNorm, causal self-attention, the MLP (with its
hook point), a Block, and the GPT that stacks them. Input and output embeddings are
tied, as in GPT-2 and nanoGPT.

The MLP's post-GELU activation, shape (B, T, 4 * n_embd), is what the sparse autoencoders
decompose. `GPT.hook_mlp(layer, fn)` reads or replaces it during any forward pass, and
`GPT.mlp_activations(idx, layer)` runs only as far as that activation (harvesting does not
need the later blocks or the unembedding).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, NamedTuple, Optional, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from monofast.gpt.dropout import Dropout, dropout

MLPHook = Callable[[torch.Tensor], Optional[torch.Tensor]]
"""`fn(act) -> None | Tensor`: act is the (B, T, d_mlp) post-GELU activation; returning
a tensor of the same shape replaces it for the rest of the forward pass."""


@dataclass
class GPTShape:
    """The model's shape, without its vocabulary: the options the GPT stage shares with
    the model (`monofast.gpt.config.GPTTrainConfig` adds training to them)."""

    n_layer: int = 2
    """Number of transformer blocks."""
    n_head: int = 2
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 192
    """Width of the residual stream; the hooked MLP activation is 4x as wide."""
    block_size: int = 256
    """Context length in tokens: training windows and the size of the position embedding."""
    dropout: float = 0.0
    """Dropout probability on attention weights, residual branches and embeddings (training only)."""
    bias: bool = False
    """Biases in the Linear and LayerNorm layers (nanoGPT trains without; slightly faster)."""

    def __post_init__(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"choose n_embd a multiple of n_head (e.g. --n-embd "
                             f"{self.n_head * max(1, round(self.n_embd / self.n_head))})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1), e.g. 0.0 or 0.2")

    def shape(self) -> dict[str, Any]:
        """The shape fields alone, by name."""
        return {f.name: getattr(self, f.name) for f in fields(GPTShape)}


@dataclass
class GPTConfig(GPTShape):
    """The model: its shape and vocabulary. Saved as `gpt/config.json` beside the weights."""

    vocab_size: int = 1024
    """Number of token ids (the tokenizer's vocabulary, end-of-text included)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool) or self.vocab_size < 1:
            raise ValueError(f"vocab_size={self.vocab_size!r} must be a positive integer")

    @property
    def d_mlp(self) -> int:
        """Width of the MLP's hidden (hooked) activation."""
        return 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def accepts_vocab(self, size: int) -> bool:
        """Can a tokenizer of `size` tokens feed the model? Only the one it was trained with."""
        return size == self.vocab_size

    @property
    def default_context(self) -> int:
        """Tokens per context where a stage's length option is 0: the whole block."""
        return self.block_size


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own only gained `bias=False` in 2.1)."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def _explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               p: float) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) + causal mask) v with three plain ops (and dropout `p` on the
    attention weights), for bf16 on CPU: there the fused SDPA kernel measured 1.6x slower at
    T=256 and 2.6x slower at T=128 (forward + backward, 2 cores, AVX-512), and the whole
    quick-preset training step 1.4x slower. The max error against an fp32 reference is that
    of bf16 rounding either way. Also for dropout on the CPU, where SDPA would draw its mask
    with torch's slow sampler (`monofast.gpt.dropout`)."""
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)  # (T, T)
    att = att.masked_fill(future, float("-inf")).softmax(dim=-1)
    return dropout(att, p) @ v  # (B, H, T, d)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `scaled_dot_product_attention`, which picks
    the flash / memory-efficient kernel for the device and never builds a (T, T) mask here."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one product
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C)
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        p = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and (q.dtype == torch.bfloat16 or p > 0):
            y = _explicit_causal_attention(q, k, v, p)  # (B, H, T, C/H)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Linear -> GELU -> [hook point] -> Linear. The hook point sees (B, T, d_mlp)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.d_mlp, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.n_embd, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)
        # Empty unless a `GPT.hook_mlp` block is active; an empty tuple costs one truth test.
        self.hooks: tuple[MLPHook, ...] = ()

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The post-GELU activation (B, T, d_mlp), after any hooks have read or replaced it."""
        act = F.gelu(self.c_fc(x))  # (B, T, d_mlp)
        for hook in self.hooks:
            out = hook(act)
            if out is not None:
                if out.shape != act.shape:
                    raise ValueError(f"an MLP hook returned shape {tuple(out.shape)}; it must "
                                     f"return None or a tensor of the activation's shape {tuple(act.shape)}")
                act = out
        return act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.activation(x)))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPTOutput(NamedTuple):
    """What `GPT.forward` returns."""

    logits: torch.Tensor
    """(B, T, vocab_size) next-token logits at every position."""
    loss: Optional[torch.Tensor]
    """Mean next-token cross-entropy (a scalar) when targets were given, else None."""


class GPT(nn.Module):
    """Token + position embeddings, `n_layer` blocks, a final LayerNorm and the tied unembedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one (V, C) matrix embeds and unembeds
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    residual_shortcut = True
    """The analysis may read this model's residual stream for exact last-layer effects."""

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is left out by default (as in nanoGPT),
        the tied token embedding is counted once."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L T C."""
        T = seq_len or self.config.block_size
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * T * c.n_embd

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape  # (B, T)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size="
                             f"{self.config.block_size}; crop the input to the last {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None) -> GPTOutput:
        """idx (B, T) token ids; targets (B, T) next-token ids (or -1 to ignore a position)."""
        x = self._embed(idx)  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
        return GPTOutput(logits, loss)

    def block(self, layer: int) -> Block:
        """Block `layer`, or a ValueError naming the layers that exist."""
        if not 0 <= layer < self.config.n_layer:
            raise ValueError(f"layer={layer} does not exist; this model has layers "
                             f"0..{self.config.n_layer - 1}")
        return cast(Block, self.h[layer])

    def mlp_activations(self, idx: torch.Tensor, layer: int) -> torch.Tensor:
        """(B, T, d_mlp) post-GELU MLP activation of `layer` for idx (B, T); the blocks after
        it and the unembedding never run. Active hooks apply, as in a full forward."""
        return self.run_to_mlp(idx, layer)[1]

    def run_to_mlp(self, idx: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first half of a forward pass, up to `layer`'s MLP activation: (the residual
        stream after that block's attention (B, T, C), the activation (B, T, d_mlp)).
        `logits_from_mlp` finishes it, with that activation or another in its place."""
        target = self.block(layer)
        x = self._embed(idx)  # (B, T, C)
        for block in self.h[:layer]:
            x = block(x)
        x = x + target.attn(target.ln_1(x))  # (B, T, C)
        return x, target.mlp.activation(target.ln_2(x))

    def logits_from_mlp(self, resid: torch.Tensor, act: torch.Tensor, layer: int) -> torch.Tensor:
        """(B, T, V) logits of a forward pass that `run_to_mlp` began, with `act` (B, T, d_mlp)
        as `layer`'s MLP activation: the same operations as `forward` from there on, so the
        same logits. Several activations of one input cost one first half."""
        target = self.block(layer)
        x = resid + target.mlp.dropout(target.mlp.c_proj(act))  # (B, T, C)
        for block in self.h[layer + 1:]:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def output_directions(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        """(F, C) residual-stream direction of a unit of each MLP-activation vector (F, d_mlp)."""
        return vectors.float() @ self.block(layer).mlp.c_proj.weight.float().T

    def direct_logits(self, directions: torch.Tensor) -> torch.Tensor:
        """(F, V) logits per unit of each residual direction (F, C): the final LayerNorm taken
        as linear (centre, times its gain), then the unembedding."""
        d = directions.float()
        return ((d - d.mean(1, keepdim=True)) * self.ln_f.weight.float()) @ self.lm_head.weight.float().T

    @contextlib.contextmanager
    def hook_mlp(self, layer: int, fn: MLPHook) -> Iterator[None]:
        """Within the block, call `fn(act)` on `layer`'s post-GELU MLP activation (B, T, d_mlp)
        in every forward pass; a tensor it returns replaces the activation. Hooks nest and
        run in the order they were entered."""
        mlp = self.block(layer).mlp
        mlp.hooks = mlp.hooks + (fn,)
        try:
            yield
        finally:
            mlp.hooks = tuple(h for h in mlp.hooks if h is not fn)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Extend idx (B, T) by `max_new_tokens` sampled tokens -> (B, T + max_new_tokens).

        temperature 0 is greedy decoding; `top_k` keeps only the k likeliest tokens; pass a
        seeded `generator` for a reproducible sample.
        """
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]  # (B, <=block_size)
            logits = self(context).logits[:, -1, :].float()  # (B, V)
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.size(-1):
                    kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)  # (B, V)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
