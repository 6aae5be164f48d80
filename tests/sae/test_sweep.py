"""The sweep and its step (monofast.sae.sweep): schedules."""

from __future__ import annotations

import pytest
from monofast.sae import sweep


def test_schedules_warm_up_lambda_and_decay_lr(small):
    cfg = small(variant="april2024", lr=1.0)
    assert sweep.schedules(cfg, 0, 100) == (pytest.approx(1 / 5), 1.0)
    assert sweep.schedules(cfg, 50, 100) == (1.0, 1.0)
    assert sweep.schedules(cfg, 90, 100)[1] == pytest.approx(0.5)
    assert sweep.schedules(small(lr=1.0), 99, 100) == (1.0, 1.0)  # anthropic2023: neither
