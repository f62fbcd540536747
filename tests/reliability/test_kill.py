"""Killed hard (kill -9) mid-run, mid-checkpoint or mid-caption-write: nothing is corrupt,
and the next run resumes from the last good checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from core.atomic import is_complete_dir
from core.train.checkpoints import latest_checkpoint, list_checkpoints
from tests.fixtures.tiny_sd import tiny_run_config
from tests.helpers import read_loss_csv

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("fault_runner.py")


def run_with_fault(args: list[str], fault: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAULT": fault, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, cwd=cwd,
                           env=env, timeout=600)


def assert_nothing_corrupt(output_dir: Path) -> None:
    """Every file a user would open is whole: LoRA files load, checkpoints are complete, CSV parses."""
    for file in output_dir.rglob("*.safetensors"):
        if any(part.startswith(".") for part in file.relative_to(output_dir).parts):
            continue  # an unfinished temporary folder, never read
        with safe_open(str(file), framework="pt") as handle:
            assert list(handle.keys()), f"{file} has no tensors"
    for _, folder in list_checkpoints(output_dir):
        assert (folder / "training_state.pt").stat().st_size > 100
    if (output_dir / "loss.csv").exists():
        read_loss_csv(output_dir)  # asserts the step,loss,lr,val_loss header and that every row is whole
    yaml.safe_load((output_dir / "config.yaml").read_text(encoding="utf-8"))


def write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.slow  # two train.py runs in subprocesses
def test_kill_9_mid_training_then_resume_latest_finishes_the_run(tiny_sd1, sd_image_folder, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_run_config(tiny_sd1.folder, sd_image_folder, out,
                                                   max_train_steps=8, save_steps=2))
    killed = run_with_fault(["train", "--config", str(config), "--quiet"], "kill_at_step:6", tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest_checkpoint(out).name == "step-000004"
    assert_nothing_corrupt(out)

    resumed = run_with_fault(["train", "--config", str(config), "--quiet", "--resume_from", "latest"], "",
                             tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert latest_checkpoint(out).name == "step-000008"
    steps = [r.step for r in read_loss_csv(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 8, "resumed steps continue without duplicates"
    assert_nothing_corrupt(out)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow  # two train.py runs in subprocesses
def test_kill_9_inside_a_checkpoint_save_leaves_the_previous_checkpoint_usable(tiny_sd1, sd_image_folder, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_run_config(tiny_sd1.folder, sd_image_folder, out,
                                                   max_train_steps=6, save_steps=2))
    # The 2nd torch.save of the run is the step-4 checkpoint's training state.
    killed = run_with_fault(["train", "--config", str(config), "--quiet"], "kill_in_save:2", tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    half = [p for p in (out / "checkpoints").iterdir() if not is_complete_dir(p)]
    assert half, "the half-written checkpoint folder is there, but never counted"
    assert latest_checkpoint(out).name == "step-000002"
    assert_nothing_corrupt(out)

    resumed = run_with_fault(["train", "--config", str(config), "--quiet", "--resume_from", "latest"], "",
                             tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [p for p in (out / "checkpoints").iterdir() if not is_complete_dir(p)], \
        "the next run clears the half-written folder"
    assert latest_checkpoint(out).name == "step-000006"
    assert_nothing_corrupt(out)


def test_kill_9_while_writing_metadata_csv_keeps_the_old_file(tmp_path):
    metadata = tmp_path / "metadata.csv"
    original = 'filename,prompt\na.png,"a cat, sitting"\nb.png,猫\n'
    metadata.write_text(original, encoding="utf-8")
    killed = run_with_fault(["captions", str(metadata), json.dumps({"a.png": "a new caption"})],
                            "kill_before_rename", tmp_path)
    assert killed.returncode == -signal.SIGKILL
    assert metadata.read_text(encoding="utf-8") == original
    backups = list(tmp_path.glob("metadata.csv.bak-*"))
    assert backups and backups[0].read_text(encoding="utf-8") == original
