"""Time and disk estimates: the model's sizes against what a smoke run really wrote, and
its behaviour as the sizes change."""

from __future__ import annotations

import pytest
from monofast.run import estimate, presets
from monofast.run.resolve import resolve_config
from monofast.run.stages import STAGES

CPU = estimate.Device("cpu", "CPU", 500.0, measured=False)


def configs(preset: str, **overrides: dict) -> dict:
    return {s.name: resolve_config(s, preset, overrides.get(s.name, {})) for s in STAGES}


def test_every_preset_gets_every_stage():
    for name in presets.names():
        got = estimate.estimate(configs(name), CPU)
        assert list(got) == [s.name for s in STAGES]
        assert all(e.seconds > 0 and e.disk_bytes > 0 for e in got.values())


def test_bigger_presets_cost_more():
    total = {name: sum(e.seconds for e in estimate.estimate(configs(name), CPU).values())
             for name in presets.names()}
    assert total["smoke"] < 60 < total["quick"] < total["laptop"]


def test_activation_disk_is_rows_times_dim_times_dtype():
    f32 = estimate.estimate(configs("quick"), CPU)["activations"].disk_bytes
    bf16 = estimate.estimate(configs("quick", activations={"dtype": "bf16"}), CPU)["activations"].disk_bytes
    rows, dim = 2_500 * 120, 512
    assert f32 == pytest.approx(rows * (dim * 4 + 13), rel=0.01)
    assert bf16 == pytest.approx(rows * (dim * 2 + 13), rel=0.01)


def test_time_scales_with_steps_and_the_device_rate():
    base = estimate.estimate(configs("quick"), CPU)["gpt"].seconds
    longer = estimate.estimate(configs("quick", gpt={"max_iters": 3000}), CPU)["gpt"].seconds
    faster = estimate.estimate(configs("quick"), CPU._replace(gflops=1000.0))["gpt"].seconds
    assert longer == pytest.approx(2 * base, rel=0.1)
    assert faster < 0.6 * base


def laptop_sae_seconds(device: estimate.Device = CPU, **sae) -> float:
    return estimate.estimate(configs("laptop", sae=sae), device)["sae"].seconds


def test_the_sparse_step_counts_two_products_once_the_sae_is_sparse():
    """An L1 SAE trains dense for its first steps, then at two products of five a step."""
    sae_seconds = laptop_sae_seconds
    dense, auto, on = (sae_seconds(sparse_step=m) for m in ("off", "auto", "on"))
    assert on < auto < dense
    steps = 1_446  # ceil(1,480,000 / 1,024): one pass over the laptop store, less the held-out rows
    assert (dense - on) / (dense - auto) == pytest.approx(steps / (steps - estimate.SAE_DENSE_STEPS), rel=0.01)
    assert sae_seconds(sparse_step="on", l1_coeff=[2.5]) < 0.55 * on  # one member of two
    topk = {m: sae_seconds(variant="topk", k=[32, 64], sparse_step=m) for m in ("off", "auto", "on")}
    assert topk["off"] == topk["auto"] == topk["on"]  # three products a step, whatever the mode
    assert 0.6 * dense < topk["off"] < 0.7 * dense  # plus the same CE pass


def test_a_graphed_sae_step_on_cuda_stays_dense():
    gpu = estimate.Device("cuda", "GPU", 500.0, measured=False)
    graphed = laptop_sae_seconds(gpu, cuda_graphs=True)
    assert graphed == laptop_sae_seconds(gpu, cuda_graphs=True, sparse_step="off")
    assert laptop_sae_seconds(gpu, cuda_graphs=False) < 0.6 * graphed


def test_a_bf16_rate_on_the_cpu_is_discounted():
    """A CPU whose best rate is bf16 reaches a smaller share of it: the same rate labelled
    bf16 gives longer compute stages, and the per-item stages do not change."""
    fp32 = estimate.estimate(configs("quick"), CPU)
    bf16 = estimate.estimate(configs("quick"), CPU._replace(precision="bf16"))
    for stage in ("gpt", "activations", "sae", "analysis"):
        assert bf16[stage].seconds > fp32[stage].seconds, stage  # each has a product part
    assert bf16["gpt"].seconds > 1.5 * fp32["gpt"].seconds
    assert bf16["data"].seconds == fp32["data"].seconds and bf16["site"].seconds == fp32["site"].seconds
    gpu = estimate.Device("cuda", "GPU", 500.0, measured=False)
    assert estimate.estimate(configs("quick"), gpu)["gpt"].seconds == pytest.approx(
        estimate.estimate(configs("quick"), gpu._replace(precision="bf16"))["gpt"].seconds)


def test_sizes_match_a_smoke_run(smoke_run):
    """Within a factor of 1.5 of the bytes the smoke run really wrote, stage by stage."""
    cfgs = {s.name: resolve_config(s, "smoke") for s in STAGES}
    got = estimate.estimate(cfgs, CPU)
    for stage in STAGES:
        if stage.extra:
            continue
        real = sum(p.stat().st_size for p in (smoke_run.run / stage.name).rglob("*") if p.is_file())
        assert real / 1.5 < got[stage.name].disk_bytes < real * 1.5, stage.name


def test_sizes_of_the_findings_match_a_smoke_run(smoke_findings):
    """The same for the stages of the findings (the site is measured without them)."""
    cfgs = {s.name: resolve_config(s, "smoke") for s in STAGES}
    got = estimate.estimate(cfgs, CPU)
    for stage in STAGES:
        if stage.extra:
            real = sum(p.stat().st_size for p in (smoke_findings.run / stage.name).rglob("*") if p.is_file())
            assert real / 2 < got[stage.name].disk_bytes < real * 2, stage.name


def test_measured_device():
    device = estimate.measure_device("cpu")
    assert device.kind == "cpu" and device.measured and device.gflops > 1


@pytest.mark.parametrize("seconds, text", [(3.2, "3 s"), (125, "2 min 05 s"), (3720, "1 h 02 min")])
def test_duration(seconds, text):
    assert estimate.duration(seconds) == text


@pytest.mark.parametrize("nbytes, text", [(999, "999 B"), (1_234_000, "1.2 MB"), (630e6, "630 MB"),
                                          (4.3e9, "4.3 GB")])
def test_size(nbytes, text):
    assert estimate.size(nbytes) == text
