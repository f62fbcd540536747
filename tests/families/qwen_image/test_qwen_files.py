"""Qwen-Image LoRA files through the LoRA tools: inspect tells our file and ComfyUI's forms without
metadata (convert, resize, merge and the Test tab: the conformance suite, tests/families/test_trained_files.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.export.inspect import inspect_lora


def _peft_state(rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from core.families.qwen_image.load import lora_targets
    from core.families.qwen_image.tiny import tiny_qwen_transformer

    model = tiny_qwen_transformer()
    model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=lora_targets(model)))
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture
def qwen_file(tmp_path) -> Path:
    from core.families.qwen_image.lora_files import write_kohya_file

    return write_kohya_file(_peft_state(), tmp_path / "qwen_lora.safetensors", variant="qwen-image", alpha=8,
                            dtype=torch.float32)


def test_inspect_tells_our_file_and_comfyui_forms_without_metadata(qwen_file, tmp_path):
    info = inspect_lora(qwen_file)
    assert (info.format, info.family, info.ranks, info.alphas) == ("kohya", "qwen-image", [4], [8.0])
    assert "transformer.transformer_blocks.0.attn.to_q" in info.modules
    tensors = load_file(str(qwen_file))
    # ComfyUI's `diffusion_model.<module>` form, no metadata: the keys alone tell the family.
    from core.families.qwen_image.lora_files import kohya_to_peft

    peft, alphas = kohya_to_peft(tensors)
    comfy = {}
    for key, value in peft.items():
        module, part = key.rsplit(".lora_", 1)
        comfy[f"diffusion_model.{module}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        comfy[f"diffusion_model.{module}.alpha"] = torch.tensor(alphas[module])
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    info = inspect_lora(tmp_path / "comfy.safetensors")
    assert (info.family, info.ranks, info.alphas) == ("qwen-image", [4], [8.0])
