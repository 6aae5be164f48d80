"""Stage `family`: SAEs of growing width on the run's activations, for feature splitting.

The widths of `FamilyConfig.expansions` train side by side in one pass over the store with
the SAE stage's machinery (`monofast.sae.train`), each evaluated like the SAE stage's own
(held-out L0, FVU, dead fraction, CE-loss recovered per source). Writes into `family/`:
    w<features>/sae_weights.safetensors, cfg.json   one SAE per width
    eval.json, metrics.jsonl                         as the SAE stage writes them
    sae_weights.safetensors, cfg.json                the member the SAE stage's rule would publish
The SAE stage's own SAE joins the family where it is (`sae/`), not trained again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from monofast.findings.config import FamilyConfig
from monofast.sae.train import run_stage as train_stage


def run_stage(cfg: FamilyConfig, run: Any) -> None:
    """Pipeline entry point: fill `family/` from `activations/` (and `gpt/`, `data/` for
    CE-loss recovered)."""
    run.require("sae")  # the family's middle member
    # Members draw their initial weights from seed + i, as the SAE stage's sweep does: moved
    # away so that no member starts from the run's SAE's weights (a shared start would show
    # up as a "parent" with cosine 1).
    train_stage(dataclasses.replace(cfg, seed=cfg.seed + SEED_OFFSET), run, stage="family")


SEED_OFFSET = 104_729
