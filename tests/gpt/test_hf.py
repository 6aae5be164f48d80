"""Hugging Face causal LMs in the tiny GPT's place (`--model`, `--hook`): tiny random GPT-2,
GPT-NeoX and Llama models saved locally, their tokenizer in the data stage, harvested
activations against a plain forward hook, the CE splice, the analysis's logit path, the
whole pipeline at smoke size, and the errors a user meets."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import hf_models
import numpy as np
import pytest
import torch
from conftest import write_code_source, write_text_source
from monofast import cli
from monofast.activations import harvest
from monofast.activations import store as activations
from monofast.common import hf as common_hf
from monofast.common.errors import UserError
from monofast.data.prepare import DataConfig, build
from monofast.data.splits import load_meta, load_split
from monofast.gpt import hf
from monofast.gpt.weights import load_model, record_hf
from monofast.sae import evaluate

WIDTH = 32
MLP_WIDTH = {"gpt2": 4 * WIDTH, "neox": 2 * WIDTH, "llama": 3 * WIDTH // 2}
MODULES = {  # where each site reads, by the names transformers gives the modules
    "gpt2": ("transformer.h.1.mlp.c_proj", "transformer.h.1", "transformer.h.1.attn"),
    "neox": ("gpt_neox.layers.1.mlp.dense_4h_to_h", "gpt_neox.layers.1", "gpt_neox.layers.1.attention"),
    "llama": ("model.layers.1.mlp.down_proj", "model.layers.1", "model.layers.1.self_attn"),
}
PLAIN = {  # the same activations read independently: (module, read its input?)
    ("gpt2", "mlp.hook_post"): ("transformer.h.1.mlp.act", False),
    ("neox", "mlp.hook_post"): ("gpt_neox.layers.1.mlp.act", False),
    ("llama", "mlp.hook_post"): ("model.layers.1.mlp.down_proj", True),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, tuple[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    text = write_text_source(root, "verse", 30_000)
    code = write_code_source(root)
    return root, (f"verse={text}", f"code={code}")


@pytest.fixture(scope="module")
def models(corpus) -> dict[str, Path]:
    root, _ = corpus
    texts = [(root / "verse.txt").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in sorted((root / "code").glob("*.py"))]
    return {kind: hf_models.save(kind, root / kind, texts) for kind in hf_models.KINDS}


def data_for(corpus, model: Path, out: Path) -> Path:
    build(DataConfig(sources=corpus[1], chars_per_source=30_000, tokenizer=str(model)), out)
    return out


def plain_activations(lm: torch.nn.Module, module: str, on_input: bool, x: torch.Tensor) -> torch.Tensor:
    seen = []

    def keep(mod, args, output):
        value = args[0] if on_input else output
        seen.append(value[0] if isinstance(value, tuple) else value)

    handle = lm.get_submodule(module).register_forward_hook(keep)
    try:
        with torch.no_grad():
            lm(input_ids=x)
    finally:
        handle.remove()
    return seen[0]


def test_hook_names():
    assert common_hf.parse_hook("blocks.3.mlp.hook_post") == (3, "mlp.hook_post")
    assert common_hf.parse_hook("blocks.0.hook_resid_post") == (0, "hook_resid_post")
    for bad in ("blocks.x.mlp.hook_post", "blocks.1.hook_resid_pre", "transformer.h.1", ""):
        with pytest.raises(UserError, match="monofast hooks --model"):
            common_hf.parse_hook(bad)


@pytest.mark.parametrize("kind", hf_models.KINDS)
def test_hooks_list_every_site_with_its_width(models, kind, capsys):
    assert cli.main(["hooks", "--model", str(models[kind])]) == 0
    out = capsys.readouterr().out
    mlp, resid, attn = MODULES[kind]
    for name, width, module in (("blocks.1.mlp.hook_post", MLP_WIDTH[kind], mlp + " (input)"),
                                ("blocks.1.hook_resid_post", WIDTH, resid),
                                ("blocks.1.hook_attn_out", WIDTH, attn)):
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert line.split()[1] == str(width) and line.endswith(module), line


def test_contexts_default_to_256_tokens_not_the_model_limit():
    import transformers

    lm = transformers.AutoModelForCausalLM.from_config(hf_models.config("llama", 64, context=4096)).eval()
    model = hf.HFModel(lm, "mlp.hook_post", "long")
    assert model.config.block_size == 4096 and model.config.default_context == hf.DEFAULT_CONTEXT == 256
    plan = harvest.plan(harvest.HarvestConfig(contexts=2, positions_per_context=4), model.config, 10_000)
    assert plan.length == 256 and plan.dim == MLP_WIDTH["llama"]
    assert harvest.plan(harvest.HarvestConfig(contexts=2, positions_per_context=4, context_length=1024),
                        model.config, 10_000).length == 1024


def test_data_stage_uses_the_model_tokenizer(corpus, models, tmp_path):
    import transformers

    data = data_for(corpus, models["gpt2"], tmp_path / "data")
    meta = load_meta(data)
    tok = transformers.AutoTokenizer.from_pretrained(models["gpt2"])
    assert meta["tokenizer"] == {"kind": "hf", "model": str(models["gpt2"].resolve())}
    assert meta["vocab_size"] == len(tok) and meta["eot_id"] == tok.eos_token_id
    split = load_split(data, "train", meta)
    first_end = int(np.flatnonzero(np.asarray(split.tokens) == tok.eos_token_id)[0])
    text = (corpus[0] / "verse.txt").read_text(encoding="utf-8")
    expected = tok(text[:2000], add_special_tokens=False)["input_ids"][:50]  # the first document's start
    assert list(np.asarray(split.tokens[:50])) == expected
    assert set(np.asarray(split.sources[:first_end]).tolist()) == {0}
    assert np.asarray(split.sources)[-1] == 1  # the code source's tokens carry its label


def test_a_vocabulary_past_uint16_gets_uint32_token_files(corpus, tmp_path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for p in corpus[0].glob("verse.txt") for w in p.read_text(encoding="utf-8").split()})
    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(70_000 - len(vocab))})  # past 65,536 entries
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        tmp_path / "big")
    meta = build(DataConfig(sources=corpus[1], chars_per_source=20_000, tokenizer=str(tmp_path / "big")),
                 tmp_path / "data")
    assert meta["vocab_size"] == 70_000 and meta["token_dtype"] == "uint32"
    tokens = np.asarray(load_split(tmp_path / "data", "train").tokens)
    assert tokens.dtype == np.uint32 and tokens.max() < 70_000 and (tokens == 0).sum() >= 1


@pytest.mark.parametrize("kind", hf_models.KINDS)
@pytest.mark.parametrize("site", hf.SITES)
def test_harvested_rows_equal_a_plain_forward_hook(corpus, models, tmp_path, kind, site):
    data = data_for(corpus, models[kind], tmp_path / "data")
    record_hf(tmp_path / "gpt", str(models[kind]), "float32", False, data)
    hook = f"blocks.1.{site}"
    cfg = harvest.HarvestConfig(contexts=12, positions_per_context=10, context_length=48, batch_size=5, hook=hook)
    harvest.harvest(cfg, data, tmp_path / "gpt", tmp_path / "acts")
    store = activations.open_store(tmp_path / "acts")
    assert store.dim == (MLP_WIDTH[kind] if site == "mlp.hook_post" else WIDTH)
    index = json.loads((tmp_path / "acts" / "index.json").read_text())
    assert index["gpt"]["hook_name"] == hook and index["gpt"]["model"] == str(models[kind].resolve())
    rows = store.take(np.arange(store.rows), to_float32=True)
    starts = np.load(tmp_path / "acts" / harvest.CONTEXTS_FILE)
    split = load_split(data, "train")
    x = torch.from_numpy(np.stack([np.asarray(split.tokens[s:s + 48], dtype=np.int64) for s in starts]))
    lm = load_model(tmp_path / "gpt", "cpu", hook).lm
    module, on_input = PLAIN.get((kind, site), (MODULES[kind][hf.SITES.index(site)], False))
    acts = plain_activations(lm, module, on_input, x)  # (contexts, 48, width)
    expected = acts[torch.from_numpy(rows.context_id.astype(np.int64)), torch.from_numpy(rows.position.astype(np.int64))]
    torch.testing.assert_close(rows.tensor(), expected, atol=1e-5, rtol=1e-5)
    assert np.array_equal(rows.token_id, x.numpy()[rows.context_id, rows.position])


@pytest.mark.parametrize("kind", hf_models.KINDS)
def test_ce_splice_matches_the_model(corpus, models, tmp_path, kind):
    data = data_for(corpus, models[kind], tmp_path / "data")
    record_hf(tmp_path / "gpt", str(models[kind]), "float32", False, data)
    model = load_model(tmp_path / "gpt", "cpu", "blocks.0.mlp.hook_post")
    tokens = evaluate.held_out_tokens(data, 32, 256)
    x = tokens.idx[:4]
    resid, act = model.run_to_mlp(x, 0)
    torch.testing.assert_close(model.logits_from_mlp(resid, act, 0), model.lm(input_ids=x).logits)
    result = evaluate.evaluate_hooks(model, 0, {"same": lambda a: a}, tokens)
    assert result.spliced["same"].overall == pytest.approx(result.clean.overall, abs=1e-9)
    zero = plain_zeroed_loss(model.lm, MODULES[kind][0].replace(".1.", ".0."), tokens)
    assert result.zero.overall == pytest.approx(zero, rel=1e-6)
    assert result.recovered["same"].overall == pytest.approx(1.0, abs=1e-6)


def plain_zeroed_loss(lm, module: str, tokens) -> float:
    """Mean next-token loss with the MLP's output projection fed zeros, by a plain pre-hook."""
    handle = lm.get_submodule(module).register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),))
    try:
        with torch.no_grad():
            logits = lm(input_ids=tokens.idx).logits
    finally:
        handle.remove()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.targets.flatten(), reduction="none")
    return float(loss.double().mean())


