"""The training objective of diffusers' own training examples, written out per kind of model, for the
conformance suite to compare each family's loss hook with (same inputs, same seed, same draws).

`unet_epsilon`: examples/text_to_image/train_text_to_image_lora.py (SD 1.x) and
train_text_to_image_lora_sdxl.py (SDXL: the prompt through both encoders with the pooled output, and
the added time ids original size + crop + target size): noise ~ N(0, 1), t ~ U{0..T-1}, the
scheduler's add_noise, and the MSE of the UNet's prediction and the noise (epsilon prediction).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def unet_epsilon(folder: Path, pipe, prompts: list[str], latents: torch.Tensor, seed: int) -> torch.Tensor:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    added = None
    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is not None:
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            size = latents.shape[-1] * pipe.vae_scale_factor
            time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(prompts), dtype=embeds.dtype)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        else:
            embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.manual_seed(seed)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        pred = pipe.unet(noisy, timesteps, embeds, added_cond_kwargs=added, return_dict=False)[0]
    return F.mse_loss(pred.float(), noise.float(), reduction="mean")
