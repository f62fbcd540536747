"""FLUX.2 dev: Mistral-Small prompts encoded exactly as Flux2Pipeline does, the objective of diffusers'
train_dreambooth_lora_flux2.py with its guidance (3.5 in the guidance embedding), a run from ComfyUI's files
(flux2-dev + mistral_3_small_flux2 + flux2-vae) that trains, draws a preview and writes BFL names, and the
klein / dev LoRAs refused on each other. Resume, both files' deltas, ComfyUI's key map and the Test tab: the
conformance table (tests/families/table.py)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from core.families.flux2.tiny import build_tiny_flux2_dev

    return build_tiny_flux2_dev(tmp_path_factory.mktemp("tiny_flux2_dev"))


def test_the_folder_and_comfys_files_load_the_same_dev_with_mistrals_language_model_alone(tiny):
    from core.families.flux2.load import detect, load_model

    assert detect(str(tiny.folder)) == detect(str(tiny.comfy_transformer)) == "flux2-dev"
    folder = load_model(str(tiny.folder))
    single = load_model(str(tiny.comfy_transformer), config_source=str(tiny.folder))
    assert folder.variant == single.variant == "flux2-dev" and not folder.distilled
    assert type(folder.text_encoder).__name__ == type(single.text_encoder).__name__ == "MistralModel"
    assert single.notes[0] == "Mistral-Small: mistral_3_small_flux2_bf16.safetensors"
    for a, b in ((folder.transformer, single.transformer), (folder.vae, single.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    ta, tb = folder.text_encoder.state_dict(), single.text_encoder.state_dict()  # the file is fp16
    assert set(ta) == set(tb) and all(torch.allclose(ta[k], tb[k].float(), atol=1e-3) for k in ta)


def test_a_dev_without_its_text_encoder_file_names_the_file_to_download(tiny, tmp_path):
    import shutil

    from core.families.flux2.load import load_model
    from core.family_api.contract import ModelLoadError

    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    shutil.copy(tiny.comfy_transformer, models / "diffusion_models" / "flux2-dev.safetensors")
    with pytest.raises(ModelLoadError, match="mistral_3_small_flux2_bf16.safetensors"):
        load_model(str(models / "diffusion_models" / "flux2-dev.safetensors"), config_source=str(tiny.folder))


def test_the_loss_is_the_dev_training_examples_objective_with_its_guidance(tiny):
    """examples/dreambooth/train_dreambooth_lora_flux2.py, written out: Mistral's layers 10, 20, 30 stacked,
    patchified BN-normalized latents, zt = (1 - s) x + s z, the transformer at timestep s with guidance 3.5
    (its --guidance_scale), MSE against z - x."""
    from diffusers import Flux2Pipeline

    from core.config import TrainConfig
    from core.families.flux2.family import train_guidance
    from core.families.flux2.load import encode_moments, load_model
    from core.families.flux2.loss import flux2_loss
    from core.families.flux2.text import encode_prompts
    from tests.families.flux2.examples_objective import examples_loss

    pipe = Flux2Pipeline.from_pretrained(str(tiny.folder))
    model = load_model(str(tiny.folder))
    assert train_guidance(model, TrainConfig()) == 3.5 and train_guidance(model, TrainConfig(train_guidance=2.0)) == 2.0
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = encode_moments(model.vae, pixels).chunk(2, dim=1)[0]
    prompts = ["a photo of a red thing", "a blue cat"]
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(prompts, device="cpu")
        model_input = pipe._encode_vae_image(pixels, generator=None)  # the pipeline's own latents
    torch.testing.assert_close(encode_prompts(model.text_encoder, model.tokenizer, prompts, "flux2-dev"), embeds)
    torch.testing.assert_close(latents, model_input, rtol=1e-5, atol=1e-5)
    noise = torch.randn(model_input.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.8])
    theirs = examples_loss(pipe, model_input, embeds, text_ids, noise, sigmas, guidance=3.5)
    with torch.no_grad():
        ours = flux2_loss(model.transformer, latents, embeds, sigmas=sigmas, noise=noise, guidance=3.5)
        without = flux2_loss(model.transformer, latents, embeds, sigmas=sigmas, noise=noise, guidance=1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, without)  # the guidance reaches the transformer


def test_a_klein_lora_is_refused_on_a_loaded_dev_in_one_sentence(tiny, tmp_path):
    from safetensors.torch import save_file

    from core.families.flux2.family import refuse_other_variant
    from core.families.flux2.load import load_model

    klein = tmp_path / "klein.safetensors"
    save_file({"lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": torch.zeros(6 * 3072, 1),
               "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": torch.zeros(1, 3072),
               "lora_unet_double_blocks_0_img_mlp_0.alpha": torch.tensor(1.0)}, str(klein))
    with pytest.raises(ValueError, match="trained for FLUX.2 klein 4B") as info:
        refuse_other_variant(load_model(str(tiny.folder)), klein)
    assert str(info.value).count(". ") == 1


def test_a_dev_run_on_comfys_files_trains_draws_a_preview_and_writes_bfl_names(tiny, tmp_path):
    from tests.fixtures.tiny_sd import single_file_run

    logs, keys, meta = single_file_run(tiny, tmp_path, "d")
    assert "Model: FLUX.2-dev (single file), flow matching" in logs, logs
    assert any(m.startswith("LoRA rank 4 on 16 transformer layers") and "guidance 3.5" in m for m in logs), logs
    assert meta["ss_base_model_version"] == "flux2_dev" and meta["modelspec.architecture"] == "flux-2-dev/lora"
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_0_img_mlp_0.alpha",
            "lora_unet_single_blocks_1_linear1.lora_up.weight", "lora_unet_single_blocks_0_linear2.alpha"} <= keys


def test_mistral_streams_its_layers_so_the_trainer_never_moves_it_whole(tiny):
    from core.families.dit.default import text_encoders
    from core.families.flux2.load import load_model

    model = load_model(str(tiny.folder))
    assert model.text_encoder.streams_layers and text_encoders(model) == []
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streaming to a GPU needs one")
def test_on_a_gpu_the_streamed_mistral_encodes_as_the_whole_one_and_leaves_its_layers_in_cpu_memory(tiny,
                                                                                                    monkeypatch):
    from core.families.dit import streamed_encoder
    from core.families.flux2.load import load_model
    from core.families.flux2.text import encode_prompts

    monkeypatch.setattr(streamed_encoder, "RESERVE", float("inf"))  # keep no layer on the card
    model = load_model(str(tiny.folder))
    prompts = ["a photo of a red thing", "a blue cat"]
    streamed = encode_prompts(model.text_encoder, model.tokenizer, prompts, "flux2-dev", "cuda")
    assert streamed.device.type == "cuda"
    assert all(p.device.type == "cpu" for p in model.text_encoder.layers.parameters())
    assert model.text_encoder.embed_tokens.weight.device.type == "cuda"
    whole = load_model(str(tiny.folder)).text_encoder
    for hook in (whole._forward_pre_hooks, *(m._forward_pre_hooks for m in whole.layers),
                 *(m._forward_hooks for m in whole.layers)):
        hook.clear()
    whole.to("cuda")
    torch.testing.assert_close(streamed, encode_prompts(whole, model.tokenizer, prompts, "flux2-dev"))


def test_comfys_fp8mixed_weights_are_read_as_the_weight_times_its_scale(tmp_path):
    """flux2_dev_fp8mixed / mistral_3_small_flux2_fp8: an fp8 weight with `weight_scale`, `comfy_quant` and
    `input_scale` bookkeeping; bf16 layers as they are."""
    from safetensors.torch import save_file

    from core.families.dit.weights import read_upcast

    weight = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    save_file({"a.weight": weight.to(torch.float8_e4m3fn), "a.weight_scale": torch.tensor(3.0),
               "a.comfy_quant": torch.tensor([1, 2], dtype=torch.uint8), "a.input_scale": torch.tensor(1.0),
               "b.weight": torch.ones(2, 2, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    state = read_upcast(tmp_path / "m.safetensors", torch.float32)
    assert set(state) == {"a.weight", "b.weight"}
    torch.testing.assert_close(state["a.weight"], weight * 3.0)
    assert state["b.weight"].dtype == torch.bfloat16


def test_a_bf16_run_loads_mistral_straight_in_bf16_from_the_folder_and_comfys_file(tiny):
    """46 GB in bf16: loading it in fp32 first (as the transformer is) would need twice that in CPU memory."""
    from core.config import TrainConfig
    from core.families.flux2.load import load_for_training

    for base, config in ((tiny.folder, ""), (tiny.comfy_transformer, str(tiny.folder))):
        cfg = TrainConfig(base_model=str(base), base_model_config=config, mixed_precision="bf16")
        model = load_for_training(cfg, dtype=torch.float32, quantization_config=None)
        assert model.text_encoder.dtype == torch.bfloat16 and model.transformer.dtype == torch.float32
