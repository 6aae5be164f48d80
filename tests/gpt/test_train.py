"""The GPT stage: training, per-source evaluation, checkpoints and resume, loading,
sampling, config errors and the `monofast gpt` commands, on a tiny offline corpus."""

import dataclasses
import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from monofast import cli
from monofast.common import config
from monofast.common import device as device_
from monofast.common.errors import DataError, UserError
from monofast.data.prepare import DataConfig, build
from monofast.data.splits import load_split
from monofast.gpt import batches, train, trainer, weights
from monofast.gpt import sample as sampling
from monofast.gpt.config import GPTTrainConfig
from monofast.gpt.model import GPT
from monofast.gpt.trainer import Trainer
from monofast.run.pipeline import RunDir

WORDS = ("thou art my lord and love the king doth speak of night sweet heaven o fair "
         "death hath made me sorrow gentle heart what say you noble friend").split()
NAMES = ("ROMEO", "JULIET", "KING HENRY", "HAMLET", "OPHELIA")


def verse(chars: int, seed: int = 0) -> str:
    """Deterministic Shakespeare-shaped text: speaker lines followed by verse lines."""
    rnd = random.Random(seed)
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) < chars:
        lines.append(f"{rnd.choice(NAMES)}:")
        for _ in range(rnd.randint(1, 4)):
            lines.append(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 9))).capitalize() + ",")
        lines.append("")
    return "\n".join(lines)


def source_specs(folder: Path) -> tuple[str, str]:
    text = folder / "verse.txt"
    text.write_text(verse(40_000), encoding="utf-8")
    python_glob = str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")
    return (f"shakespeare={text}", f"python={python_glob}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    cfg = DataConfig(sources=source_specs(folder), chars_per_source=40_000, vocab_size=320)
    build(cfg, folder / "data")
    return folder / "data"


def tiny_cfg(**overrides) -> GPTTrainConfig:
    values = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.1, batch_size=8,
                  max_iters=20, warmup_iters=3, learning_rate=3e-3, eval_interval=5,
                  eval_batches=2, device="cpu", sample_tokens=12, num_samples=1)
    values.update(overrides)
    return GPTTrainConfig(**values)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "gpt"
    return out, train.train(tiny_cfg(), data_dir, out)


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics]


def train_killed_at(step: int, cfg: GPTTrainConfig, data_dir: Path, out: Path, monkeypatch) -> None:
    """Train `cfg` into `out`, interrupted (KeyboardInterrupt) as step `step` begins."""
    real_step = trainer.Trainer.step

    def killed(self, at, x, y):
        if at == step:
            raise KeyboardInterrupt
        return real_step(self, at, x, y)

    monkeypatch.setattr(trainer.Trainer, "step", killed)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, data_dir, out)
    monkeypatch.setattr(trainer.Trainer, "step", real_step)


def assert_same_run(got, want) -> None:
    """Two training results with the same metrics (timing aside) and the same weights."""
    assert without_timing(got.metrics) == without_timing(want.metrics)
    for (name, a), b in zip(want.model.state_dict().items(), got.model.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------
# Training and its outputs

def test_train_writes_model_metrics_and_checkpoint(trained):
    out, result = trained
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "checkpoint.pt"):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 10, 15, 20]
    assert without_timing(lines) == without_timing(result.metrics)
    assert set(lines[-1]["val_loss_by_source"]) == {"shakespeare", "python"}
    assert lines[-1]["val_loss"] < lines[0]["val_loss"]
    assert not result.model.training


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = tiny_cfg(max_iters=100, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4)
    lrs = [trainer.lr_at(step, cfg) for step in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] < lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert trainer.lr_at(100, cfg) == pytest.approx(1e-4)


