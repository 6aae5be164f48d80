"""The CUDA-graph training step and the pinned-memory feeder: where they apply, and (on a
machine with CUDA) that they compute exactly what the ordinary paths compute.

The CUDA cases are skipped without a GPU; `benches/gpu_check.py` runs the same comparisons
on a CUDA machine at real sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monofast.activations import store as activations
from monofast.sae import graph as sae_graph
from monofast.sae import train as sae_train
from monofast.sae.config import SAETrainConfig
from safetensors.torch import load_file

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("enabled,variant,device,world,expected", [
    (True, "anthropic2023", "cuda", 1, None),
    (True, "april2024", "cuda", 1, None),
    (False, "anthropic2023", "cuda", 1, "turned off"),
    (True, "anthropic2023", "cpu", 1, "CUDA devices"),
    (True, "anthropic2023", "cuda", 2, "several processes"),
    (True, "topk", "cuda", 1, "data-dependent"),
])
def test_graphs_apply_to_fixed_shape_steps_on_one_cuda_device(enabled, variant, device, world, expected):
    reason = sae_graph.unavailable(enabled, variant, torch.device(device), world)
    assert (reason is None) == (expected is None)
    if expected is not None:
        assert expected in reason


def test_describe_reports_whether_steps_were_graphed():
    assert sae_graph.describe(None) == {"cuda_graph": False}


def test_the_feeder_is_a_plain_copy_off_cuda():
    feed = activations.DeviceFeeder("cpu")
    x = torch.randn(5, 3)
    assert torch.equal(feed(x), x)


def _store(folder, rows=2000, dim=32):
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((48, dim)).astype(np.float32)
    codes = np.zeros((rows, 48), np.float32)
    for r in range(rows):
        codes[r, rng.choice(48, 3, replace=False)] = rng.uniform(0.5, 2.0, 3)
    values = codes @ atoms
    r = np.arange(rows)
    with activations.ActivationWriter(folder, dim, "fp32") as writer:
        writer.append(values, r % 50, r % 2, r // 10, r % 10)
        writer.finish()
    return folder


@cuda
@pytest.mark.parametrize("variant", ["anthropic2023", "april2024"])
def test_graph_replays_train_the_same_weights_as_eager_steps(tmp_path, variant):
    store = _store(tmp_path / "acts")
    weights = {}
    for graphs in (True, False):
        cfg = SAETrainConfig(variant=variant, expansion=2, batch_size=128, l1_coeff=(1.0, 3.0),
                             device="cuda", cuda_graphs=graphs, held_out=200, log_every=5, resample_every=4)
        out = tmp_path / f"sae_{graphs}"
        evaluation = sae_train.train(cfg, store, out)
        assert evaluation["training"]["cuda_graph"] is graphs  # replays really ran (or were off)
        weights[graphs] = load_file(str(out / "sae_weights.safetensors"))
    for name, eager in weights[False].items():
        torch.testing.assert_close(weights[True][name], eager, rtol=1e-5, atol=1e-6)


@cuda
def test_the_feeder_keeps_every_batch_intact_on_the_device():
    feed = activations.DeviceFeeder("cuda", depth=2)
    batches = [torch.randn(64, 16) for _ in range(7)]
    fed = [feed(b) for b in batches]  # all kept: the ring must not overwrite what was sent
    for host, device in zip(batches, fed):
        assert torch.equal(device.cpu(), host)
