"""SD3 / SD3.5 LoRAs train end to end through the one image path: both files written and loadable,
previews from cached prompt encodings, the Test tab, SAI's all-in-one
file, SD3.5 Large with fp8 storage on the CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.fixtures.tiny_sd import lora_header, run_collect, two_step_config





def test_a_tiny_sd35_medium_trains_writes_both_files_and_the_test_tab_uses_them(tiny_sd3, two_images, tmp_path,
                                                                                monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    from core.families.sd3 import loss as sd3_loss_module
    from core.families.sd3.lora_files import read_lora
    from core.sample import clear_pipeline_cache, generate_images

    seen: list[dict] = []
    real_loss = sd3_loss_module.sd3_loss

    def spy(transformer, latents, cond, generator=None, **kwargs):
        seen.append(kwargs)
        return real_loss(transformer, latents, cond, generator, **kwargs)

    monkeypatch.setattr(sd3_loss_module, "sd3_loss", spy)
    out = tmp_path / "out"
    outputs, events = run_collect(two_step_config(tiny_sd3.folder, two_images, out, output_name="my_sd3", lora_alpha=2,
                                          sample_prompts=["a red thing"], sample_steps=2, save_steps=2,
                                          sample_negative_prompt="blue"))
    logs = [e.message for e in events if e.kind == "log"]
    assert any(m.startswith("Model: SD3.5 Medium (diffusers)") for m in logs), logs
    losses = [e.loss for e in events if e.kind == "progress"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # The reference default: shift sampling with SD3's scheduler shift 3.0 (the config's default means it).
    assert seen and all(k["timestep_sampling"] == "shift" and k["shift"] == 3.0 for k in seen)

    kohya, diffusers_file = Path(outputs["lora"]), Path(outputs["diffusers"])
    assert kohya.name == "my_sd3.safetensors"
    keys, meta = lora_header(kohya)
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["ss_steps"] == "2"
    assert meta["ss_network_alpha"] == "2" and meta["ss_discrete_flow_shift"] == "3"
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in keys
    assert all(k.startswith("lora_unet_joint_blocks_") for k in keys)
    assert (out / "samples" / "step-000002-0.png").is_file()
    assert (out / "checkpoints" / "step-000002" / "transformer_peft.safetensors").is_file()

    # The LoRA moved: some B is non-zero; both files hold the same modules and values.
    from_kohya, alphas, _ = read_lora(kohya)
    from_diffusers = StableDiffusion3Pipeline.lora_state_dict(str(diffusers_file))
    assert {f"transformer.{k}" for k in from_kohya} == set(from_diffusers)
    assert any(v.abs().sum() > 0 for k, v in from_kohya.items() if "lora_B" in k)
    for key, value in from_kohya.items():
        torch.testing.assert_close(value, from_diffusers[f"transformer.{key}"].float(), atol=1e-6, rtol=1e-5)
    assert set(alphas.values()) == {2.0} and set(read_lora(diffusers_file)[1].values()) == {2.0}

    # The Test tab: the LoRA at weight 0 is the base model, at 1 it changes the image.
    kwargs = dict(seed=3, steps=2, guidance=4.0, width=32, height=32)
    try:
        base = generate_images(str(tiny_sd3.folder), None, ["a red thing"], **kwargs)[0]
        zero = generate_images(str(tiny_sd3.folder), diffusers_file, ["a red thing"], weight=0.0, **kwargs)[0]
        full = generate_images(str(tiny_sd3.folder), kohya, ["a red thing"], weight=1.0, **kwargs)[0]
    finally:
        clear_pipeline_cache()
    assert base.size == (32, 32)
    assert np.array_equal(np.asarray(zero), np.asarray(base))
    assert not np.array_equal(np.asarray(full), np.asarray(base))


def test_sais_all_in_one_file_trains_as_comfyui_has_it(tiny_sd3, two_images, tmp_path):
    outputs, events = run_collect(two_step_config(tiny_sd3.comfy_checkpoint, two_images, tmp_path / "aio",
                                          base_model_config=str(tiny_sd3.folder), max_train_steps=1))
    logs = [e.message for e in events if e.kind == "log"]
    assert any(m.startswith("Model: SD3.5 Medium (single file)") for m in logs), logs
    assert any("T5: sd3.5_medium_incl_clips" in m for m in logs), logs
    _, meta = lora_header(Path(outputs["lora"]))
    assert meta["ss_base_model_version"] == "5-medium"


def test_sd35_large_trains_with_fp8_storage_on_the_cpu_and_continues_from_its_file(tiny_sd35_large, two_images,
                                                                                   tmp_path):
    from core.families.sd3.lora_files import read_lora

    outputs, events = run_collect(two_step_config(tiny_sd35_large.folder, two_images, tmp_path / "fp8", fp8_base=True,
                                          gradient_checkpointing=True))
    logs = [e.message for e in events if e.kind == "log"]
    assert any(m.startswith("fp8 storage:") for m in logs), logs
    assert any(m.startswith("Model: SD3.5 Large") for m in logs), logs
    assert all(np.isfinite([e.loss for e in events if e.kind == "progress"]))
    keys, meta = lora_header(Path(outputs["lora"]))
    assert meta["ss_base_model_version"] == "5-large"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"
    assert not any("attn2" in k for k in keys)
    # Continued with a learning rate too small to move anything: the new file equals the old one.
    second, events = run_collect(two_step_config(tiny_sd35_large.folder, two_images, tmp_path / "again", max_train_steps=1,
                                         learning_rate=1e-12, weight_decay=0.0, init_lora=outputs["lora"]))
    assert any("Continuing from the LoRA" in getattr(e, "message", "") for e in events)
    before, after = read_lora(outputs["lora"])[0], read_lora(second["lora"])[0]
    assert set(before) == set(after)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=1e-5)


def test_the_sd3_benchmark_runs_both_sides_at_toy_sizes():
    from bench import sd3_speed

    results = sd3_speed.main(["--toy", "--steps", "3", "--resolution", "64", "--threads", "1"])
    assert set(results) == {"ours", "peer", "ratios"}
    assert all(results[side]["s_per_step"] > 0 for side in ("ours", "peer"))
