"""Distilled models (Z-Image Turbo, FLUX.1 schnell) on the tiny Z-Image: a training adapter is merged for
training and left out of the saved LoRA and the previews, previews can be drawn on another model of the
family (sample_base: the Turbo one while the base trains), the run and the Train tab warn when a distilled
model is trained without an adapter, and the presets' preview steps and guidance follow the model."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.fixtures.tiny_sd import run_collect, two_step_config

ADAPTED = ("layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v",
           "layers.1.feed_forward.w1", "noise_refiner.0.attention.to_out.0")



def _config(model, data, out, **overrides) -> dict:
    return two_step_config(model, data, out, **{"save_steps": 2, "sample_guidance_scale": 0.0, **overrides})


def make_training_adapter(model_folder: Path, path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Z-Image LoRA file in ComfyUI's names (qkv fused) on a few modules, strong enough to change the loss;
    returns it and its update per diffusers module."""
    from core.families.zimage.load import load_model
    from core.families.zimage.lora_files import write_kohya_file

    named = dict(load_model(str(model_folder)).transformer.named_modules())
    generator = torch.Generator().manual_seed(11)
    state, delta = {}, {}
    for module in ADAPTED:
        out_f, in_f = named[module].weight.shape
        down, up = torch.randn(2, in_f, generator=generator), torch.randn(out_f, 2, generator=generator) * 0.5
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = down, up
        delta[module] = up @ down * (1.0 / 2)
    return write_kohya_file(state, path, variant="z-image-turbo", alpha=1.0, dtype=torch.float32), delta


def _losses(events) -> list[float]:
    return [e.loss for e in events if e.kind == "progress"]


def _warnings(events) -> list[str]:
    return [e.message for e in events if e.kind == "warning"]


def _dw(peft: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    out = {}
    for key, a in peft.items():
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            out[path.removeprefix("transformer.")] = (peft[f"{path}.lora_B.weight"].float() @ a.float()
                                                      * alphas.get(path, a.shape[0]) / a.shape[0])
    return out


def test_a_training_adapter_is_merged_for_training_and_absent_from_the_saved_lora_and_the_previews(
        tiny_zimage, two_images, tmp_path):
    from core.families.zimage.lora_files import read_lora
    from core.sample import clear_pipeline_cache, generate_images

    adapter, _ = make_training_adapter(tiny_zimage.folder, tmp_path / "adapter.safetensors")
    plain_out, adapted_out = tmp_path / "plain", tmp_path / "adapted"
    plain, plain_events = run_collect(_config(tiny_zimage.folder, two_images, plain_out, output_name="z"))
    outputs, events = run_collect(_config(tiny_zimage.folder, two_images, adapted_out, output_name="z",
                                          training_adapter=str(adapter), sample_prompts=["a red thing"]))
    # Merged: the same seed and data give another loss from the first step on.
    assert abs(_losses(events)[0] - _losses(plain_events)[0]) > 1e-4
    assert any("Training adapter adapter.safetensors merged into 5 layers" in e.message
               for e in events if e.kind == "log")
    # Warned without an adapter (the tiny model is a Turbo), not with one.
    assert any("distilled model" in w and "training_adapter" in w for w in _warnings(plain_events))
    assert not any("distilled model" in w for w in _warnings(events))

    # Left out: the file holds the run's own modules, and their update is exactly the run's own LoRA
    # (the checkpoint's PEFT weights), not LoRA + adapter.
    saved = load_file(outputs["lora"])
    assert saved.keys() == load_file(plain["lora"]).keys()
    own = load_file(str(adapted_out / "checkpoints" / "step-000002" / "transformer_peft.safetensors"))
    peft, alphas, _ = read_lora(outputs["lora"])
    ours, expect = _dw(peft, alphas), _dw(own, {k.removesuffix(".lora_A.weight"): 4.0 for k in own})
    assert set(ours) == set(expect)
    for module in ours:
        torch.testing.assert_close(ours[module], expect[module], atol=1e-6, rtol=1e-5)

    # Previews are drawn without the adapter: the final preview is the Test tab's image of the saved LoRA.
    preview = Image.open(adapted_out / "samples" / "step-000002-0.png")
    try:
        tab = generate_images(str(tiny_zimage.folder), outputs["lora"], ["a red thing"], weight=1.0, seed=1234,
                              steps=2, guidance=0.0, width=preview.width, height=preview.height)[0]
    finally:
        clear_pipeline_cache()
    assert np.abs(np.asarray(preview, dtype=int) - np.asarray(tab, dtype=int)).max() <= 2


def test_a_training_adapter_of_another_model_or_for_sd_is_refused_in_one_sentence(tiny_zimage, two_images, tmp_path):
    from core.train.training_adapter import merge_training_adapter
    from core.families.zimage.load import load_model
    from core.family_api.lookup import family_impl

    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_layers_0_attention_qkv.lora_down.weight": torch.zeros(2, 7),
               "lora_unet_layers_0_attention_qkv.lora_up.weight": torch.zeros(99, 2)}, str(foreign))
    model = load_model(str(tiny_zimage.folder))
    with pytest.raises(ValueError, match="training_adapter 'foreign.safetensors'"):
        merge_training_adapter(model.transformer, foreign, family_impl("z-image-turbo").lora_files.to_peft, "Z-Image")
    from core.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="training_adapter"):
        config_from_dict(_config(tiny_zimage.folder, two_images, tmp_path / "o", training_adapter=str(foreign),
                                 base_quantization="nf4"))


