"""Qwen-Image LoRA files through the LoRA tools (inspect, convert both ways, resize, merge) and the
Test tab (generate_images with our diffusers file)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.export.inspect import inspect_lora
from core.tools.convert import convert_lora, read_lora
from core.tools.extract import resize_file
from core.tools.merge import combine_files


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


def _deltas(lora) -> dict[str, torch.Tensor]:
    return {name: module.delta() for name, module in lora.modules.items()}


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


def test_convert_to_diffusers_and_back_keeps_every_delta(qwen_file, tmp_path):
    from diffusers import QwenImagePipeline

    written = convert_lora(qwen_file, tmp_path / "diffusers", "diffusers")
    assert written.name == "pytorch_lora_weights.safetensors"
    assert all(k.startswith("transformer.") for k in load_file(str(written)))
    assert QwenImagePipeline.lora_state_dict(str(written))
    assert inspect_lora(written).family == "qwen-image" and inspect_lora(written).alphas == [8.0]
    back = convert_lora(written.parent, tmp_path / "back.safetensors", "kohya")
    assert load_file(str(back)).keys() == load_file(str(qwen_file)).keys()
    before, after = _deltas(read_lora(qwen_file)), _deltas(read_lora(back))
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6)
    meta = read_lora(back).metadata
    assert meta["ss_base_model_version"] == "qwen_image" and meta["modelspec.architecture"] == "Qwen-Image/lora"


def test_resize_and_merge(qwen_file, tmp_path):
    from core.families.qwen_image.lora_files import write_kohya_file
    from core.tools.convert import write_like

    lora = read_lora(qwen_file)
    full, report = resize_file(qwen_file, tmp_path / "full.safetensors", rank=8, dtype=None)
    assert report.max_error < 1e-5
    for name, delta in _deltas(read_lora(full)).items():
        torch.testing.assert_close(delta, lora.modules[name].delta(), rtol=1e-4, atol=1e-5)
    small, report = resize_file(qwen_file, tmp_path / "r2.safetensors", rank=2, dtype=None)
    assert {m.rank for m in read_lora(small).modules.values()} == {2} and inspect_lora(small).family == "qwen-image"
    other = write_kohya_file(_peft_state(seed=1), tmp_path / "other.safetensors", variant="qwen-image", alpha=8,
                             dtype=torch.float32)
    merged, _ = combine_files([qwen_file, other], [1.0, 0.5])
    b = read_lora(other)
    for name, module in merged.modules.items():
        torch.testing.assert_close(module.delta(), lora.modules[name].delta() + 0.5 * b.modules[name].delta(),
                                   rtol=1e-4, atol=1e-5)
    assert inspect_lora(write_like(merged, tmp_path / "merged.safetensors", dtype=None)).family == "qwen-image"


def test_the_test_tab_generates_with_and_without_the_lora(tiny_qwen_image, qwen_file, tmp_path):
    from core.sample import clear_pipeline_cache, generate_images

    written = convert_lora(qwen_file, tmp_path / "diffusers", "diffusers")
    kwargs = dict(seed=3, steps=2, guidance=1.0, width=32, height=32)
    try:
        base = generate_images(str(tiny_qwen_image.folder), None, ["a red thing"], **kwargs)[0]
        zero = generate_images(str(tiny_qwen_image.folder), written, ["a red thing"], weight=0.0, **kwargs)[0]
        full = generate_images(str(tiny_qwen_image.folder), qwen_file, ["a red thing"], weight=1.0, **kwargs)[0]
    finally:
        clear_pipeline_cache()
    assert base.size == (32, 32)
    assert np.array_equal(np.asarray(zero), np.asarray(base))
    assert not np.array_equal(np.asarray(full), np.asarray(base))
