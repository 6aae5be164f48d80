"""The one device and precision choice every stage uses."""

from __future__ import annotations

import pytest
import torch
from monofast.common import device as device_
from monofast.common.errors import UserError
from monofast.run.stages import STAGES

COMPUTE = {"gpt": "dtype", "sae": "compute_dtype", "analysis": "dtype"}
"""Each stage's compute-precision option."""
STORAGE = {"activations": "dtype"}
"""Each stage's storage-precision option."""


def test_one_precision_rule_across_stages():
    """Compute precision is runtime (like the device) in every stage; storage precision is config."""
    for stage in STAGES:
        cls = stage.config_cls()
        runtime = getattr(cls, "RUNTIME", frozenset())
        fields = {f for f in cls.__dataclass_fields__}
        if "device" in fields:
            assert "device" in runtime, stage.name
        if stage.name in COMPUTE:
            assert COMPUTE[stage.name] in runtime, stage.name
            assert cls.__dataclass_fields__[COMPUTE[stage.name]].default == "auto", stage.name
        if stage.name in STORAGE:
            assert STORAGE[stage.name] not in runtime, stage.name


def test_auto_is_bf16_where_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device_, "native_bf16", lambda device: False)
    assert device_.pick_dtype("auto", cpu) is torch.float32
    assert device_.pick_dtype("auto", cpu, otherwise=None) is None  # the SAE: its parameters' dtype
    assert device_.pick_dtype("auto", torch.device("cuda"), half_fallback=True) is torch.float16
    monkeypatch.setattr(device_, "native_bf16", lambda device: True)
    assert device_.pick_dtype("auto", cpu) is torch.bfloat16
    assert device_.pick_dtype("float32", cpu) is torch.float32


def test_bad_choices_name_the_fix():
    with pytest.raises(UserError, match="bfloat16 or float32"):
        device_.pick_dtype("float16", torch.device("cpu"))
    with pytest.raises(UserError, match="choose one of auto, float32"):
        device_.pick_dtype("int8", torch.device("cpu"))
    with pytest.raises(UserError, match="--device: device='tpu'"):
        device_.pick_device("tpu")
    with pytest.raises(ValueError, match="cpu, cuda or mps"):
        device_.parse_device("meta")
    assert device_.dtype_name(torch.bfloat16) == "bfloat16" and device_.dtype_name(None) == "float32"
