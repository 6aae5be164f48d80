"""The cheap CPU dropout: its keep rate and scale, its gradient, its reproducibility under
torch.manual_seed, and where it hands over to F.dropout."""

import pytest
import torch
import torch.nn.functional as F
from monofast.gpt import dropout as dropout_
from monofast.gpt.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_masks_keep_one_minus_p_of_the_elements(p):
    torch.manual_seed(0)
    keep = keep_mask(torch.Size((64, 4, 63, 65)), p)  # an odd element count
    assert keep.dtype == torch.bool and keep.shape == (64, 4, 63, 65)
    n = keep.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sd
    # Neighbouring elements (which share one 64-bit draw) are independent.
    flat = keep.flatten()[: n - n % 2].view(-1, 2).float()
    both = (flat[:, 0] * flat[:, 1]).mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * (1 / n) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_elements_are_scaled_and_the_gradient_follows_the_mask(dtype):
    torch.manual_seed(1)
    x = torch.randn(8, 16, 32).to(dtype).requires_grad_()
    torch.manual_seed(2)
    y = dropout(x, 0.2)
    torch.manual_seed(2)
    keep = keep_mask(x.shape, 0.2)
    assert y.dtype == dtype
    assert torch.equal(y, torch.where(keep, x * 1.25, 0))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(keep, g * 1.25, 0))


def test_masks_follow_torch_manual_seed():
    x = torch.ones(1000)
    torch.manual_seed(5)
    a, b = dropout(x, 0.3), dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(a, dropout(x, 0.3)) and torch.equal(b, dropout(x, 0.3))
    assert not torch.equal(a, b)


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(10, 10)
    module = Dropout(0.5).eval()
    assert module(x) is x and dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert "p=0.5" in repr(module)


def test_other_devices_and_compiled_code_use_f_dropout(monkeypatch):
    calls = []
    monkeypatch.setattr(dropout_.F, "dropout", lambda x, p, training: calls.append(p) or x)
    x = torch.randn(4, 4)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dropout(x, 0.2) is x and calls == [0.2]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    dropout(x, 0.2)
    assert calls == [0.2]  # the CPU path


def test_distribution_matches_f_dropout():
    """Same mean and second moment as F.dropout's output for the same input."""
    x = torch.randn(200_000)
    torch.manual_seed(3)
    ours = dropout(x, 0.2)
    theirs = F.dropout(x, 0.2, training=True)
    for a, b in ((ours, theirs), (ours.square(), theirs.square())):
        assert a.mean().item() == pytest.approx(b.mean().item(), abs=0.02)