def test_wsd_schedule_warms_up_holds_the_peak_then_decays_linearly():
    cfg = tiny_cfg(max_iters=100, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4, schedule="wsd",
                   decay_frac=0.4)
    lrs = [trainer.lr_at(step, cfg) for step in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] < lrs[10]
    assert lrs[10:61] == [pytest.approx(1e-3)] * 51  # stable until the last 40 steps
    steps = np.diff(lrs[60:])
    assert np.allclose(steps, steps[0]) and steps[0] == pytest.approx(-9e-4 / 40)
    assert lrs[100] == pytest.approx(1e-4) and lrs[80] == pytest.approx(5.5e-4)
    whole = dataclasses.replace(cfg, decay_frac=1.0)  # linear from the end of the warm-up
    assert trainer.lr_at(10, whole) == pytest.approx(1e-3) and trainer.lr_at(55, whole) == pytest.approx(5.5e-4)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    cfg = tiny_cfg(n_layer=2, optimizer="muon", muon_lr=0.05, learning_rate=2e-3, max_iters=10,
                   warmup_iters=0, min_lr=0.0)
    run = Trainer(cfg, 64, torch.device("cpu"), torch.float32)
    adamw, muon = run.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in run.model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {f"h.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert in_adamw == set(names.values()) - in_muon and "wte.weight" in in_adamw
    x = torch.randint(0, 64, (8, 32))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.step(5, x, x)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.05 * trainer.lr_at(5, cfg) / 2e-3)
    assert adamw.param_groups[0]["lr"] == pytest.approx(trainer.lr_at(5, cfg))
    moved = {n for n, p in run.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(names.values())


def test_muon_run_learns_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    cfg = dict(optimizer="muon", schedule="wsd", muon_lr=0.02, dropout=0.0)
    full = train.train(tiny_cfg(**cfg), data_dir, tmp_path / "full")
    assert full.metrics[-1]["val_loss"] < full.metrics[0]["val_loss"] - 0.3
    train_killed_at(7, tiny_cfg(**cfg), data_dir, tmp_path / "gpt", monkeypatch)
    resumed = train.train(tiny_cfg(**cfg, resume=True), data_dir, tmp_path / "gpt")
    assert_same_run(resumed, full)


def test_tiling_windows_cover_the_split_once(data_dir):
    split = load_split(data_dir, "val")
    starts = batches.tiling_starts(len(split.tokens), 32)
    assert starts[0] == 0 and np.all(np.diff(starts) == 32)
    assert len(split.tokens) - 64 <= starts[-1] < len(split.tokens) - 32


def test_batches_are_keyed_on_the_step(data_dir):
    split = load_split(data_dir, "train")
    cfg = tiny_cfg()
    x, y = batches.get_batch(split, 3, cfg, torch.device("cpu"))
    assert x.shape == y.shape == (cfg.batch_size, cfg.block_size) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, batches.get_batch(split, 3, cfg, torch.device("cpu"))[0])
    assert not torch.equal(x, batches.get_batch(split, 4, cfg, torch.device("cpu"))[0])


def test_per_source_eval_matches_a_direct_computation(data_dir, trained):
    _, result = trained
    model, cfg = result.model, tiny_cfg()
    split = load_split(data_dir, "val")
    got = batches.evaluate(model, split, ["shakespeare", "python"], cfg, torch.device("cpu"), torch.float32)
    losses: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for start in batches.eval_starts(len(split.tokens), cfg):
            window = torch.from_numpy(split.tokens[start:start + cfg.block_size + 1].astype(np.int64))
            logits = model(window[None, :-1]).logits[0]
            per_token = torch.nn.functional.cross_entropy(logits, window[1:], reduction="none")
            for loss, src in zip(per_token.tolist(), split.sources[start + 1:start + cfg.block_size + 1]):
                losses[int(src)].append(loss)
    assert got.by_source["shakespeare"] == pytest.approx(np.mean(losses[0]), rel=1e-5)
    assert got.by_source["python"] == pytest.approx(np.mean(losses[1]), rel=1e-5)
    assert got.tokens == {"shakespeare": len(losses[0]), "python": len(losses[1])}
    assert got.loss == pytest.approx(np.mean(losses[0] + losses[1]), rel=1e-5)


