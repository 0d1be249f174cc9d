"""The batch wait: none for a lone request, some only while more work is known to be coming."""

from __future__ import annotations

import pytest

from workers.batch_wait import SIBLING_TTL, BatchWait
from workers.jobs import ImageJob


def job(request_id: str, index: int = 0, images: int = 1) -> ImageJob:
    return ImageJob(request_id, index, "a fox", 1, 64, 64, images=images)


def test_a_lone_request_never_waits():
    wait = BatchWait(0.01)
    assert wait.arrived(job("a"), 0.0) == 0.0
    # One request a second (a quiet service): each goes at once.
    assert [wait.arrived(job(f"r{k}"), 1.0 + k) for k in range(5)] == [0.0] * 5


def test_while_requests_arrive_faster_than_the_wait_it_waits_about_two_gaps():
    wait = BatchWait(0.01)
    waits = [wait.arrived(job(f"r{k}"), k * 0.002) for k in range(10)]
    assert waits[:2] == [0.0, 0.0]  # not enough seen yet to call it a stream
    assert waits[-1] == pytest.approx(0.004)
    # ... and the stream stops: the next request, after a quiet spell, goes at once.
    assert wait.arrived(job("late"), 1.0) == 0.0


def test_arrivals_slower_than_the_wait_never_wait():
    wait = BatchWait(0.01)
    assert {wait.arrived(job(f"r{k}"), k * 0.05) for k in range(10)} == {0.0}


def test_the_other_images_of_a_request_are_waited_for_until_they_are_in():
    wait = BatchWait(0.01)
    assert wait.arrived(job("a", 0, images=3), 5.0) == 0.01
    assert wait.arrived(job("a", 1, images=3), 5.0001) == 0.01
    assert wait.arrived(job("a", 2, images=3), 5.0002) < 0.01  # the last one: none to come
    assert wait.arrived(job("b"), 9.0) == 0.0


def test_a_sibling_that_never_comes_stops_being_waited_for():
    wait = BatchWait(0.01)
    assert wait.arrived(job("a", 0, images=2), 0.0) == 0.01
    assert wait.arrived(job("b"), SIBLING_TTL + 0.5) == 0.0


def test_a_zero_limit_never_waits():
    wait = BatchWait(0.0)
    assert wait.arrived(job("a", 0, images=4), 0.0) == 0.0
