"""Several processes (monofast.common.distributed): two gloo ranks on the CPU against one process.

One spawn of two ranks runs every scenario (starting processes, not the work, is what
costs here: each imports torch and its compiler stack) and leaves its results in files;
each test then compares one thing with the single process: GPT losses for the same global
batches, resume under DDP, the harvested store row for row, SAE gradient steps, the rows
each rank trained on, SAE losses, SAE resume, and `monofast gpt train` with the
environment torchrun gives. Starting real torchrun would cost a third torch start-up;
one test checks instead how its parser passes the command on.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_code_source, write_text_source
from monofast.activations import harvest
from monofast.activations import store as activations
from monofast.common import distributed
from monofast.common.errors import UserError
from monofast.gpt import batches, config, train, trainer, weights
from monofast.sae import train as sae_train
from monofast.sae.config import SAETrainConfig

WORLD = 2
ROW_BYTES = 64 * 4 + activations.META_ROW_BYTES  # d_mlp 64, fp32


def gpt_cfg(**overrides) -> config.GPTTrainConfig:
    values = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, dropout=0.0, batch_size=8, max_iters=12,
                  warmup_iters=2, learning_rate=3e-3, eval_interval=4, eval_batches=3, device="cpu",
                  sample_tokens=0)
    return config.GPTTrainConfig(**{**values, **overrides})


def harvest_cfg() -> harvest.HarvestConfig:
    return harvest.HarvestConfig(contexts=40, positions_per_context=12, batch_size=4, device="cpu",
                                 shard_mb=(activations.HEADER_BYTES + 48.5 * ROW_BYTES) / 2**20)  # 48 rows a shard


def sae_cfg(**overrides) -> SAETrainConfig:
    # 480 rows, 48 held out: 432 = 27 steps of 16, or of 2 x 8 rows; resampling after 6, 12, 18.
    values = dict(expansion=2, batch_size=16, held_out=48, lr=3e-3, l1_coeff=(1.0,), log_every=3,
                  resample_every=6, resample_rows=64, checkpoint_every=5, b_dec_init="mean",
                  compute_dtype="float32", device="cpu", ce_eval_tokens=0)
    return SAETrainConfig(**{**values, **overrides})


@contextlib.contextmanager
def one_thread():
    """Tiny models on one thread: the spin-waiting OpenMP threads of several would make every
    step several times slower on a busy 2-core machine (and OMP_WAIT_POLICY cannot be set
    once torch is loaded)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Interrupted(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def row_names(store: activations.ActivationStore) -> dict[bytes, int]:
    """Each distinct row's bytes -> the first store row holding them."""
    rows = store.take(np.arange(store.rows), to_float32=True).activations
    names: dict[bytes, int] = {}
    for i, row in enumerate(rows):
        names.setdefault(row.tobytes(), i)
    return names


def record_batches(store: activations.ActivationStore, where: Path, monkeypatch) -> None:
    """Make every SAE training step write the store rows it trained on into `where`. A row
    is named by the first store row with the same values (a tiny GPT gives some tokens
    identical activations), see `row_names`."""
    index = row_names(store)
    seen: list[int] = []
    real = sae_train.train_step

    def recording(member, x, *args, **kwargs):
        seen.extend(index[row.tobytes()] for row in x.numpy())
        where.write_text(json.dumps(seen))
        return real(member, x, *args, **kwargs)

    monkeypatch.setattr(sae_train, "train_step", recording)


# ---------------------------------------------------------------------------------------
# The single process, and the two ranks


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Data, a GPT trained in one process (and a copy killed after step 9), its harvest,
    and SAE training in one process (recording the rows it trained on)."""
    with one_thread():
        return make_single(tmp_path_factory.mktemp("single"))


def make_single(root: Path) -> dict:
    from monofast import cli

    text, code = write_text_source(root, "verse", 16_000), write_code_source(root, files=4, lines=40)
    assert cli.main(["data", "--run", str(root / "run"), "--preset", "smoke", "--source", f"verse={text}",
                     "--source", f"code={code}", "--chars-per-source", "12000", "--vocab-size", "300"]) == 0
    shutil.copytree(root / "run", root / "cli")
    assert cli.main(["gpt", "train", *cli_flags(root / "cli")]) == 0
    data_dir = root / "run" / "data"
    full = train.train(gpt_cfg(), data_dir, root / "gpt")
    real_step = trainer.Trainer.step

    def killed_at_step_9(self, step, x, y):
        if step == 9:
            raise KeyboardInterrupt
        return real_step(self, step, x, y)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.Trainer, "step", killed_at_step_9)
        with pytest.raises(KeyboardInterrupt):
            train.train(gpt_cfg(), data_dir, root / "killed" / "gpt")
    harvest.harvest(harvest_cfg(), data_dir, root / "gpt", root / "activations")
    store = activations.open_store(root / "activations")
    with pytest.MonkeyPatch.context() as patch:
        record_batches(store, root / "sae_rows.json", patch)
        evaluation = sae_train.train(sae_cfg(), root / "activations", root / "sae")
    return {"root": root, "data": data_dir, "gpt": full, "sae": evaluation}


def cli_flags(run: Path) -> list[str]:
    return ["--run", str(run), "--preset", "smoke", "--device", "cpu", "--max-iters", "8", "--eval-interval", "4",
            "--n-embd", "16", "--batch-size", "8", "--sample-tokens", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two ranks share the machine's cores
    distributed.TIMEOUT = datetime.timedelta(seconds=120)  # a test that goes wrong fails soon
    distributed.init()


def scenarios(rank: int, port: int, root: Path, out: Path) -> None:
    """One rank of the spawned job: every scenario in turn, results under `out`."""
    join(rank, port)
    try:
        here = distributed.world()
        assert here == distributed.World(rank, WORLD, rank)
        data_dir = root / "run" / "data"
        train.train(gpt_cfg(), data_dir, out / "gpt")
        train.train(gpt_cfg(resume=True), data_dir, root / "killed" / "gpt")
        with pytest.raises(UserError, match="--batch-size 7 does not split evenly over 2 processes"):
            train.train(gpt_cfg(batch_size=7), data_dir, out / "refused")
        harvest.harvest(harvest_cfg(), data_dir, root / "gpt", out / "activations")
        sae_scenarios(here, root, out)
        command_line(root, out)
    finally:
        distributed.shutdown()


def sae_scenarios(here: distributed.World, root: Path, out: Path) -> None:
    store = activations.open_store(root / "activations")

    # One step on this rank's half of a global batch against one process on all of it.
    batch = store.take(np.arange(32), to_float32=True).tensor().clone()  # (32, 64)
    members = sae_train.build_sweep(sae_cfg(), store.dim, batch, 10, torch.device("cpu"))
    reference = sae_train.build_sweep(sae_cfg(), store.dim, batch, 10, torch.device("cpu"))
    half = batch[here.rank * 16:(here.rank + 1) * 16]
    for _ in range(3):
        sae_train.train_step(members[0], half, 1.0, 1e-2, 0.0, here)
        sae_train.train_step(reference[0], batch, 1.0, 1e-2, 0.0)
    torch.save({"ddp": members[0].sae.state_dict(), "single": reference[0].sae.state_dict()},
               out / f"step-rank{here.rank}.pt")

    with pytest.MonkeyPatch.context() as patch:
        record_batches(store, out / f"sae_rows-rank{here.rank}.json", patch)
        sae_train.train(sae_cfg(), root / "activations", out / "sae")

    real = sae_train.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        if args[6].step == 10:  # the TrainState: killed on every rank after the second checkpoint
            raise Interrupted

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sae_train, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            sae_train.train(sae_cfg(), root / "activations", out / "sae_resumed")
    sae_train.train(sae_cfg(resume=True), root / "activations", out / "sae_resumed")


def command_line(root: Path, out: Path) -> None:
    """`monofast gpt train` as torchrun starts it on each rank (RANK, WORLD_SIZE, ... set):
    rank 0 leads, rank 1 follows, and the process group is gone afterwards."""
    from monofast import cli

    if distributed.is_main():
        shutil.copytree(root / "run", out / "run")
    distributed.barrier()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert cli.main(["--", "gpt", "train", *cli_flags(out / "run")]) == 0
    (out / f"cli-stderr-rank{os.environ['RANK']}.txt").write_text(err.getvalue())
    assert distributed.world() == distributed.SINGLE


@pytest.fixture(scope="module")
def ranks(single, tmp_path_factory):
    """The folder of what the two ranks wrote."""
    out = tmp_path_factory.mktemp("ranks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads of two ranks on two cores: 5x slower
        torch.multiprocessing.start_processes(scenarios, args=(free_port(), single["root"], out), nprocs=WORLD,
                                              start_method="spawn")
    return out


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(records: list[dict]) -> list[float]:
    return [v for r in records for v in (r["train_loss"], r["val_loss"], *r["val_loss_by_source"].values())]


# ---------------------------------------------------------------------------------------
# GPT


def test_gpt_losses_match_one_process_for_the_same_global_batches(single, ranks):
    ddp = metrics(ranks / "gpt" / train.METRICS_FILE)
    one = single["gpt"].metrics
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [4, 8, 12]
    assert [r["lr"] for r in ddp] == [r["lr"] for r in one]
    np.testing.assert_allclose(losses(ddp), losses(one), rtol=1e-4)
    assert (ranks / "gpt" / weights.MODEL_FILE).is_file() and (ranks / "gpt" / train.CHECKPOINT_FILE).is_file()


def test_gpt_resumes_under_ddp_from_a_single_process_checkpoint(single, ranks):
    resumed = metrics(single["root"] / "killed" / "gpt" / train.METRICS_FILE)
    assert [r["step"] for r in resumed] == [4, 8, 12]
    np.testing.assert_allclose(losses(resumed), losses(single["gpt"].metrics), rtol=1e-4)


def test_rank_rows_split_the_global_batch_and_the_batch_must_divide():
    assert batches.rank_rows(8, distributed.World(1, 2, 1)) == slice(4, 8)
    assert batches.rank_rows(8, distributed.SINGLE) == slice(None)
    assert distributed.check_divides(6, "--batch-size") == distributed.SINGLE
    assert trainer.step_seed(gpt_cfg(), 7) == trainer.step_seed(gpt_cfg(), 7, rank=0) != trainer.step_seed(gpt_cfg(), 7, 1)


# ---------------------------------------------------------------------------------------
# Harvest


def test_harvest_by_rank_writes_the_single_process_store(single, ranks):
    one, two = activations.open_store(single["root"] / "activations"), activations.open_store(ranks / "activations")
    assert activations.verify(ranks / "activations") == activations.verify(single["root"] / "activations")
    assert two.index._replace(shards=[]) == one.index._replace(shards=[])
    assert [(s["file"], s["rows"]) for s in two.index.shards] == [(s["file"], s["rows"]) for s in one.index.shards]
    a, b = one.take(np.arange(one.rows)), two.take(np.arange(two.rows))
    for column in ("token_id", "source_id", "context_id", "position", "row"):
        np.testing.assert_array_equal(getattr(b, column), getattr(a, column), err_msg=column)
    np.testing.assert_allclose(b.activations, a.activations, rtol=1e-5, atol=1e-6)
    leftovers = [p.name for p in (ranks / "activations").iterdir() if p.name.startswith(("part-", "journal"))]
    assert leftovers == []


def test_harvest_shares_are_whole_shards_covering_every_row():
    for rows, per_shard, world in [(480, 48, 2), (481, 48, 3), (10, 48, 4), (96, 48, 2)]:
        shares = [harvest.share(rows, per_shard, r, world) for r in range(world)]
        assert shares[0].first_row == 0 and shares[-1].end_row == rows
        for a, b in zip(shares, shares[1:]):
            assert a.end_shard == b.first_shard and a.end_row == b.first_row
        assert all(s.first_row == min(s.first_shard * per_shard, rows) for s in shares)


# ---------------------------------------------------------------------------------------
# SAE


def test_sae_step_on_split_batches_equals_one_step_on_the_whole(ranks):
    for rank in range(WORLD):
        saved = torch.load(ranks / f"step-rank{rank}.pt")
        for key, value in saved["single"].items():
            torch.testing.assert_close(saved["ddp"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_sae_ranks_train_on_disjoint_rows_covering_the_single_process_rows(single, ranks):
    per_rank = [json.loads((ranks / f"sae_rows-rank{r}.json").read_text()) for r in range(WORLD)]
    one = json.loads((single["root"] / "sae_rows.json").read_text())
    assert [len(rows) for rows in per_rank] == [27 * 8] * WORLD and len(one) == 27 * 16
    store = activations.open_store(single["root"] / "activations")
    rows = store.take(np.arange(432), to_float32=True).activations
    names = row_names(store)
    training = Counter(names[row.tobytes()] for row in rows)  # rows [0, 432): the training rows
    # Every training row exactly once over the ranks, so none on both (counted, as rows with
    # equal values share a name).
    assert Counter(per_rank[0]) + Counter(per_rank[1]) == Counter(one) == training


def test_sae_losses_match_one_process_within_tolerance(single, ranks):
    ddp = json.loads((ranks / "sae" / sae_train.EVAL_FILE).read_text())
    one = single["sae"]
    assert ddp["rows"] == one["rows"] == 48
    for key in ("mse", "l0"):
        a, b = ddp["saes"]["l1_1"][key], one["saes"]["l1_1"][key]
        assert a == pytest.approx(b, rel=0.25), key  # other rows in each batch: close, not equal
    logged = metrics(ranks / "sae" / sae_train.METRICS_FILE)
    assert [r["step"] for r in logged] == [r["step"] for r in metrics(single["root"] / "sae" / "metrics.jsonl")]


def test_sae_resumes_under_ddp_exactly(ranks):
    whole = json.loads((ranks / "sae" / sae_train.EVAL_FILE).read_text())
    resumed = json.loads((ranks / "sae_resumed" / sae_train.EVAL_FILE).read_text())
    assert resumed == whole
    assert not (ranks / "sae_resumed" / sae_train.CHECKPOINT_FILE).exists()


# ---------------------------------------------------------------------------------------
# The command line under torchrun


def test_the_command_line_under_torchrun_trains_on_both_ranks_and_rank_0_writes(single, ranks):
    run = ranks / "run"
    assert (run / "gpt" / "manifest.json").is_file()
    ddp, one = metrics(run / "gpt" / train.METRICS_FILE), metrics(single["root"] / "cli" / "gpt" / train.METRICS_FILE)
    assert [r["step"] for r in ddp] == [4, 8]
    np.testing.assert_allclose(losses(ddp), losses(one), rtol=1e-4)
    logs = [(ranks / f"cli-stderr-rank{r}.txt").read_text() for r in range(WORLD)]
    assert "gpt: step 8:" in logs[0] and "gpt: done in" in logs[0]
    assert logs[1] == ""  # the follower neither logs nor shows progress


def test_torchrun_passes_the_command_after_a_double_dash():
    """`torchrun ... -m monofast -- gpt train --run DIR`: without the `--`, torchrun's own
    parser takes `--run` for an abbreviation of its `--run-path` and refuses it."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(["--standalone", "--nproc_per_node=2", "-m", "monofast", "--", "gpt",
                                         "train", "--run", "runs/x"])
    assert (args.module, args.training_script) == (True, "monofast")
    assert args.training_script_args == ["gpt", "train", "--run", "runs/x"]
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        get_args_parser().parse_args(["--nproc_per_node=2", "-m", "monofast", "gpt", "train", "--run", "runs/x"])
    assert subprocess.run([sys.executable, "-m", "monofast", "--", "--version"], capture_output=True,
                          text=True).stdout.startswith("monofast ")


def test_without_torchrun_nothing_is_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and distributed.join(lambda *stage: None) is None
    assert distributed.world() == distributed.SINGLE and distributed.mean([1.5]) == [1.5]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="torchrun --nproc_per_node"):
        distributed.init()
