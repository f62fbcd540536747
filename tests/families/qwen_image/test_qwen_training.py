"""Qwen-Image LoRAs train end to end through ImageRun: both files written and loadable by diffusers
(every key) in ComfyUI's key layout, the same dW in both, fp8 storage on the CPU,
previews from the cached prompt encodings."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_sd import lora_header, run_collect, two_step_config





def comfy_key_map(model_keys: list[str]) -> dict[str, str]:
    """ComfyUI's LoRA key map for a Qwen-Image model (comfy/lora.py model_lora_keys_unet, reimplemented):
    every `diffusion_model.<m>.weight` of the model is reachable as `lora_unet_<m with _>`,
    `diffusion_model.<m>`, `<m>`, `transformer.<m>` and `lycoris_<m with _>`."""
    out = {}
    for key in model_keys:
        if not key.endswith(".weight"):
            continue
        module = key[:-len(".weight")]
        full = f"diffusion_model.{key}"
        for name in (f"lora_unet_{module.replace('.', '_')}", f"diffusion_model.{module}", module,
                     f"transformer.{module}", f"lycoris_{module.replace('.', '_')}"):
            out[name] = full
    return out


def comfy_loaded(lora_keys: list[str], key_map: dict[str, str]) -> set[str]:
    """The keys ComfyUI's load_lora consumes (lora_up / lora_down / alpha of a mapped name)."""
    used = set()
    for name in key_map:
        for suffix in (".lora_up.weight", ".lora_down.weight", ".alpha"):
            if name + suffix in lora_keys:
                used.add(name + suffix)
    return used


def test_a_tiny_qwen_image_trains_and_writes_both_files(tiny_qwen_image, two_images, tmp_path):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from core.families.qwen_image.lora_files import read_lora

    out = tmp_path / "out"
    outputs, events = run_collect(two_step_config(tiny_qwen_image.folder, two_images, out, output_name="my_qwen",
                                          lora_alpha=2, sample_prompts=["a red thing"], sample_steps=2,
                                          save_steps=2))
    logs = [e.message for e in events if e.kind == "log"]
    assert any(m.startswith("Model: Qwen-Image (diffusers)") for m in logs), logs
    losses = [e.loss for e in events if e.kind == "progress"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    kohya, diffusers_file = out / "my_qwen.safetensors", out / "pytorch_lora_weights.safetensors"
    assert outputs["lora"] == str(kohya)
    keys, meta = lora_header(kohya)
    assert meta["ss_base_model_version"] == "qwen_image" and meta["modelspec.architecture"] == "Qwen-Image/lora"
    assert meta["ss_network_module"] == "networks.lora_qwen_image" and meta["ss_network_alpha"] == "2"
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in keys
    assert "lora_unet_transformer_blocks_1_img_mlp_net_0_proj.lora_up.weight" in keys
    assert not any("_mod_" in k for k in keys)  # no modulation Linears, as musubi-tuner
    assert (out / "samples" / "step-000002-0.png").is_file()

    # ComfyUI: every key of our file maps to a weight of the model, key for key.
    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_image.folder, subfolder="transformer")
    used = comfy_loaded(keys, comfy_key_map(list(transformer.state_dict())))
    assert used == set(keys)

    # diffusers reads every key of both files into the same modules and values.
    from_diffusers = QwenImagePipeline.lora_state_dict(str(diffusers_file))
    from_kohya = QwenImagePipeline.lora_state_dict(str(kohya))
    ours, alphas, _ = read_lora(kohya)
    assert {f"transformer.{k}" for k in ours} == {k for k in from_diffusers if "lora_" in k}
    assert len(from_diffusers) == len(ours)
    assert set(alphas.values()) == {2.0} and set(read_lora(diffusers_file)[1].values()) == {2.0}

    # Same dW: diffusers' converter folds alpha / rank into the kohya file's down weights.
    for key, value in ours.items():
        torch.testing.assert_close(value, from_diffusers[f"transformer.{key}"].float(), atol=1e-6, rtol=1e-5)
    for module in {k.rsplit(".lora_", 1)[0] for k in ours}:
        a, b = from_kohya[f"transformer.{module}.lora_A.weight"], from_kohya[f"transformer.{module}.lora_B.weight"]
        da, db = ours[f"{module}.lora_A.weight"], ours[f"{module}.lora_B.weight"]
        torch.testing.assert_close((b.float() @ a.float()), (db @ da) * 2 / da.shape[0], atol=1e-6, rtol=1e-5)

    # Both files give the trained model's output: loaded into the pipeline, same transformer output.
    torch.manual_seed(0)
    hidden, text = torch.randn(1, 16, 16), torch.randn(1, 5, 16)
    results = []
    for path in (diffusers_file, kohya):
        pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image.folder)
        pipe.load_lora_weights(str(path))
        with torch.no_grad():
            results.append(pipe.transformer(hidden_states=hidden, encoder_hidden_states=text,
                                            encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long),
                                            timestep=torch.tensor([0.5]), img_shapes=[(1, 4, 4)],
                                            return_dict=False)[0])
    base = QwenImagePipeline.from_pretrained(tiny_qwen_image.folder).transformer
    with torch.no_grad():
        plain = base(hidden_states=hidden, encoder_hidden_states=text,
                     encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long), timestep=torch.tensor([0.5]),
                     img_shapes=[(1, 4, 4)], return_dict=False)[0]
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(results[0], plain)


