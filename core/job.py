"""Job: runs one training (or captioning) in a background thread and keeps a snapshot.

One job at a time per process: a second start is refused with a clear message. The
GUI polls `snapshot()`, so closing and reopening the browser tab loses nothing and two
windows see the same job. `stop()` asks the run to finish its current step, save a
checkpoint and end.
"""
from __future__ import annotations

import errno
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from core.devices import is_out_of_memory
from core.events import (CheckpointEvent, DoneEvent, ErrorEvent, EvalEvent, Event, Listener, LogEvent,
                         ProgressEvent, RunContext, SampleEvent, StopRequested, WarningEvent)

# Shared by every Job in the process: the GPU (or the CPU) runs one job at a time.
_RUN_LOCK = threading.Lock()
_CURRENT: Job | None = None


class JobBusyError(RuntimeError):
    """A job is already running."""


@dataclass
class JobSnapshot:
    """Everything a UI needs to draw the job's state; plain data, safe to copy."""

    state: str = "idle"  # idle | running | stopping | done | stopped | failed
    kind: str = ""
    name: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    progress: ProgressEvent | None = None
    # (step, loss, smoothed, lr, validation loss or None)
    losses: list[tuple[int, float, float | None, float | None, float | None]] = field(default_factory=list)
    samples: list[SampleEvent] = field(default_factory=list)
    checkpoints: list[CheckpointEvent] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    warnings: list[WarningEvent] = field(default_factory=list)
    error: ErrorEvent | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    rewards: list[tuple[int, float]] = field(default_factory=list)  # GRPO: (step, mean reward of its samples)
    evaluation: EvalEvent | None = None  # a text run's latest scores before/after (core.text_eval)

    @property
    def running(self) -> bool:
        return self.state in ("running", "stopping")


def friendly_error(exc: BaseException) -> ErrorEvent:
    """Turn an exception into an ErrorEvent with advice; engines may attach `.advice`."""
    advice = getattr(exc, "advice", "")
    message = str(exc) or type(exc).__name__
    if not advice and isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" ({exc.filename})" if exc.filename else ""
        advice = (f"The disk is full{where}. Free some space; the files saved before are untouched. "
                  "Then run again with resume_from: latest to continue from the last checkpoint.")
    if not advice and is_out_of_memory(exc):
        advice = ("Lower batch_size or resolution, turn on gradient_checkpointing, use mixed_precision "
                  "fp16/bf16, or choose a smaller preset.")
    return ErrorEvent(message=message, advice=advice, error_type=type(exc).__name__)


