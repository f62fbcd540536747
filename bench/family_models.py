"""Random-weight models at the real networks' widths with few blocks, saved as diffusers folders that both
`train.py` and diffusers' training examples load (bench/families_vs_examples.py).

- FLUX.2 klein 4B: the transformer at its real shapes (width 3072 = 24 heads of 128, joint width 7680,
  128 latent channels, no guidance embedding) with 1 double and 2 single blocks; the real AutoencoderKLFlux2
  (diffusers' defaults are the released VAE's); a Qwen3 text encoder of the real hidden width (2560) with
  the 27 layers the prompt taps (hidden states 9, 18, 27) but narrow attention (4 heads of 128) and MLP (512),
  and the small chat BPE tokenizer of the tests.
- Krea 2: the transformer at its real shapes (width 6144 = 48 heads of 128, 12 key/value heads, MLP 16384,
  text-fusion width 2560) with 2 blocks, one layer-wise and one refiner text block and 2 tapped text layers;
  the real Qwen-Image VAE (AutoencoderKLQwenImage's defaults); a Qwen3-VL of hidden width 2560 with 2 layers
  (narrow attention and MLP as above, a one-block vision tower).

Narrow text encoders keep the memory of the run on the transformer, which is what both sides train; the text
encoders run once per caption on both sides and are freed (ours) or kept (the examples) after.
"""
from __future__ import annotations

from pathlib import Path

import torch

TEXT_WIDTH = 2560  # Qwen3-4B and Qwen3-VL-4B hidden size
NARROW_TEXT = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128, intermediate_size=512)


def build_flux2_klein(folder: Path, *, double: int = 1, single: int = 2) -> Path:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
        Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from core.families.tiny_parts import chat_bpe_tokenizer

    torch.manual_seed(0)
    tokenizer = chat_bpe_tokenizer()
    transformer = Flux2Transformer2DModel(num_layers=double, num_single_layers=single, num_attention_heads=24,
                                          attention_head_dim=128, joint_attention_dim=3 * TEXT_WIDTH,
                                          guidance_embeds=False)
    vae = AutoencoderKLFlux2()
    with torch.no_grad():  # statistics a trained VAE would have, not the identity
        vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, vae.bn.num_features))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.num_features))
    text = Qwen3ForCausalLM(Qwen3Config(hidden_size=TEXT_WIDTH, num_hidden_layers=27, vocab_size=len(tokenizer),
                                        max_position_embeddings=1024, **NARROW_TEXT)).eval()
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                              vae=vae, text_encoder=text, tokenizer=tokenizer, transformer=transformer,
                              is_distilled=False)
    pipe.save_pretrained(folder)
    return folder


def build_krea2(folder: Path, *, blocks: int = 2) -> Path:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline, \
        Krea2Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from core.families.tiny_parts import chat_bpe_tokenizer

    torch.manual_seed(0)
    tokenizer = chat_bpe_tokenizer()
    layers = (1, 2)
    transformer = Krea2Transformer2DModel(num_layers=blocks, num_text_layers=len(layers), num_layerwise_text_blocks=1,
                                          num_refiner_text_blocks=1)
    with torch.no_grad():  # zeros in diffusers (trained values in a real model): small random values instead
        for name, param in transformer.named_parameters():
            if name.endswith("scale_shift_table") or (name.endswith(".weight") and "norm" in name):
                param.copy_(torch.randn_like(param) * 0.1)
    text = Qwen3VLModel(Qwen3VLConfig(
        text_config={"hidden_size": TEXT_WIDTH, "num_hidden_layers": len(layers), "vocab_size": len(tokenizer),
                     "max_position_embeddings": 1024, **NARROW_TEXT,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20]}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": TEXT_WIDTH, "patch_size": 16, "deepstack_visual_indexes": [0]})).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=6400)
    pipe = Krea2Pipeline(scheduler=scheduler, vae=AutoencoderKLQwenImage(), text_encoder=text, tokenizer=tokenizer,
                         transformer=transformer, text_encoder_select_layers=layers, is_distilled=False)
    pipe.save_pretrained(folder)
    return folder
