"""FLUX.2 klein: registry sizes from the real configs, ComfyUI's single files, the reference trainer's
objective, both LoRA files against ComfyUI's key map and diffusers' loader with equal deltas, and a LoRA of
another FLUX.2 variant (or FLUX.1) named and refused in one sentence."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.families.comfy_keys import comfy_load, comfy_lora_key_map


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from core.families.flux2.tiny import build_tiny_flux2

    return build_tiny_flux2(tmp_path_factory.mktemp("tiny_flux2"))


def test_registry_sizes_are_the_real_configs_counted_on_the_meta_device():
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from core.family_api.registry import (FLUX2_DEV, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B, QWEN3_8B, family_info)

    with torch.device("meta"):
        nets = {"flux2-klein-4b": Flux2Transformer2DModel(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                                          joint_attention_dim=7680, guidance_embeds=False),
                "flux2-klein-9b": Flux2Transformer2DModel(num_layers=8, num_single_layers=24, num_attention_heads=32,
                                                          joint_attention_dim=12288, guidance_embeds=False),
                "flux2-dev": Flux2Transformer2DModel()}
        qwen8 = Qwen3Model(Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936))
    sizes = {"flux2-klein-4b": FLUX2_KLEIN_4B, "flux2-klein-9b": FLUX2_KLEIN_9B, "flux2-dev": FLUX2_DEV}
    for name, net in nets.items():
        assert sum(p.numel() for p in net.parameters()) == sizes[name] == family_info(name).trained_params
        assert family_info(name).width == net.inner_dim
    assert sum(p.numel() for p in qwen8.parameters()) == QWEN3_8B


def test_the_folder_the_comfy_single_files_and_names_are_detected_and_load_the_same_model(tiny):
    from core.families.flux2.load import detect, load_model
    from core.family_api.lookup import detect_image_family
    from core.model_info import detect_model

    assert detect_image_family(str(tiny.folder)) == "flux2-klein-4b"
    assert detect_image_family(str(tiny.comfy_transformer)) == "flux2-klein-4b"
    assert detect("black-forest-labs/FLUX.2-klein-base-9B") == "flux2-klein-9b"
    assert detect(str(tiny.comfy_root / "vae" / "flux2-vae.safetensors")) is None
    info = detect_model(str(tiny.comfy_transformer), "image-generation")
    assert info.family == "flux2-klein-4b" and info.width == 32
    folder = load_model(str(tiny.folder))
    single = load_model(str(tiny.comfy_transformer), config_source=str(tiny.folder))
    assert single.is_single_file and not folder.distilled and not single.distilled
    for a, b in ((folder.transformer, single.transformer), (folder.vae, single.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    ta, tb = folder.text_encoder.state_dict(), single.text_encoder.state_dict()  # the file is fp16
    assert set(ta) == set(tb) and all(torch.allclose(ta[k], tb[k].float(), atol=1e-3) for k in ta)


def test_a_flux1_file_and_folder_are_not_taken_for_flux2(tmp_path):
    from core.families.flux.load import variant_from_folder_configs, variant_from_keys

    assert variant_from_keys(["double_blocks.0.img_attn.qkv.weight", "single_stream_modulation.lin.weight"]) is None
    assert variant_from_folder_configs({"_class_name": "Flux2KleinPipeline"}, {}) is None
    assert variant_from_keys(["double_blocks.0.img_attn.qkv.weight", "guidance_in.in_layer.weight"]) == "flux-dev"


def test_the_loss_is_the_klein_training_examples_objective_on_the_same_draws(tiny):
    """examples/dreambooth/train_dreambooth_lora_flux2_klein.py, written out: patchified BN-normalized latents,
    zt = (1 - s) x + s z, the transformer at timestep s (t / 1000) without guidance, MSE against z - x."""
    from diffusers import Flux2KleinPipeline

    from core.families.flux2.load import encode_moments, load_model
    from core.families.flux2.loss import flux2_loss
    from core.families.flux2.text import encode_prompts
    from tests.families.flux2.examples_objective import examples_loss

    pipe = Flux2KleinPipeline.from_pretrained(str(tiny.folder))
    model = load_model(str(tiny.folder))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours_latents = encode_moments(model.vae, pixels).chunk(2, dim=1)[0]
    with torch.no_grad():
        raw = pipe.vae.encode(pixels).latent_dist.mode()
        model_input = Flux2KleinPipeline._patchify_latents(raw)
        mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        model_input = (model_input - mean) / std
    torch.testing.assert_close(ours_latents, model_input, rtol=1e-5, atol=1e-5)
    prompts = ["a photo of a red thing", "a blue cat"]
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(prompts, device="cpu")
    torch.testing.assert_close(encode_prompts(model.text_encoder, model.tokenizer, prompts), embeds)
    noise = torch.randn(model_input.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.8])
    theirs = examples_loss(pipe, model_input, embeds, text_ids, noise, sigmas)
    with torch.no_grad():
        ours = flux2_loss(model.transformer, ours_latents, embeds, sigmas=sigmas, noise=noise)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _random_lora(transformer, rank: int = 2, alpha: float = 3.0):
    from peft import LoraConfig

    from core.families.flux2.load import lora_targets
    from core.lora import peft_state

    torch.manual_seed(3)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_targets(transformer),
                                       init_lora_weights=True))
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    return peft_state(transformer)


def test_both_files_give_comfyuis_and_diffusers_loaders_every_key_with_equal_deltas(tiny, tmp_path):
    from diffusers import Flux2KleinPipeline
    from safetensors.torch import load_file

    from core.families.flux2.lora_files import write_diffusers_file, write_kohya_file
    from core.families.flux2.single_file import native_to_diffusers
    from core.families.flux2.tiny import bfl_transformer_state

    pipe = Flux2KleinPipeline.from_pretrained(str(tiny.folder))
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    state = _random_lora(pipe.transformer)
    expected = {}
    for name, module in pipe.transformer.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            expected[f"{name}.weight"] = module.get_delta_weight("default").detach()
    kohya = write_kohya_file(state, tmp_path / "k.safetensors", variant="flux2-klein-4b", alpha=3.0, dtype=None)
    diffusers_file = write_diffusers_file(state, tmp_path, lora_config=pipe.transformer.peft_config["default"], dtype=None)

    # ComfyUI: every kohya module is a key of its map and patches a BFL weight; merged back to diffusers names,
    # the model equals the base plus the trained dW.
    lora = load_file(str(kohya))
    patches, left = comfy_load(lora, comfy_lora_key_map(tiny.comfy_transformer))
    assert not left and patches
    bfl = {f"diffusion_model.{k}": v.clone() for k, v in bfl_transformer_state(base).items()}
    for target, (up, down, alpha) in patches.items():
        bfl[target] += (up.float() @ down.float()) * alpha / down.shape[0]
    merged = native_to_diffusers({k: v for k, v in bfl.items()})
    for key, value in base.items():
        delta = expected.get(key, torch.zeros_like(value))
        torch.testing.assert_close(merged[key], value + delta, rtol=1e-4, atol=1e-5, msg=key)

    # diffusers: both files load with no key left over and give the same dW.
    for path in (kohya, diffusers_file):
        fresh = Flux2KleinPipeline.from_pretrained(str(tiny.folder))
        fresh.load_lora_weights(str(path), adapter_name="x")
        got = {f"{n}.weight": m.get_delta_weight("x").detach() for n, m in fresh.transformer.named_modules()
               if "x" in getattr(m, "lora_A", {})}
        assert got.keys() == expected.keys(), path.name
        for key, delta in expected.items():
            torch.testing.assert_close(got[key], delta, rtol=1e-4, atol=1e-6, msg=key)


def _shaped_lora(path: Path, width: int, mlp: int) -> Path:
    save_file({"lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": torch.zeros(mlp * width, 1),
               "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": torch.zeros(1, width),
               "lora_unet_double_blocks_0_img_mlp_0.alpha": torch.tensor(1.0)}, str(path))
    return path


def test_a_klein_lora_is_refused_on_dev_and_the_reverse_in_one_sentence(tmp_path, tiny):
    from core.export.inspect import inspect_lora, lora_family_mismatch
    from core.families.flux2.family import refuse_other_variant
    from core.families.flux2.load import load_model

    klein = _shaped_lora(tmp_path / "klein.safetensors", 3072, 6)
    klein9 = _shaped_lora(tmp_path / "klein9.safetensors", 4096, 6)
    dev = _shaped_lora(tmp_path / "dev.safetensors", 6144, 6)
    flux1 = _shaped_lora(tmp_path / "flux1.safetensors", 3072, 4)
    families = {p.name: inspect_lora(p).family for p in (klein, klein9, dev, flux1)}
    assert families == {"klein.safetensors": "flux2-klein-4b", "klein9.safetensors": "flux2-klein-9b",
                        "dev.safetensors": "flux2-dev", "flux1.safetensors": "flux-dev"}
    on_dev = lora_family_mismatch(inspect_lora(klein), "flux2-dev")
    assert on_dev and on_dev.count(". ") == 1 and "FLUX.2 klein 4B" in on_dev and "FLUX.2-dev" in on_dev
    assert lora_family_mismatch(inspect_lora(dev), "flux2-klein-4b")
    assert lora_family_mismatch(inspect_lora(flux1), "flux2-klein-4b")
    assert lora_family_mismatch(inspect_lora(klein), "flux2-klein-4b") is None
    model = load_model(str(tiny.folder))
    with pytest.raises(ValueError, match="trained for FLUX.2-dev"):
        refuse_other_variant(model, dev)


def test_a_run_on_the_comfy_single_file_trains_draws_a_preview_and_writes_bfl_names(tiny, tmp_path):
    from tests.fixtures.tiny_sd import single_file_run

    logs, keys, meta = single_file_run(tiny, tmp_path, "k")
    assert "Model: FLUX.2 klein 4B (single file), flow matching" in logs, logs
    assert any(m.startswith("LoRA rank 4 on 16 transformer layers") and "logit_normal" in m for m in logs), logs
    assert meta["ss_base_model_version"] == "flux2_klein_4b"
    assert meta["modelspec.architecture"] == "flux-2-klein-4b/lora"
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_0_img_mlp_0.alpha",
            "lora_unet_single_blocks_1_linear1.lora_up.weight", "lora_unet_single_blocks_0_linear2.alpha"} <= keys
