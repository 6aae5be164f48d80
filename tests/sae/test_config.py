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
    ({"variant": "topk", "aux_coeff": -1.0}, "aux_coeff is a weight of the AuxK loss, >= 0"),
    ({"aux_coeff": float("nan")}, "aux_coeff"),
    ({"resample_every": -7}, "resample_every=-7: give a number of steps, 0 .* or -1 \\(never\\)"),
    ({"seed": -1}, "seed=-1 must be >= 0"),
], ids=["variant", "no-l1", "negative-l1", "k0", "warmup", "b_dec", "aux-coeff", "aux-coeff-nan", "resample-every",
        "seed"])
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


def test_a_sweep_too_large_for_the_memory_is_refused_with_the_numbers():
    import torch
    from monofast.common.errors import UserError

    cpu = torch.device("cpu")
    small = SAETrainConfig(expansion=2, batch_size=128, l1_coeff=(1.0, 3.0))
    assert small.memory_needed(128) == 2 * 4 * (4 * (2 * 128 * 256 + 256 + 128) + 2 * 128 * 256)
    small.check_memory(128, cpu)  # a few MB: fits
    with pytest.raises(UserError, match=r"1 SAE\(s\) of 128,000,000 features on inputs of 128 need at least "
                                        r"\d+\.\d GiB .* but cpu has \d+\.\d GiB free; lower the width \(--expansion"):
        SAETrainConfig(expansion=1_000_000).check_memory(128, cpu)
