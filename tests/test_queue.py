"""The run queue: runs start one after another, each in its own folder; a stop ends only the running one."""
from __future__ import annotations

import threading
import time

from core.config import TrainConfig
from core.events import RunContext
from core.job import Job
from core.queue import RunQueue


def held_runs(gates: dict[str, threading.Event], order: list[str]):
    """A `start` for the queue whose runs last until their gate opens (or they are stopped)."""

    def start(job: Job, cfg: TrainConfig) -> None:
        def target(ctx: RunContext) -> None:
            order.append(cfg.output_dir)
            gate = gates.setdefault(cfg.output_dir, threading.Event())
            while not gate.wait(0.02):
                if ctx.should_stop():
                    return

        job.run(target, kind="train", name=cfg.name)

    return start


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def states(queue: RunQueue) -> list[str]:
    return [e.state for e in queue.entries()]


def test_queued_runs_start_one_after_another_and_a_queued_one_can_be_removed():
    gates: dict[str, threading.Event] = {}
    order: list[str] = []
    job = Job()
    queue = RunQueue(job, held_runs(gates, order))
    first = queue.add(TrainConfig(output_dir="./output/a"))
    second = queue.add(TrainConfig(output_dir="./output/b"))
    third = queue.add(TrainConfig(output_dir="./output/c"))
    wait_until(lambda: states(queue)[0] == "running")
    assert states(queue) == ["running", "queued", "queued"] and order == ["./output/a"]
    assert queue.remove(third.id) and not queue.remove(first.id)  # the running one is stopped, not removed
    gates.setdefault("./output/a", threading.Event()).set()
    wait_until(lambda: states(queue) == ["done", "running"])
    assert order == ["./output/a", "./output/b"]
    gates.setdefault("./output/b", threading.Event()).set()
    assert queue.wait(10)
    assert states(queue) == ["done", "done"] and [e.id for e in queue.entries()] == [first.id, second.id]


def test_the_same_config_queued_twice_gets_its_own_output_folder():
    job = Job()
    gates: dict[str, threading.Event] = {}
    queue = RunQueue(job, held_runs(gates, []))
    queue.close()  # nothing starts: only the folders are looked at
    one = queue.add(TrainConfig(output_dir="./output/cats", output_name="cats"))
    two = queue.add(TrainConfig(output_dir="./output/cats", output_name="cats"))
    three = queue.add(TrainConfig(output_dir="./output/cats/"))
    assert [one.output_dir, two.output_dir, three.output_dir] == ["./output/cats", "./output/cats-2", "./output/cats-3"]
    assert two.config.name == "cats-2"


def test_a_queued_run_waits_for_a_job_started_by_hand():
    gates: dict[str, threading.Event] = {}
    order: list[str] = []
    job = Job()
    manual = threading.Event()
    job.run(lambda ctx: manual.wait(10), kind="train", name="by hand")
    queue = RunQueue(job, held_runs(gates, order))
    queue.add(TrainConfig(output_dir="./output/later"))
    time.sleep(0.3)
    assert states(queue) == ["queued"] and order == []
    manual.set()
    wait_until(lambda: order == ["./output/later"])
    gates.setdefault("./output/later", threading.Event()).set()
    assert queue.wait(10) and states(queue) == ["done"]


def test_two_tiny_sd_runs_train_in_turn_and_stopping_the_first_does_not_cancel_the_second(
        tmp_path, tiny_sd1, sd_image_folder):
    from core.presets import resolve_config
    from tests.fixtures.tiny_sd import tiny_run_config

    job = Job()
    ended: dict[str, float] = {}

    def stop_the_first(event) -> None:
        snap = job.snapshot()
        if event.kind == "progress" and snap.name == "first" and snap.state == "running":
            job.stop()
        if event.kind == "done":
            ended[snap.name] = event.time

    job.subscribe(stop_the_first)
    queue = RunQueue(job)
    configs = [resolve_config(tiny_run_config(tiny_sd1.folder, sd_image_folder, tmp_path / name, output_name=name,
                                              max_train_steps=3)) for name in ("first", "second")]
    entries = [queue.add(cfg) for cfg in configs]
    assert queue.wait(600)
    first, second = queue.entries()
    assert [first.state, second.state] == ["stopped", "done"], (first.message, second.message)
    assert second.output.endswith("second.safetensors") and (tmp_path / "second" / "second.safetensors").is_file()
    assert first.output_dir != second.output_dir and [e.id for e in entries] == [first.id, second.id]
    # The second began only after the first had ended.
    assert job.snapshot().name == "second" and job.snapshot().started_at >= ended["first"]
