"""FLUX.2 memory: the LoRA and block sizes of the estimate are the real networks' (built on the meta device),
and `preset: auto` picks each variant's tier: klein 4B fits 8 GB with NF4, klein 9B 12 GB with NF4 and
16 GB with fp8, FLUX.2-dev 24 GB with fp8 and block swap."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("layers,single,heads,text", [(5, 20, 24, 7680), (8, 24, 32, 12288), (8, 48, 48, 15360)])
def test_the_lora_and_block_sizes_are_the_real_networks_counted_on_the_meta_device(layers, single, heads, text):
    from diffusers import Flux2Transformer2DModel

    from core.families.flux2.load import lora_targets
    from core.families.flux2.memory import block_params, blocks_of, flux2_lora_params

    with torch.device("meta"):
        net = Flux2Transformer2DModel(num_layers=layers, num_single_layers=single, num_attention_heads=heads,
                                      joint_attention_dim=text, guidance_embeds=False)
    width = net.inner_dim
    modules = dict(net.named_modules())
    features = sum(modules[n].in_features + modules[n].out_features for n in lora_targets(net))
    assert blocks_of(width) == (layers, single)
    assert flux2_lora_params(16, width, layers, single) == 16 * features
    double, one = block_params(width)
    assert abs(sum(p.numel() for p in net.transformer_blocks[0].parameters()) - double) < width
    assert abs(sum(p.numel() for p in net.single_transformer_blocks[0].parameters()) - one) < width


@pytest.mark.parametrize("repo,gb,expected", [
    ("black-forest-labs/FLUX.2-klein-base-4B", 8, "flux2-klein-4b-8gb"),
    ("black-forest-labs/FLUX.2-klein-base-4B", 24, "flux2-klein-4b-24gb"),
    ("black-forest-labs/FLUX.2-klein-base-9B", 12, "flux2-klein-9b-12gb"),
    ("black-forest-labs/FLUX.2-klein-base-9B", 16, "flux2-klein-9b-16gb"),
    ("black-forest-labs/FLUX.2-dev", 24, "flux2-dev-24gb"),
])
def test_preset_auto_picks_each_variants_tier(repo, gb, expected):
    from core.devices import DeviceInfo
    from core.model_info import detect_model
    from core.presets import choose_preset

    card = DeviceInfo("cuda", f"{gb} GB card", gb * 0.96, gb * 0.96 - 0.4, bf16=True, bitsandbytes=True)
    choice = choose_preset({"base_model": repo}, device=card, model=detect_model(repo), processes=1)
    assert choice.name == expected, choice.reason
