"""Feature clamping at the hook: only the clamped features move, the error term stays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monofast.common.errors import DataError, UserError
from monofast.gpt.model import GPT, GPTConfig
from monofast.sae.model import SAEConfig, SparseAutoencoder
from monofast.sae.steer import (ClampSpec, clamp_hook, clamped, feature_acts, parse_clamp, parse_clamps,
                                sae_layer, sample_clamped)

D_IN, D_SAE = 16, 6


def orthonormal_sae() -> SparseAutoencoder:
    """An SAE that encodes exactly: decoder rows orthonormal, W_enc = W_dec^T, b_enc = 0, so
    encode(b_dec + sum_i c_i d_i + r) = c for c >= 0 and any r orthogonal to every d_i."""
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, scale_inputs=False))
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        sae.W_dec.copy_(q[:D_SAE])
        sae.W_enc.copy_(q[:D_SAE].T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.linspace(-0.5, 0.5, D_IN))
    return sae


def exact_activations(sae: SparseAutoencoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2, 3, D_IN) activations made of known features (some zero) plus an error term the
    SAE cannot see; returns (act, codes (6, D_SAE), error (6, D_IN))."""
    g = torch.Generator().manual_seed(1)
    codes = torch.rand(6, D_SAE, generator=g) * 3
    codes[codes < 1.0] = 0.0  # some features off
    rest = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(0)))[0][D_SAE:]
    error = torch.randn(6, D_IN - D_SAE, generator=g) @ rest  # orthogonal to every decoder row
    act = sae.b_dec + codes @ sae.W_dec.detach() + error
    return act.view(2, 3, D_IN), codes, error


def test_the_hand_built_sae_encodes_exactly():
    sae = orthonormal_sae()
    act, codes, error = exact_activations(sae)
    flat = act.view(-1, D_IN)
    torch.testing.assert_close(sae.encode(flat), codes, atol=1e-5, rtol=0)
    torch.testing.assert_close(flat - sae.decode(sae.encode(flat)), error, atol=1e-5, rtol=0)


@pytest.mark.parametrize("clamps", [{2: 7.5}, {0: 0.0, 4: 2.25}, {1: 11.0, 3: 0.5, 5: 4.0}],
                         ids=["one-up", "one-off-one-up", "three"])
def test_clamping_moves_exactly_the_clamped_features(clamps):
    sae = orthonormal_sae()
    act, codes, error = exact_activations(sae)
    out = clamp_hook(sae, clamps)(act)
    assert out is not None and out.shape == act.shape
    flat = out.view(-1, D_IN)
    expected = codes.clone()
    for f, v in clamps.items():
        expected[:, f] = v
    torch.testing.assert_close(sae.encode(flat), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(flat - sae.decode(sae.encode(flat)), error, atol=1e-5, rtol=0)  # error term kept


def test_the_hook_is_decode_of_clamped_plus_error_on_any_sae():
    """The literal recipe (encode, error, clamp, decode, add) on a random SAE with a
    folded input scale, against the hook's shortcut."""
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=40, variant="april2024"),
                            generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sae.input_scale.fill_(2.5)
        sae.b_enc.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(4))
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(5))
    act = torch.relu(torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(6)))
    clamps = {7: 3.0, 19: 0.0}
    flat = act.view(-1, D_IN)
    feats = sae.encode(flat)
    error = flat - sae.decode(feats)
    feats[:, 7], feats[:, 19] = 3.0, 0.0
    expected = (sae.decode(feats) + error).view(act.shape)
    out = clamp_hook(sae, clamps)(act)
    assert out is not None
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["anthropic2023", "topk"])
def test_feature_acts_match_encode(variant):
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=32, variant=variant, k=4),
                            generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sae.input_scale.fill_(0.7)
        sae.b_enc.fill_(0.05)
    x = torch.randn(10, D_IN, generator=torch.Generator().manual_seed(7))
    ids = torch.tensor([3, 0, 31])
    torch.testing.assert_close(feature_acts(sae, x, ids), sae.encode(x)[:, ids])


def test_no_clamp_or_clamping_to_the_current_value_changes_nothing():
    sae = orthonormal_sae()
    act, codes, _ = exact_activations(sae)
    assert clamp_hook(sae, {})(act) is None  # the hook leaves the activation alone
    same = clamp_hook(sae, {2: float(codes[0, 2])})(act[:1, :1])  # one position, its own value
    assert same is not None
    torch.testing.assert_close(same, act[:1, :1], atol=1e-6, rtol=0)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=8))
    return model.eval()


