"""The SAE module (monofast.sae.model): config checks, the three variants, the decoder constraint,
resampling, AuxK, and SAELens-compatible files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from monofast.common.device import pick_dtype
from monofast.common.errors import DataError, UserError
from monofast.sae.model import (
    SAEConfig,
    SAEOutput,
    SparseAutoencoder,
    geometric_median,
    reset_adam_state,
)

D_IN, D_SAE = 16, 48


def sparse_data(n_rows=512, d_in=D_IN, n_atoms=24, active=3, seed=0):
    """Rows that are sums of a few of `n_atoms` random directions: what an SAE should find."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d_in, generator=gen), dim=1)
    codes = torch.zeros(n_rows, n_atoms)
    idx = torch.randint(0, n_atoms, (n_rows, active), generator=gen)
    codes.scatter_(1, idx, torch.rand(n_rows, active, generator=gen) * 2 + 0.5)
    return codes @ atoms * 3.0 + 0.5


def make(variant="anthropic2023", **overrides) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, variant=variant, compute_dtype="float32", k=4, **overrides)
    return SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(0))


def train(sae, x, steps=150, l1_coeff=1.0, lr=1e-2):
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        out = sae(x)
        loss = out.mse + l1_coeff * out.l1 + out.aux / 32
        first = first if first is not None else float(loss.detach())
        loss.backward()
        sae.optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
    return first, out, opt


# ------------------------------------------------------------------------- config

@pytest.mark.parametrize("fields,message", [
    ({"d_in": 0}, "d_in and d_sae must be positive"),
    ({"variant": "gated"}, "choose one of anthropic2023, april2024, topk"),
    ({"variant": "topk", "k": 0}, "set --k"),
    ({"variant": "topk", "k": 100, "d_sae": 10}, "between 1 and d_sae=10"),
    ({"aux_k": -1}, "aux_k must be >= 0"),
    ({"dtype": "float64"}, "dtype 'float64' is unknown"),
    ({"compute_dtype": "int8"}, "choose auto or one of"),
    ({"dec_init_norm": 0.0}, "dec_init_norm must be > 0"),
], ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()))
def test_config_errors_name_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(**fields)


def test_compute_dtype_resolution():
    assert pick_dtype("float32", torch.device("cpu"), otherwise=None) == torch.float32
    assert pick_dtype("auto", torch.device("meta"), otherwise=None) is None


# ------------------------------------------------------------------------- forward and training

