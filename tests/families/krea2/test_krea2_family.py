"""Krea 2: registry sizes from the real configs, ComfyUI's single files, the reference trainer's objective (with
the pipeline's own padded prompt encodings: dropping the padding changes nothing), both LoRA files against
ComfyUI's key map and Krea2Pipeline's loader with equal deltas, memory shapes and `preset: auto`, and a run on
the single file that draws a preview."""
from __future__ import annotations

import pytest
import torch

from tests.families.comfy_keys import comfy_load, comfy_lora_key_map


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from core.families.krea2.tiny import build_tiny_krea2

    return build_tiny_krea2(tmp_path_factory.mktemp("tiny_krea2"))


def test_registry_sizes_and_lora_shapes_are_the_real_networks_counted_on_the_meta_device():
    from diffusers import Krea2Transformer2DModel

    from core.families.krea2.load import lora_targets
    from core.families.krea2.memory import krea2_lora_params
    from core.family_api.registry import KREA2, family_info

    with torch.device("meta"):
        net = Krea2Transformer2DModel()
    assert sum(p.numel() for p in net.parameters()) == KREA2 == family_info("krea2").trained_params
    assert family_info("krea2").width == net.hidden_size == family_info("krea2-turbo").width
    modules = dict(net.named_modules())
    targets = lora_targets(net)
    assert len(targets) == 28 * 8 + 4 * 8
    assert krea2_lora_params(16) == 16 * sum(modules[n].in_features + modules[n].out_features for n in targets)