def test_the_comfyui_layout_trains_with_fp8_storage(tiny_qwen_image, two_images, tmp_path):
    text_encoder = tiny_qwen_image.comfy_root / "text_encoders" / "qwen_2.5_vl_7b.safetensors"
    outputs, events = run_collect(two_step_config(tiny_qwen_image.comfy_transformer, two_images, tmp_path / "fp8",
                                          base_model_config=str(tiny_qwen_image.folder), fp8_base=True,
                                          gradient_checkpointing=True, text_encoder_files=str(text_encoder)))
    logs = [e.message for e in events if e.kind == "log"]
    assert any(m.startswith("Model: Qwen-Image (single file)") for m in logs), logs
    assert any(m.startswith("fp8 storage:") for m in logs), logs
    assert any("Text encoder qwen_2.5_vl_7b.safetensors" in m for m in logs), logs
    losses = [e.loss for e in events if e.kind == "progress"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    keys, _ = lora_header(Path(outputs["lora"]))
    assert keys and all(re.match(r"lora_unet_transformer_blocks_\d+_", k) for k in keys)


def test_the_family_is_read_from_the_models_files(tiny_qwen_image, tiny_qwen_edit):
    from core.family_api.lookup import detect_image_family, family_for_model
    from core.families.qwen_image.family import FAMILY
    from core.model_info import detect_model as model_info

    assert detect_image_family(str(tiny_qwen_image.folder)) == "qwen-image"
    assert detect_image_family(str(tiny_qwen_image.comfy_transformer)) == "qwen-image"
    assert detect_image_family(str(tiny_qwen_edit.folder)) == "qwen-image-edit"
    assert family_for_model(str(tiny_qwen_image.folder)) is FAMILY
    assert model_info(str(tiny_qwen_image.folder)).family == "qwen-image"
    assert model_info(str(tiny_qwen_image.comfy_transformer)).family == "qwen-image"
    assert model_info("Qwen/Qwen-Image-Edit").family == "qwen-image-edit"


def test_qwen_image_edit_trains_on_pairs_with_the_control_given_to_both_encoders(tiny_qwen_edit, tmp_path,
                                                                                 monkeypatch):
    from core.families.qwen_image import loss as qwen_loss_module
    from core.families.qwen_image import text as qwen_text
    from tests.data.test_pairs import make_pairs

    data = make_pairs(tmp_path / "pairs", count=2)
    from PIL import Image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "lonely.png")  # a target without a control: skipped
    seen_batches, seen_images = [], []
    real_loss, real_encode = qwen_loss_module.qwen_loss, qwen_text.encode_prompt_list

    def spy_loss(transformer, batch, generator=None, **kwargs):
        seen_batches.append(batch)
        return real_loss(transformer, batch, generator, **kwargs)

    def spy_encode(*args, images=None, **kwargs):
        seen_images.append(images)
        return real_encode(*args, images=images, **kwargs)

    # The Edit pipeline sizes the control to about 1 megapixel for the VL encoder and the preview's latents;
    # 64 px keeps this tiny CPU run quick (the wiring is what is checked here).
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_pipeline

    monkeypatch.setattr(edit_pipeline, "calculate_dimensions", lambda area, ratio: (64, 64, None))
    monkeypatch.setattr(qwen_loss_module, "qwen_loss", spy_loss)
    monkeypatch.setattr(qwen_text, "encode_prompt_list", spy_encode)
    out = tmp_path / "edit"
    outputs, events = run_collect(two_step_config(tiny_qwen_edit.folder, data, out, caption_dropout=0.5,
                                          sample_prompts=["make it green"], sample_steps=2))
    logs = [e.message for e in events if e.kind == "log"]
    warnings = [e.message for e in events if e.kind == "warning"]
    assert any(m.startswith("Model: Qwen-Image-Edit (diffusers)") for m in logs), logs
    assert any("lonely.png (no control image)" in w for w in warnings), warnings
    losses = [e.loss for e in events if e.kind == "progress"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # The transformer got the control latents (same bucket as the target), the VL encoder the control images.
    assert seen_batches and all(b.control is not None and b.control.shape == b.latents.shape for b in seen_batches)
    assert seen_images and all(imgs and all(i is not None for i in imgs) for imgs in seen_images)
    # The preview edits the first pair's control image with the sample prompt (encoded with it, cached).
    assert (out / "samples" / "step-000002-0.png").is_file()
    _, meta = lora_header(Path(outputs["lora"]))
    assert meta["ss_base_model_version"] == "qwen_image_edit" and meta["modelspec.architecture"] == \
        "Qwen-Image-Edit/lora"


def test_an_edit_model_without_pairs_says_how_to_give_them(tiny_qwen_edit, two_images, tmp_path):
    with pytest.raises(ValueError, match="control/ folder"):
        run_collect(two_step_config(tiny_qwen_edit.folder, two_images, tmp_path / "out"))


def test_edit_pairs_train_without_the_latent_cache_too(tiny_qwen_edit, tmp_path):
    from tests.data.test_pairs import make_pairs

    data = make_pairs(tmp_path / "pairs", count=2)
    _, events = run_collect(two_step_config(tiny_qwen_edit.folder, data, tmp_path / "out", cache_latents=False,
                                    random_flip=True))
    losses = [e.loss for e in events if e.kind == "progress"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