# ---------------------------------------------------------------------------------------
# Checkpoints and resume

def test_resume_continues_exactly_like_an_uninterrupted_run(data_dir, trained, tmp_path, monkeypatch):
    full_out, full = trained
    out = tmp_path / "gpt"
    train_killed_at(12, tiny_cfg(), data_dir, out, monkeypatch)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [5, 10]  # the evaluations before the kill

    resumed = train.train(tiny_cfg(resume=True), data_dir, out)
    assert_same_run(resumed, full)


def test_resume_refuses_a_different_schedule(data_dir, trained, tmp_path):
    out, _ = trained
    target = tmp_path / "gpt"
    target.mkdir()
    (target / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    with pytest.raises(UserError, match=r"max_iters=20 \(now 40\)"):
        train.train(tiny_cfg(resume=True, max_iters=40), data_dir, target)


def test_resume_in_another_precision(tmp_path):
    """Precision is runtime: a checkpoint made in fp32 resumes in fp16 (which adds a loss
    scaler) and back."""
    cfg = tiny_cfg()
    fp32 = Trainer(cfg, 64, torch.device("cpu"), torch.float32)
    train.save_checkpoint(tmp_path, fp32, train.TrainState(3, []))
    fp16 = Trainer(cfg, 64, torch.device("cpu"), torch.float16)
    assert fp16.scaler.is_enabled() and train.load_checkpoint(tmp_path, fp16).step == 3
    train.save_checkpoint(tmp_path, fp16, train.TrainState(4, []))
    assert train.load_checkpoint(tmp_path, Trainer(cfg, 64, torch.device("cpu"), torch.float32)).step == 4


def test_resume_of_a_finished_run_only_reexports(data_dir, trained, tmp_path):
    out, full = trained
    target = tmp_path / "gpt"
    target.mkdir()
    (target / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    again = train.train(tiny_cfg(resume=True, device="cpu", eval_batches=3), data_dir, target)
    assert without_timing(again.metrics) == without_timing(full.metrics)


def test_corrupt_checkpoint_is_a_data_error(data_dir, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="drop --resume"):
        train.train(tiny_cfg(resume=True), data_dir, tmp_path)


# ---------------------------------------------------------------------------------------
# Divergence

def poisoned_at(index: int, monkeypatch, seen: dict[str, bytes], out: Path) -> None:
    """From step `index` (0-based) on, the weights hold a NaN and every loss is NaN: the
    model file as it was just before is kept in `seen`."""
    real_step = trainer.Trainer.step

    def step(self, step, x, y):
        if step == index:
            seen["model"] = (out / "model.safetensors").read_bytes() if (out / "model.safetensors").exists() else b""
            with torch.no_grad():
                self.model.lm_head.weight[0, 0] = float("nan")
        return real_step(self, step, x, y)

    monkeypatch.setattr(trainer.Trainer, "step", step)


def test_a_diverged_run_names_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "gpt"
    seen: dict[str, bytes] = {}
    poisoned_at(12, monkeypatch, seen, out)
    with pytest.raises(UserError, match=r"diverged: the training loss is nan at step 13; the last good "
                                        r"checkpoint is .*checkpoint\.pt at step 10.*--learning-rate \(now 0\.003\)"):
        train.train(tiny_cfg(), data_dir, out)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [5, 10]
    assert (out / "model.safetensors").read_bytes() == seen["model"]  # the step-10 model, not a NaN one
    assert all(torch.isfinite(p).all() for p in weights.load_model(out).parameters())
    state = train.load_checkpoint(out, Trainer(tiny_cfg(), 320, torch.device("cpu"), torch.float32))
    assert state.step == 10


def test_a_nan_loss_is_noticed_at_the_loss_readback_before_any_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "gpt"
    real_step = trainer.Trainer.step
    steps: list[int] = []

    def nan_from_step_3(self, step, x, y):
        steps.append(step)
        loss = real_step(self, step, x, y)
        return loss * float("nan") if step >= 2 else loss

    monkeypatch.setattr(trainer.Trainer, "step", nan_from_step_3)
    with pytest.raises(UserError, match=r"loss is nan at step 3; no checkpoint was written before it.*"
                                        r"--grad-clip 1\.0 \(now off\)"):
        train.train(tiny_cfg(eval_interval=20, grad_clip=0.0), data_dir, out)
    assert len(steps) == train.LOG_EVERY  # stopped at the first read-back of the loss
    assert not any((out / name).exists() for name in ("checkpoint.pt", "model.safetensors", "metrics.jsonl"))


# ---------------------------------------------------------------------------------------
# Loading the model

def test_load_model_round_trips(trained):
    out, result = trained
    idx = torch.randint(0, result.model.config.vocab_size, (2, 10))
    for folder in (out, out.parent):  # the stage folder or the run directory
        model = weights.load_model(folder)
        assert isinstance(model, GPT) and not model.training
        assert model.config == result.model.config
        assert model.lm_head.weight is model.wte.weight
        assert torch.equal(model(idx).logits, result.model(idx).logits)


def test_load_model_errors_name_the_file(trained, tmp_path):
    with pytest.raises(UserError, match="gpt train"):
        weights.load_model(tmp_path)
    out, _ = trained
    broken = tmp_path / "gpt"
    broken.mkdir()
    (broken / "config.json").write_text((out / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(DataError, match="model.safetensors is unreadable"):
        weights.load_model(broken)
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "n_embd": cfg["n_embd"] * 2}))
    with pytest.raises(DataError, match="does not match"):
        weights.load_model(broken)
    (broken / "config.json").write_text("{")
    with pytest.raises(UserError, match="corrupt"):
        weights.load_model(broken)


# ---------------------------------------------------------------------------------------
# Config and input errors

@pytest.mark.parametrize("overrides, match", [
    ({"n_embd": 30, "n_head": 4}, "not divisible by n_head"),
    ({"warmup_iters": 20}, "warmup_iters=20"),
    ({"min_lr": 1.0}, "min_lr"),
    ({"dtype": "float8"}, "dtype='float8'"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"optimizer": "sgd"}, "optimizer='sgd'; choose one of adamw, muon"),
    ({"schedule": "linear"}, "schedule='linear'; choose one of cosine, wsd"),
    ({"decay_frac": 0.0}, "decay_frac=0.0"),
    ({"muon_lr": -1.0}, "muon_lr=-1.0"),
    ({"muon_momentum": 1.0}, "muon_momentum=1.0"),
], ids=["indivisible-heads", "warmup-too-long", "min-lr-above-lr", "bad-dtype", "bad-device", "no-batch",
        "bad-optimizer", "bad-schedule", "no-decay", "negative-muon-lr", "muon-momentum-1"])
