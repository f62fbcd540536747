"""The disk fills up while a run saves: a clear message, and the files saved before are intact."""
from __future__ import annotations

import errno

import safetensors.torch

from core.config import config_from_dict
from core.events import RunContext
from core.job import Job
from core.train import run_training
from tests.fixtures.tiny_sd import tiny_run_config


def test_disk_full_during_the_final_save_keeps_the_previous_lora(tiny_sd1, sd_image_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    raw = tiny_run_config(tiny_sd1.folder, sd_image_folder, out, max_train_steps=2)
    run_training(config_from_dict(raw), RunContext())
    lora = out / "pytorch_lora_weights.safetensors"
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert lora.name in before

    real_save = safetensors.torch.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 64)  # the first bytes made it, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    job = Job()
    job.start(config_from_dict({**raw, "max_train_steps": 4}))
    snap = job.wait(600)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)

    assert snap.state == "failed"
    assert "No space left" in snap.error.message
    assert "disk is full" in snap.error.advice and "resume_from: latest" in snap.error.advice
    after = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert after == before, "the LoRA files of the first run are byte for byte the same"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "no temporary file left in the output"
