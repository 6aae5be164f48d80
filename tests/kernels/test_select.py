"""TopK's selection rule (`reference.top_k`: the k largest, ties to the lower index, NaN
largest) and its fast forms (`select.top_k`) on CPUs and through int64 keys."""

from __future__ import annotations

import pytest
import torch

from monofast.kernels import reference, select


def _cases():
    gen = torch.Generator().manual_seed(0)
    ties = torch.randint(-2, 3, (40, 37), generator=gen).float()  # many exact ties at any cut
    ties[3] = 1.0  # a row of one value
    ties[4, ::5] = float("nan")
    ties[5] = -torch.arange(37.0)  # all negative
    ties[6, 10] = float("inf")
    ties[6, 11] = -0.0
    ties[6, 12] = 0.0
    return {"random": torch.randn(33, 130, generator=gen), "ties": ties}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["random", "ties"])
@pytest.mark.parametrize("k", [1, 5, 37])
@pytest.mark.parametrize("keys", [False, True], ids=["dispatch", "int64-keys"])
def test_fast_forms_keep_exactly_the_rules_features(monkeypatch, dtype, case, k, keys):
    pre = _cases()[case].to(dtype)
    if keys:
        monkeypatch.setattr(select, "_NATIVE", False)
    values, indices = select.top_k(pre, k)
    want_values, want_indices = reference.top_k(pre, k)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values, equal_nan=True, rtol=0, atol=0)
    assert bool((indices.diff(dim=1) > 0).all())  # increasing within a row


def test_the_rule_breaks_ties_toward_lower_indices():
    pre = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [float("nan"), 0.0, float("nan"), 5.0, -0.0]])
    values, indices = reference.top_k(pre, 2)
    assert indices.tolist() == [[1, 2], [0, 2]]
    assert select.top_k(pre, 2)[1].tolist() == [[1, 2], [0, 2]]
    assert reference.top_k(pre, 4)[1].tolist()[1] == [0, 1, 2, 3]  # +0.0 and -0.0 tie: the lower one
    assert select.top_k(pre, 4)[1].tolist()[1] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="k must be between 1 and d_sae=5"):
        select.top_k(pre, 6)


def test_activate_keeps_the_rules_features_after_relu():
    pre = _cases()["ties"]
    torch.testing.assert_close(select.activate(pre, 4), reference.activate(pre, 4), equal_nan=True)
    torch.testing.assert_close(select.activate(pre, None), torch.relu(pre), equal_nan=True)
