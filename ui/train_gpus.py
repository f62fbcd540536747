"""The Train tab's choice of GPUs: which (and so how many) a run trains on, and whether the frozen
base is sharded over them (distributed: fsdp). Start launches a run on several of them through
Accelerate (core.launch); with one GPU or none the control says so and offers nothing.

The choice is the app's (one per app process, like its one Job): it is kept in `CHOICE` when
changed, and read when a run starts, from the Train tab or from the queue.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

import gradio as gr

from core import launch
from core.config import TrainConfig


@dataclass
class GpuChoice:
    """The devices picked (their labels) and the shard switch; empty: every device found."""

    picked: list[str] = dataclasses.field(default_factory=list)
    shard: bool = False


CHOICE = GpuChoice()
_lock = threading.Lock()
_FOUND: list[launch.Device] | None = None


def found_devices() -> list[launch.Device]:
    """The devices, looked up once per app process (CUDA's device list does not change under it)."""
    global _FOUND
    if _FOUND is None:
        try:
            _FOUND = launch.devices()
        except Exception:  # noqa: BLE001 - a broken driver: the app trains in one process, as before
            _FOUND = []
    return _FOUND


def plan_for(cfg: TrainConfig, found: list[launch.Device] | None = None,
             choice: GpuChoice | None = None) -> tuple[TrainConfig, launch.LaunchPlan | None]:
    """The config and launch plan of a run started now: None (one process) unless several are picked."""
    found = found_devices() if found is None else found
    choice = choice or CHOICE
    if len(found) < 2:
        return cfg, None
    picked = [d for d in found if d.label in choice.picked] if choice.picked else list(found)
    if len(picked) < 2:  # one process: in the app, or launched on the one GPU picked
        return cfg, launch.LaunchPlan(tuple(picked)) if picked else None
    if choice.shard and cfg.distributed != "fsdp":
        cfg = dataclasses.replace(cfg, distributed="fsdp")
    return cfg, launch.LaunchPlan(tuple(picked))


def on_choice(picked: list[str] | None, shard: bool) -> str:
    """Keep the choice; say what Start will do."""
    with _lock:
        CHOICE.picked, CHOICE.shard = list(picked or []), bool(shard)
    found = found_devices()
    count = len([d for d in found if d.label in CHOICE.picked]) if CHOICE.picked else len(found)
    if count < 2:
        return "Start trains in **one process**" + (" on the GPU picked." if count == 1 else ".")
    how = "the frozen base **sharded** over them (distributed: fsdp)" if shard else "each holding the whole model (ddp)"
    return f"Start launches **{count} processes** through Accelerate, {how}."


def create_gpu_picker() -> dict[str, Any]:
    """The control under Start: a line about the devices, and with several a pick and the shard switch."""
    found = found_devices()
    several = len(found) > 1
    with gr.Accordion("GPUs", open=several, elem_id="train-gpus"):
        gr.Markdown(launch.describe_devices(found), elem_id="train-gpus-line")
        labels = [d.label for d in found]
        picked = gr.CheckboxGroup(choices=labels, value=labels, label="Train on", visible=several,
                                  elem_id="train-gpus-pick")
        shard = gr.Checkbox(value=False, label="Shard the model over them (FSDP: for a model one GPU cannot hold)",
                            visible=several, elem_id="train-gpus-shard")
        said = gr.Markdown(on_choice(labels, False) if several else "", elem_id="train-gpus-said")
    if several:
        picked.change(on_choice, [picked, shard], said, show_progress="hidden")
        shard.change(on_choice, [picked, shard], said, show_progress="hidden")
    return {"picked": picked, "shard": shard, "said": said}
