"""Steering: clamp a source-pure feature high and see whether the GPT's text turns to its source.

The paper's finding: pinning a feature that fires on one kind of text (its Arabic, DNA,
base64 features) at a high value makes the model write that kind of text. Here, for the
purest features of each source:

1. prompts are windows of the *other* sources' validation text, drawn at random (seeded);
2. each prompt is continued twice from the same seed: clean, and with the feature clamped
   at `multiple` x its largest activation in the analysis at every position
   (`monofast.sae.steer`: the SAE's error term is kept, so nothing else changes);
3. the continuations alone are classified by per-source n-gram models trained on the
   train split (`monofast.findings.classify`), and the share read as the feature's source
   is reported with and without the clamp.

The null control clamps random *mixed* features (purity below `null_max_purity`) at the same
multiple of their own maxima on the same prompts. It tests the confound that matters: that
any large push at the hook wrecks the text and the classifier then calls the wreck one
source. (Zero-clamping would not test it: a pure feature of one source is already near zero
on the other's text, so clamping it to zero changes nothing whether steering works or not.)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Protocol, Sequence

import numpy as np
import torch

from monofast.common.errors import DataError
from monofast.data import tokenizer
from monofast.data.splits import Split, load_meta, load_split
from monofast.findings.classify import SourceClassifier, accuracy, load_classifier, source_names
from monofast.gpt.model import GPT
from monofast.sae.model import SparseAutoencoder
from monofast.sae.steer import sample_clamped


@dataclass
class SteeringConfig:
    """The steering experiment's choices."""

    per_source: int = 4
    """Source-pure features clamped per source."""
    min_purity: float = 0.95
    """A feature counts as pure when this share of its activation mass is on one source."""
    min_density: float = 1e-4
    """...and it fires on at least this fraction of tokens (rarer ones have noisy purity)."""
    prompts: int = 8
    """Prompts per feature, all continued in one batch."""
    prompt_tokens: int = 24
    """Tokens per prompt."""
    tokens: int = 40
    """Tokens generated per continuation (and the classifier's validation chunk length)."""
    multiple: float = 4.0
    """Clamp value as a multiple of the feature's largest activation in the analysis. 4 is the
    smallest that steers on the quick run: share of continuations read as the feature's
    source (mean / median over 8 features; 16 prompts, 3 seeds; clean 0.01) at 2x 0.04 /
    0.02, null 0.03; 3x 0.12 / 0.05, null 0.05; 4x 0.27 / 0.19, null 0.06; 5x 0.35 / 0.31,
    null 0.09; 6x 0.39 / 0.33, null 0.11. Higher multiples steer more and wreck more text
    (the null rises with them)."""
    temperature: float = 0.8
    """Sampling temperature."""
    top_k: int = 50
    """Sample among the k likeliest tokens (0: all)."""
    seed: int = 0
    """Seeds the prompts, the null features and the sampling (the same for clean and clamped)."""
    examples: int = 3
    """(prompt, clean, clamped) texts kept per feature."""
    null_per_source: int = 4
    """Random mixed features clamped per source as the null control (0: none)."""
    null_max_purity: float = 0.7
    """Features below this purity are mixed, candidates for the null control."""

    def __post_init__(self) -> None:
        for name in ("prompts", "prompt_tokens", "tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("per_source", "examples", "null_per_source", "top_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0.0 < self.min_purity <= 1.0 or not 0.0 < self.null_max_purity <= 1.0:
            raise ValueError(f"min_purity={self.min_purity} and null_max_purity={self.null_max_purity} must be "
                             f"in (0, 1], e.g. 0.95 and 0.7")
        if not 0.0 <= self.min_density < 1.0:
            raise ValueError(f"min_density={self.min_density} must be in [0, 1), e.g. 1e-4")
        if not (math.isfinite(self.multiple) and self.multiple >= 0):
            raise ValueError(f"multiple={self.multiple} must be a finite number >= 0, e.g. 4")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")


# ---------------------------------------------------------------------------------------
# Features and prompts


def _alive(features: Mapping[str, np.ndarray], min_density: float) -> np.ndarray:
    """(F,) bool: fires often enough, on some source, with a positive maximum."""
    density = np.asarray(features["density"], dtype=np.float64)
    max_act = np.asarray(features["max_act"], dtype=np.float64)
    dominant = np.asarray(features["dominant"])
    return (density > 0) & (density >= min_density) & (dominant >= 0) & np.isfinite(max_act) & (max_act > 0)


def pure_features(features: Mapping[str, np.ndarray], n_sources: int, cfg: SteeringConfig) -> list[list[int]]:
    """Per source id, up to `per_source` of its pure features: purity >= min_purity, alive,
    density >= min_density; purest first, the commoner first among equally pure ones.

    Purity to the last digit matters: on the quick run the four purest features of each
    source (purity 0.998-0.999) steered 2-4x as often as the four commonest of those with
    purity >= 0.99 (density ~4%): at 4x, a mean share of 0.27 against 0.09."""
    purity = np.asarray(features["purity"])
    density = np.asarray(features["density"], dtype=np.float64)
    dominant = np.asarray(features["dominant"])
    threshold = np.asarray(cfg.min_purity, dtype=purity.dtype)  # so that a float32 purity of 0.95 counts
    ok = _alive(features, cfg.min_density) & (purity >= threshold)
    order = np.lexsort((-density, -purity))  # the last key sorts first
    return [[int(f) for f in order if ok[f] and dominant[f] == s][:cfg.per_source] for s in range(n_sources)]


def null_features(features: Mapping[str, np.ndarray], n_sources: int, cfg: SteeringConfig,
                  rng: np.random.Generator) -> list[list[int]]:
    """Per source id, `null_per_source` random mixed features (alive, purity < null_max_purity)."""
    purity = np.asarray(features["purity"], dtype=np.float64)
    mixed = np.flatnonzero(_alive(features, cfg.min_density) & (purity < cfg.null_max_purity))
    count = min(cfg.null_per_source, len(mixed))
    return [sorted(int(f) for f in rng.choice(mixed, count, replace=False)) for _ in range(n_sources)]


def prompt_windows(split: Split, source: int, count: int, length: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` windows of `length` tokens of `split`, each inside one run of a source other
    than `source`, at random starts: ((count, length) int64 tokens, (count,) their sources).
    Starts are drawn without replacement while there are enough."""
    tokens, sources = np.asarray(split.tokens), np.asarray(split.sources)
    n = len(tokens) - length + 1
    if n < 1:
        raise DataError(f"the validation split has {len(tokens)} tokens, fewer than one prompt of {length}; "
                        f"build more data or lower the prompt length")
    first = sources[:n]  # (n,) source of each window's first token
    same = np.ones(n, dtype=bool)
    boundary = np.flatnonzero(sources[1:] != sources[:-1]) + 1  # first token of each new run
    for b in boundary:  # a window starting in [b - length + 1, b) spans a change of source
        same[max(0, b - length + 1):b] = False
    starts = np.flatnonzero(same & (first != source))
    if len(starts) == 0:
        raise DataError(f"the validation split has no window of {length} tokens outside source {source}; "
                        f"steering needs text of at least two sources")
    chosen = np.sort(rng.choice(starts, count, replace=len(starts) < count))
    windows = tokens[chosen[:, None] + np.arange(length)[None, :]].astype(np.int64)  # (count, length)
    return windows, sources[chosen].astype(np.int64)


# ---------------------------------------------------------------------------------------
# One clamped feature


def _share(labels: np.ndarray, source: int) -> float:
    return float(np.mean(labels == source)) if len(labels) else float("nan")


def _text(tok: Any, ids: Sequence[int]) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _mean(values: Iterable[float]) -> Optional[float]:
    """The mean, or None for no values."""
    a = list(values)
    return float(np.mean(a)) if a else None


def _spread(shares: Sequence[float]) -> Optional[dict[str, float]]:
    """Median, min, max and mean of a list of shares (None when empty)."""
    if not shares:
        return None
    a = np.asarray(shares, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean())}


class Continuations(NamedTuple):
    """Sampled continuations of a batch of prompts, classified."""

    tokens: np.ndarray
    """(P, tokens) int64 token ids."""
    labels: np.ndarray
    """(P,) int64 the source each reads as."""
    logprob: np.ndarray
    """(P,) mean log-probability per token under that source's n-gram model (fluency)."""


class Prompts(NamedTuple):
    """One source's prompts (windows of the other sources) and their clean continuations."""

    windows: np.ndarray
    """(P, prompt_tokens) int64 prompt token ids."""
    sources: np.ndarray
    """(P,) int64 source id of each prompt."""
    clean: Continuations
    """Their continuations without a clamp."""


def classify(classifier: SourceClassifier, tokens: np.ndarray) -> Continuations:
    """The source and fluency of each continuation (P, tokens)."""
    ll = classifier.log_likelihood(tokens)  # (P, S)
    return Continuations(tokens, ll.argmax(axis=1), ll.max(axis=1) / max(1, tokens.shape[1]))


def _feature_entry(feature: int, source: int, prompts: Prompts, clamped: Continuations, clamp: float,
                   features: Mapping[str, np.ndarray], names: Sequence[str], tok: Any,
                   cfg: SteeringConfig) -> dict[str, Any]:
    """The report of one clamped feature on one source's prompts."""
    counts = np.bincount(prompts.sources, minlength=len(names))
    examples = [{"prompt": _text(tok, prompts.windows[i]), "clean": _text(tok, prompts.clean.tokens[i]),
                 "clamped": _text(tok, clamped.tokens[i])} for i in range(min(cfg.examples, len(clamped.tokens)))]
    dominant = int(features["dominant"][feature])
    return {
        "feature": feature,
        "source": names[source],
        "dominant": names[dominant] if 0 <= dominant < len(names) else None,
        "purity": float(features["purity"][feature]),
        "density": float(features["density"][feature]),
        "max_act": float(features["max_act"][feature]),
        "multiple": cfg.multiple,
        "clamp": clamp,
        "prompt_sources": {names[i]: int(c) for i, c in enumerate(counts) if c},
        "share_clean": _share(prompts.clean.labels, source),
        "share_clamped": _share(clamped.labels, source),
        "logprob_clean": float(prompts.clean.logprob.mean()),
        "logprob_clamped": float(clamped.logprob.mean()),
        "examples": examples,
    }


# ---------------------------------------------------------------------------------------
# The experiment


def run_steering(model: GPT, sae: SparseAutoencoder, layer: int, data_dir: str | Path, tok: Any,
                 features: Mapping[str, np.ndarray], device: torch.device | str | None = None,
                 cfg: Optional[SteeringConfig] = None,
                 classifier: Optional[SourceClassifier] = None) -> dict[str, Any]:
    """The steering experiment on a trained GPT and its SAE at `layer`; a JSON-serialisable report.

    `features` holds the analysis arrays `max_act`, `purity`, `dominant` and `density` (F,);
    `tok` decodes the examples; `device`, when given, is where the model and SAE are moved
    (in place); `classifier` defaults to one trained on `data_dir`'s train split.

    The report: "features" (one entry per clamped pure feature: its source, clamp value,
    share of continuations read as its source without and with the clamp, fluency, three
    examples), "baseline" (the clean share), "steered" (median / min / max / mean of the
    clamped share over features), "null" (the same for random mixed features), the
    classifier's validation accuracy on chunks of the continuation length, and timings.
    """
    cfg = cfg or SteeringConfig()
    started = time.perf_counter()
    _check_features(features, sae.cfg.d_sae)
    if device is not None:
        model.to(device)
        sae.to(device)
    meta = load_meta(data_dir)
    names = source_names(meta)
    val = load_split(data_dir, "val", meta)
    clf = classifier or load_classifier(data_dir)
    acc = accuracy(clf, val, cfg.tokens)
    classifier_seconds = time.perf_counter() - started

    rng = np.random.default_rng(cfg.seed)
    chosen = pure_features(features, len(names), cfg)
    nulls = null_features(features, len(names), cfg, rng)
    runs = 0

    def sample(windows: np.ndarray, clamps: Optional[dict[int, float]]) -> Continuations:
        nonlocal runs
        runs += 1
        out = sample_clamped(model, torch.from_numpy(windows), cfg.tokens, sae, layer, clamps,
                             cfg.temperature, cfg.top_k, cfg.seed)  # (P, tokens)
        return classify(clf, out.cpu().numpy())

    reports: list[dict[str, Any]] = []
    null_reports: list[dict[str, Any]] = []
    baseline: dict[str, float] = {}
    for s, name in enumerate(names):
        if not chosen[s] and not nulls[s]:
            continue
        windows, prompt_sources = prompt_windows(val, s, cfg.prompts, cfg.prompt_tokens, rng)
        prompts = Prompts(windows, prompt_sources, sample(windows, None))
        baseline[name] = _share(prompts.clean.labels, s)
        for group, out in ((chosen[s], reports), (nulls[s], null_reports)):
            for f in group:
                clamp = cfg.multiple * float(features["max_act"][f])
                out.append(_feature_entry(f, s, prompts, sample(windows, {f: clamp}), clamp, features, names,
                                          tok, cfg))
    return {
        "config": asdict(cfg),
        "layer": layer,
        "sources": list(names),
        "classifier": {"order": clf.order, "alpha": clf.alpha, "chunk_tokens": acc.length,
                       "val_accuracy": acc.overall, "val_accuracy_by_source": acc.by_source,
                       "val_chunks": acc.chunks, "val_logprob_by_source": acc.token_logprob},
        "features": reports,
        "baseline": {"share_clean": _mean(r["share_clean"] for r in reports), "by_source": baseline},
        "steered": _spread([r["share_clamped"] for r in reports]),
        "logprob": {"clean": _mean(r["logprob_clean"] for r in reports),
                    "clamped": _mean(r["logprob_clamped"] for r in reports)},
        "null": {"features": null_reports, "steered": _spread([r["share_clamped"] for r in null_reports]),
                 "logprob_clamped": _mean(r["logprob_clamped"] for r in null_reports)},
        "work": {"sampling_runs": runs, "prompts_per_run": cfg.prompts,
                 "tokens_generated": runs * cfg.prompts * cfg.tokens},
        "seconds": {"classifier": classifier_seconds, "total": time.perf_counter() - started},
    }


def _check_features(features: Mapping[str, np.ndarray], d_sae: int) -> None:
    missing = {"max_act", "purity", "dominant", "density"} - set(features)
    if missing:
        raise ValueError(f"the feature arrays lack {sorted(missing)}; pass the analysis features.npz arrays")
    if any(len(features[k]) != d_sae for k in ("max_act", "purity", "dominant", "density")):
        raise DataError(f"the analysis has {len(features['max_act'])} features but the SAE {d_sae}; "
                        f"re-run `monofast analysis --force`")


class StageOptions(Protocol):
    """The findings stage's steering options (`monofast.findings.config.FindingsConfig`)."""

    steer_features: int
    steer_prompts: int
    steer_tokens: int
    steer_multiple: float
    seed: int


def experiment(options: StageOptions, data_dir: str | Path, model: GPT, sae: SparseAutoencoder, layer: int,
               features: Mapping[str, np.ndarray], names: Sequence[str],
               device: torch.device | str | None = None) -> dict[str, Any]:
    """`run_steering` with the findings stage's options (a steer_multiple of 0 takes this
    module's default) and the data's own tokenizer; `names` must be the data's sources."""
    data_names = source_names(load_meta(data_dir))
    if tuple(names) != data_names:
        raise DataError(f"the analysis names sources {list(names)} but {data_dir} holds {list(data_names)}; "
                        f"re-run `monofast analysis --force`")
    cfg = SteeringConfig(per_source=options.steer_features, prompts=options.steer_prompts,
                         tokens=options.steer_tokens, seed=options.seed,
                         multiple=options.steer_multiple or SteeringConfig.multiple)
    return run_steering(model, sae, layer, data_dir, tokenizer.load(data_dir), features, device, cfg)