def test_config_errors_name_the_fix(overrides, match):
    with pytest.raises(UserError, match=match):
        config.build(GPTTrainConfig, dataclasses.asdict(tiny_cfg()), overrides)


def test_block_size_larger_than_the_data(data_dir, tmp_path):
    with pytest.raises(DataError, match="lower --block-size"):
        train.train(tiny_cfg(block_size=10**6), data_dir, tmp_path)


def test_missing_data_stage(tmp_path):
    with pytest.raises(UserError, match="monofast data"):
        train.run_stage(tiny_cfg(), RunDir(tmp_path))


def test_device_and_dtype_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert device_.pick_dtype("float32", cpu) is torch.float32
    with pytest.raises(UserError, match="bfloat16 or float32"):
        device_.pick_dtype("float16", cpu)
    monkeypatch.setattr(device_, "native_bf16", lambda device: False)
    assert device_.pick_dtype("auto", cpu) is torch.float32
    monkeypatch.setattr(device_, "native_bf16", lambda device: device.type == "cpu")
    assert device_.pick_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device_.pick_device("auto") == cpu
    with pytest.raises(UserError, match="no CUDA GPU"):
        device_.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_.pick_device("auto") == torch.device("cuda")


# ---------------------------------------------------------------------------------------
# Sampling

