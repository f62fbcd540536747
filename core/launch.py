"""A multi-process run started from the app: the GPUs it may use, the launch command, and the
run itself as a child process group whose events come back to the app's RunContext.

The app trains one process in a thread (core.job); on several GPUs it starts the same
`train.py` through Accelerate (`accelerate launch --multi_gpu --num_processes N --gpu_ids ...`)
and follows it: the main process appends every event as a JSON line to a file, which is read
back here and emitted as the event it was, so the live plot, previews, log and the final
outputs work as for one process. Stop creates a file the main process watches (the run then
finishes its step, saves a checkpoint and ends, as with Ctrl+C); resume is `resume_from: latest`
as ever.

On a machine without CUDA, `LORA_CPU_PROCESSES=N` offers N CPU processes over gloo (for trying
the multi-process path, and for the tests): `accelerate launch --cpu` starts only one process
there, so those are started with torchrun, into the same Accelerate code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import TrainConfig
from core.events import (CheckpointEvent, DoneEvent, ErrorEvent, Event, LogEvent, ProgressEvent, RunContext,
                         SampleEvent, WarningEvent)

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_DIR = ".launch"  # inside output_dir: the launched run's config, events, stop file and console log
EVENT_TYPES: dict[str, type[Event]] = {
    "progress": ProgressEvent, "sample": SampleEvent, "checkpoint": CheckpointEvent, "log": LogEvent,
    "warning": WarningEvent, "error": ErrorEvent, "done": DoneEvent}


@dataclass(frozen=True)
class Device:
    """One device a run may be launched on."""

    index: int
    name: str
    memory_gb: float
    kind: str = "cuda"  # cuda | cpu (gloo processes, LORA_CPU_PROCESSES)

    @property
    def label(self) -> str:
        if self.kind == "cpu":
            return f"CPU process {self.index} (gloo)"
        return f"GPU {self.index}: {self.name} ({self.memory_gb:.0f} GB)"


@dataclass(frozen=True)
class LaunchPlan:
    """Which devices a run uses; one device (or none chosen) is the plain in-app run."""

    devices: tuple[Device, ...] = ()

    @property
    def processes(self) -> int:
        return max(1, len(self.devices))

    @property
    def several(self) -> bool:
        return self.processes > 1

    @property
    def launched(self) -> bool:
        """Started as processes of its own: several, or one GPU other than the app's first."""
        return self.several or any(d.kind == "cuda" and d.index != 0 for d in self.devices)

    @property
    def on_cpu(self) -> bool:
        return any(d.kind == "cpu" for d in self.devices)


def devices() -> list[Device]:
    """The GPUs this machine shows (CUDA_VISIBLE_DEVICES applies), else the CPU processes LORA_CPU_PROCESSES offers."""
    import torch

    if torch.cuda.is_available():
        found = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            found.append(Device(index, props.name, props.total_memory / 1024**3))
        return found
    try:
        count = int(os.environ.get("LORA_CPU_PROCESSES", "0"))
    except ValueError:
        count = 0
    return [Device(i, "CPU", 0.0, "cpu") for i in range(count)] if count > 1 else []


def describe_devices(found: list[Device]) -> str:
    """What the Train tab says above the GPU choice (or instead of it, with one GPU or none)."""
    if not found:
        return "No GPU found: runs train in one process on this machine."
    if len(found) == 1:
        return f"One GPU ({found[0].label}): runs train in one process on it."
    return (f"{len(found)} {'GPUs' if found[0].kind == 'cuda' else 'CPU processes'}: pick the ones to train on "
            "(one process each); with *Shard the model* the frozen base is split over them (distributed: fsdp).")


def command(config_path: Path, plan: LaunchPlan, folder: Path) -> list[str]:
    """The launch command line of `plan`, with the event and stop files of `folder`."""
    tail = [str(ROOT / "train.py"), "--config", str(config_path), "--quiet",
            "--events_file", str(folder / "events.jsonl"), "--stop_file", str(folder / "stop")]
    if plan.on_cpu:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(plan.processes), *tail]
    ids = ",".join(str(d.index) for d in plan.devices)
    several = ["--multi_gpu"] if plan.several else []
    return [sys.executable, "-m", "accelerate.commands.launch", *several, "--num_processes",
            str(plan.processes), "--gpu_ids", ids, "--num_machines", "1", "--dynamo_backend", "no", *tail]


def event_from_dict(data: dict[str, Any]) -> Event | None:
    """The event a launched run's main process wrote (None for a kind this version does not know)."""
    cls = EVENT_TYPES.get(data.get("kind", ""))
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    event = cls(**{k: v for k, v in data.items() if k in names})
    if "time" in data:
        event.time = float(data.get("time", event.time))
    return event


def run_launched(cfg: TrainConfig, ctx: RunContext, plan: LaunchPlan, poll_seconds: float = 0.5) -> dict[str, str]:
    """Train `cfg` in `plan.processes` processes; their events reach `ctx`; returns the output paths.

    `ctx.should_stop()` becomes the stop file; a failed launch raises with the end of its console.
    """
    from core.atomic import atomic_write_text

    folder = Path(cfg.output_dir) / LAUNCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("events.jsonl", "stop"):
        (folder / stale).unlink(missing_ok=True)
    config_path = folder / "config.yaml"
    import yaml

    atomic_write_text(config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if plan.on_cpu:
        env.setdefault("OMP_NUM_THREADS", "1")
    ctx.log(f"Launching {plan.processes} processes: " + ", ".join(d.label for d in plan.devices))
    outputs: dict[str, str] = {}
    with open(folder / "console.log", "w", encoding="utf-8") as console:
        process = subprocess.Popen(command(config_path, plan, folder), stdout=console, stderr=subprocess.STDOUT,
                                   env=env, cwd=str(ROOT), start_new_session=True)
        reader = _EventReader(folder / "events.jsonl")
        stop_sent = False
        while True:
            finished = process.poll() is not None
            for event in reader.read():
                if isinstance(event, DoneEvent):
                    outputs = dict(event.outputs)
                ctx.emit(event)
            if finished:
                break
            if ctx.should_stop() and not stop_sent:
                (folder / "stop").write_text("stop\n", encoding="utf-8")
                stop_sent = True
            time.sleep(poll_seconds)
    if process.returncode != 0:
        said = (folder / "console.log").read_text(encoding="utf-8", errors="replace")
        lines = [line for line in said.splitlines() if line.startswith(("ERROR", "What to change"))]
        reason = " ".join(lines) or (said.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"The {plan.processes}-process run failed (exit {process.returncode}): {reason} "
                           f"Its console: {folder / 'console.log'}.")
    return outputs


class _EventReader:
    """Reads the complete JSON lines appended to a file since the last read."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, ""

    def read(self) -> list[Event]:
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8") as handle:
            handle.seek(self.offset)
            text = handle.read()
            self.offset = handle.tell()
        text, self.partial = self.partial + text, ""
        lines = text.split("\n")
        self.partial = lines.pop()  # an unfinished last line waits for the next read
        events = []
        for line in lines:
            if line.strip():
                event = event_from_dict(json.loads(line))
                if event is not None:
                    events.append(event)
        return events