def _other_weights(folder: Path, to: Path) -> Path:
    """A copy of the tiny model whose transformer weights differ (the 'Turbo' to preview on)."""
    shutil.copytree(folder, to)
    weights = next((to / "transformer").glob("*.safetensors"))
    state = load_file(str(weights))
    generator = torch.Generator().manual_seed(5)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.dim() == 2 else v
               for k, v in state.items()}, str(weights))
    return to


def test_previews_are_drawn_on_sample_base_with_the_run_lora(tiny_zimage, two_images, tmp_path):
    from core.sample import clear_pipeline_cache, generate_images

    turbo = _other_weights(tiny_zimage.folder, tmp_path / "tiny-z-image-turbo-2")
    out = tmp_path / "out"
    outputs, _ = run_collect(_config(tiny_zimage.folder, two_images, out, output_name="z", sample_base=str(turbo),
                                     sample_prompts=["a red thing"], learning_rate=5e-2))
    preview = np.asarray(Image.open(out / "samples" / "step-000002-0.png"), dtype=int)
    kwargs = dict(weight=1.0, seed=1234, steps=2, guidance=0.0, width=64, height=64)
    try:
        on_turbo = np.asarray(generate_images(str(turbo), outputs["lora"], ["a red thing"], **kwargs)[0], dtype=int)
        on_base = np.asarray(generate_images(str(tiny_zimage.folder), outputs["lora"], ["a red thing"],
                                             **kwargs)[0], dtype=int)
    finally:
        clear_pipeline_cache()
    assert preview.shape == on_turbo.shape and np.abs(preview - on_turbo).max() <= 1
    assert np.abs(preview - on_base).max() >= 4


def test_the_registry_marks_distilled_models_and_presets_take_their_preview_steps_and_guidance(tiny_zimage):
    from core.family_api.registry import distilled_warning, family_info
    from core.presets import preview_values

    assert family_info("z-image-turbo").distilled and family_info("flux-schnell").distilled
    assert not family_info("z-image").distilled and not family_info("flux-dev").distilled
    assert family_info("z-image-turbo").training_base == "Tongyi-MAI/Z-Image"
    assert family_info("z-image").sample_base == "Tongyi-MAI/Z-Image-Turbo"
    assert preview_values({"base_model": "Tongyi-MAI/Z-Image-Turbo"}) == {
        "sample_num_inference_steps": 8, "sample_guidance_scale": 0.0}
    assert preview_values({"base_model": "Tongyi-MAI/Z-Image"})["sample_num_inference_steps"] == 50
    # Trained on the base, previewed on Turbo: Turbo's sampling.
    assert preview_values({"base_model": "Tongyi-MAI/Z-Image", "sample_base": str(tiny_zimage.folder)}) == {
        "sample_num_inference_steps": 8, "sample_guidance_scale": 0.0}
    assert preview_values({"base_model": "black-forest-labs/FLUX.1-schnell"})["sample_num_inference_steps"] == 4
    assert preview_values({"base_model": "black-forest-labs/FLUX.1-dev"})["sample_num_inference_steps"] == 28
    from core.presets import apply_preset

    chosen = apply_preset({"preset": "cpu", "base_model": "Tongyi-MAI/Z-Image-Turbo"})
    assert (chosen["sample_num_inference_steps"], chosen["sample_guidance_scale"]) == (8, 0.0)
    mine = apply_preset({"preset": "cpu", "base_model": "Tongyi-MAI/Z-Image", "sample_num_inference_steps": 30})
    assert (mine["sample_num_inference_steps"], mine["sample_guidance_scale"]) == (30, 4.0)  # the user's value stays
    sentence = distilled_warning("z-image-turbo", "")
    assert not re.search(r"\.\s+[A-Z]", sentence) and sentence.endswith(".") and "training_adapter" in sentence
    assert distilled_warning("z-image-turbo", "adapter.safetensors") == "" and distilled_warning("sd1", "") == ""


def test_the_train_tab_warns_in_one_sentence_when_a_distilled_model_trains_without_an_adapter(tiny_zimage):
    from ui.train_tab import distilled_line

    raw = {"task_type": "image-generation", "base_model": str(tiny_zimage.folder)}
    assert "Z-Image-Turbo is a distilled model" in distilled_line(raw)
    assert distilled_line({**raw, "training_adapter": "adapter.safetensors"}) == ""
    assert distilled_line({**raw, "task_type": "text-generation"}) == ""


def test_a_lora_trained_on_the_base_is_tested_on_its_turbo_without_a_family_warning(tmp_path):
    from core.export.inspect import inspect_lora, lora_family_mismatch
    from core.families.zimage.lora_files import write_kohya_file

    state = {"layers.0.attention.to_out.0.lora_A.weight": torch.randn(2, 32),
             "layers.0.attention.to_out.0.lora_B.weight": torch.randn(32, 2)}
    base_lora = write_kohya_file(state, tmp_path / "base.safetensors", variant="z-image", alpha=2.0,
                                 dtype=torch.float32)
    info = inspect_lora(base_lora)
    assert info.family in ("z-image", "z-image-turbo")  # the keys are the same; either is the pair
    assert lora_family_mismatch(info, "z-image-turbo") is None and lora_family_mismatch(info, "z-image") is None
    assert lora_family_mismatch(info, "flux-dev") is not None


def test_a_sharded_run_refuses_sample_base_in_one_sentence():
    import dataclasses

    from core.config import TrainConfig, fsdp_refusal

    cfg = dataclasses.replace(TrainConfig(), distributed="fsdp", sample_base="Tongyi-MAI/Z-Image-Turbo")
    assert fsdp_refusal(cfg).startswith("sample_base draws previews with the LoRA as saved")
    assert fsdp_refusal(dataclasses.replace(cfg, sample_base="")) is None