def tiny_sae(seed: int = 0) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.fill_(0.01)
    return sae


def test_clamped_hooks_only_within_the_block():
    model, sae = tiny_gpt(), tiny_sae()
    idx = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    clean, clean_acts = model(idx).logits, model.mlp_activations(idx, 1)
    with clamped(model, 1, sae, {3: 20.0}):
        acts = model.mlp_activations(idx, 1)
        steered = model(idx).logits
    assert not torch.allclose(steered, clean)
    torch.testing.assert_close(acts, clamp_hook(sae, {3: 20.0})(clean_acts))
    torch.testing.assert_close(model(idx).logits, clean)  # the hook is gone
    with clamped(model, 1, sae, {}):
        torch.testing.assert_close(model(idx).logits, clean)


def test_sample_clamped_is_seeded_and_clamps_change_it():
    model, sae = tiny_gpt(), tiny_sae()
    prompts = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(1))
    clean = sample_clamped(model, prompts, 12, seed=3)
    assert clean.shape == (4, 12) and clean.dtype == torch.long
    assert torch.equal(clean, sample_clamped(model, prompts, 12, seed=3))
    assert torch.equal(clean, sample_clamped(model, prompts, 12, sae, 1, {}, seed=3))
    steered = sample_clamped(model, prompts, 12, sae, 1, {5: 200.0}, seed=3)
    assert not torch.equal(clean, steered)
    model.train()
    sample_clamped(model, prompts, 2, seed=3)
    assert model.training  # the mode is put back
    with pytest.raises(ValueError, match="needs the SAE"):
        sample_clamped(model, prompts, 2, clamps={5: 1.0})


@pytest.mark.parametrize("spec, parsed", [
    ("12=5.5", ClampSpec(12, 5.5, False)), ("0=3x", ClampSpec(0, 3.0, True)),
    (" 7 = 0 ", ClampSpec(7, 0.0, False)), ("4=2.5x", ClampSpec(4, 2.5, True)), ("3=1e2", ClampSpec(3, 100.0, False)),
], ids=["value", "multiple", "spaces", "fraction-multiple", "exponent"])
def test_parse_clamp(spec, parsed):
    assert parse_clamp(spec) == parsed


@pytest.mark.parametrize("spec", ["12", "=3", "a=3", "12=", "12=abc", "12=3xx", "12=nan", "-1=3", "12=3y"])
def test_bad_clamp_syntax_names_the_fix(spec):
    with pytest.raises(UserError, match=r"is not FEATURE=VALUE; write e.g. --clamp 12=5.5"):
        parse_clamp(spec)


def test_parse_clamps_checks_ids_and_scales_multiples():
    maxima = np.array([1.0, 2.0, 4.0])
    assert parse_clamps(["2=3x", "0=0.5", "0=1.5"], 3, maxima) == {2: 12.0, 0: 1.5}
    with pytest.raises(UserError, match="feature 3 does not exist; this SAE has features 0..2"):
        parse_clamps(["3=1"], 3, maxima)
    with pytest.raises(UserError, match="run `monofast analysis` first"):
        parse_clamps(["1=2x"], 3, None)
    assert parse_clamps(["1=2"], 3, None) == {1: 2.0}  # absolute values need no analysis
    with pytest.raises(DataError, match="analysis is stale"):
        parse_clamps(["1=2x"], 4, maxima)
    with pytest.raises(UserError, match="does not exist"):
        clamp_hook(tiny_sae(), {24: 1.0})


def test_sae_layer_from_cfg_or_store(tmp_path):
    sae = tiny_sae()
    sae.save(tmp_path / "a", hook_layer=1)
    assert sae_layer(tmp_path / "a") == 1
    sae.save(tmp_path / "b")
    (tmp_path / "acts").mkdir()
    (tmp_path / "acts" / "index.json").write_text('{"gpt": {"layer": 0}}')
    assert sae_layer(tmp_path / "b", tmp_path / "acts") == 0
    with pytest.raises(DataError, match="no hook_layer"):
        sae_layer(tmp_path / "b")
