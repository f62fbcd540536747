"""Two processes on one machine (what `accelerate launch` / `torchrun` start on two GPUs),
here on the CPU with gloo: the run trains, saves one LoRA, and a resume from a mid-run
checkpoint continues exactly like the uninterrupted run, every process's noise included.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.tiny_sd import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]


def launch_two(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), "--config", str(config), "--quiet"]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def loss_rows(folder: Path) -> list[tuple[int, float]]:
    with (folder / "loss.csv").open(encoding="utf-8") as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]


def test_two_processes_train_and_resume_exactly_like_the_uninterrupted_run(tiny_sd1, sd_image_folder, tmp_path):
    straight = tmp_path / "straight"
    raw = tiny_run_config(tiny_sd1.folder, sd_image_folder, straight, batch_size=1, max_train_steps=4,
                          save_steps=2, caption_dropout=0.3, noise_offset=0.05)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    done = launch_two(config, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stdout + done.stderr  # one run in two processes, not two runs
    assert (straight / f"{straight.name}.safetensors").is_file()
    assert [step for step, _ in loss_rows(straight)] == [1, 2, 3, 4]

    # The same run as if it had ended after step 2: only the step-2 checkpoint and log remain.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    rows = (straight / "loss.csv").read_text(encoding="utf-8").splitlines()
    (resumed / "loss.csv").write_text("\n".join(rows[:3]) + "\n", encoding="utf-8")
    config.write_text(yaml.safe_dump(dict(raw, output_dir=str(resumed), resume_from="latest")), encoding="utf-8")
    again = launch_two(config, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    for (step_a, loss_a), (step_b, loss_b) in zip(loss_rows(straight), loss_rows(resumed), strict=True):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-4), f"step {step_a}"