@pytest.mark.parametrize("kind", ("gpt2", "llama"))
def test_direct_logits_follow_the_final_norm(models, kind):
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(models[kind]).eval()
    with torch.no_grad():
        norm = lm.transformer.ln_f if kind == "gpt2" else lm.model.norm
        norm.weight.uniform_(0.5, 1.5)
    model = hf.HFModel(lm, "hook_resid_post", kind)
    d = torch.randn(5, WIDTH)
    centred = d - d.mean(1, keepdim=True) if kind == "gpt2" else d  # LayerNorm centres, RMSNorm does not
    expected = (centred * norm.weight) @ lm.get_output_embeddings().weight.T
    torch.testing.assert_close(model.direct_logits(d), expected.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(model.output_directions(1, d), d)  # outside an MLP the direction is its own
    mlp = hf.HFModel(lm, "mlp.hook_post", kind)
    v = torch.randn(3, MLP_WIDTH[kind])
    proj = lm.get_submodule(MODULES[kind][0])
    torch.testing.assert_close(mlp.output_directions(1, v), proj(v) - proj(torch.zeros_like(v)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind,site", [("gpt2", "mlp.hook_post"), ("neox", "hook_resid_post"),
                                       ("llama", "mlp.hook_post")])
def test_whole_pipeline_on_a_hugging_face_model(corpus, models, tmp_path, kind, site, capsys):
    run = tmp_path / "run"
    argv = ["run", "--preset", "smoke", "--run", str(run), "--model", str(models[kind]), "--hook",
            f"blocks.1.{site}", "--set", f"data.sources={','.join(corpus[1])}"]
    assert cli.main(argv) == 0
    shape = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("SAE "))
    assert shape.endswith(f"on {MLP_WIDTH[kind] if site == 'mlp.hook_post' else WIDTH} "
                          f"{'MLP neurons' if site == 'mlp.hook_post' else 'residual-stream dimensions'})")
    evaluation = json.loads((run / "sae" / "eval.json").read_text())
    member = evaluation["saes"][evaluation["selection"]["published"]]
    assert np.isfinite(member["ce_loss_recovered"]) and set(member["ce_loss_recovered_by_source"]) == {"verse", "code"}
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    meta = cfg.get("metadata", cfg)
    assert meta["model_name"] == str(models[kind].resolve())
    assert meta["model_class_name"] == "AutoModelForCausalLM" and meta["monofast_hook_name"] == f"blocks.1.{site}"
    saelens_name = {("gpt2", "mlp.hook_post"): "transformer.h.1.mlp.act", ("neox", "hook_resid_post"):
                    "gpt_neox.layers.1", ("llama", "mlp.hook_post"): "blocks.1.mlp.hook_post"}[(kind, site)]
    assert meta["hook_name"] == saelens_name  # a gated MLP's activation is no module's output
    if importlib.util.find_spec("sae_lens") is not None:  # SAELens reads the folder as it is
        with warnings.catch_warnings():  # its import of TransformerLens warns of a renamed module
            warnings.simplefilter("ignore", DeprecationWarning)
            from sae_lens import SAE

        loaded = SAE.load_from_disk(str(run / "sae"), device="cpu")
        assert loaded.cfg.metadata.hook_name == saelens_name
        assert loaded.cfg.metadata.model_name == str(models[kind].resolve())
        assert loaded.cfg.metadata.model_class_name == "AutoModelForCausalLM"
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert summary["hook_name"] == f"blocks.1.{site}" and summary["model"] == str(models[kind].resolve())
    assert (run / "site" / "index.html").is_file() and not (run / "site" / "lab.html").exists()
    # Steering: a feature clamped at the hook, the SAE's error term spliced back in.
    capsys.readouterr()
    assert cli.main(["gpt", "sample", "--run", str(run), "--prompt", "Thou", "--tokens", "5", "--clamp", "3=2x"]) == 0
    assert capsys.readouterr().out.startswith("Thou")


