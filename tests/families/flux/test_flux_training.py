"""FLUX.1 and Chroma LoRAs train end to end like SD ones: train.py from a YAML, both files written
and loadable, Chroma's own sampling, fp8 storage on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from tests.fixtures.tiny_sd import lora_header, run_collect, two_step_config

ROOT = Path(__file__).resolve().parents[3]





def test_a_tiny_flux_dev_trains_from_a_yaml_with_train_py_and_writes_both_files(tiny_flux_dev, two_images,
                                                                                  tmp_path):
    from diffusers import FluxPipeline

    from core.families.flux.lora_files import read_flux_lora
    from core.sample import clear_pipeline_cache, generate_images

    out = tmp_path / "out"
    config = tmp_path / "flux.yaml"
    config.write_text(yaml.safe_dump(two_step_config(tiny_flux_dev.folder, two_images, out, output_name="my_flux",
                                             lora_alpha=2, sample_prompts=["a red thing"], sample_steps=2,
                                             save_steps=2)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FLUX.1-dev" in done.stdout and "Done: 2 steps" in done.stdout

    kohya, diffusers_file = out / "my_flux.safetensors", out / "pytorch_lora_weights.safetensors"
    keys, meta = lora_header(kohya)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_steps"] == "2"
    assert "modelspec.prediction_type" not in meta
    # BFL names (what WebUI / Forge / ComfyUI load), fused qkv included.
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert (out / "samples" / "step-000002-0.png").is_file()
    assert (out / "checkpoints" / "step-000002" / "transformer_peft.safetensors").is_file()

    # The kohya file reads back into the same diffusers modules and values as the diffusers file.
    from_kohya, alphas, _ = read_flux_lora(kohya)
    from_diffusers = FluxPipeline.lora_state_dict(str(diffusers_file))
    assert {f"transformer.{k}" for k in from_kohya} == set(from_diffusers)
    for key, value in from_kohya.items():
        torch.testing.assert_close(value, from_diffusers[f"transformer.{key}"].float(), atol=1e-6, rtol=1e-5)
    # alpha 2 with rank 4 is kept in both files (diffusers would assume alpha = rank without it).
    assert set(alphas.values()) == {2.0} and set(read_flux_lora(diffusers_file)[1].values()) == {2.0}
    assert meta["ss_network_alpha"] == "2"

    # The Test tab's path: the LoRA at weight 0 is the base model, at 1 it changes the image.
    kwargs = dict(seed=3, steps=2, guidance=3.5, width=32, height=32)
    try:
        base = generate_images(str(tiny_flux_dev.folder), None, ["a red thing"], **kwargs)[0]
        zero = generate_images(str(tiny_flux_dev.folder), diffusers_file, ["a red thing"], weight=0.0, **kwargs)[0]
        full = generate_images(str(tiny_flux_dev.folder), diffusers_file, ["a red thing"], weight=1.0, **kwargs)[0]
    finally:
        clear_pipeline_cache()
    assert base.size == (32, 32)
    assert np.array_equal(np.asarray(zero), np.asarray(base))
    assert not np.array_equal(np.asarray(full), np.asarray(base))


def test_chroma_trains_with_sigmoid_sampling_and_no_guidance(tiny_chroma, two_images, tmp_path, monkeypatch):
    from diffusers import ChromaPipeline

    from core.families.flux import loss as flux_train

    seen: list[dict] = []
    real_loss = flux_train.flux_loss

    def spy(transformer, batch, generator=None, **kwargs):
        seen.append(kwargs)
        return real_loss(transformer, batch, generator, **kwargs)

    monkeypatch.setattr(flux_train, "flux_loss", spy)
    out = tmp_path / "chroma"
    # ComfyUI's layout: the BFL transformer file; T5 and AE found in models/, configs from the folder.
    outputs, events = run_collect(two_step_config(tiny_chroma.comfy_transformer, two_images, out,
                                          base_model_config=str(tiny_chroma.folder), sample_prompts=["a red thing"],
                                          sample_guidance_scale=2.0, sample_negative_prompt="blue"))
    assert [e.step for e in events if e.kind == "progress"] == [1, 2]
    logs = [e.message for e in events if e.kind == "log"]
    assert any(m.startswith("Model: Chroma (single file)") for m in logs), logs
    assert seen and all(k["timestep_sampling"] == "sigmoid" and k["guidance"] is None for k in seen)
    keys, meta = lora_header(Path(outputs["lora"]))
    assert meta["ss_base_model_version"] == "chroma" and meta["modelspec.architecture"] == "chroma/lora"
    assert all(k.startswith("lora_unet_") for k in keys) and not any("guidance_in" in k for k in keys)
    assert ChromaPipeline.lora_state_dict(outputs["diffusers"])
    assert (out / "samples" / "step-000002-0.png").is_file()  # previews from the cached prompt encodings


def test_a_flux_lora_file_as_init_lora_starts_from_its_weights(tiny_flux_dev, two_images, tmp_path):
    from core.families.flux.lora_files import read_flux_lora

    first, _ = run_collect(two_step_config(tiny_flux_dev.folder, two_images, tmp_path / "first", lora_blocks="attention"))
    # A learning rate too small to move anything: the continued LoRA equals the file it started from.
    second, events = run_collect(two_step_config(tiny_flux_dev.folder, two_images, tmp_path / "second", max_train_steps=1,
                                         learning_rate=1e-12, weight_decay=0.0, init_lora=first["lora"]))
    assert any("Continuing from the LoRA" in getattr(e, "message", "") for e in events)
    before, alphas_before, _ = read_flux_lora(first["lora"])
    after, alphas_after, _ = read_flux_lora(second["lora"])
    assert set(after) == set(before) and alphas_after == alphas_before
    assert not any("proj_mlp" in k for k in after)  # the attention-only modules of the file, no others
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=1e-5)


def test_fp8_base_trains_on_the_cpu(tiny_flux_dev, two_images, tmp_path, monkeypatch):
    from core.families.dit import low_memory

    trained = []
    real = low_memory.enable_fp8_storage

    def keep(transformer, *args, **kwargs):
        trained.append(transformer)
        return real(transformer, *args, **kwargs)

    monkeypatch.setattr(low_memory, "enable_fp8_storage", keep)
    ae = tiny_flux_dev.comfy_root / "vae" / "ae.safetensors"  # a separate AE file with a diffusers folder
    outputs, events = run_collect(two_step_config(tiny_flux_dev.folder, two_images, tmp_path / "fp8", fp8_base=True,
                                          gradient_checkpointing=True, vae=str(ae)))
    logs = [e.message for e in events if e.kind == "log"]
    assert any(m.startswith("fp8 storage:") for m in logs), logs
    assert f"AE from {ae}" in logs
    losses = [e.loss for e in events if e.kind == "progress"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # After the steps: the frozen base weights are stored in float8, the trained LoRA is fp32 and moved.
    block = trained[0].transformer_blocks[0]
    assert block.attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    lora = [p for n, p in trained[0].named_parameters() if "lora_" in n]
    assert lora and {p.dtype for p in lora} == {torch.float32}
    assert any(p.abs().sum() > 0 for n, p in trained[0].named_parameters() if "lora_B" in n)
    _, meta = lora_header(Path(outputs["lora"]))
    assert meta["ss_base_model_version"] == "flux1"


def test_the_family_is_read_from_the_models_files(tiny_flux_dev, tiny_chroma, tiny_sd1):
    from core.family_api.lookup import detect_image_family, family_for_model
    from core.families.flux.family import FLUX
    from core.families.sd.family import SD

    assert detect_image_family(str(tiny_flux_dev.folder)) == "flux-dev"
    assert detect_image_family(str(tiny_flux_dev.comfy_transformer)) == "flux-dev"
    assert detect_image_family(str(tiny_chroma.comfy_transformer)) == "chroma"
    assert detect_image_family(str(tiny_sd1.folder)) == "sd1"
    assert family_for_model(str(tiny_chroma.folder)) is FLUX and family_for_model(str(tiny_sd1.folder)) is SD
