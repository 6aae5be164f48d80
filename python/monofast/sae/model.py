"""Sparse autoencoders: the config, the module, the decoder constraint, resampling, files.

Five variants share one module; the first three run one fused step
(`monofast.sae.backend.sae_step`), the BatchTopK pair an eager one (`monofast.sae.batchtopk`):

- `anthropic2023` (Towards Monosemanticity): f = ReLU((x - b_dec) W_enc + b_enc),
  x_hat = f W_dec + b_dec; decoder rows kept at unit norm, with the gradient component
  along each row removed before the optimizer step; loss = MSE + lambda * L1; dead
  features are resampled (`resample`).
- `april2024` (Anthropic's April 2024 update): the L1 term weights each feature by its
  decoder row norm, so no norm constraint is needed; W_enc starts as W_dec^T with decoder
  rows of norm `dec_init_norm`.
- `topk` (Gao et al. 2024): only the k largest pre-activations of each row survive; unit
  decoder rows as in anthropic2023; an AuxK loss reconstructs the residual from the
  dead features.
- `batchtopk` (Bussmann et al. 2024): in training, the k x B largest pre-activations of
  the whole batch of B rows survive (`reference.batch_topk`), so rows share a budget of k
  on average; unit decoder rows and AuxK as topk. Inference cannot depend on the batch,
  so `encode` (and the forward pass in eval mode) is a JumpReLU at a threshold estimated
  in training (`threshold`, saved with the weights).
- `matryoshka` (Matryoshka BatchTopK, Bussmann et al. 2025; Nabeshima 2024): batchtopk
  whose reconstruction loss is summed over nested prefixes of the dictionary (the first
  F/16, F/8, ..., F features, each with b_dec), so early features must reconstruct on
  their own and stay general.

Every variant may scale its inputs so that E|x| = sqrt(d_in) (`scale_inputs`, on by
default, from the April 2024 update); the scale is folded into the weights when saving.
Layout and file names follow SAELens: W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc,
b_dec, in `sae_weights.safetensors` beside a `cfg.json`, so `sae_lens.SAE.load_from_disk`
loads the folder as it is (a BatchTopK SAE as the JumpReLU it is at inference).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from monofast.common import files
from monofast.common.device import PRECISION_NAMES, pick_dtype
from monofast.common.errors import DataError, UserError
from monofast.sae import backend
from monofast.sae.batchtopk import batch_step

VARIANTS = ("anthropic2023", "april2024", "topk", "batchtopk", "matryoshka")
K_VARIANTS = ("topk", "batchtopk", "matryoshka")
"""Variants whose sparsity is set by k (and whose sweep is over k, with AuxK), not by L1."""
BATCH_VARIANTS = ("batchtopk", "matryoshka")
"""Variants that choose features over the whole batch in training and by threshold after."""
SAE_LENS_ARCHITECTURES = {"topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
"""cfg.json's `architecture`: the SAELens class computing the variant's `encode` (else "standard")."""
FOREIGN_ARCHITECTURES = {"standard": "anthropic2023", "topk": "topk", "jumprelu": "batchtopk",
                         "batchtopk": "batchtopk", "matryoshka_batchtopk": "matryoshka"}
"""The variant that reads a cfg.json without monofast's own section (written elsewhere)."""
MATRYOSHKA_PREFIXES = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
"""The nested prefixes of Bussmann et al. 2025 (F/16, F/8, F/4, F/2, F), as fractions of F."""
DTYPES = PRECISION_NAMES
WEIGHTS_FILE = "sae_weights.safetensors"  # SAELens' name; older runs' folders hold OLD_WEIGHTS_FILE
OLD_WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


