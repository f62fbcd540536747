"""Incremental training (the seed's): a run continues from an existing LoRA file, kohya or diffusers."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.tiny_sd import run_collect, tiny_run_config


@pytest.mark.parametrize("source", ["kohya", "diffusers"])
def test_a_lora_file_as_init_lora_starts_from_its_weights(tiny_sd1, sd_image_folder, tmp_path, source):
    first = tmp_path / "first"
    outputs, _ = run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, first, max_train_steps=3))
    kohya_file = first / "first.safetensors"
    start = kohya_file if source == "kohya" else first / "pytorch_lora_weights.safetensors"

    # A learning rate too small to move anything: the continued LoRA must equal the file it started from.
    second = tmp_path / "second"
    _, events = run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, second, max_train_steps=1,
                                            learning_rate=1e-12, weight_decay=0.0, init_lora=str(start)))
    assert any("Continuing from the LoRA" in getattr(e, "message", "") for e in events)
    before, after = load_file(str(kohya_file)), load_file(str(second / "second.safetensors"))
    assert set(after) == set(before)
    for key in before:
        torch.testing.assert_close(after[key].float(), before[key].float(), atol=1e-5, rtol=1e-4)
