"""The GPT module: shapes, causality, the MLP hook point, the truncated forward, sampling."""

import pytest
import torch
import torch.nn.functional as F
from monofast.gpt.model import GPT, GPTConfig, GPTOutput, _explicit_causal_attention

V, T, B = 61, 16, 3


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=24, dropout=0.0, bias=False)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg)).eval()


def tokens(b: int = B, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------
# Config

def test_config_d_mlp_is_four_times_width():
    assert GPTConfig(n_embd=128).d_mlp == 512


@pytest.mark.parametrize("kwargs, match", [
    ({"n_embd": 30, "n_head": 4}, "not divisible by n_head"),
    ({"n_layer": 0}, "n_layer=0 must be a positive integer"),
    ({"dropout": 1.0}, "dropout"),
    ({"vocab_size": 2.5}, "vocab_size"),
], ids=["indivisible-heads", "no-layers", "dropout-1", "float-vocab"])
def test_config_errors_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


# ---------------------------------------------------------------------------------------
# Forward

@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_forward_shapes_and_loss(bias):
    model = tiny(bias=bias)
    idx = tokens()
    out = model(idx)
    assert isinstance(out, GPTOutput)
    assert out.logits.shape == (B, T, V) and out.loss is None
    out = model(idx, tokens(seed=2))
    assert out.loss.shape == () and torch.isfinite(out.loss)
    # An untrained model predicts roughly uniformly: loss near ln(V).
    assert abs(out.loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.5


def test_embeddings_are_tied():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(tokens(t=T + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_future_tokens_do_not_change_past_logits(dtype):
    model = tiny()
    idx = tokens()
    cut = 7
    changed = idx.clone()
    changed[:, cut:] = (changed[:, cut:] + 5) % V
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        a, b = model(idx).logits, model(changed).logits
    assert torch.equal(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])


def test_explicit_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = _explicit_causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.0).float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(_explicit_causal_attention(q, k, v, 0.0), want, atol=1e-5, rtol=1e-5)


def test_training_lowers_the_loss():
    model = tiny().train()
    idx, targets = tokens(), tokens(seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(idx, targets).loss.item()
    for _ in range(30):
        loss = model(idx, targets).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first - 0.5


# ---------------------------------------------------------------------------------------
# MLP hook point

@pytest.mark.parametrize("layer", [0, 1])
def test_hook_reads_post_gelu_activation(layer):
    model = tiny()
    seen = []
    with model.hook_mlp(layer, seen.append):
        model(tokens())
    assert len(seen) == 1 and seen[0].shape == (B, T, model.config.d_mlp)
    assert seen[0].min() >= -0.2  # GELU's minimum is about -0.17
    assert model.h[layer].mlp.hooks == ()  # removed on exit


@pytest.mark.parametrize("layer", [0, 1])
def test_replacing_with_the_same_tensor_changes_nothing(layer):
    model = tiny()
    idx, targets = tokens(), tokens(seed=2)
    clean = model(idx, targets)
    with model.hook_mlp(layer, lambda act: act.clone()):
        same = model(idx, targets)
    assert torch.equal(clean.logits, same.logits) and torch.equal(clean.loss, same.loss)


@pytest.mark.parametrize("layer", [0, 1])
def test_zero_ablation_changes_the_loss(layer):
    model = tiny()
    idx, targets = tokens(), tokens(seed=2)
    clean = model(idx, targets).loss
    with model.hook_mlp(layer, torch.zeros_like):
        ablated = model(idx, targets).loss
    assert not torch.equal(clean, ablated)
    assert model(idx, targets).loss.item() == clean.item()  # gone after the block


def test_hooks_nest_in_order_and_see_replacements():
    model = tiny()
    calls = []

    def double(act):
        calls.append("double")
        return act * 2

    def read(act):
        calls.append("read")
        reads.append(act)

    reads: list[torch.Tensor] = []
    with model.hook_mlp(0, double), model.hook_mlp(0, read):
        model(tokens())
    assert calls == ["double", "read"]
    torch.testing.assert_close(reads[0], 2 * model.mlp_activations(tokens(), 0))


def test_hook_must_keep_the_shape():
    model = tiny()
    with model.hook_mlp(0, lambda act: act[..., :3]), pytest.raises(ValueError, match="shape"):
        model(tokens())


def test_hook_on_missing_layer_is_refused():
    with pytest.raises(ValueError, match=r"layers 0\.\.1"):
        with tiny().hook_mlp(2, print):
            pass


@pytest.mark.parametrize("layer", [0, 1])
def test_mlp_activations_equal_the_hooked_value(layer):
    model = tiny()
    idx = tokens()
    seen = []
    with model.hook_mlp(layer, seen.append):
        model(idx)
    assert torch.equal(model.mlp_activations(idx, layer), seen[0])


def test_mlp_activations_stop_at_the_layer():
    model = tiny()
    later = []
    with model.hook_mlp(1, later.append):
        act = model.mlp_activations(tokens(), 0)
    assert act.shape == (B, T, model.config.d_mlp) and later == []
    with pytest.raises(ValueError, match="layer=5"):
        model.mlp_activations(tokens(), 5)


# ---------------------------------------------------------------------------------------
# Sampling

def test_generate_is_deterministic_for_a_seed():
    model = tiny()
    prompt = tokens(b=1, t=4)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 30, temperature=1.0, top_k=10, generator=gen)

    a, b, c = run(7), run(7), run(8)
    assert a.shape == (1, 34) and torch.equal(a[:, :4], prompt)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_is_greedy():
    model = tiny()
    prompt = tokens(b=2, t=3)
    greedy = model.generate(prompt, T + 4, temperature=0)  # runs past block_size: context is cropped
    top1 = model.generate(prompt, T + 4, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)


def test_a_forward_split_at_an_mlp_gives_the_same_logits():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=0.0)).eval()
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in range(3):
            resid, act = model.run_to_mlp(idx, layer)
            assert torch.equal(model.logits_from_mlp(resid, act, layer), model(idx).logits)
            with model.hook_mlp(layer, lambda a: a * 0.5):
                halved = model(idx).logits
            assert torch.equal(model.logits_from_mlp(resid, act * 0.5, layer), halved)
