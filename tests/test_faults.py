"""Fault injection decisions: off by default, per request reproducible, rates as configured."""

from __future__ import annotations

import numpy as np

from workers.config import FaultConfig
from workers.faults import FaultPlan, apply_tint, plan_for

IDS = [f"req-{i}:0" for i in range(4000)]


def test_off_by_default():
    assert not FaultConfig().active
    assert all(plan_for(FaultConfig(), i) == FaultPlan() for i in IDS[:100])


def test_rates_match_the_configuration():
    faults = FaultConfig(
        error_percent=20, oom_percent=5, timeout_percent=10, delay=0.5, delay_percent=50
    )
    plans = [plan_for(faults, i) for i in IDS]
    assert abs(sum(p.error for p in plans) / len(plans) - 0.20) < 0.03
    assert abs(sum(p.oom for p in plans) / len(plans) - 0.05) < 0.02
    assert abs(sum(p.hang for p in plans) / len(plans) - 0.10) < 0.02
    delays = [p.delay_s for p in plans]
    assert set(delays) == {0.0, 0.5} and abs(delays.count(0.5) / len(plans) - 0.5) < 0.03


def test_same_request_same_plan():
    faults = FaultConfig(error_percent=50)
    assert [plan_for(faults, i) for i in IDS[:200]] == [plan_for(faults, i) for i in IDS[:200]]


def test_hundred_percent_means_every_request():
    faults = FaultConfig(error_percent=100, delay=5)
    assert all(p.error and p.delay_s == 5 for p in (plan_for(faults, i) for i in IDS[:500]))


def test_tint_shifts_channels_and_clips():
    image = np.array([[[10, 250, 128]]], dtype=np.uint8)
    assert apply_tint(image, (30, 30, -200)).tolist() == [[[40, 255, 0]]]
    assert apply_tint(image, None) is image
