"""Out of memory in a real text run (tiny Llama): with auto_downshift the run continues from
its last checkpoint with the next smaller preset and finishes. The fault is injected where
every loop meets it: runtime.check_finite. (Stopping with advice instead: test_recovery.py.)
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

import core.devices
from core.events import DoneEvent, ProgressEvent, RunContext, WarningEvent
from core.presets import resolve_config
import core.train.text
from core.train import run_training, runtime
from tests.helpers import read_loss_csv

RTX_3060 = core.devices.DeviceInfo("cuda", "NVIDIA GeForce RTX 3060", 11.7, 11.3, bf16=True, bitsandbytes=False)


def inject_oom_once(monkeypatch, at_step: int) -> list[int]:
    real = runtime.check_finite
    hits: list[int] = []

    def faulty(loss: float, step: int, cfg) -> None:
        if step == at_step and not hits:
            hits.append(step)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return real(loss, step, cfg)

    monkeypatch.setattr(runtime, "check_finite", faulty)
    return hits


def config(tiny_llm_dir: Path, data: Path, out: Path, **extra):
    # The llm-12gb preset on a (simulated) 12 GB GPU; the loop itself runs on this CPU.
    raw = dict(task_type="text-generation", base_model=str(tiny_llm_dir), train_data_dir=str(data),
               output_dir=str(out), preset="llm-12gb", batch_size=2, gradient_accumulation_steps=1,
               max_seq_length=64, mixed_precision="no", optimizer="adamw", gradient_checkpointing=False,
               max_train_steps=6, save_steps=2, learning_rate=5e-3, lora_rank=4, lora_alpha=8, seed=7)
    raw.update(extra)
    return resolve_config(raw)


def test_a_real_text_run_that_runs_out_of_memory_downshifts_resumes_and_finishes(
        tiny_llm_dir, qa_file, tmp_path, monkeypatch):
    monkeypatch.setattr(core.devices, "detect_device", lambda index=0: RTX_3060)
    hits = inject_oom_once(monkeypatch, at_step=3)
    rows: list[list[int]] = []  # the token rows of every forward pass, in order
    real_loss = core.train.text.batch_loss_sum

    def recording(model, batch, *args, **kwargs):
        rows.append(batch.input_ids[0].tolist())
        return real_loss(model, batch, *args, **kwargs)

    monkeypatch.setattr(core.train.text, "batch_loss_sum", recording)
    events: list = []
    out = tmp_path / "out"

    outputs = run_training(config(tiny_llm_dir, qa_file, out, auto_downshift=True),
                           RunContext(listeners=[events.append]))

    assert hits == [3]
    warning = next(e for e in events if isinstance(e, WarningEvent) and "Out of memory" in e.message)
    assert "at step 3" in warning.message and "from the last checkpoint" in warning.message
    assert "batch_size 2 -> 1" in warning.message and "gradient_checkpointing off -> on" in warning.message
    # Steps 1-2 before the error, 3-6 after the resume from step-000002: the run finished.
    steps = [e.step for e in events if isinstance(e, ProgressEvent)]
    assert steps == [1, 2, 3, 4, 5, 6]
    done = [e for e in events if isinstance(e, DoneEvent)]
    assert len(done) == 1 and not done[0].stopped
    assert (Path(outputs["adapter"]) / "adapter_model.safetensors").is_file()
    logged = [r.step for r in read_loss_csv(out)]
    assert logged == [1, 2, 3, 4, 5, 6]
    # The resume continues at the examples of the failed step (now one per batch), not two
    # batches back: nothing in the epoch is trained twice.
    assert rows[3] + rows[4] == rows[2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["batch_size"] == 1 and saved["gradient_accumulation_steps"] == 2
    assert saved["preset"] == "llm-8gb" and saved["lora_rank"] == 4  # the LoRA's shape never changes


def test_a_real_image_run_that_runs_out_of_memory_downshifts_resumes_and_finishes(
        tiny_sd1, sd_image_folder, tmp_path, monkeypatch):
    from tests.fixtures.tiny_sd import run_collect, tiny_run_config

    monkeypatch.setattr(core.devices, "detect_device", lambda index=0: RTX_3060)
    hits = inject_oom_once(monkeypatch, at_step=3)
    out = tmp_path / "run"
    raw = tiny_run_config(tiny_sd1.folder, sd_image_folder, out, preset="sd15-6gb", resolution=64, batch_size=2,
                          gradient_accumulation_steps=1, gradient_checkpointing=True, optimizer="adamw",
                          mixed_precision="no", max_train_steps=4, save_steps=2, auto_downshift=True)

    outputs, events = run_collect(raw)

    assert hits == [3]
    warning = next(e for e in events if isinstance(e, WarningEvent) and "Out of memory" in e.message)
    assert "batch_size 2 -> 1" in warning.message and "sd15-4gb" in warning.message
    assert [e.step for e in events if isinstance(e, ProgressEvent)] == [1, 2, 3, 4]
    assert Path(outputs["lora"]).is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["batch_size"] == 1 and saved["gradient_accumulation_steps"] == 2 and saved["lora_rank"] == 4
