"""lab/model.js: the encoding round-trips at its stated density, the weights fold the SAE's
input scale and decoder bias as its encoder does, and bad inputs are refused with the fix.
(What the page computes from the file is tested in test_lab_engine.py, in Chromium.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from monofast.common.errors import DataError, UserError
from monofast.gpt.model import GPT, GPTConfig
from monofast.gpt.weights import save_model
from monofast.sae.model import SAEConfig, SparseAutoencoder
from monofast.site import lab_model


def small_models(variant: str = "anthropic2023") -> tuple[GPT, SparseAutoencoder]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=50)).eval()
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=96, variant=variant, k=5),
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.input_scale.fill_(2.5)
    return model, sae


@pytest.mark.parametrize("count", [0, 1, 12, 13, 14, 26, 27, 1000, 4097])
def test_words_round_trip_at_16_chars_per_13_bytes(count):
    words = np.random.default_rng(count).integers(0, 65536, count).astype(np.uint16)
    words[:2] = [0, 65535][:min(2, count)]
    text = lab_model.encode_words(words)
    assert len(text) == lab_model.encoded_chars(count) == 2 * -(-16 * count // 13)
    assert set(text) <= set(lab_model.ALPHABET)
    np.testing.assert_array_equal(lab_model.decode_words(text, count), words)


def test_the_alphabet_is_91_characters_safe_in_a_string_literal():
    alphabet = lab_model.ALPHABET
    assert len(alphabet) == len(set(alphabet)) == 91 and 91 ** 2 >= 2 ** lab_model.GROUP_BITS
    assert all(0x21 <= ord(c) < 0x7F for c in alphabet)
    assert not set('"\\<') & set(alphabet)  # a string's end, an escape, a closing </script>
    assert json.loads(json.dumps(alphabet)) == alphabet and json.dumps(alphabet) == f'"{alphabet}"'


def test_damaged_data_is_refused():
    text = lab_model.encode_words(np.arange(100, dtype=np.uint16))
    with pytest.raises(DataError, match="rebuild the site"):
        lab_model.decode_words(text[:-2], 100)
    with pytest.raises(DataError, match="outside the alphabet"):
        lab_model.decode_words('"' + text[1:], 100)


@pytest.mark.parametrize("variant", ["anthropic2023", "april2024", "topk"])
def test_the_shipped_sae_encodes_as_the_original_within_fp16(variant):
    model, sae = small_models(variant)
    weights = lab_model.lab_weights(model, sae, 1)
    assert all(a.dtype == np.float16 for a in weights.tensors.values())
    shipped_model, shipped_sae = lab_model.shipped_models(weights)
    x = torch.randn(40, 64)
    want = sae.encode(x)  # input scale and decoder bias applied, not folded
    got = shipped_sae.encode(x)
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()
    # decode's slope in the input space: what clamping adds per unit of a feature
    slope = sae.decode(torch.eye(96)[:3]) - sae.decode(torch.zeros(3, 96))
    torch.testing.assert_close(shipped_sae.W_dec[:3], slope, rtol=1e-3, atol=1e-4)
    ids = torch.randint(0, 50, (1, 12))
    torch.testing.assert_close(shipped_model(ids).logits, model(ids).logits, rtol=0, atol=5e-3)
    assert weights.config == {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 12, "vocab_size": 50,
                              "bias": False, "layer": 1, "d_mlp": 64, "d_sae": 96, "sae_variant": variant,
                              "k": 5 if variant == "topk" else None}


def test_the_script_is_the_header_and_the_data_and_its_sizes_add_up():
    model, sae = small_models()
    weights = lab_model.lab_weights(model, sae, 0)
    script, sizes = lab_model.render(weights)
    assert script.isascii() and "</" not in script
    found = re.fullmatch(r"/\*.*?\*/\nwindow\.MONOFAST_MODEL = (\{.*\});\n", script, re.DOTALL)
    assert found
    head = json.loads(found.group(1))
    count = sum(a.size for a in weights.tensors.values())
    assert head["count"] == count and head["config"] == weights.config
    words = lab_model.decode_words(head["data"], count)
    for entry in head["tensors"]:
        want = weights.tensors[entry["name"]]
        assert entry["shape"] == list(want.shape)
        got = words[entry["offset"]:entry["offset"] + want.size].view(np.float16).reshape(want.shape)
        np.testing.assert_array_equal(got, want)
    assert "lm_head.weight" not in weights.tensors  # tied to wte.weight, shipped once
    assert sizes["total"] == len(script.encode()) == sizes["header"] + len(head["data"])
    assert abs(sizes["gpt"] + sizes["sae_encoder"] + sizes["sae_decoder"] - len(head["data"])) <= 2


def test_model_script_refuses_missing_and_corrupt_inputs(tmp_path):
    model, sae = small_models()
    save_model(tmp_path / "gpt", model)
    sae.save(tmp_path / "sae", hook_layer=1)
    script, sizes = lab_model.model_script(tmp_path / "gpt", tmp_path / "sae")
    assert sizes["total"] == len(script)
    with pytest.raises(UserError, match="no trained model"):
        lab_model.model_script(tmp_path / "nowhere", tmp_path / "sae")
    with pytest.raises(UserError, match="no trained SAE.*--to sae"):
        lab_model.model_script(tmp_path / "gpt", tmp_path / "nowhere")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del cfg["hook_layer"], cfg["metadata"]["hook_layer"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="no hook_layer"):
        lab_model.model_script(tmp_path / "gpt", tmp_path / "sae")
    (tmp_path / "sae" / "sae_weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{nonsense")
    with pytest.raises(DataError, match="sae_weights.safetensors is unreadable.*--from sae"):
        lab_model.model_script(tmp_path / "gpt", tmp_path / "sae")


def test_weights_that_do_not_fit_are_refused_naming_the_tensor():
    model, sae = small_models()
    with pytest.raises(DataError, match="layers 0..1"):
        lab_model.lab_weights(model, sae, 2)
    other = SparseAutoencoder(SAEConfig(d_in=32, d_sae=8))
    with pytest.raises(DataError, match="MLP is 64 wide"):
        lab_model.lab_weights(model, other, 0)
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[0, 0] = 1e6
    with pytest.raises(DataError, match=r"h\.0\.mlp\.c_fc\.weight holds \|w\| up to 1e\+06"):
        lab_model.lab_weights(model, sae, 1)
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        lab_model.lab_weights(model, sae, 1)
