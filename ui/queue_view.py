"""The Train tab's queue table: one row per queued, running or finished run.

Pure functions over `core.queue.QueueEntry`s, so the table is tested without a browser.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from core.queue import QueueEntry
from ui import catalog

HEADERS = ["#", "run", "state", "output"]


def queue_rows(entries: Sequence[QueueEntry]) -> list[list[str]]:
    """[#, name, state (with the error of a failed run), output folder or file] per entry."""
    rows = []
    for entry in entries:
        state = entry.state if not entry.message else f"{entry.state}: {entry.message}"
        output = entry.output or entry.output_dir
        if Path(output).is_absolute():
            output = catalog.rel(Path(output))  # ./output/... when inside the project
        rows.append([str(entry.id), entry.name, state, output])
    return rows