def test_sampling_is_deterministic_for_a_seed(data_dir, trained):
    from monofast.data import tokenizer

    _, result = trained
    tok = tokenizer.load(data_dir)
    a = sampling.sample(result.model, tok, "def run", 40, seed=3)
    assert a.startswith("def run")
    assert a == sampling.sample(result.model, tok, "def run", 40, seed=3)
    assert a != sampling.sample(result.model, tok, "def run", 40, seed=4)


# ---------------------------------------------------------------------------------------
# Command line

def test_cli_train_sample_and_errors(tmp_path, capsys):
    run = str(tmp_path / "run")
    sources = [arg for spec in source_specs(tmp_path) for arg in ("--source", spec)]
    assert cli.main(["data", "--preset", "smoke", "--run", run, *sources]) == 0
    assert cli.main(["gpt", "train", "--preset", "smoke", "--run", run, "--device", "cpu"]) == 0
    folder = Path(run) / "gpt"
    samples = (folder / "samples.txt").read_text()
    assert "'def run'" in samples and "'ROMEO:'" in samples
    assert json.loads((folder / "manifest.json").read_text())["config"]["n_embd"] == 32
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert cli.main(["gpt", "train", "--preset", "smoke", "--run", run, "--device", "cpu"]) == 0
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # up to date: skipped

    capsys.readouterr()
    args = ["gpt", "sample", "--run", run, "--prompt", "def run", "--tokens", "20", "--seed", "5",
            "--temperature", "0.8", "--top-k", "50"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("def run")
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first

    assert cli.main(["gpt", "train", "--preset", "smoke", "--run", run, "--n-embd", "30",
                     "--n-head", "4"]) == 2
    assert "not divisible by n_head" in capsys.readouterr().err
    assert cli.main(["gpt", "train", "--preset", "smoke", "--run", str(tmp_path / "empty")]) == 2
    assert "monofast data" in capsys.readouterr().err
    assert cli.main(["gpt", "sample", "--run", str(tmp_path / "empty")]) == 2
    assert "gpt train" in capsys.readouterr().err


class _BackwardFails(torch.autograd.Function):
    """Identity forward; its backward raises, as a compiler failing at the first backward would."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward compiler failed")


@pytest.mark.parametrize("choice", ["auto", "true"])
def test_a_compile_failure_in_the_first_backward_falls_back_under_auto_only(choice):
    cfg = tiny_cfg(compile=choice, dropout=0.1)
    trainer = Trainer(cfg, 64, torch.device("cpu"), torch.float32)
    reference = Trainer(dataclasses.replace(cfg, compile="false"), 64, torch.device("cpu"), torch.float32)
    reference.model.load_state_dict(trainer.model.state_dict())
    eager = trainer.forward

    def broken(x, y):  # stands in for the compiled module
        out = eager(x, y)
        return out._replace(loss=_BackwardFails.apply(out.loss))

    trainer.forward, trainer.compile_pending = broken, True
    x = torch.randint(0, 64, (4, cfg.block_size))
    y = torch.randint(0, 64, (4, cfg.block_size))
    if choice == "true":
        with pytest.raises(RuntimeError, match="backward compiler failed"):
            trainer.step(0, x, y)
        return
    loss = trainer.step(0, x, y)
    assert trainer.forward is trainer.eager_forward and not trainer.compile_pending
    expected = reference.step(0, x, y)  # same weights, same dropout masks: the same step
    torch.testing.assert_close(loss, expected)
    for a, b in zip(trainer.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(a, b)
