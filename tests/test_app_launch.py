"""The app starts a run on several devices through Accelerate and follows it like a run of its own:
here 2 CPU processes over gloo (LORA_CPU_PROCESSES=2, what two picked GPUs do on a GPU machine):
progress, checkpoints and the LoRA come back to the Job, Stop ends it cleanly with a checkpoint,
and Resume continues it to the end."""
from __future__ import annotations

from pathlib import Path

import pytest

from core import launch
from core.events import DoneEvent, ProgressEvent
from core.job import Job
from core.presets import resolve_config
from tests.fixtures.tiny_sd import make_image_folder, tiny_run_config
from tests.helpers import read_loss_csv

pytestmark = pytest.mark.slow  # two launches of two train.py processes


def test_the_app_launches_a_two_process_run_stops_it_and_resumes_it(tiny_sd1, tmp_path, monkeypatch):
    from ui import train_gpus
    from ui.train_tab import start_run

    monkeypatch.setenv("LORA_CPU_PROCESSES", "2")
    monkeypatch.setattr(train_gpus, "_FOUND", None)
    monkeypatch.setattr(train_gpus, "CHOICE", train_gpus.GpuChoice())
    assert "2 CPU processes" in launch.describe_devices(train_gpus.found_devices())
    assert "2 processes" in train_gpus.on_choice([d.label for d in train_gpus.found_devices()], True)

    data = make_image_folder(tmp_path / "data", count=4)
    cfg = resolve_config(tiny_run_config(tiny_sd1.folder, data, tmp_path / "out", batch_size=1, max_train_steps=6))
    job = Job()
    seen: list = []

    def stop_after_the_first_step(event) -> None:
        seen.append(event)
        if isinstance(event, ProgressEvent) and event.step >= 1:
            job.stop()

    job.subscribe(stop_after_the_first_step)
    start_run(job, cfg)
    snapshot = job.wait(timeout=600)
    assert snapshot.state == "stopped", snapshot.log[-10:]
    assert any("Launching 2 processes" in line for line in snapshot.log)
    assert any("x 2 processes (base sharded: fsdp)" in line for line in snapshot.log)  # the shard switch
    stopped_at = snapshot.progress.step
    assert 1 <= stopped_at < 6 and snapshot.losses
    assert snapshot.checkpoints and Path(snapshot.outputs["lora"]).is_file()
    assert [e for e in seen if isinstance(e, DoneEvent)][-1].stopped

    job = Job()
    start_run(job, resolve_config({**cfg.to_dict(), "resume_from": "latest"}))
    snapshot = job.wait(timeout=600)
    assert snapshot.state == "done", snapshot.log[-10:]
    assert any("Resumed from" in line and f"step {stopped_at}" in line for line in snapshot.log)
    assert [r.step for r in read_loss_csv(tmp_path / "out")] == list(range(1, 7))
