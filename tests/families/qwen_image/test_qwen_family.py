"""Qwen-Image / Qwen-Image-Edit: registry facts, detection, loading (diffusers and ComfyUI layouts),
prompt encoding and latents as the pipelines do them, and the flow-matching loss."""
from __future__ import annotations

import pytest
import torch



def test_the_registry_sizes_are_the_real_models_counted_on_the_meta_device():
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from core.family_api.registry import QWEN_IMAGE, QWEN_IMAGE_VAE, family_info

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(num_layers=60, attention_head_dim=128, num_attention_heads=24,
                                                  joint_attention_dim=3584, in_channels=64, out_channels=16)
        vae = AutoencoderKLQwenImage()
    assert sum(p.numel() for p in transformer.parameters()) == QWEN_IMAGE
    assert sum(p.numel() for p in vae.parameters()) == QWEN_IMAGE_VAE
    info = family_info("qwen-image")
    assert info.kind == "dit" and info.pipeline_class == "QwenImagePipeline" and info.native_resolution == 1328
    assert family_info("qwen-image-edit").pipeline_class == "QwenImageEditPipeline"


def test_the_templates_and_dropped_tokens_are_the_pipelines():
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    from core.families.qwen_image.load import PROMPT_TEMPLATE, TEMPLATE_DROP

    plain = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    edit = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                 transformer=None)
    assert PROMPT_TEMPLATE["qwen-image"] == plain.prompt_template_encode
    assert TEMPLATE_DROP["qwen-image"] == plain.prompt_template_encode_start_idx
    assert PROMPT_TEMPLATE["qwen-image-edit"] == edit.prompt_template_encode
    assert TEMPLATE_DROP["qwen-image-edit"] == edit.prompt_template_encode_start_idx


def test_detect_names_folders_single_files_and_nothing_else(tiny_qwen_image, tiny_qwen_edit, tmp_path):
    from core.families.qwen_image.load import detect

    assert detect(str(tiny_qwen_image.folder)) == "qwen-image"
    assert detect(str(tiny_qwen_edit.folder)) == "qwen-image-edit"
    assert detect(str(tiny_qwen_image.comfy_transformer)) == "qwen-image"
    assert detect(str(tmp_path)) is None
    assert detect("stabilityai/stable-diffusion-xl-base-1.0") is None


def test_prompt_encoding_is_the_pipelines(tiny_qwen_image):
    from diffusers import QwenImagePipeline

    from core.families.qwen_image.text import encode_prompt_list, stack_prompts

    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image.folder)
    captions = ["a red cat", "a much longer caption of a blue dog on the grass"]
    ours = stack_prompts(encode_prompt_list(pipe.text_encoder, pipe.tokenizer, captions))
    theirs, mask = pipe.encode_prompt(captions, device=torch.device("cpu"))
    torch.testing.assert_close(ours.embeds, theirs)
    assert torch.equal(ours.mask, mask)


def test_edit_prompt_encoding_feeds_the_control_image_to_the_vl_encoder(tiny_qwen_edit):
    from diffusers import QwenImagePipeline
    from PIL import Image

    from core.families.qwen_image.text import encode_prompt_list, load_vl_processor, stack_prompts
    from core.families.qwen_image.tiny import edit_pipeline

    pipe = edit_pipeline(QwenImagePipeline.from_pretrained(tiny_qwen_edit.folder).components)
    ours_processor = load_vl_processor(str(tiny_qwen_edit.folder), pipe.tokenizer, True)
    image = Image.new("RGB", (64, 48), (200, 30, 40))
    other = Image.new("RGB", (64, 48), (10, 200, 40))
    ours = stack_prompts(encode_prompt_list(pipe.text_encoder, pipe.tokenizer, ["make it blue"],
                                            variant="qwen-image-edit", processor=ours_processor, images=[image]))
    theirs, _ = pipe.encode_prompt(["make it blue"], image=image, device=torch.device("cpu"))
    torch.testing.assert_close(ours.embeds, theirs)
    changed = stack_prompts(encode_prompt_list(pipe.text_encoder, pipe.tokenizer, ["make it blue"],
                                               variant="qwen-image-edit", processor=ours_processor, images=[other]))
    assert not torch.allclose(changed.embeds, ours.embeds)


def test_latents_are_normalized_by_the_vae_statistics_and_round_trip(tiny_qwen_image):
    from diffusers import AutoencoderKLQwenImage

    from core.families.qwen_image.load import denormalize_latents, encode_moments, normalize_latents

    vae = AutoencoderKLQwenImage.from_pretrained(tiny_qwen_image.folder, subfolder="vae")
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    moments = encode_moments(vae, pixels)
    assert moments.shape == (2, 8, 8, 8)
    mean = moments[:, :4]
    expected = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]
    torch.testing.assert_close(mean, expected)
    normalized = normalize_latents(vae.config, mean)
    stats_mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1)
    stats_std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
    torch.testing.assert_close(normalized, (mean - stats_mean) / stats_std)
    torch.testing.assert_close(denormalize_latents(vae.config, normalized), mean)


