"""LoRA file formats: kohya/WebUI (`kohya`), diffusers (`diffusers_format`), metadata, inspection.

`load_lora_as_peft` reads either kind of image-LoRA file back into PEFT state dicts (to
continue training from it or to convert it).
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor


def load_lora_as_peft(path: str | Path, family: str
                      ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]], dict[str, float]]:
    """A kohya or diffusers LoRA .safetensors -> (UNet PEFT dict, [text encoder PEFT dicts], alphas).

    Alphas are keyed `unet.<path>` / `text_encoder.<path>` / `text_encoder_2.<path>`; the text encoder
    list has one entry per text encoder of the family (empty dicts where the file has none).
    """
    from core.export.diffusers_format import diffusers_lora_to_peft
    from core.export.kohya import KOHYA_KEY_PREFIXES, kohya_to_peft, load_kohya_lora, text_encoder_prefixes

    tensors, metadata = load_kohya_lora(path)
    if tensors and all(k.startswith(KOHYA_KEY_PREFIXES) for k in tensors):
        return kohya_to_peft(tensors, family)  # type: ignore[arg-type]
    unet, tes, alphas = diffusers_lora_to_peft(tensors, metadata)
    return unet, tes[:len(text_encoder_prefixes(family))], alphas
