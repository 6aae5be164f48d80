"""The SAE stage's options (monofast.sae.config): checks, and which fields are runtime."""

from __future__ import annotations

import pytest
from monofast.common import config
from monofast.sae.config import SAETrainConfig


@pytest.mark.parametrize("fields,message", [
    ({"variant": "gated"}, "choose one of"),
    ({"l1_coeff": ()}, "--l1-coeff 1,3,10"),
    ({"l1_coeff": (-1.0,)}, "finite values >= 0"),
    ({"k": (0,)}, "--k 16,32"),
    ({"l1_warmup": 2.0}, "between 0 and 1"),
    ({"b_dec_init": "median"}, "geometric_median, mean or zeros"),
], ids=["variant", "no-l1", "negative-l1", "k0", "warmup", "b_dec"])
def test_config_errors_name_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        SAETrainConfig(**fields)


@pytest.mark.parametrize("fields", [{"ce_eval_tokens": -1}, {"checkpoint_every": -1}], ids=["ce", "checkpoint"])
def test_negative_budgets_are_refused(fields):
    with pytest.raises(ValueError, match="0 turns them off"):
        SAETrainConfig(**fields)


def test_runtime_fields_do_not_change_the_identity():
    assert SAETrainConfig.RUNTIME == frozenset({"device", "resume", "cuda_graphs", "compute_dtype", "verify",
                                                "sparse_step"})
    same = [config.identity(SAETrainConfig(device=d, resume=r, sparse_step=s))
            for d, r, s in (("cpu", False, "auto"), ("auto", True, "off"))]
    assert same[0] == same[1] and "device" not in same[0] and "resume" not in same[0]
    assert config.identity(SAETrainConfig(checkpoint_every=7)) != config.identity(SAETrainConfig())


def test_the_compute_precision_is_runtime():
    # Computing in bf16 or fp32 neither re-runs a finished stage nor blocks --resume.
    identities = [config.identity(SAETrainConfig(compute_dtype=name)) for name in ("auto", "float32", "bfloat16")]
    assert identities[0] == identities[1] == identities[2]
    assert "compute_dtype" not in identities[0]