def test_harvest_command_with_a_model_runs_the_stages_before_it(corpus, models, tmp_path, capsys):
    config = tmp_path / "sources.toml"
    config.write_text("[data]\nsources = [" + ", ".join(f'"{s}"' for s in corpus[1]) + "]\n")
    run = tmp_path / "run"
    argv = ["harvest", "--preset", "smoke", "--run", str(run), "--config", str(config), "--model",
            str(models["llama"]), "--hook", "blocks.0.hook_attn_out"]
    assert cli.main(argv) == 0
    assert load_meta(run / "data")["tokenizer"]["model"] == str(models["llama"].resolve())
    assert json.loads((run / "gpt" / hf.MODEL_RECORD).read_text())["architecture"] == "LlamaForCausalLM"
    index = json.loads((run / "activations" / "index.json").read_text())
    assert index["gpt"]["hook_name"] == "blocks.0.hook_attn_out" and index["dim"] == WIDTH
    assert not (run / "sae").exists()  # it stops at the stage asked for
    assert cli.main(["gpt", "sample", "--run", str(run), "--prompt", "Thou art", "--tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("Thou art")
    # Without --model the same run trains the tiny GPT again, and the folder stops naming the model.
    assert cli.main(["run", "--preset", "smoke", "--run", str(run), "--config", str(config), "--to", "gpt"]) == 0
    assert not (run / "gpt" / hf.MODEL_RECORD).exists()
    assert type(load_model(run / "gpt")).__name__ == "GPT"


def test_half_precision_weights(corpus, models, tmp_path):
    data = data_for(corpus, models["neox"], tmp_path / "data")
    hook = "blocks.1.mlp.hook_post"
    rows = {}
    for dtype in ("float32", "bfloat16"):
        record_hf(tmp_path / dtype, str(models["neox"]), dtype, False, data)
        model = load_model(tmp_path / dtype, "cpu", hook)
        assert next(model.parameters()).dtype == getattr(torch, dtype)
        cfg = harvest.HarvestConfig(contexts=8, positions_per_context=8, context_length=32, batch_size=4, hook=hook)
        harvest.harvest(cfg, data, tmp_path / dtype, tmp_path / f"acts-{dtype}")
        rows[dtype] = activations.open_store(tmp_path / f"acts-{dtype}").take(np.arange(64), to_float32=True).tensor()
    torch.testing.assert_close(rows["bfloat16"], rows["float32"], atol=0.05, rtol=0.05)  # bf16: 8 significant bits
    assert not torch.equal(rows["bfloat16"], rows["float32"])


def test_errors_name_the_problem_and_the_fix(corpus, models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    assert cli.main(["hooks", "--model", "someone/not-cached"]) == 2
    assert "neither a local folder nor in the local Hugging Face cache" in capsys.readouterr().err
    assert cli.main(["hooks", "--model", str(tmp_path / "missing")]) == 2
    assert "--allow-download" in capsys.readouterr().err

    monkeypatch.setattr(common_hf, "available_memory", lambda device: 1_000)
    with pytest.raises(UserError, match=r"needs 0\.0 GiB .* has 0\.0 GiB free"):
        common_hf.load_lm(str(models["gpt2"]), torch.device("cpu"), torch.float32)
    monkeypatch.undo()

    own = tmp_path / "own-bpe"
    build(DataConfig(sources=corpus[1], chars_per_source=20_000, vocab_size=300), own)
    with pytest.raises(UserError, match="tokenized with its own BPE"):
        record_hf(tmp_path / "gpt", str(models["gpt2"]), "auto", False, own)

    with pytest.raises(UserError, match="tiny GPT is hooked at its MLPs only"):
        load_model(tmp_path / "nowhere", "cpu", "blocks.0.hook_resid_post")

    run = ["run", "--preset", "smoke", "--run", str(tmp_path / "r"), "--model", str(models["gpt2"])]
    assert cli.main([*run, "--with", "findings"]) == 2
    assert "does not run on a Hugging Face model" in capsys.readouterr().err


def test_hooks_refuses_an_empty_name_and_a_folder_that_is_no_model(tmp_path, capsys):
    assert cli.main(["hooks", "--model", ""]) == 2
    err = capsys.readouterr().err
    assert "--model is empty; give a Hugging Face model" in err and "hf download" not in err
    assert cli.main(["hooks", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is a folder but not a Hugging Face model folder (it holds no config.json)" in err
    assert "neither a local folder" not in err


def test_without_transformers_the_command_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert cli.main(["hooks", "--model", "gpt2"]) == 2
    assert "pip install 'monofast[hf]'" in capsys.readouterr().err
