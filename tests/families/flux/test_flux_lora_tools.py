"""FLUX.1 / Chroma LoRA files through the LoRA tools: inspect, convert (kohya BFL <-> diffusers),
and the `--family` choices of tools/export.py, from a tiny transformer's LoRA
written by write_flux_kohya_file (resize and merge: the conformance suite)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.export.inspect import inspect_lora, lora_family_mismatch
from core.families.flux.lora_files import bfl_module_from_kohya, read_flux_lora, write_flux_kohya_file
from core.tools.convert import convert_lora, read_lora
from core.tools.describe import describe_info

ROOT = Path(__file__).resolve().parents[3]


def _peft_state(variant: str, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    from core.families.flux.lora import add_flux_lora
    from core.families.flux.tiny import tiny_chroma_transformer, tiny_flux_transformer

    model = tiny_chroma_transformer() if variant == "chroma" else tiny_flux_transformer(variant == "flux-dev")
    add_flux_lora(model, rank, 2 * rank)
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # a trained LoRA: B is not zero
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture
def flux_file(tmp_path) -> Path:
    return write_flux_kohya_file(_peft_state("flux-dev"), tmp_path / "flux_lora.safetensors", variant="flux-dev",
                                 alpha=8, dtype=torch.float32)


def _deltas(lora) -> dict[str, torch.Tensor]:
    return {name: module.delta() for name, module in lora.modules.items()}


def test_inspect_tells_a_bfl_kohya_flux_lora_with_rank_and_alpha_per_module(flux_file):
    info = inspect_lora(flux_file)
    assert (info.format, info.family) == ("kohya", "flux-dev")
    assert info.ranks == [4] and info.alphas == [8.0]  # the fused qkv / linear1 parts: rank 4 each, not 12
    assert "transformer.transformer_blocks.0.attn.to_q" in info.modules
    assert "transformer.single_transformer_blocks.0.proj_mlp" in info.modules
    text = describe_info(info)
    assert "Family:    FLUX.1-dev" in text and "transformer (" in text
    # A FLUX.1 LoRA on an SDXL model is named as such; on FLUX.1-schnell it is the same kind (flux1).
    assert "FLUX.1-dev" in lora_family_mismatch(info, "sdxl")
    assert lora_family_mismatch(info, "flux-schnell") is None


def test_inspect_tells_chroma_from_its_metadata(tmp_path):
    file = write_flux_kohya_file(_peft_state("chroma"), tmp_path / "chroma.safetensors", variant="chroma", alpha=4)
    info = inspect_lora(file)
    assert info.family == "chroma" and info.metadata["ss_base_model_version"] == "chroma"


def test_inspect_reads_comfyui_and_diffusers_forms_without_metadata(flux_file, tmp_path):
    tensors = load_file(str(flux_file))
    comfy = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        comfy[f"diffusion_model.{bfl_module_from_kohya(name).bfl}.{part}"] = value
    save_file(comfy, str(tmp_path / "comfy.safetensors"))  # no metadata: the keys alone tell
    info = inspect_lora(tmp_path / "comfy.safetensors")
    assert (info.format, info.family, info.ranks, info.alphas) == ("comfyui", "flux-dev", [4], [8.0])
    folder = convert_lora(flux_file, tmp_path / "diffusers", "diffusers")
    info = inspect_lora(folder)
    assert (info.format, info.family, info.ranks, info.alphas) == ("diffusers", "flux-dev", [4], [8.0])


def test_convert_kohya_to_diffusers_and_back_keeps_every_delta(flux_file, tmp_path):
    written = convert_lora(flux_file, tmp_path / "diffusers", "diffusers")
    assert written == tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    folder = written.parent
    keys = load_file(str(written))
    assert all(k.startswith("transformer.") for k in keys)
    peft, alphas, _ = read_flux_lora(written)
    original, original_alphas, _ = read_flux_lora(flux_file)
    assert alphas == original_alphas
    back = convert_lora(folder, tmp_path / "back.safetensors", "kohya")
    assert load_file(str(back)).keys() == load_file(str(flux_file)).keys()  # BFL names, as WebUI / ComfyUI load
    before, after = _deltas(read_lora(flux_file)), _deltas(read_lora(back))
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6)
    meta = read_lora(back).metadata
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"


def test_the_cli_family_choices_come_from_the_family_table(flux_file, tmp_path):
    help_text = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), "convert", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "flux-dev" in help_text and "chroma" in help_text
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), "inspect", str(flux_file)],
                         capture_output=True, text=True, check=True).stdout
    assert "FLUX.1-dev" in out


def test_a_chroma_lora_keeps_its_family_through_diffusers_when_told(tmp_path):
    file = write_flux_kohya_file(_peft_state("chroma"), tmp_path / "chroma.safetensors", variant="chroma", alpha=4,
                                 dtype=torch.float32)
    written = convert_lora(file, tmp_path / "diffusers", "diffusers")
    # The diffusers file does not say Chroma (FluxPipeline and ChromaPipeline read the same keys).
    back = convert_lora(written, tmp_path / "back.safetensors", "kohya", family="chroma")
    meta = read_lora(back).metadata
    assert meta["ss_base_model_version"] == "chroma" and meta["modelspec.architecture"] == "chroma/lora"
    before, after = _deltas(read_lora(file)), _deltas(read_lora(back))
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6)
