"""Two processes on one machine (what `accelerate launch` / `torchrun` start on two GPUs),
here on the CPU with gloo: the run trains, saves one LoRA, and a resume from a mid-run
checkpoint continues exactly like the uninterrupted run, every process's noise included.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.tiny_sd import tiny_run_config
from tests.helpers import read_loss_csv

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # four train.py processes, two runs


def launch_two(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), "--config", str(config), "--quiet"]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


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
    assert [r.step for r in read_loss_csv(straight)] == [1, 2, 3, 4]

    # The same run as if it had ended after step 2: only the step-2 checkpoint and log remain.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    rows = (straight / "loss.csv").read_text(encoding="utf-8").splitlines()
    (resumed / "loss.csv").write_text("\n".join(rows[:3]) + "\n", encoding="utf-8")
    config.write_text(yaml.safe_dump(dict(raw, output_dir=str(resumed), resume_from="latest")), encoding="utf-8")
    again = launch_two(config, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    for a, b in zip(read_loss_csv(straight), read_loss_csv(resumed), strict=True):
        assert a.step == b.step and a.loss == pytest.approx(b.loss, rel=1e-4), f"step {a.step}"