class Job:
    """A background task with events and a snapshot. Reusable: start again after it ends."""

    LOG_LINES = 500

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ctx: RunContext | None = None
        self._snapshot = JobSnapshot()
        self._listeners: list[Listener] = []
        self._log: deque[str] = deque(maxlen=self.LOG_LINES)
        self.result: Any = None

    # -- control -------------------------------------------------------------------------
    def start(self, config: Any, plan: Any = None) -> None:
        """Start training `config` (a TrainConfig) in the background.

        `plan` (core.launch.LaunchPlan) with several devices (or one other than the first GPU): the
        run is launched as that many processes through Accelerate and followed from here
        (core.launch.run_launched)."""
        from core.train import run_training

        if plan is not None and plan.launched:
            from core.launch import run_launched

            self.run(lambda ctx: run_launched(config, ctx, plan), kind="train", name=getattr(config, "name", ""))
            return
        self.run(lambda ctx: run_training(config, ctx), kind="train", name=getattr(config, "name", ""))

    def run(self, target: Callable[[RunContext], Any], *, kind: str = "task", name: str = "") -> None:
        """Run `target(ctx)` in a background thread. Refused while any job is running."""
        global _CURRENT
        if not _RUN_LOCK.acquire(blocking=False):
            busy = _CURRENT.snapshot().name if _CURRENT else ""
            raise JobBusyError(f"A job is already running{f' ({busy})' if busy else ''}. Stop it or "
                               "wait for it to finish before starting another.")
        _CURRENT = self
        ctx = RunContext(listeners=[self._record, *self._listeners])
        with self._lock:
            self._ctx = ctx
            self._log.clear()
            self._snapshot = JobSnapshot(state="running", kind=kind, name=name, started_at=time.time())
            self.result = None
        self._thread = threading.Thread(target=self._main, args=(target, ctx), name=f"lora-{kind}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Ask the running task to save and end after its current step. False if none runs."""
        with self._lock:
            if self._ctx is None or not self._snapshot.running:
                return False
            self._ctx.stop_flag.set()
            self._snapshot.state = "stopping"
            self._log.append("Stop requested: finishing the current step and saving a checkpoint.")
        return True

    def wait(self, timeout: float | None = None) -> JobSnapshot:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.snapshot()

    def subscribe(self, listener: Listener) -> None:
        """Also send future events to `listener` (called in the worker thread)."""
        self._listeners.append(listener)
        if self._ctx is not None:
            self._ctx.listeners.append(listener)

    # -- state -----------------------------------------------------------------------------
    def snapshot(self) -> JobSnapshot:
        with self._lock:
            snap = self._snapshot
            return JobSnapshot(state=snap.state, kind=snap.kind, name=snap.name, started_at=snap.started_at,
                               finished_at=snap.finished_at, progress=snap.progress,
                               losses=list(snap.losses), samples=list(snap.samples),
                               checkpoints=list(snap.checkpoints), log=list(self._log),
                               warnings=list(snap.warnings), error=snap.error, outputs=dict(snap.outputs),
                               evaluation=snap.evaluation, rewards=list(snap.rewards))

    @property
    def running(self) -> bool:
        return self.snapshot().running

    # -- internals ---------------------------------------------------------------------------
    def _record(self, event: Event) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
        with self._lock:
            snap = self._snapshot
            if isinstance(event, ProgressEvent):
                snap.progress = event
                if event.loss is not None:
                    snap.losses.append((event.step, event.loss, event.smoothed_loss, event.lr,
                                        event.validation_loss))
                if "reward/mean" in event.scalars:
                    snap.rewards.append((event.step, event.scalars["reward/mean"]))
            elif isinstance(event, SampleEvent):
                snap.samples.append(event)
                self._log.append(f"{stamp} samples at step {event.step}")
            elif isinstance(event, EvalEvent):
                snap.evaluation = event
                self._log.append(f"{stamp} evaluation at step {event.step}")
            elif isinstance(event, CheckpointEvent):
                snap.checkpoints.append(event)
                self._log.append(f"{stamp} checkpoint at step {event.step}: {event.path}")
            elif isinstance(event, WarningEvent):
                snap.warnings.append(event)
                self._log.append(f"{stamp} WARNING {event.message}" + (f" -> {event.advice}" if event.advice else ""))
            elif isinstance(event, ErrorEvent):
                snap.error = event
                self._log.append(f"{stamp} ERROR {event.message}" + (f" -> {event.advice}" if event.advice else ""))
            elif isinstance(event, LogEvent):
                self._log.append(f"{stamp} {event.message}")
            elif isinstance(event, DoneEvent):
                snap.outputs.update(event.outputs)
                if event.message:
                    self._log.append(f"{stamp} {event.message}")

    def _main(self, target: Callable[[RunContext], Any], ctx: RunContext) -> None:
        global _CURRENT
        state = "done"
        try:
            self.result = target(ctx)
            if ctx.should_stop():
                state = "stopped"
        except StopRequested:
            state = "stopped"
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the user
            state = "failed"
            event = friendly_error(exc)
            ctx.emit(event)
            with self._lock:
                self._log.append(traceback.format_exc(limit=6))
        finally:
            with self._lock:
                self._snapshot.state = state
                self._snapshot.finished_at = time.time()
                self._ctx = None
            _CURRENT = None
            _RUN_LOCK.release()
