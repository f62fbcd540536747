"""`distributed: fsdp` on the CPU with 2 gloo processes (what `accelerate launch` starts on two GPUs):
the frozen base is sharded (FSDP2 through Accelerate's FSDP plugin), the LoRA trains exactly as in a
DDP run, the LoRA file is written once, and a stop + resume of a sharded run, also on another
process count, continues exactly like the uninterrupted run.

Image runs draw each process's noise from seed + rank, so a 2-process image run is compared with
the 2-process DDP run (the same noise, the same data shards); a text run without dropout has no
randomness and is compared with one process training on the whole global batch.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from core.events import RunContext
from core.presets import resolve_config
from core.train import run_training
from tests.fixtures.tiny_sd import make_image_folder, tiny_run_config
from tests.helpers import read_loss_csv
from tests.train.test_multi_process import launch_two

pytestmark = pytest.mark.slow  # several train.py launches of two processes each


def _launch(raw: dict, tmp_path: Path, name: str) -> str:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    done = launch_two(config, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def _same_losses(a: Path, b: Path) -> None:
    for x, y in zip(read_loss_csv(a), read_loss_csv(b), strict=True):
        assert x.step == y.step and x.loss == pytest.approx(y.loss, rel=1e-4, abs=1e-6), f"step {x.step}"


def _same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert sorted(left) == sorted(right)
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-4, atol=1e-6, msg=key)


def _cut_after_step_2(straight: Path, resumed: Path) -> None:
    """The same run as if it had ended after step 2: only the step-2 checkpoint and log remain."""
    resumed.mkdir()
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    rows = (straight / "loss.csv").read_text(encoding="utf-8").splitlines()
    (resumed / "loss.csv").write_text("\n".join(rows[:3]) + "\n", encoding="utf-8")


def test_a_sharded_sd_run_trains_like_ddp_writes_one_lora_and_resumes_exactly(tiny_sd1, tmp_path):
    data = make_image_folder(tmp_path / "data", count=4)
    raw = tiny_run_config(tiny_sd1.folder, data, tmp_path / "ddp", batch_size=1, max_train_steps=4, save_steps=2,
                          caption_dropout=0.3, noise_offset=0.05)
    _launch(raw, tmp_path, "ddp")
    sharded = tmp_path / "fsdp"
    said = _launch(dict(raw, output_dir=str(sharded), distributed="fsdp"), tmp_path, "fsdp")
    assert "x 2 processes (base sharded: fsdp)" in said
    assert said.count("Done: 4 steps") == 1  # one run, the LoRA written by the main process
    _same_losses(tmp_path / "ddp", sharded)
    _same_tensors(tmp_path / "ddp" / "ddp.safetensors", sharded / "fsdp.safetensors")
    _same_tensors(tmp_path / "ddp" / "checkpoints" / "step-000002" / "unet_peft.safetensors",
                  sharded / "checkpoints" / "step-000002" / "unet_peft.safetensors")

    resumed = tmp_path / "resumed"
    _cut_after_step_2(sharded, resumed)
    _launch(dict(raw, output_dir=str(resumed), output_name="fsdp", distributed="fsdp", resume_from="latest"),
            tmp_path, "resume")
    _same_losses(sharded, resumed)
    _same_tensors(sharded / "fsdp.safetensors", resumed / "fsdp.safetensors")


def test_a_sharded_checkpoint_resumes_in_one_process_and_a_one_process_checkpoint_resumes_sharded(
        tiny_sd1, tmp_path):
    data = make_image_folder(tmp_path / "data", count=2)
    raw = tiny_run_config(tiny_sd1.folder, data, tmp_path / "fsdp", batch_size=1, max_train_steps=2, save_steps=1,
                          distributed="fsdp")
    _launch(raw, tmp_path, "fsdp")
    # One process picks the sharded run's whole, name-keyed optimizer state up (another process count).
    one = tmp_path / "one"
    one.mkdir()
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step-000001", one / "checkpoints" / "step-000001")
    outputs = run_training(resolve_config(dict(raw, output_dir=str(one), resume_from="latest")), RunContext())
    assert Path(outputs["lora"]).is_file()
    assert [r.step for r in read_loss_csv(one)] == [2]

    # ...and the sharded run picks a one-process (numbered) optimizer state up: the OOM ladder's
    # step from ddp to fsdp resumes from the last checkpoint.
    said = _launch(dict(raw, output_dir=str(one), max_train_steps=3, resume_from="latest"), tmp_path, "back")
    assert "Resumed from" in said and "Done: 3 steps" in said
    assert [r.step for r in read_loss_csv(one)] == [2, 3]


def test_a_sharded_flux_run_trains_like_ddp(tiny_flux_dev, tmp_path):
    data = make_image_folder(tmp_path / "data", count=2)
    raw = tiny_run_config(tiny_flux_dev.folder, data, tmp_path / "ddp", batch_size=1, max_train_steps=2)
    _launch(raw, tmp_path, "ddp")
    _launch(dict(raw, output_dir=str(tmp_path / "fsdp"), output_name="ddp", distributed="fsdp"), tmp_path, "fsdp")
    _same_losses(tmp_path / "ddp", tmp_path / "fsdp")
    _same_tensors(tmp_path / "ddp" / "ddp.safetensors", tmp_path / "fsdp" / "ddp.safetensors")


def test_a_sharded_text_run_equals_one_process_on_the_whole_batch_and_resumes_exactly(tiny_llm_dir, tmp_path):
    from tests.fixtures.tiny_llm import KESTREL_QA, write_qa_jsonl
    from tests.text.test_text_multi_process import text_config

    train = write_qa_jsonl(tmp_path / "train.jsonl", KESTREL_QA[:4])
    validation = write_qa_jsonl(tmp_path / "val.jsonl", KESTREL_QA[4:])
    # Two processes of batch 1 x 2 accumulation see each step the four examples one process of 1 x 4 sees.
    raw = text_config(tiny_llm_dir, train, validation, tmp_path / "fsdp", distributed="fsdp")
    said = _launch(raw, tmp_path, "fsdp")
    assert said.count("Done: 4 steps") == 1
    assert sorted(p.name for p in (tmp_path / "fsdp" / "samples").iterdir()) == ["step-000004.json",
                                                                                 "step-000004.txt"]
    one = tmp_path / "one"
    run_training(resolve_config(dict(raw, output_dir=str(one), gradient_accumulation_steps=4, distributed="ddp")),
                 RunContext())
    _same_losses(one, tmp_path / "fsdp")
    _same_tensors(one / "adapter" / "adapter_model.safetensors",
                  tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")

    resumed = tmp_path / "resumed"
    _cut_after_step_2(tmp_path / "fsdp", resumed)
    _launch(dict(raw, output_dir=str(resumed), resume_from="latest"), tmp_path, "resume")
    _same_losses(tmp_path / "fsdp", resumed)
    _same_tensors(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors",
                  resumed / "adapter" / "adapter_model.safetensors")
