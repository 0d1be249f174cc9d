"""The sticky split and mirror sampling, over thousands of synthetic users."""

from __future__ import annotations

import pytest

from controller.serving.routing import is_mirrored, primary_role
from controller.serving.traffic import RoutingTable
from policies.vocabulary import Arm

CANDIDATE, INCUMBENT = Arm.CANDIDATE, Arm.INCUMBENT

USERS = [f"user-{i}" for i in range(2000)]


def table(weight, mirror=100.0, rollout="swap"):
    return RoutingTable(
        rollout=rollout,
        state="canary",
        stage=str(weight),
        version=1,
        candidate_weight=weight,
        mirror_percent=mirror,
        route="generate",
        incumbent="sd",
        candidate="sd-next",
    )


def share(weight, users=USERS):
    return sum(primary_role(table(weight), u) == CANDIDATE for u in users) / len(users)


def test_weight_zero_sends_nobody_to_the_candidate():
    assert share(0) == 0


def test_weight_hundred_sends_everybody_to_the_candidate():
    assert share(100) == 1


@pytest.mark.parametrize("weight", [10, 30, 60])
def test_share_within_three_points_of_the_weight(weight):
    assert abs(share(weight) - weight / 100) <= 0.03


def test_each_user_stays_on_one_side_within_a_stage():
    first = [primary_role(table(30), u) for u in USERS]
    for _ in range(3):
        assert [primary_role(table(30), u) for u in USERS] == first


def test_users_on_the_candidate_stay_there_as_the_weight_grows():
    for low, high in ((10, 30), (30, 60), (60, 100)):
        on_low = {u for u in USERS if primary_role(table(low), u) == CANDIDATE}
        on_high = {u for u in USERS if primary_role(table(high), u) == CANDIDATE}
        assert on_low <= on_high


def test_different_rollouts_bucket_users_independently():
    a = {u for u in USERS if primary_role(table(30, rollout="a"), u) == CANDIDATE}
    b = {u for u in USERS if primary_role(table(30, rollout="b"), u) == CANDIDATE}
    assert a != b


@pytest.mark.parametrize("mirror", [0.0, 25.0, 100.0])
def test_mirror_percent_is_respected(mirror):
    mirrored = sum(is_mirrored(table(10, mirror), f"req-{i}") for i in range(2000)) / 2000
    assert abs(mirrored - mirror / 100) <= 0.03


def test_incumbent_is_the_default_side():
    assert primary_role(table(0), "anyone") == INCUMBENT