@pytest.mark.parametrize("variant", ["anthropic2023", "april2024", "topk"])
def test_each_variant_learns_sparse_data(variant):
    x = sparse_data(n_rows=256)
    sae = make(variant)
    if variant == "april2024":
        sae.set_input_scale(x)
        assert torch.linalg.vector_norm(x * sae.input_scale, dim=1).mean() == pytest.approx(D_IN ** 0.5, rel=1e-4)
    sae.init_b_dec(x)
    l1_coeff = 0.0 if variant == "topk" else 1.0
    first, out, _ = train(sae, x, l1_coeff=l1_coeff)
    assert isinstance(out, SAEOutput)
    assert out.x_hat.shape == x.shape and out.feats.shape == (x.shape[0], D_SAE)
    assert float((out.mse + l1_coeff * out.l1).detach()) < 0.5 * first
    fvu = float(((out.x_hat.detach().float() - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert fvu < 0.25
    if variant == "topk":
        assert float(out.l0) <= 4
    else:
        assert 0 < float(out.l0) < D_SAE / 2


@pytest.mark.parametrize("variant", ["anthropic2023", "topk"])
def test_unit_decoder_rows_and_orthogonal_gradient(variant):
    sae = make(variant)
    x = sparse_data(n_rows=64)
    out = sae(x)
    (out.mse + 1e-2 * out.l1).backward()
    sae.remove_parallel_grad()
    along = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert along.abs().max() < 1e-5
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    opt.step()
    sae.normalize_decoder()
    norms = torch.linalg.vector_norm(sae.W_dec, dim=1)
    torch.testing.assert_close(norms, torch.ones(D_SAE))


def test_april2024_keeps_decoder_norms_free_and_weights_l1_by_them():
    sae = make("april2024")
    norms = torch.linalg.vector_norm(sae.W_dec, dim=1)
    torch.testing.assert_close(norms, torch.full((D_SAE,), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    x = sparse_data(n_rows=32)
    out = sae(x)
    xs = x * sae.input_scale
    expected = (out.feats * norms).sum(1).mean()
    torch.testing.assert_close(out.l1, expected)
    torch.testing.assert_close(out.mse, ((out.x_hat * sae.input_scale - xs) ** 2).sum(1).mean())


def test_wrong_width_is_a_data_error():
    with pytest.raises(DataError, match="d_in=16"):
        make()(torch.randn(4, 15))


def test_topk_auxk_uses_dead_features():
    sae = make("topk", dead_tokens=1, aux_k=8)
    x = sparse_data(n_rows=64)
    sae(x)  # every feature that did not fire is now dead (dead_tokens=1)
    dead = sae.dead_mask()
    assert 0 < int(dead.sum()) < D_SAE
    out = sae(x)
    assert float(out.aux.detach()) > 0
    out.aux.backward()
    touched = sae.W_dec.grad.abs().sum(1) > 0
    assert touched[sae.dead_mask()].any() and not touched[~sae.dead_mask()].any()


def test_eval_mode_counts_nothing():
    sae = make().eval()
    sae(sparse_data(n_rows=8))
    assert int(sae.tokens_since_fired.sum()) == 0


# ------------------------------------------------------------------------- resampling

def test_resample_resets_weights_and_adam_state():
    sae = make()
    x = sparse_data()
    _, _, opt = train(sae, x, steps=5)
    dead = torch.tensor([3, 7, 11])
    inputs = x[:3]
    alive = torch.ones(D_SAE, dtype=torch.bool).index_fill_(0, dead, False)
    live_norm = torch.linalg.vector_norm(sae.W_enc, dim=0)[alive].mean()
    sae.resample(dead, inputs, opt)
    unit = torch.nn.functional.normalize(inputs, dim=1)
    torch.testing.assert_close(sae.W_dec[dead], unit)
    torch.testing.assert_close(sae.W_enc[:, dead].T, unit * 0.2 * live_norm)
    assert torch.all(sae.b_enc[dead] == 0)
    for param, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
        state = opt.state[param]
        assert torch.all(state["exp_avg"][index] == 0) and torch.all(state["exp_avg_sq"][index] == 0)
    others = torch.tensor([0, 1, 2])
    assert torch.any(opt.state[sae.W_dec]["exp_avg"][others] != 0)
    with pytest.raises(ValueError, match="one input of width 16 per dead feature"):
        sae.resample(dead, inputs[:2], opt)


def test_reset_adam_state_ignores_params_without_state():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([param])
    reset_adam_state(opt, param, rows=torch.tensor([0]))  # no state yet: nothing to do


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) * 0.1,
                        torch.full((20, 4), 100.0)])
    median = geometric_median(points)
    assert torch.linalg.vector_norm(median) < 1.0
    assert torch.linalg.vector_norm(points.mean(0)) > 10


# ------------------------------------------------------------------------- files

@pytest.mark.parametrize("variant", ["anthropic2023", "april2024", "topk"])
def test_save_load_round_trip_in_sae_lens_layout(tmp_path, variant):
    from safetensors.torch import load_file

    x = sparse_data(n_rows=64)
    sae = make(variant)
    if variant == "april2024":
        sae.set_input_scale(x)
    sae.init_b_dec(x, "mean")
    train(sae, x, steps=10)
    sae.eval()
    sae.save(tmp_path, hook_name="blocks.0.mlp.hook_post", hook_layer=0, model_name="monofast-gpt")

    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert {name: tuple(t.shape) for name, t in tensors.items()} == {
        "W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,)}
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE
    assert cfg["architecture"] == ("topk" if variant == "topk" else "standard")
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == "blocks.0.mlp.hook_post"
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True

    # The saved weights act on raw inputs: the plain SAELens formula reproduces our forward.
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    if variant == "topk":
        values, indices = pre.topk(4, dim=1)
        feats = torch.zeros_like(pre).scatter_(1, indices, values.relu())
    else:
        feats = pre.relu()
    x_hat = feats @ tensors["W_dec"] + tensors["b_dec"]
    torch.testing.assert_close(x_hat, sae.decode(sae.encode(x)), rtol=1e-4, atol=1e-4)

    loaded = SparseAutoencoder.load(tmp_path)
    assert loaded.cfg == dataclasses.replace(sae.cfg, scale_inputs=False)
    assert float(loaded.input_scale) == 1.0
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), x_hat, rtol=1e-4, atol=1e-4)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="SAE config not found"):
        SparseAutoencoder.load(tmp_path)
    make().save(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(UserError, match="SAE weights not found"):
        SparseAutoencoder.load(tmp_path)
    other = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE + 1, compute_dtype="float32"))
    other.save(tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "cfg.json").read_text())
    cfg["monofast"]["d_sae"] = D_SAE
    (tmp_path / "other" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="W_enc should have shape"):
        SparseAutoencoder.load(tmp_path / "other")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_on_load(tmp_path, value):
    """A saved SAE with NaN or Inf in a weight (no manifest records it: the file is as it
    was written) is one error naming the tensor, not NaN features in every reader."""
    from safetensors.torch import load_file, save_file

    make().save(tmp_path)
    path = tmp_path / "sae_weights.safetensors"
    tensors = load_file(str(path))
    tensors["W_dec"][3, 1] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(DataError, match="W_dec holds NaN or infinite values; redo the stage"):
        SparseAutoencoder.load(tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_of_sparse_features_sums_their_rows_as_the_product_does(dtype):
    sae = SparseAutoencoder(SAEConfig(d_in=12, d_sae=80, dtype=dtype), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.input_scale.fill_(1.7)
    gen = torch.Generator().manual_seed(1)
    feats = torch.relu(torch.randn(30, 80, generator=gen) - 2.2).to(getattr(torch, dtype))  # ~1.4% fire
    feats[4] = 0  # a row that fires nothing
    dense = (feats @ sae.W_dec.detach() + sae.b_dec.detach()) / sae.input_scale.to(feats.dtype)
    tol = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 2e-2)}[dtype]
    torch.testing.assert_close(sae.decode(feats), dense, rtol=tol[0], atol=tol[1])
    signed = feats.clone()
    signed[0, 0] = -1.0  # a clamp may write a negative value: the product takes it
    torch.testing.assert_close(sae.decode(signed), (signed @ sae.W_dec.detach() + sae.b_dec.detach())
                               / sae.input_scale.to(feats.dtype), rtol=tol[0], atol=tol[1])


def test_a_folder_written_before_sae_lens_names_still_loads(tmp_path):
    sae = make("topk")
    sae.save(tmp_path)
    assert (tmp_path / "sae_weights.safetensors").is_file() and not (tmp_path / "sae.safetensors").exists()
    (tmp_path / "sae_weights.safetensors").rename(tmp_path / "sae.safetensors")  # an older run's folder
    x = sparse_data(32)
    torch.testing.assert_close(SparseAutoencoder.load(tmp_path).encode(x), sae.encode(x))
    sae.save(tmp_path)  # saving again leaves one weights file, under the new name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_foreign_configs_load_by_architecture_or_are_named(tmp_path):
    sae = make("batchtopk")
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0.0, 1.0, D_SAE))
    sae.save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    for key in ("monofast", "k", "topk_threshold"):  # a JumpReLU SAE written by SAELens has neither
        del raw[key]
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    loaded = SparseAutoencoder.load(tmp_path)
    assert loaded.cfg.variant == "batchtopk"
    torch.testing.assert_close(loaded.threshold, sae.threshold)
    x = sparse_data(32)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    raw["architecture"] = "gated"
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="a 'gated' SAE, which monofast cannot compute"):
        SparseAutoencoder.load(tmp_path)
