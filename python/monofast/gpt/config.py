"""Options of the GPT stage (`monofast gpt train`): the model's shape, the optimizer and
its schedule, the evaluation, the samples, and how it runs (device, precision, compile)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from monofast.common.config import not_utf8
from monofast.common.device import DTYPE_CHOICES, parse_device
from monofast.gpt.model import GPTConfig, GPTShape

COMPILE_CHOICES = ("auto", "true", "false")
OPTIMIZER_CHOICES = ("adamw", "muon")
SCHEDULE_CHOICES = ("cosine", "wsd")


@dataclass
class GPTTrainConfig(GPTShape):
    """Options of the GPT stage. The defaults are the seed laptop recipe.

    The model's shape fields (n_layer, n_head, n_embd, block_size, dropout, bias) and
    their checks come from `GPTShape`; the vocabulary comes from the data stage."""

    # Options that change how a run executes or what it writes after training, not which
    # steps it takes: a run may resume with other values of these (the manifest ignores them).
    RUNTIME: ClassVar[frozenset[str]] = frozenset({
        "device", "dtype", "compile", "resume", "eval_batches", "sample_prompts", "allow_download",
        "sample_tokens", "num_samples", "temperature", "top_k"})

    dropout: float = 0.2
    """Dropout probability during training (0 for none)."""
    batch_size: int = 24
    """Training windows per step."""
    max_iters: int = 7500
    """Optimizer steps; the schedule ends at exactly this many."""
    optimizer: str = "adamw"
    """adamw (every parameter) or muon (Muon for the blocks' weight matrices, AdamW at
    learning_rate for the embeddings and the norms' gains)."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate, reached after the warm-up."""
    min_lr: float = 1e-4
    """AdamW learning rate at the end of the schedule (Muon's ends at the same fraction of muon_lr)."""
    muon_lr: float = 0.02
    """Peak Muon learning rate (optimizer muon only); it follows the same schedule."""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum (optimizer muon only)."""
    schedule: str = "cosine"
    """After the warm-up: cosine (decay from the peak to min_lr over the remaining steps) or
    wsd (warm-up, stable: hold the peak, decay: linear to min_lr over the last decay_frac of
    the steps)."""
    decay_frac: float = 0.4
    """Fraction of max_iters the wsd schedule spends decaying (schedule wsd only)."""
    warmup_iters: int = 100
    """Steps of linear warm-up from 0 to the peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW's and Muon's), applied to weight matrices and embeddings
    only (not to biases or norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2 (0.99 rather than 0.999 suits small models and small batches)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 turns clipping off)."""
    eval_interval: int = 250
    """Evaluate on the validation split, write metrics and save a checkpoint every this many
    steps (and at the end)."""
    eval_batches: int = 20
    """Validation batches per evaluation (each of batch_size windows, spread evenly over the
    split)."""
    device: str = "auto"
    """Device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """Autocast precision: auto (bfloat16 where it is faster), float32, bfloat16 or float16
    (CUDA/MPS only)."""
    compile: str = "auto"
    """torch.compile the model: auto (on CUDA only, and in one process with CUDA graphs,
    torch.compile's reduce-overhead mode: the small models here are launch-bound there; on
    CPU compiling measured 0.9-1.1x eager after 10-40 s), true (the default mode, any
    device) or false."""
    model: str = ""
    """A Hugging Face causal LM (local folder, or hub id in the local cache) to use instead of
    training the tiny GPT: the stage then records it, and later stages load it at --dtype
    (auto: bfloat16 where it is faster, else float32). `monofast run --model` sets it."""
    allow_download: bool = False
    """Let a Hugging Face model download from the hub when it is not in the local cache."""
    resume: bool = False
    """Continue from gpt/checkpoint.pt (a killed run) on the same schedule instead of starting over."""
    seed: int = 1337
    """Seed of the initial weights, the training windows, dropout and the samples."""
    sample_prompts: tuple[str, ...] = field(default=("def run", "ROMEO:"), metadata={"metavar": "PROMPT,..."})
    """Prompts for samples.txt, comma-separated: by default one Python and one Shakespeare prompt."""
    sample_tokens: int = 200
    """Tokens generated per sample in samples.txt (0 writes no samples)."""
    num_samples: int = 2
    """Samples per prompt in samples.txt."""
    temperature: float = 0.8
    """Sampling temperature for samples.txt (0 is greedy)."""
    top_k: int = 50
    """Sample only among the k likeliest tokens (0 for no limit)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "max_iters", "eval_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0.0 < self.learning_rate:
            raise ValueError(f"learning_rate={self.learning_rate} must be positive, e.g. 1e-3")
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise ValueError(f"optimizer={self.optimizer!r}; choose one of {', '.join(OPTIMIZER_CHOICES)}")
        if self.schedule not in SCHEDULE_CHOICES:
            raise ValueError(f"schedule={self.schedule!r}; choose one of {', '.join(SCHEDULE_CHOICES)}")
        if not 0.0 < self.decay_frac <= 1.0:
            raise ValueError(f"decay_frac={self.decay_frac} must be in (0, 1], e.g. 0.4")
        if not 0.0 < self.muon_lr:
            raise ValueError(f"muon_lr={self.muon_lr} must be positive, e.g. 0.02")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"muon_momentum={self.muon_momentum} must be in [0, 1), e.g. 0.95")
        if not 0.0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} must be in [0, learning_rate={self.learning_rate}]")
        if not 0 <= self.warmup_iters < self.max_iters:
            raise ValueError(f"warmup_iters={self.warmup_iters} must be in [0, max_iters={self.max_iters}); "
                             f"lower --warmup-iters or raise --max-iters")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1={self.beta1} and beta2={self.beta2} must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be non-negative (0 turns them off)")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        self.compile = str(self.compile).lower()
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile={self.compile!r}; choose auto, true or false")
        parse_device(self.device)
        if self.sample_tokens < 0 or self.num_samples < 0 or self.top_k < 0 or self.temperature < 0:
            raise ValueError("sample_tokens, num_samples, top_k and temperature must be non-negative")
        for prompt in self.sample_prompts:
            if (shown := not_utf8(prompt)) is not None:
                raise ValueError(f"sample_prompts: '{shown}' holds bytes that are not UTF-8 text; "
                                 f"give the prompts as UTF-8")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0 (numpy takes only non-negative seeds), e.g. 1337")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, **self.shape())