@dataclass
class SAEConfig:
    """The shape and kind of one sparse autoencoder (training options live elsewhere)."""

    d_in: int = 512
    """Width of the activations it reads (the GPT's MLP width)."""
    d_sae: int = 4096
    """Number of features (the dictionary size)."""
    variant: str = "anthropic2023"
    """anthropic2023 (unit-norm decoder, L1), april2024 (L1 weighted by decoder norms, input
    scaling), topk (k largest pre-activations, AuxK), batchtopk (k x B largest of the batch,
    AuxK, a threshold at inference) or matryoshka (batchtopk with nested-prefix losses)."""
    k: int = 32
    """topk: features kept per row; batchtopk and matryoshka: per row on average over a batch."""
    aux_k: int = 256
    """topk, batchtopk, matryoshka: dead features the AuxK loss may use per row (0 turns AuxK off)."""
    dead_tokens: int = 10_000_000
    """A feature that has not fired for this many tokens counts as dead (AuxK, statistics)."""
    dec_init_norm: float = 0.1
    """april2024: L2 norm of each decoder row at initialisation."""
    scale_inputs: bool = True
    """Multiply inputs by sqrt(d_in) / E|x| (set by `set_input_scale`, folded into the weights
    when saving), as the April 2024 update does, so that one L1 coefficient means the same
    on any model's activations."""
    matryoshka_prefixes: tuple[float, ...] = MATRYOSHKA_PREFIXES
    """matryoshka: the nested prefixes whose reconstruction losses are summed, as increasing
    fractions of d_sae ending at 1 (the paper's F/16 ... F by default)."""
    dtype: str = "float32"
    """Dtype of the parameters (float32 master weights train best)."""
    compute_dtype: str = "auto"
    """Dtype of the matrix products: auto (bfloat16 on CUDA and on CPUs that multiply it
    natively, else the parameter dtype), float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
        if self.variant in K_VARIANTS and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must be between 1 and d_sae={self.d_sae}; "
                             f"set --k to the number of features each row keeps")
        self.matryoshka_prefixes = tuple(float(f) for f in self.matryoshka_prefixes)  # JSON gives a list
        check_prefixes(self.matryoshka_prefixes)
        if self.aux_k < 0:
            raise ValueError(f"aux_k must be >= 0 (0 turns AuxK off), got {self.aux_k}")
        if self.dead_tokens < 1:
            raise ValueError(f"dead_tokens must be >= 1, got {self.dead_tokens}")
        if not self.dec_init_norm > 0:
            raise ValueError(f"dec_init_norm must be > 0, got {self.dec_init_norm}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        if self.compute_dtype not in ("auto",) + DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r} is unknown; choose auto or one of "
                             f"{', '.join(DTYPES)}")

    @property
    def top_k(self) -> Optional[int]:
        """k for the fused step: the configured k for topk, None (ReLU) otherwise."""
        return self.k if self.variant == "topk" else None

    @property
    def unit_decoder(self) -> bool:
        """Decoder rows are held at unit norm (every variant but april2024)."""
        return self.variant != "april2024"

    @property
    def uses_k(self) -> bool:
        """Sparsity is set by k (topk, batchtopk, matryoshka), with AuxK for dead features."""
        return self.variant in K_VARIANTS

    @property
    def batch_sparsity(self) -> bool:
        """Features are chosen over the whole batch in training, by threshold at inference."""
        return self.variant in BATCH_VARIANTS

    @property
    def prefix_sizes(self) -> list[int]:
        """The matryoshka prefixes in features: increasing, at least 1, the last d_sae
        (fractions that round to the same size count once); [d_sae] for the other variants."""
        if self.variant != "matryoshka":
            return [self.d_sae]
        return sorted({max(1, round(f * self.d_sae)) for f in self.matryoshka_prefixes})


def check_prefixes(fractions: tuple[float, ...]) -> None:
    """Refuse matryoshka prefixes that are not increasing fractions in (0, 1] ending at 1."""
    ok = bool(fractions) and fractions[-1] == 1.0 and all(0 < f <= 1 for f in fractions) and \
        all(a < b for a, b in zip(fractions, fractions[1:]))
    if not ok:
        raise ValueError(f"matryoshka_prefixes must be increasing fractions of d_sae in (0, 1] ending "
                         f"at 1, got {fractions}; e.g. 0.0625,0.125,0.25,0.5,1")


class SAEOutput(NamedTuple):
    """One forward pass. The training loss is `mse + l1_coeff * l1 + aux_coeff * aux`.

    With `scale_inputs`, mse and l1 are measured on the scaled inputs (E|x| = sqrt(d_in)).
    """

    x_hat: Tensor
    """[B, d_in] reconstruction, in the space of the input x."""
    feats: Tensor
    """[B, d_sae] feature activations."""
    mse: Tensor
    """Scalar: squared error summed over d_in, averaged over the batch. For matryoshka, the
    training loss: that error summed over the nested prefixes (the full reconstruction's is
    the last term; `x_hat` is the full one, which held-out metrics use)."""
    l1: Tensor
    """Scalar: feature activations summed per row (weighted by decoder row norms for
    april2024), averaged over the batch."""
    l0: Tensor
    """Scalar: mean number of firing features per row (no gradient)."""
    fired: Tensor
    """[d_sae] int32: rows of this batch each feature fired on (no gradient)."""
    aux: Tensor
    """Scalar: the AuxK loss (normalised by the batch's variance); zero unless a k variant has
    dead features in training mode."""


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder of any variant; `forward` runs the fused step of the device's backend."""

    input_scale: Tensor
    tokens_since_fired: Tensor
    threshold: Tensor
    threshold_batches: Tensor

    def __init__(self, cfg: SAEConfig, device: torch.device | str = "cpu",
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        """Inputs are multiplied by this (sqrt(d_in) / E|x| with scale_inputs); 1 once folded in."""
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.int64, device=device))
        """Tokens seen in training since each feature last fired."""
        if cfg.batch_sparsity:  # only these variants have them, so older checkpoints still load
            self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=torch.float32, device=device))
            """[d_sae] the inference JumpReLU threshold (one value for all features; 0 = ReLU
            until the first training batch)."""
            self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.int64, device=device))
            """Training batches that have updated `threshold`."""
        self.sparse_step = False
        """Take the sparse form of the fused step (same results; the trainer sets it by the
        measured crossover, `monofast.sae.crossover`). The BatchTopK variants ignore it."""
        self.reset_parameters(generator)

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Random decoder directions (unit rows, or `dec_init_norm` for april2024),
        W_enc = W_dec^T, zero biases."""
        w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32, device="cpu")
        w /= torch.linalg.vector_norm(w, dim=1, keepdim=True)
        if not self.cfg.unit_decoder:
            w *= self.cfg.dec_init_norm
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor, method: str = "geometric_median") -> None:
        """Set b_dec from a sample of inputs [N, d_in]: its geometric median, mean, or zeros."""
        sample = sample.float() * self.input_scale.to(sample.device)
        if method == "geometric_median":
            centre = geometric_median(sample)
        elif method == "mean":
            centre = sample.mean(0)
        elif method == "zeros":
            centre = torch.zeros(sample.shape[1])
        else:
            raise UserError(f"b_dec init {method!r} is unknown; choose geometric_median, mean or zeros")
        self.b_dec.copy_(centre.to(self.b_dec))

    @torch.no_grad()
    def set_input_scale(self, sample: Tensor) -> float:
        """Scale inputs so that E|x| = sqrt(d_in), estimated on `sample` [N, d_in]."""
        mean_norm = float(torch.linalg.vector_norm(sample.float(), dim=1).mean())
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            raise DataError(f"cannot scale inputs: their mean norm is {mean_norm}")
        scale = math.sqrt(self.cfg.d_in) / mean_norm
        self.input_scale.fill_(scale)
        return scale

    # ------------------------------------------------------------------ forward

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        """The products' dtype; None: the parameters' own (`auto` where bf16 is not native)."""
        return pick_dtype(self.cfg.compute_dtype, self.W_enc.device, otherwise=None, flag="--compute-dtype")

    def forward(self, x: Tensor) -> SAEOutput:
        if x.dim() != 2 or x.shape[1] != self.cfg.d_in:
            raise DataError(f"the SAE reads rows of width d_in={self.cfg.d_in}; got input of shape "
                            f"{tuple(x.shape)}")
        scaled = self.cfg.scale_inputs
        xs = x * self.input_scale.to(x.dtype) if scaled else x
        if self.cfg.batch_sparsity:
            out = batch_step(xs, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold,
                             self.threshold_batches, self.cfg.k, self.cfg.prefix_sizes, self.training,
                             self.compute_dtype)
        else:
            out = backend.sae_step(xs, self.W_enc, self.b_enc, self.W_dec, self.b_dec, k=self.cfg.top_k,
                                   dec_norm=not self.cfg.unit_decoder, compute_dtype=self.compute_dtype,
                                   sparse=self.sparse_step)
        aux = torch.zeros((), dtype=torch.float32, device=x.device)
        if self.training:
            with torch.no_grad():
                self.tokens_since_fired.add_(x.shape[0]).masked_fill_(out.fired > 0, 0)
            if self.cfg.uses_k and self.cfg.aux_k > 0:
                aux = self._aux_loss(xs, out.x_hat)
        x_hat = out.x_hat / self.input_scale.to(out.x_hat.dtype) if scaled else out.x_hat
        return SAEOutput(x_hat, out.feats, out.mse, out.l1, out.l0, out.fired, aux)

    def inference_threshold(self) -> Optional[Tensor]:
        """[d_sae] the JumpReLU threshold `encode` applies (batchtopk, matryoshka), else None."""
        return self.threshold.detach() if self.cfg.batch_sparsity else None

    def dead_mask(self) -> Tensor:
        """[d_sae] bool: features that have not fired for `dead_tokens` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def _aux_loss(self, xs: Tensor, x_hat: Tensor) -> Tensor:
        """AuxK: reconstruct the residual from the top `aux_k` dead features (eager; the dead
        features are few, so this is a thin [B, n_dead] product)."""
        dead = self.dead_mask().nonzero().squeeze(1)
        if dead.numel() == 0:
            return torch.zeros((), dtype=torch.float32, device=xs.device)
        xs32 = xs.float()
        pre = (xs32 - self.b_dec.float()) @ self.W_enc[:, dead].float() + self.b_enc[dead].float()
        values, indices = torch.topk(pre, min(self.cfg.aux_k, dead.numel()), dim=1, sorted=False)
        e_hat = nn.functional.embedding_bag(indices, self.W_dec[dead].float(),
                                            per_sample_weights=torch.relu(values), mode="sum")
        residual = (xs32 - x_hat.float()).detach()
        variance = (xs32 - xs32.mean(0)).square().sum().clamp_min(1e-12)
        return (e_hat - residual).square().sum() / variance

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """[B, d_sae] feature activations (inference, plain PyTorch, parameter dtype); the
        BatchTopK variants apply their threshold, so a row's features do not depend on the batch."""
        from monofast.kernels.reference import jump_relu
        from monofast.kernels.select import activate

        xs = x.to(self.W_enc.dtype) * self.input_scale.to(self.W_enc.dtype)
        pre = (xs - self.b_dec) @ self.W_enc + self.b_enc  # [B, d_sae]
        if self.cfg.batch_sparsity:
            return jump_relu(pre, self.threshold.to(pre.dtype))
        return activate(pre, self.cfg.top_k)

    @torch.no_grad()
    def decode(self, feats: Tensor) -> Tensor:
        """[B, d_in] reconstruction from features, in the input space. Features that fire
        sparsely (at most 1 in `GATHER_MIN_RATIO`) are decoded by summing each row's
        active decoder rows (`monofast.kernels.sparse`), the rest by the dense product."""
        from monofast.kernels.eager import GATHER_MIN_RATIO
        from monofast.kernels.sparse import gather_sum, relu_active

        feats = feats.to(self.W_dec.dtype)
        scale = self.input_scale.to(self.W_dec.dtype)
        if feats.dim() == 2 and feats.numel() and float(feats.min()) >= 0:  # (a clamp may set negatives)
            active = relu_active(feats)
            if active.col.numel() * GATHER_MIN_RATIO <= feats.numel():
                return gather_sum(self.W_dec, active.col, active.row_ptr, active.val).add_(self.b_dec) / scale
        return (feats @ self.W_dec + self.b_dec) / scale

    # ------------------------------------------------------------------ optimisation

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of each decoder row's gradient along the row itself (unit-norm variants):
        the optimizer then moves rows around the sphere instead of fighting the renormalisation."""
        grad = self.W_dec.grad
        if grad is None or not self.cfg.unit_decoder:
            return
        along = torch.linalg.vecdot(grad, self.W_dec, dim=1)  # [d_sae]; rows are unit vectors
        grad.addcmul_(along[:, None], self.W_dec, value=-1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Put every decoder row back on the unit sphere (unit-norm variants)."""
        if self.cfg.unit_decoder:
            self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min(1e-12))

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The constrained step: remove the parallel gradient, step, renormalise the decoder."""
        self.remove_parallel_grad()
        optimizer.step()
        self.normalize_decoder()

    @torch.no_grad()
    def resample(self, dead: Tensor, inputs: Tensor, optimizer: Optional[torch.optim.Optimizer] = None,
                 encoder_scale: float = 0.2) -> None:
        """Anthropic's neuron resampling for the features `dead` (indices) from `inputs`
        [len(dead), d_in] (picked by the caller with probability proportional to their loss).

        Decoder row = the normalised input; encoder column = the same direction scaled to
        `encoder_scale` x the mean encoder norm of the live features; encoder bias 0; Adam
        moments of those rows and columns reset to zero.
        """
        dead = dead.to(self.W_enc.device, torch.long)
        if dead.numel() == 0:
            return
        if inputs.shape != (dead.numel(), self.cfg.d_in):
            raise ValueError(f"resample needs one input of width {self.cfg.d_in} per dead feature; "
                             f"got {tuple(inputs.shape)} for {dead.numel()} features")
        direction = inputs.to(self.W_dec.device, torch.float32) * self.input_scale
        direction /= torch.linalg.vector_norm(direction, dim=1, keepdim=True).clamp_min(1e-12)
        alive = torch.ones(self.cfg.d_sae, dtype=torch.bool, device=self.W_enc.device)
        alive[dead] = False
        enc_norms = torch.linalg.vector_norm(self.W_enc.float(), dim=0)  # [d_sae]
        live_norm = enc_norms[alive].mean() if bool(alive.any()) else torch.tensor(1.0)
        self.W_dec[dead] = direction.to(self.W_dec.dtype)
        self.W_enc[:, dead] = (direction * (encoder_scale * live_norm)).T.to(self.W_enc.dtype)
        self.b_enc[dead] = 0
        self.tokens_since_fired[dead] = 0
        if optimizer is not None:
            reset_adam_state(optimizer, self.W_dec, rows=dead)
            reset_adam_state(optimizer, self.W_enc, cols=dead)
            reset_adam_state(optimizer, self.b_enc, rows=dead)

    # ------------------------------------------------------------------ files

    @torch.no_grad()
    def folded_weights(self) -> dict[str, Tensor]:
        """The weights with the input scale folded in: they act on unscaled inputs.

        With s the scale, f = ReLU((x s - b_dec) W_enc + b_enc) = ReLU((x - b_dec/s)(s W_enc) + b_enc)
        and x_hat = (f W_dec + b_dec) / s = f (W_dec / s) + b_dec / s.
        """
        s = float(self.input_scale)
        weights = {
            "W_enc": (self.W_enc * s).contiguous(),
            "W_dec": (self.W_dec / s).contiguous(),
            "b_enc": self.b_enc.detach().clone(),
            "b_dec": (self.b_dec / s).contiguous(),
        }
        if self.cfg.batch_sparsity:  # f is unchanged by the folding, and so is its threshold
            weights["threshold"] = self.threshold.to(self.W_enc.dtype).clone()  # SAELens' JumpReLU name
        return weights

    def sae_lens_cfg(self, **metadata: Any) -> dict[str, Any]:
        """`cfg.json` contents: SAELens keys, then monofast's own config under "monofast"."""
        cfg: dict[str, Any] = {
            "architecture": SAE_LENS_ARCHITECTURES.get(self.cfg.variant, "standard"),
            "d_in": self.cfg.d_in, "d_sae": self.cfg.d_sae,
            "dtype": self.cfg.dtype, "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",  # the input scale is folded into the weights
            "reshape_activations": "none",
        }
        if self.cfg.uses_k:
            cfg["k"] = self.cfg.k
        if self.cfg.batch_sparsity:
            cfg["topk_threshold"] = float(self.threshold[0])
        cfg.update({key: value for key, value in metadata.items() if value is not None})
        cfg["metadata"] = {key: value for key, value in metadata.items() if value is not None}
        cfg["monofast"] = {**asdict(self.cfg), "folded_input_scale": float(self.input_scale)}
        return cfg

    def save(self, folder: str | Path, **metadata: Any) -> None:
        """Write `sae_weights.safetensors` and `cfg.json` (atomically) into `folder`.

        `metadata` (hook_name, hook_layer, model_name, context_size, ...) goes into cfg.json.
        """
        from safetensors.torch import save as save_tensors

        folder = Path(folder)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.folded_weights().items()}
        files.write_bytes(folder / WEIGHTS_FILE, save_tensors(tensors, metadata={"format": "pt"}))
        files.write_json(folder / CONFIG_FILE, self.sae_lens_cfg(**metadata))
        (folder / OLD_WEIGHTS_FILE).unlink(missing_ok=True)  # a stale copy must not shadow these

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> "SparseAutoencoder":
        """Read an SAE written by `save` (or by SAELens: standard, topk or jumprelu)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        raw = files.read_json(files.verify_recorded(folder / CONFIG_FILE), "SAE config")
        mine = dict(raw.get("monofast", {}))
        mine.pop("folded_input_scale", None)
        if not mine:
            variant = FOREIGN_ARCHITECTURES.get(raw.get("architecture", "standard"))
            if variant is None:
                raise DataError(f"{folder / CONFIG_FILE}: a {raw['architecture']!r} SAE, which monofast cannot "
                                f"compute (it reads {', '.join(sorted(FOREIGN_ARCHITECTURES))})")
            mine = {"d_in": raw["d_in"], "d_sae": raw["d_sae"], "variant": variant,
                    "dtype": raw.get("dtype", "float32")}
            mine.update({"k": raw["k"]} if variant in K_VARIANTS and "k" in raw else {})  # JumpReLU: no k
        mine["scale_inputs"] = False  # the saved weights already act on unscaled inputs
        try:
            cfg = SAEConfig(**mine)
        except (TypeError, ValueError) as err:
            raise DataError(f"{folder / CONFIG_FILE}: {err}") from None
        path = weights_path(folder)
        if not path.is_file():
            raise UserError(f"SAE weights not found: {path}")
        tensors = load_file(str(files.verify_recorded(path)))
        sae = cls(cfg, device=device)
        expected = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_in), "b_enc": (cfg.d_sae,),
                    "b_dec": (cfg.d_in,), **({"threshold": (cfg.d_sae,)} if cfg.batch_sparsity else {})}
        for name, shape in expected.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise DataError(f"{path}: {name} should have shape {shape}, found {got}")
            if not bool(torch.isfinite(tensors[name]).all()):  # every reader would compute NaN from it
                raise DataError(f"{path}: {name} holds NaN or infinite values; redo the stage that wrote it")
            with torch.no_grad():
                getattr(sae, name).copy_(tensors[name])
        return sae


def weights_path(folder: str | Path) -> Path:
    """The SAE weights in `folder`: SAELens' file name, else the one older runs wrote."""
    old, new = Path(folder) / OLD_WEIGHTS_FILE, Path(folder) / WEIGHTS_FILE
    return old if old.is_file() and not new.is_file() else new


def reset_adam_state(optimizer: torch.optim.Optimizer, param: Tensor,
                     rows: Optional[Tensor] = None, cols: Optional[Tensor] = None) -> None:
    """Zero the Adam moments (exp_avg, exp_avg_sq) of `param` at the given rows or columns."""
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        moment = state.get(key)
        if moment is None:
            continue
        if rows is not None:
            moment[rows] = 0
        if cols is not None:
            moment[:, cols] = 0


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed distance to `points` [N, d] (Weiszfeld's iteration)."""
    points = points.float()
    median = points.mean(0)
    for _ in range(iters):
        dist = torch.linalg.vector_norm(points - median, dim=1).clamp_min(1e-8)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        moved = float(torch.linalg.vector_norm(new - median))
        median = new
        if moved <= tol * (1.0 + float(torch.linalg.vector_norm(median))):
            break
    return median
