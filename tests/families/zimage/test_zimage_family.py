"""Z-Image (Turbo and base): registry sizes from the real configs, loading a diffusers folder and ComfyUI's
single files, Qwen3 prompts as ZImagePipeline encodes them, training through ImageRun,
and both LoRA files: ComfyUI's key map (reimplemented from comfy/lora.py) and diffusers' loader read every
key, and both give the trained model's dW."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.families.comfy_keys import unet_key_map

from tests.fixtures.tiny_sd import run_collect, two_step_config




def test_registry_sizes_are_the_real_configs_counted_on_the_meta_device():
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from core.family_api.registry import FLUX_AE, QWEN3_4B, Z_IMAGE, family_info

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel()  # diffusers' defaults are Z-Image's config (dim 3840, 30 layers)
        qwen = Qwen3Model(Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                      vocab_size=151936, tie_word_embeddings=True))
    assert sum(p.numel() for p in transformer.parameters()) == Z_IMAGE
    assert sum(p.numel() for p in qwen.parameters()) == QWEN3_4B
    for name in ("z-image-turbo", "z-image"):
        info = family_info(name)
        assert info.kind == "dit" and info.is_flow_matching and info.preset_family == "z-image"
        assert info.trained_params == Z_IMAGE and info.frozen_params == QWEN3_4B + FLUX_AE
        assert info.pipeline_class == "ZImagePipeline"
    assert family_info("z-image-turbo").hub_repo == "Tongyi-MAI/Z-Image-Turbo"


def test_folder_and_comfy_single_files_load_the_same_model_and_are_detected(tiny_zimage):
    from core.families.zimage.load import detect, load_model, variant_from_name

    assert detect(str(tiny_zimage.folder)) == "z-image-turbo"
    assert detect(str(tiny_zimage.comfy_transformer)) == "z-image-turbo"
    assert detect("Tongyi-MAI/Z-Image") == "z-image" and variant_from_name("z_image_bf16.safetensors") == "z-image"
    assert detect(str(tiny_zimage.comfy_root / "vae" / "ae.safetensors")) is None
    folder = load_model(str(tiny_zimage.folder))
    single = load_model(str(tiny_zimage.comfy_transformer), config_source=str(tiny_zimage.folder))
    assert single.is_single_file and any("qwen_3_4b" in n for n in single.notes)
    a, b = folder.transformer.state_dict(), single.transformer.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    va, vb = folder.vae.state_dict(), single.vae.state_dict()
    assert all(torch.allclose(va[k], vb[k]) for k in va)
    ta, tb = folder.text_encoder.state_dict(), single.text_encoder.state_dict()
    assert set(ta) == set(tb)  # the fp16 file: equal up to fp16 rounding
    assert all(torch.allclose(ta[k], tb[k], atol=1e-3) for k in ta)


def test_prompts_are_encoded_as_the_pipeline_does(tiny_zimage):
    from diffusers import ZImagePipeline

    from core.families.zimage.load import load_model
    from core.families.zimage.text import encode_prompts

    model = load_model(str(tiny_zimage.folder))
    ours = encode_prompts(model.text_encoder, model.tokenizer, ["a red thing", "a photo of a cat"])
    pipe = ZImagePipeline.from_pretrained(str(tiny_zimage.folder))
    theirs, _ = pipe.encode_prompt(["a red thing", "a photo of a cat"], do_classifier_free_guidance=False)
    assert [t.shape[1] for t in ours] == [16, 16] and ours[0].shape[0] != ours[1].shape[0]  # padding cut off
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_the_loss_is_the_diffusers_scripts_objective(tiny_zimage):
    """model(x_s, 1 - s) ~ x0 - noise, i.e. -model ~ noise - x0 as train_dreambooth_lora_z_image.py has it."""
    from core.families.zimage.load import load_model
    from core.families.zimage.loss import ZImageBatch, zimage_loss

    model = load_model(str(tiny_zimage.folder))
    x0, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    sigmas = torch.tensor([0.3, 0.8])
    caps = [torch.randn(5, 16), torch.randn(3, 16)]
    ours = zimage_loss(model.transformer, ZImageBatch(x0, caps), sigmas=sigmas, noise=noise)
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        out = model.transformer(list(noisy.unsqueeze(2).unbind(0)), (1000 - sigmas * 1000) / 1000, caps,
                                return_dict=False)[0]
    pred = -torch.stack(out).squeeze(2)
    torch.testing.assert_close(ours.detach(), torch.nn.functional.mse_loss(pred, noise - x0))


def _dw(peft: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    out = {}
    for key, a in peft.items():
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            b = peft[f"{path}.lora_B.weight"]
            out[path.removeprefix("transformer.")] = (b.float() @ a.float()) * alphas[path] / a.shape[0]
    return out


def test_a_run_trains_writes_both_files_and_both_load_key_for_key(tiny_zimage, two_images, tmp_path):
    from diffusers import ZImagePipeline
    from safetensors import safe_open

    from core.families.zimage.lora_files import read_lora
    from core.families.zimage.tiny import native_transformer_state

    out = tmp_path / "out"
    outputs, events = run_collect(two_step_config(tiny_zimage.folder, two_images, out, output_name="zi", lora_alpha=2,
                                          sample_prompts=["a red thing"], sample_steps=2, save_steps=2))
    losses = [e.loss for e in events if e.kind == "progress"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    logs = [e.message for e in events if e.kind == "log"]
    assert "Model: Z-Image-Turbo (diffusers), flow matching" in logs
    assert any(m.startswith("LoRA rank 4 on 28 transformer layers") for m in logs), logs
    assert (out / "samples" / "step-000002-0.png").is_file()

    kohya = Path(outputs["lora"])
    with safe_open(str(kohya), "pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    assert meta["ss_base_model_version"] == "z_image_turbo" and meta["modelspec.architecture"] == "Z-Image/lora"
    assert meta["ss_network_alpha"] == "2" and meta["ss_steps"] == "2"
    assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in keys
    assert "lora_unet_context_refiner_0_feed_forward_w2.alpha" in keys
    # ComfyUI: every module of the file is a key of its map, pointing at a weight of the native model.
    native = list(native_transformer_state(ZImagePipeline.from_pretrained(str(tiny_zimage.folder))
                                           .transformer.state_dict()))
    comfy = unet_key_map([k for k in native if k.endswith(".weight")])
    modules = {re.sub(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", "", k) for k in keys}
    assert modules <= set(comfy), sorted(modules - set(comfy))[:5]
    assert comfy["lora_unet_layers_0_attention_qkv"] == "diffusion_model.layers.0.attention.qkv.weight"

    # diffusers: both files load with every key, and give the same dW as the trained LoRA.
    trained, trained_alphas, _ = read_lora(outputs["diffusers"])
    from_kohya, kohya_alphas, _ = read_lora(kohya)
    expect = _dw(trained, trained_alphas)
    for name, path in (("kohya", kohya), ("diffusers", Path(outputs["diffusers"]))):
        pipe = ZImagePipeline.from_pretrained(str(tiny_zimage.folder))
        state = ZImagePipeline.lora_state_dict(str(path))
        pipe.load_lora_weights(str(path), adapter_name="z")
        loaded = {k.removeprefix("transformer."): v for k, v in state.items()}
        assert len({k.rsplit(".lora_", 1)[0] for k in loaded}) == 28, name
        # every state key became a parameter of the transformer (none dropped)
        params = dict(pipe.transformer.named_parameters())
        assert all(k.replace(".lora_A.weight", ".lora_A.z.weight").replace(".lora_B.weight", ".lora_B.z.weight")
                   in params for k in loaded), name
        got = {}
        for module_name, module in pipe.transformer.named_modules():
            if hasattr(module, "lora_A") and "z" in getattr(module, "lora_A", {}):
                got[module_name] = module.get_delta_weight("z")
        assert set(got) == set(expect), name
        for path_ in expect:
            torch.testing.assert_close(got[path_].float(), expect[path_], atol=1e-5, rtol=1e-4)
    for path_ in expect:
        torch.testing.assert_close(_dw(from_kohya, kohya_alphas)[path_], expect[path_], atol=1e-6, rtol=1e-5)


def test_the_family_layer_names_z_image_from_its_files_and_headers(tiny_zimage, tmp_path):
    from core.export.inspect import family_from_keys
    from core.family_api.lookup import detect_image_family, family_for_model
    from core.families.zimage.family import ZIMAGE
    from core.model_info import detect_model

    assert detect_image_family(str(tiny_zimage.folder)) == "z-image-turbo"
    assert detect_image_family(str(tiny_zimage.comfy_transformer)) == "z-image-turbo"
    assert family_for_model(str(tiny_zimage.comfy_transformer)) is ZIMAGE
    assert detect_model(str(tiny_zimage.comfy_transformer)).family == "z-image-turbo"
    assert detect_model(str(tiny_zimage.folder)).family == "z-image-turbo"
    assert detect_model("Tongyi-MAI/Z-Image").family == "z-image"
    assert family_from_keys({"lora_unet_layers_0_attention_qkv.lora_down.weight": (4, 32)}, "kohya",
                            None) == "z-image-turbo"


def test_the_test_tab_makes_images_with_both_files_and_weight_0_is_the_base(tiny_zimage, two_images, tmp_path):
    import numpy as np

    from core.sample import clear_pipeline_cache, generate_images

    outputs, _ = run_collect(two_step_config(tiny_zimage.folder, two_images, tmp_path / "out", learning_rate=5e-2))
    kwargs = dict(seed=3, steps=2, guidance=0.0, width=32, height=32)
    model = str(tiny_zimage.folder)
    try:
        base = np.asarray(generate_images(model, None, ["a red thing"], **kwargs)[0])
        zero = np.asarray(generate_images(model, outputs["diffusers"], ["a red thing"], weight=0.0, **kwargs)[0])
        full = np.asarray(generate_images(model, outputs["diffusers"], ["a red thing"], weight=1.0, **kwargs)[0])
        comfy = np.asarray(generate_images(model, outputs["lora"], ["a red thing"], weight=1.0, **kwargs)[0])
        cfg = generate_images(model, None, ["a red thing"], **{**kwargs, "guidance": 3.0}, negative_prompt="blue")
    finally:
        clear_pipeline_cache()
    assert base.shape == (32, 32, 3) and np.array_equal(zero, base)
    assert not np.array_equal(full, base)
    assert np.abs(full.astype(int) - comfy.astype(int)).max() <= 1  # the same LoRA from either file
    assert cfg[0].size == (32, 32)


def test_the_benchmark_runs_both_sides_at_toy_sizes():
    from bench import zimage_speed

    results = zimage_speed.main(["--toy", "--steps", "3", "--resolution", "64", "--threads", "1"])
    assert set(results) == {"ours", "peer", "ratios"}
    assert all(results[side]["s_per_step"] > 0 for side in ("ours", "peer"))


def test_turbo_previews_run_without_cfg_unless_asked_and_base_previews_keep_it():
    from core.config import TrainConfig
    from core.families.zimage.family import preview_guidance

    cfg = TrainConfig(base_model="x", train_data_dir="y")
    assert preview_guidance(cfg, "z-image-turbo") == 0.0 and preview_guidance(cfg, "z-image") == 7.0
    assert preview_guidance(TrainConfig(base_model="x", train_data_dir="y", sample_guidance_scale=2.0),
                            "z-image-turbo") == 2.0


def test_fp8_base_with_checkpointing_trains_on_the_cpu_and_a_lora_file_continues(tiny_zimage, two_images, tmp_path,
                                                                                monkeypatch):
    from core.families.dit import low_memory
    from core.families.zimage.lora_files import read_lora

    trained = []
    real = low_memory.enable_fp8_storage

    def keep(transformer, *args, **kwargs):
        trained.append(transformer)
        return real(transformer, *args, **kwargs)

    monkeypatch.setattr(low_memory, "enable_fp8_storage", keep)
    first, events = run_collect(two_step_config(tiny_zimage.folder, two_images, tmp_path / "fp8", fp8_base=True,
                                        gradient_checkpointing=True))
    assert any(getattr(e, "message", "").startswith("fp8 storage:") for e in events)
    losses = [e.loss for e in events if e.kind == "progress"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    block = trained[0].layers[0]
    assert block.attention.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert block.adaLN_modulation[0].weight.dtype == torch.float8_e4m3fn
    assert trained[0].cap_embedder[1].weight.dtype != torch.float8_e4m3fn  # precision-sensitive: kept
    assert {p.dtype for n, p in trained[0].named_parameters() if "lora_" in n} == {torch.float32}

    # init_lora: the ComfyUI file as the starting point; a learning rate too small to move anything.
    second, events = run_collect(two_step_config(tiny_zimage.folder, two_images, tmp_path / "second", max_train_steps=1,
                                         learning_rate=1e-12, weight_decay=0.0, init_lora=first["lora"]))
    assert any("Continuing from the LoRA" in getattr(e, "message", "") for e in events)
    before, alphas_before, _ = read_lora(first["lora"])
    after, alphas_after, _ = read_lora(second["lora"])
    assert set(after) == set(before) and alphas_after == alphas_before
    for key in before:
        torch.testing.assert_close(after[key].float(), before[key].float(), atol=1e-6, rtol=1e-5)