def test_the_folder_the_comfy_single_files_and_names_are_detected_and_load_the_same_model(tiny):
    from core.families.krea2.load import load_model
    from core.family_api.lookup import detect_image_family
    from core.model_info import detect_model

    assert detect_image_family(str(tiny.folder)) == "krea2"
    assert detect_image_family(str(tiny.comfy_transformer)) == "krea2"
    assert detect_model("krea/Krea-2-Turbo").family == "krea2-turbo"
    info = detect_model(str(tiny.comfy_transformer), "image-generation")
    assert info.family == "krea2" and info.width == 32
    folder = load_model(str(tiny.folder))
    single = load_model(str(tiny.comfy_transformer), config_source=str(tiny.folder))
    assert single.is_single_file and folder.text_layers == single.text_layers == (1, 2)
    for a, b in ((folder.transformer, single.transformer), (folder.vae, single.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    ta, tb = folder.text_encoder.state_dict(), single.text_encoder.state_dict()  # the file is fp16
    assert set(ta) == set(tb) and all(torch.allclose(ta[k], tb[k].float(), atol=1e-3) for k in ta)


def test_the_loss_is_the_krea2_training_examples_objective_with_the_pipelines_padded_prompts(tiny):
    """examples/dreambooth/train_dreambooth_lora_krea2.py written out: (x - mean) / std latents, zt = (1 - s) x + s z,
    2x2 packing, position ids with the text at the origin, the transformer at s with the prompt mask, MSE against
    z - x; the prompts as Krea2Pipeline.encode_prompt gives them (padded in the middle, with its mask)."""
    from diffusers import Krea2Pipeline

    from core.families.dit.flow import pack_latents, unpack_latents
    from core.families.krea2.load import load_model
    from core.families.krea2.loss import krea2_loss
    from core.families.krea2.text import encode_entries, stack

    pipe = Krea2Pipeline.from_pretrained(str(tiny.folder))
    model = load_model(str(tiny.folder))
    prompts = ["a photo of a red thing", "a blue cat sitting on a long wooden bench"]
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompts, device="cpu")
    ours_prompt = stack(encode_entries(model, prompts, torch.device("cpu")))
    assert ours_prompt[0].shape[1] < embeds.shape[1]  # the padding is gone
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        s = sigmas.view(-1, 1, 1, 1)
        packed = pack_latents((1 - s) * x0 + s * noise)
        ids = Krea2Pipeline.prepare_position_ids(embeds.shape[1], 4, 4, "cpu")
        pred = pipe.transformer(hidden_states=packed, encoder_hidden_states=embeds, timestep=sigmas, position_ids=ids,
                                encoder_attention_mask=mask, return_dict=False)[0]
        theirs = torch.mean(((unpack_latents(pred, 8, 8) - (noise - x0)) ** 2).reshape(2, -1), 1).mean()
        ours = krea2_loss(model.transformer, x0, ours_prompt, sigmas=sigmas, noise=noise)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_both_files_give_comfyuis_and_diffusers_loaders_every_key_with_equal_deltas(tiny, tmp_path):
    from diffusers import Krea2Pipeline
    from peft import LoraConfig
    from safetensors.torch import load_file

    from core.families.krea2.load import lora_targets
    from core.families.krea2.lora_files import write_diffusers_file, write_native_file
    from core.families.krea2.single_file import native_to_diffusers
    from core.families.krea2.tiny import native_transformer_state
    from core.lora import peft_state

    pipe = Krea2Pipeline.from_pretrained(str(tiny.folder))
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    torch.manual_seed(3)
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=3.0, target_modules=lora_targets(pipe.transformer)))
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    state = peft_state(pipe.transformer)
    expected = {f"{n}.weight": m.get_delta_weight("default").detach() for n, m in pipe.transformer.named_modules()
                if "default" in getattr(m, "lora_A", {})}
    native = write_native_file(state, tmp_path / "k.safetensors", variant="krea2", alpha=3.0, dtype=None)
    diffusers_file = write_diffusers_file(state, tmp_path, lora_config=pipe.transformer.peft_config["default"],
                                          dtype=None)
    lora = load_file(str(native))
    assert not any(k.endswith(".alpha") for k in lora) and all(k.startswith("diffusion_model.") for k in lora)
    assert "diffusion_model.txtfusion.layerwise_blocks.0.attn.wq.lora_A.weight" in lora
    assert "diffusion_model.blocks.1.mlp.down.lora_B.weight" in lora

    patches, left = comfy_load(lora, comfy_lora_key_map(tiny.comfy_transformer))
    assert not left and patches
    merged_native = {f"diffusion_model.{k}": v.clone() for k, v in native_transformer_state(base).items()}
    for target, (up, down, alpha) in patches.items():
        assert alpha is None  # no alpha key: ComfyUI's scale 1, the scale is in lora_B
        merged_native[target] += up.float() @ down.float()
    merged = native_to_diffusers(merged_native)
    for key, value in base.items():
        torch.testing.assert_close(merged[key], value + expected.get(key, torch.zeros_like(value)), rtol=1e-4,
                                   atol=1e-5, msg=key)

    for path in (native, diffusers_file):
        fresh = Krea2Pipeline.from_pretrained(str(tiny.folder))
        fresh.load_lora_weights(str(path), adapter_name="x")
        got = {f"{n}.weight": m.get_delta_weight("x").detach() for n, m in fresh.transformer.named_modules()
               if "x" in getattr(m, "lora_A", {})}
        assert got.keys() == expected.keys(), path.name
        for key, delta in expected.items():
            torch.testing.assert_close(got[key], delta, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("gb,expected", [(16, "krea2-16gb"), (24, "krea2-24gb"), (48, "krea2-48gb")])
def test_preset_auto_picks_krea2s_tier(gb, expected):
    from core.devices import DeviceInfo
    from core.model_info import detect_model
    from core.presets import choose_preset

    card = DeviceInfo("cuda", f"{gb} GB card", gb * 0.96, gb * 0.96 - 0.4, bf16=True, bitsandbytes=True)
    choice = choose_preset({"base_model": "krea/Krea-2-Raw"}, device=card, model=detect_model("krea/Krea-2-Raw"),
                           processes=1)
    assert choice.name == expected, choice.reason


def test_a_run_on_the_comfy_single_file_trains_draws_a_preview_and_writes_the_native_file(tiny, tmp_path):
    from tests.fixtures.tiny_sd import single_file_run

    logs, keys, meta = single_file_run(tiny, tmp_path, "k")
    assert "Model: Krea 2 (Raw) (single file), flow matching" in logs, logs
    assert any(m.startswith("LoRA rank 4 on 48 transformer layers") and "logit_normal" in m for m in logs), logs
    assert meta["ss_base_model_version"] == "krea2" and meta["modelspec.architecture"] == "Krea-2/lora"
    assert "diffusion_model.blocks.0.attn.gate.lora_B.weight" in keys and not any(k.endswith("alpha") for k in keys)


def test_a_krea2_lora_is_named_and_refused_on_another_family(tiny, tmp_path):
    from safetensors.torch import save_file

    from core.export.inspect import inspect_lora, lora_family_mismatch

    path = tmp_path / "krea.safetensors"
    save_file({"diffusion_model.blocks.0.attn.wq.lora_A.weight": torch.zeros(1, 6144),
               "diffusion_model.blocks.0.attn.wq.lora_B.weight": torch.zeros(6144, 1)}, str(path))
    info = inspect_lora(path)
    assert info.family == "krea2"
    assert lora_family_mismatch(info, "krea2-turbo") is None  # a Raw LoRA is used on Turbo
    message = lora_family_mismatch(info, "flux2-klein-4b")
    assert message and "Krea 2" in message
