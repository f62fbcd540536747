"""A queue of training runs: add runs while another trains; they start one after another.

Each entry is a validated TrainConfig with its own output folder (a second entry that would
write into the same folder as an earlier one gets `<folder>-2`, ...). One dispatcher thread
starts the next queued entry on the shared `Job` once the device is free (a run started by
hand, a captioning or a Test-tab job is waited for, never interrupted) and records how the
entry ended. Stopping the running entry (`Job.stop`) ends only that one: the dispatcher goes
on with the next. A queued entry can be removed; a running one is stopped instead.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.job import Job, JobBusyError

# How often the dispatcher looks again while another job holds the device.
RETRY_SECONDS = 1.0
STATES = ("queued", "running", "done", "stopped", "failed")


@dataclass
class QueueEntry:
    """One run of the queue and how far it got."""

    id: int
    name: str
    config: Any  # core.config.TrainConfig
    state: str = "queued"  # queued | running | done | stopped | failed
    output: str = ""
    message: str = ""
    claimed: bool = False  # the dispatcher is starting it: no longer removable

    @property
    def output_dir(self) -> str:
        return str(self.config.output_dir)


def _folder_key(folder: str) -> str:
    return str(Path(folder).expanduser().resolve())


class RunQueue:
    """Runs added with `add` are trained in order on `job` (`start(job, config)` starts one)."""

    def __init__(self, job: Job, start: Callable[[Job, Any], None] | None = None) -> None:
        self.job = job
        self._start = start or (lambda j, cfg: j.start(cfg))
        self._lock = threading.Lock()
        self._entries: list[QueueEntry] = []
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- what the page does ------------------------------------------------------------------
    def add(self, config: Any) -> QueueEntry:
        """Queue `config`; its output folder is made its own. Starts at once when the device is free."""
        with self._lock:
            config = self._own_folder(config)
            entry = QueueEntry(id=next(self._ids), name=str(getattr(config, "name", "")), config=config)
            self._entries.append(entry)
            if self._closed:
                return entry
        self._ensure_dispatcher()
        return entry

    def remove(self, entry_id: int) -> bool:
        """Take a queued entry out; False when it is not waiting (running or finished)."""
        with self._lock:
            for entry in self._entries:
                if entry.id == entry_id and entry.state == "queued" and not entry.claimed:
                    self._entries.remove(entry)
                    return True
        return False

    def entries(self) -> list[QueueEntry]:
        """A copy of the entries, in order (what the table shows)."""
        with self._lock:
            return [dataclasses.replace(e) for e in self._entries]

    def clear_finished(self) -> None:
        with self._lock:
            self._entries = [e for e in self._entries if e.state in ("queued", "running")]

    def close(self) -> None:
        """Start nothing more (the app is quitting); the running entry is left to the caller."""
        with self._lock:
            self._closed = True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every entry has ended; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return True
            thread.join(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic())))
            if deadline is not None and time.monotonic() >= deadline:
                return not thread.is_alive()

    # -- internals -----------------------------------------------------------------------------
    def _own_folder(self, config: Any) -> Any:
        """`config` with an output folder no other entry of the queue writes into."""
        taken = {_folder_key(e.output_dir) for e in self._entries}
        folder = str(config.output_dir)
        if _folder_key(folder) not in taken:
            return config
        for n in itertools.count(2):
            candidate = f"{folder.rstrip('/')}-{n}"
            if _folder_key(candidate) not in taken:
                changes: dict[str, Any] = {"output_dir": candidate}
                if getattr(config, "output_name", ""):
                    changes["output_name"] = f"{config.output_name}-{n}"
                return dataclasses.replace(config, **changes)
        raise AssertionError("unreachable")

    def _ensure_dispatcher(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._dispatch, name="lora-queue", daemon=True)
            self._thread.start()

    def _claim_next(self) -> QueueEntry | None:
        """The first queued entry, claimed so that a remove() cannot race its start."""
        with self._lock:
            if self._closed:
                return None
            entry = next((e for e in self._entries if e.state == "queued"), None)
            if entry is not None:
                entry.claimed = True
            return entry

    def _dispatch(self) -> None:
        while True:
            entry = self._claim_next()
            if entry is None:
                with self._lock:
                    # An entry added after _claim_next() looked, before this thread ends, would wait forever.
                    if self._closed or not any(e.state == "queued" for e in self._entries):
                        self._thread = None
                        return
                continue
            try:
                self._start(self.job, entry.config)
            except JobBusyError:
                with self._lock:
                    entry.claimed = False
                time.sleep(RETRY_SECONDS)  # another job holds the device: wait for it, start after
                continue
            except Exception as exc:  # noqa: BLE001 - a run that cannot start fails alone
                self._finish(entry, "failed", f"could not start: {exc}")
                continue
            with self._lock:
                entry.state = "running"
            snap = self.job.wait()
            message = snap.error.message if snap.error is not None else ""
            self._finish(entry, snap.state if snap.state in STATES else "failed", message,
                         snap.outputs.get("lora") or snap.outputs.get("adapter") or snap.outputs.get("output_dir", ""))

    def _finish(self, entry: QueueEntry, state: str, message: str = "", output: str = "") -> None:
        with self._lock:
            entry.state = state
            entry.message = message
            entry.output = output or entry.output_dir
