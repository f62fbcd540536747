"""File size of a LoRA, LoKr and LoHa on a full-size SD 1.5 / SDXL UNet, without any download.

    .venv/bin/python bench/lycoris_sizes.py [--rank 16] [--conv-rank 0] [--factor -1] [--family sd15|sdxl]

The UNet is built from its published config on the `meta` device (no weights, no memory), the
trainer's own adapters are injected (core.families.sd.lora.add_unet_lora), and the adapter tensors
are counted at fp16 (the default save_precision); the file header adds a few KB.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The published UNet configs (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0), as diffusers reads them.
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2)
SDXL = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def adapter_megabytes(family: str, variant: str, rank: int, conv_rank: int, factor: int) -> float:
    import torch
    from diffusers import UNet2DConditionModel

    from core.config import TrainConfig
    from core.families.sd.lora import add_unet_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SDXL if family == "sdxl" else SD15))
    cfg = dataclasses.replace(TrainConfig(), lora_variant=variant, lora_rank=rank, lora_alpha=rank,
                              conv_rank=conv_rank, lokr_factor=factor)
    add_unet_lora(unet, cfg)
    count = sum(p.numel() for n, p in unet.named_parameters() if any(k in n for k in ("lora_", "lokr_", "hada_")))
    return count * 2 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--conv-rank", type=int, default=0)
    parser.add_argument("--factor", type=int, default=-1)
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    args = parser.parse_args()
    print(f"{args.family} UNet, rank {args.rank}, conv_rank {args.conv_rank}, lokr_factor {args.factor}, fp16")
    for variant in ("lora", "lokr", "loha"):
        size = adapter_megabytes(args.family, variant, args.rank, args.conv_rank, args.factor)
        print(f"{variant:<6} {size:9.2f} MB")


if __name__ == "__main__":
    main()
