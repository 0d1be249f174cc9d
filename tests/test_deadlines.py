"""Work past its deadline is dropped or stopped, work that cannot finish in time is refused,
and a call that outlives every deadline makes the replica unhealthy. A real tiny pipeline."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from workers.batching import BatchExecutor, CostModel
from workers.config import ModelConfig
from workers.deadlines import Admission, SpeedModel, measure_speed
from workers.jobs import ImageJob
from workers.memory import CpuProbe
from workers.pipeline import PipelineRunner


def job(name, *, steps=2, size=64, deadline=None):
    return ImageJob(name, 0, "a red fox", 7, size, size, steps=steps, deadline=deadline)


class CountingRunner:
    """The real pipeline runner, counting the denoising steps it ran (through `on_step`)."""

    def __init__(self, runner):
        self.runner = runner
        self.device = runner.device
        self.steps = 0

    def call(self, jobs, on_step=None):
        def counted(pipeline, step, timestep, kwargs):
            self.steps += 1
            return on_step(pipeline, step, timestep, kwargs) if on_step else kwargs

        return self.runner.call(jobs, counted)


@pytest.fixture(scope="module")
def runner(tiny_models):
    model = ModelConfig(pipeline=str(tiny_models["incumbent"]), steps=2)
    return PipelineRunner(model, Path("/"))


def executor_for(runner, step_delay=0.0):
    speed = SpeedModel(default_steps=2)
    counting = CountingRunner(runner)
    executor = BatchExecutor(
        counting, CpuProbe(), CostModel(1.0), 3, speed, step_delay=lambda: step_delay
    )
    return executor, counting, speed


def test_a_job_whose_deadline_passed_in_the_queue_is_dropped_unstarted(runner):
    executor, counting, _ = executor_for(runner)
    late, fresh = job("late", deadline=time.time() - 1), job("fresh", deadline=time.time() + 60)
    outcomes = executor.render([late, fresh])
    assert [o.status for o in outcomes] == ["timeout", "ok"]
    assert "dropped unstarted" in outcomes[0].error
    assert counting.steps == 2  # only the fresh job was sampled (one call of two steps)


def test_a_running_call_stops_between_steps_once_every_caller_has_given_up(runner):
    """A slow device (0.2 s a step) and 40 steps: 8 s of sampling for a caller who waits 0.5 s.
    The call stops at the first step boundary past the deadline, and the next job runs at once."""
    executor, counting, _ = executor_for(runner, step_delay=0.2)
    started = time.monotonic()
    [outcome] = executor.render([job("big", steps=40, deadline=time.time() + 0.5)])
    stopped_after = time.monotonic() - started
    assert outcome.status == "timeout" and "stopped after step" in outcome.error
    assert counting.steps < 10 and stopped_after < 3.0, (counting.steps, stopped_after)
    executor.step_delay = lambda: 0.0
    [after] = executor.render([job("small", deadline=time.time() + 60)])
    assert after.status == "ok"
    # A call keeps running while any caller still waits: "a" expires mid-call, "b" does not.
    executor.step_delay = lambda: 0.05
    both = [
        job("a", steps=12, deadline=time.time() + 0.3),
        job("b", steps=12, deadline=time.time() + 60),
    ]
    assert [o.status for o in executor.render(both)] == ["ok", "ok"]


def test_step_times_are_measured_and_extrapolated_without_overstating():
    """Per-step time grows faster than pixels at large sizes (attention), and is flat at tiny
    ones (fixed overheads): a bound drawn from smaller sizes must never exceed the truth."""
    speed = SpeedModel(default_steps=10)
    assert speed.estimate(job("x", size=64)) is None  # nothing measured: admit, the steps bound it
    speed.observe_step(64 * 64, 0.02)
    assert speed.estimate(job("x", steps=10, size=64)) == pytest.approx(0.2)
    # One size measured: a larger one is at least as slow per step, never assumed slower.
    assert speed.seconds_per_step(512 * 512) == pytest.approx(0.02)
    speed.observe_step(128 * 128, 0.08)
    # Two sizes: the line through them, which true (convex) step times stay above.
    line = 0.08 + (0.08 - 0.02) / (128 * 128 - 64 * 64) * (256 * 256 - 128 * 128)
    assert speed.seconds_per_step(256 * 256) == pytest.approx(line)
    assert speed.seconds_per_step(32 * 32) is None  # below every measurement: no bound


def test_admission_refuses_what_the_measured_steps_say_cannot_finish(runner):
    speed = SpeedModel(default_steps=2)
    measure_speed(runner, speed, [64, 128])
    assert set(speed.step_seconds) == {64 * 64, 128 * 128}
    admission = Admission(speed)
    per_step = speed.seconds_per_step(256 * 256)
    steps = 50
    tight = job("big", steps=steps, size=256, deadline=time.time() + per_step * steps / 2)
    refusal = admission.refusal(tight)
    assert refusal is not None and "256x256 at 50 steps needs about" in refusal
    assert "smaller size or fewer steps" in refusal
    roomy = job("big", steps=steps, size=256, deadline=time.time() + per_step * steps * 4 + 5)
    assert admission.refusal(roomy) is None
    # Fits alone, but not behind the work this replica already admitted.
    admission.backlog_s = per_step * steps * 4 + 10
    assert "overloaded" in admission.refusal(roomy)
    admission.finished(admission.backlog_s)
    assert admission.backlog_s == 0.0
    # A running call teaches the speed of its own size, stopped or not.
    executor, _, learned = executor_for(runner)
    executor.render([job("warm", size=64, steps=3, deadline=time.time() + 60)])
    assert learned.step_seconds.get(64 * 64, 0) > 0


def test_a_call_running_long_past_every_deadline_fails_the_health_check(runner):
    executor, _, _ = executor_for(runner, step_delay=1.0)
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (
            executor.render([job("x", steps=3, deadline=time.time() + 0.05)]),
            done.set(),
        )
    )
    thread.start()
    deadline = time.monotonic() + 10
    while executor.running_deadline is None and time.monotonic() < deadline:
        time.sleep(0.01)
    seen = executor.running_deadline
    assert seen is not None
    assert executor.health_problem(wedged_after=60) is None
    problem = executor.health_problem(wedged_after=30, now=seen + 31)
    assert problem is not None and "did not stop between steps" in problem
    thread.join(10)
    assert done.is_set() and executor.health_problem(wedged_after=30, now=seen + 31) is None