def test_dynamic_shift_is_the_schedulers_mu():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from core.families.qwen_image.loss import dynamic_shift

    for tokens in (256, 4096, 6889):
        assert dynamic_shift(tokens) == pytest.approx(torch.tensor(calculate_shift(tokens, 256, 8192, 0.5, 0.9))
                                                      .exp().item())


def test_the_loss_is_the_flow_matching_mse_of_the_unpacked_prediction(tiny_qwen_image):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from core.families.qwen_image.loss import QwenBatch, qwen_loss
    from core.families.qwen_image.text import encode_prompt_list, stack_prompts

    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image.folder)
    transformer: QwenImageTransformer2DModel = pipe.transformer
    prompts = stack_prompts(encode_prompt_list(pipe.text_encoder, pipe.tokenizer, ["a cat", "a red dog"]))
    x0 = torch.randn(2, 4, 8, 6)
    noise = torch.randn(2, 4, 8, 6)
    sigmas = torch.tensor([0.3, 0.8])
    loss = qwen_loss(transformer, QwenBatch(x0, prompts), sigmas=sigmas, noise=noise)
    # The training example's way: 5-D latents, the pipeline's packing, unpacked prediction.
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
    packed = QwenImagePipeline._pack_latents(noisy.unsqueeze(1), 2, 4, 8, 6)
    pred = transformer(hidden_states=packed, encoder_hidden_states=prompts.embeds,
                       encoder_hidden_states_mask=prompts.mask, timestep=sigmas, img_shapes=[(1, 4, 3)] * 2,
                       return_dict=False)[0]
    pred = QwenImagePipeline._unpack_latents(pred, 8 * 4, 6 * 4, 4)[:, :, 0]
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, noise - x0))


def test_the_edit_loss_appends_the_control_tokens_and_keeps_the_target_part(tiny_qwen_edit):
    from diffusers import QwenImageTransformer2DModel

    from core.families.qwen_image.loss import QwenBatch, qwen_loss
    from core.families.qwen_image.text import QwenPrompts

    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_edit.folder, subfolder="transformer")
    prompts = QwenPrompts(torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.long))
    x0, noise, sigmas = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    a = qwen_loss(transformer, QwenBatch(x0, prompts, torch.randn(1, 4, 8, 8)), sigmas=sigmas, noise=noise)
    b = qwen_loss(transformer, QwenBatch(x0, prompts, torch.randn(1, 4, 6, 4)), sigmas=sigmas, noise=noise)
    c = qwen_loss(transformer, QwenBatch(x0, prompts), sigmas=sigmas, noise=noise)
    assert len({round(float(v.detach()), 6) for v in (a, b, c)}) == 3


def test_comfyui_single_files_load_to_the_same_modules(tiny_qwen_image):
    from diffusers import QwenImagePipeline

    from core.families.qwen_image.load import load_qwen_model

    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image.folder)
    model = load_qwen_model(str(tiny_qwen_image.comfy_transformer), config_source=str(tiny_qwen_image.folder))
    assert model.is_single_file and model.variant == "qwen-image"
    for ours, theirs in ((model.transformer, pipe.transformer), (model.vae, pipe.vae),
                         (model.text_encoder, pipe.text_encoder)):
        reference = theirs.state_dict()
        state = ours.state_dict()
        assert set(state) == set(reference)
        for key, value in state.items():
            assert torch.equal(value, reference[key]), key


def test_fp8_and_scaled_fp8_files_are_upcast(tmp_path):
    from core.families.qwen_image.single_file import dequantize

    weight = torch.randn(4, 4)
    fp8 = weight.to(torch.float8_e4m3fn)
    out = dequantize({"a.weight": fp8, "b.weight": fp8, "b.scale_weight": torch.tensor(2.0),
                      "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, torch.float32)
    assert set(out) == {"a.weight", "b.weight"} and out["a.weight"].dtype == torch.float32
    torch.testing.assert_close(out["b.weight"], fp8.float() * 2)


def test_the_vae_key_map_reaches_the_real_wan_names():
    """Our rule for the real config (2 res blocks) names what diffusers' Wan converter reads."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from core.families.qwen_image.single_file import vae_key_to_wan

    with torch.device("meta"):
        keys = list(AutoencoderKLQwenImage().state_dict())
    wan = {vae_key_to_wan(k, 2): k for k in keys}
    converted = convert_wan_vae_to_diffusers(dict.fromkeys(wan, 0))
    assert set(converted) == set(keys)
