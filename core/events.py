"""Typed events: the only way progress leaves the engine.

Training, captioning and tools publish these through a `RunContext`; the GUI, the CLI's
progress bar and the tests read them. Every event is a plain dataclass, so it can be
logged, compared and shown without knowing who sent it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from collections.abc import Callable


@dataclass
class Event:
    """Base of all events; `kind` says which one it is."""

    kind: str = field(init=False, default="event")
    time: float = field(init=False, default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProgressEvent(Event):
    """One optimizer step (training) or one item (captioning) is done."""

    step: int
    total: int
    epoch: int = 0
    loss: float | None = None
    smoothed_loss: float | None = None
    lr: float | None = None
    seconds_per_step: float | None = None
    eta_seconds: float | None = None
    vram_gb: float | None = None
    message: str = ""  # e.g. the current file while captioning
    validation_loss: float | None = None  # on the steps that measured one
    scalars: dict[str, float] = field(default_factory=dict)  # a task's own numbers (GRPO's "reward/mean")

    def __post_init__(self) -> None:
        self.kind = "progress"


@dataclass
class SampleEvent(Event):
    """Previews made at `step`: image paths, or generated texts (LoRA and base answers)."""

    step: int
    images: list[str] = field(default_factory=list)
    texts: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kind = "sample"


@dataclass
class EvalEvent(Event):
    """A text LoRA's evaluation at `step` (0: the base before training): one row per thing measured,
    {"name", "metric", "before", "after", "history"} (core.text_eval.report), and the chart's file."""

    step: int
    rows: list[dict] = field(default_factory=list)
    chart: str = ""

    def __post_init__(self) -> None:
        self.kind = "eval"


@dataclass
class CheckpointEvent(Event):
    step: int
    path: str

    def __post_init__(self) -> None:
        self.kind = "checkpoint"


@dataclass
class LogEvent(Event):
    """A line for the log: stages of the run ("caching latents: 40 images")."""

    message: str

    def __post_init__(self) -> None:
        self.kind = "log"


@dataclass
class WarningEvent(Event):
    message: str
    advice: str = ""

    def __post_init__(self) -> None:
        self.kind = "warning"


@dataclass
class ErrorEvent(Event):
    """The run failed: what happened and what to change."""

    message: str
    advice: str = ""
    error_type: str = ""

    def __post_init__(self) -> None:
        self.kind = "error"


@dataclass
class DoneEvent(Event):
    """The run ended. `stopped` is True when the user asked it to stop."""

    outputs: dict[str, str] = field(default_factory=dict)
    stopped: bool = False
    message: str = ""

    def __post_init__(self) -> None:
        self.kind = "done"


Listener = Callable[[Event], None]


class StopRequested(Exception):
    """Raised inside a run when it should end; the run saves what it has first."""


@dataclass
class RunContext:
    """What a running task gets: a way to publish events and to hear commands.

    Listeners are called in the worker thread; an exception in one is logged and
    swallowed so a UI bug can never kill a training run.
    """

    listeners: list[Listener] = field(default_factory=list)
    stop_flag: threading.Event = field(default_factory=threading.Event)
    errors_in_listeners: list[str] = field(default_factory=list)

    def emit(self, event: Event) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - a listener must never break the run
                self.errors_in_listeners.append(f"{type(exc).__name__}: {exc}")

    def log(self, message: str) -> None:
        self.emit(LogEvent(message))

    def warn(self, message: str, advice: str = "") -> None:
        self.emit(WarningEvent(message, advice))

    def should_stop(self) -> bool:
        return self.stop_flag.is_set()
