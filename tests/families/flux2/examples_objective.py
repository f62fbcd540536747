"""The loss of diffusers' FLUX.2 training examples (train_dreambooth_lora_flux2.py and _klein.py), written out
with the pipeline's own helpers, for the tests that compare our loss with it on the same draws."""
from __future__ import annotations

from typing import Any

import torch


def examples_loss(pipe: Any, model_input: torch.Tensor, embeds: torch.Tensor, text_ids: torch.Tensor,
                  noise: torch.Tensor, sigmas: torch.Tensor, guidance: float | None = None) -> torch.Tensor:
    """zt = (1 - s) x + s z packed as the pipeline packs it, the transformer at timestep s (with `guidance` in its
    guidance embedding, or none for klein), MSE against z - x per sample, then the mean."""
    pipeline = type(pipe)
    with torch.no_grad():
        ids = pipeline._prepare_latent_ids(model_input)
        s = sigmas.view(-1, 1, 1, 1)
        packed = pipeline._pack_latents((1 - s) * model_input + s * noise)
        embedded = None if guidance is None else torch.full([1], guidance).expand(len(sigmas))
        pred = pipe.transformer(hidden_states=packed, timestep=sigmas, guidance=embedded, encoder_hidden_states=embeds,
                                txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        pred = pipeline._unpack_latents_with_ids(pred[:, : packed.size(1)], ids)
        return torch.mean(((pred.float() - (noise - model_input).float()) ** 2).reshape(len(sigmas), -1), 1).mean()
