"""Wan's memory estimate: the activations it counts per token are what a real WanTransformerBlock keeps for the
backward pass (autograd's saved tensors, bf16, on the CPU), and the presets fit their tiers with the 14B."""
from __future__ import annotations

import pytest
import torch


def saved_bytes_per_token(width: int, ffn: int, tokens: int = 256, text: int = 32) -> float:
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

    torch.manual_seed(0)
    heads = width // 64
    block = WanTransformerBlock(width, ffn, heads, "rms_norm_across_heads", 1e-6, True).to(torch.bfloat16)
    block.requires_grad_(False)
    for module in block.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.requires_grad_(True)  # as the LoRA makes them need gradients
    rope = WanRotaryPosEmbed(64, (1, 2, 2), 32)(torch.zeros(1, 16, 1, 32, 32))
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= tokens and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, width, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, torch.randn(1, text, width, dtype=torch.bfloat16), torch.randn(1, 6, width, dtype=torch.bfloat16),
              rope)
    return sum(seen.values()) / tokens


@pytest.mark.parametrize("width,ffn", [(256, 691), (512, 896)])
def test_the_activation_count_per_token_is_what_the_real_block_keeps(width, ffn):
    from core.families.wan.memory import ELEMENTS_PER_FFN, ELEMENTS_PER_WIDTH

    counted = (ELEMENTS_PER_WIDTH * width + ELEMENTS_PER_FFN * ffn) * 2
    assert counted == pytest.approx(saved_bytes_per_token(width, ffn), rel=0.05)


def test_the_14b_fits_each_wan_preset_tier_and_a_clip_costs_more_than_an_image():
    from core.memory import estimate_memory
    from core.model_info import detect_model
    from core.presets import adapt_to_device, load_preset, loose_config, preset_info
    from tests.test_presets import gpu

    model = detect_model("Wan-AI/Wan2.1-T2V-14B-Diffusers")
    for name in ("wan-24gb", "wan-16gb", "wan-12gb", "wan-8gb"):
        card = gpu(f"{preset_info(name).memory_gb:g} GB", preset_info(name).memory_gb * 0.96)
        values, _ = adapt_to_device(load_preset(name), card)
        assert estimate_memory(loose_config(values), model, card).fits, name
        clip = estimate_memory(loose_config(values), model, card).parts["activations"]
        still = estimate_memory(loose_config({**values, "video_frames": 1}), model, card).parts["activations"]
        assert clip > 2 * still, name


def test_both_a14b_experts_count_a_second_expert_unless_the_inactive_one_waits_in_cpu_memory():
    from core.memory import estimate_memory
    from core.model_info import detect_model
    from core.presets import loose_config
    from tests.test_presets import gpu

    model = detect_model("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    card = gpu("80 GB", 80)
    base = {"base_model": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "resolution": 512, "video_frames": 17,
            "fp8_base": True, "gradient_checkpointing": True, "mixed_precision": "bf16", "batch_size": 1}
    one = estimate_memory(loose_config(base), model, card).parts
    both = estimate_memory(loose_config({**base, "wan_expert": "both"}), model, card).parts
    swapped = estimate_memory(loose_config({**base, "wan_expert": "both", "wan_offload_inactive_expert": True}),
                              model, card).parts
    assert both["second expert weights"] == one["transformer weights"]
    assert both["LoRA + optimizer"] == 2 * one["LoRA + optimizer"]
    assert "second expert weights" not in swapped and "second expert weights" not in one


@pytest.mark.parametrize("hub", ["Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.2-I2V-A14B-Diffusers"])
def test_the_i2v_14bs_fit_each_wan_preset_tier_at_the_t2v_14bs_width(hub):
    """The extra 2.1B parameters of Wan 2.1 I2V (k_img / v_img, the image projection) cost 4 more blocks swapped
    at 24 and 16 GB than the T2V 14B needed."""
    from core.memory import estimate_memory
    from core.model_info import detect_model
    from core.presets import adapt_to_device, load_preset, loose_config, preset_info
    from core.families.wan.memory import IMAGE_TOKENS
    from tests.test_presets import gpu

    model, t2v = detect_model(hub), detect_model("Wan-AI/Wan2.1-T2V-14B-Diffusers")
    assert model.width == t2v.width == 5120
    for name in ("wan-24gb", "wan-16gb", "wan-12gb", "wan-8gb"):
        card = gpu(f"{preset_info(name).memory_gb:g} GB", preset_info(name).memory_gb * 0.96)
        values, _ = adapt_to_device(load_preset(name), card)
        parts = estimate_memory(loose_config(values), model, card).parts
        assert estimate_memory(loose_config(values), model, card).fits, (hub, name)
        t2v_parts = estimate_memory(loose_config(values), t2v, card).parts
        extra = parts["activations"] - t2v_parts["activations"]
        # Wan 2.1 I2V attends to 257 CLIP tokens beside the text in every one of its 40 blocks (bf16 keys and
        # values); Wan 2.2 I2V to the text alone
        assert extra * 2**30 == pytest.approx(40 * 2 * IMAGE_TOKENS * 5120 * 2 if "2.1" in hub else 0), (hub, name)
        assert parts["transformer weights"] >= t2v_parts["transformer weights"]


def test_the_ti2v_5b_counts_its_real_shape_and_a_quarter_of_the_tokens_per_frame():
    import torch
    from diffusers import WanTransformer3DModel

    from core.families.wan.memory import SHAPES, lora_params, video_tokens
    from core.memory import estimate_memory
    from core.model_info import detect_model
    from core.presets import adapt_to_device, load_preset, loose_config, preset_info
    from tests.test_presets import gpu

    with torch.device("meta"):  # the real TI2V-5B transformer's config
        real = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128,
                                     in_channels=48, out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336,
                                     num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    model = detect_model("Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    assert model.family == "wan2.2-ti2v-5b" and model.params == sum(p.numel() for p in real.parameters())
    assert SHAPES[3072] == (3072, len(real.blocks), real.blocks[0].ffn.net[0].proj.out_features)
    assert video_tokens(512, 17, 16) * 4 == video_tokens(512, 17, 8)
    targets = [m for n, m in real.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")
               and n.split(".", 2)[-1] in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                                           "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")]
    assert lora_params(8, 3072) == sum(8 * (m.in_features + m.out_features) for m in targets)
    for name in ("wan-24gb", "wan-16gb", "wan-12gb", "wan-8gb"):
        card = gpu(f"{preset_info(name).memory_gb:g} GB", preset_info(name).memory_gb * 0.96)
        values, _ = adapt_to_device(load_preset(name), card)
        assert estimate_memory(loose_config(values), model, card).fits, name


@pytest.mark.parametrize("hub, image", [("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", True),
                                        ("Wan-AI/Wan2.2-I2V-A14B-Diffusers", False)])
def test_the_registry_counts_the_real_i2v_transformers(hub, image):
    from diffusers import WanTransformer3DModel

    from core.model_info import detect_model

    extra = dict(image_dim=1280, added_kv_proj_dim=5120) if image else {}
    with torch.device("meta"):  # the real I2V 14B transformers' configs (diffusers' folders)
        real = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                     in_channels=36, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                     num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", **extra)
    assert detect_model(hub).params == sum(p.numel() for p in real.parameters())
