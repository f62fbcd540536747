"""The Job runs work in the background, refuses a second start and stops on request."""
import time

import pytest

from core.events import ProgressEvent, StopRequested
from core.job import Job, JobBusyError


def _slow_task(ctx):
    for step in range(1, 1000):
        if ctx.should_stop():
            ctx.log("saved checkpoint")
            raise StopRequested
        ctx.emit(ProgressEvent(step=step, total=1000, loss=1.0 / step))
        time.sleep(0.01)


def test_second_start_is_refused_and_stop_ends_the_run():
    job, other = Job(), Job()
    job.run(_slow_task, kind="train", name="first")
    try:
        with pytest.raises(JobBusyError, match="already running"):
            other.run(_slow_task)
        time.sleep(0.1)
        assert job.snapshot().progress.step >= 1
    finally:
        assert job.stop()
    snap = job.wait(10)
    assert snap.state == "stopped"
    assert any("saved checkpoint" in line for line in snap.log)
    other.run(lambda ctx: None)  # free again
    assert other.wait(5).state == "done"


def test_a_failure_becomes_an_error_event_with_advice():
    job = Job()

    def boom(ctx):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")

    job.run(boom)
    snap = job.wait(5)
    assert snap.state == "failed"
    assert "batch_size" in snap.error.advice


def test_a_broken_listener_never_kills_the_run():
    job = Job()
    job.subscribe(lambda event: 1 / 0)
    job.run(lambda ctx: ctx.emit(ProgressEvent(step=1, total=1, loss=0.5)))
    snap = job.wait(5)
    assert snap.state == "done" and snap.progress.step == 1
