"""Image LoRA training on a tiny SD 1.x model: outputs, stop, resume, and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.fixtures.tiny_sd import run_collect, tiny_run_config
from tests.helpers import read_loss_csv

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_run_writes_every_output_and_lists_a_corrupt_image(tiny_sd1, sd_image_folder, tmp_path):
    (sd_image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    out = tmp_path / "run"
    raw = tiny_run_config(tiny_sd1.folder, sd_image_folder, out, max_train_steps=4, save_steps=2,
                          sample_prompts=["a red thing"], output_name="my_style")
    outputs, events = run_collect(raw)

    warnings = [e.message for e in events if e.kind == "warning"]
    assert any("broken.png" in w for w in warnings), warnings
    progress = [e for e in events if e.kind == "progress"]
    assert [e.step for e in progress] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in progress)
    assert progress[-1].eta_seconds is not None and progress[-1].smoothed_loss is not None
    assert any("Caching latents" in e.message for e in events if e.kind == "log")

    assert (out / "my_style.safetensors").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["output_name"] == "my_style"
    assert [r.step for r in read_loss_csv(out)] == [1, 2, 3, 4]
    assert any((out / "logs").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step-000002", "step-000004"]
    assert (out / "checkpoints" / "step-000002" / "my_style.safetensors").is_file()
    assert (out / "samples" / "step-000004-0.png").is_file()
    done = [e for e in events if e.kind == "done"]
    assert len(done) == 1 and not done[0].stopped and done[0].outputs["lora"] == outputs["lora"]
    checkpoints = [e.step for e in events if e.kind == "checkpoint"]
    assert checkpoints == [2, 4]

    from safetensors import safe_open

    with safe_open(str(out / "my_style.safetensors"), "pt") as handle:
        meta = handle.metadata()
        keys = list(handle.keys())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "4"
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in keys)
    # The second run reuses the latents cached on disk beside the images.
    _, events2 = run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, tmp_path / "run2", max_train_steps=1))
    assert any("reused from the disk cache" in e.message for e in events2 if e.kind == "log")


def test_stop_then_resume_continues_exactly_like_an_uninterrupted_run(tiny_sd1, sd_image_folder, tmp_path):
    common = dict(max_train_steps=6, batch_size=1, gradient_accumulation_steps=2, lr_scheduler="cosine",
                  lr_warmup_steps=2, save_steps=3, caption_dropout=0.3, noise_offset=0.05, snr_gamma=5.0)
    straight = tmp_path / "straight"
    run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, straight, **common))

    stopped = tmp_path / "stopped"
    outputs, events = run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, stopped, **common), stop_at=4)
    done = [e for e in events if e.kind == "done"][0]
    assert done.stopped and "step-000004" in done.message and "resume_from" in done.message
    assert (stopped / "checkpoints" / "step-000004").is_dir()
    assert Path(outputs["lora"]).is_file()  # the LoRA so far is usable right away

    _, resumed = run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, stopped, resume_from="latest",
                                             **common))
    assert [e.step for e in resumed if e.kind == "progress"] == [5, 6]
    a, b = read_loss_csv(straight), read_loss_csv(stopped)
    assert [r.step for r in b] == [1, 2, 3, 4, 5, 6]
    for row_a, row_b in zip(a, b):
        assert row_a.step == row_b.step and row_a.lr == pytest.approx(row_b.lr, rel=1e-6)
        assert row_a.loss == pytest.approx(row_b.loss, rel=1e-4), f"step {row_a.step}"


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


def test_cli_trains_from_yaml_and_refuses_a_bad_key_with_exit_code_2(tiny_sd1, sd_image_folder, tmp_path):
    config = tmp_path / "x.yaml"
    raw = tiny_run_config(tiny_sd1.folder, sd_image_folder, tmp_path / "cli_out", max_train_steps=2)
    raw["learning_rate"] = "2e-4"  # a YAML string, read as the number
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")

    bad = _cli(["--config", str(config), "--learning_rat", "1e-4", "--lora_rank", "0"], tmp_path)
    assert bad.returncode == 2
    assert "learning_rat" in bad.stderr and "learning_rate" in bad.stderr and "lora_rank" in bad.stderr

    good = _cli(["--config", str(config), "--output_name", "cli_lora", "--quiet"], tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "Settings:" in good.stdout and "Done: 2 steps" in good.stdout
    assert (tmp_path / "cli_out" / "cli_lora.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "cli_out" / "config.yaml").read_text())
    assert saved["output_name"] == "cli_lora" and saved["learning_rate"] == 2e-4
