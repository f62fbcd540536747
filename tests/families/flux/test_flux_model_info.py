"""FLUX.1-dev / -schnell and Chroma base models are told apart from headers and folder configs
only (core.model_info), with their real sizes, for the Train tab, presets and the memory estimate."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from safetensors import safe_open

from core.family_api.registry import CHROMA, FLUX_DEV, FLUX_SCHNELL, family_info
from core.model_info import detect_model, safetensors_header


def _numel(path: Path, prefix: str = "") -> int:
    with safe_open(str(path), "pt") as handle:
        total = 0
        for key in handle.keys():
            if key.startswith(prefix):
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
        return total


def _header_only_copy(path: Path, target: Path) -> Path:
    """The file's 8-byte length and JSON header, without a byte of tensor data."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    target.write_bytes(data[: 8 + size])
    return target


@pytest.mark.parametrize("fixture, variant", [("tiny_flux_dev", "flux-dev"), ("tiny_chroma", "chroma")])
def test_a_comfyui_single_file_is_told_by_its_header_alone(fixture, variant, request, tmp_path):
    tiny = request.getfixturevalue(fixture)
    # Only the header is read: a copy without the tensor data is detected the same way.
    copy = _header_only_copy(tiny.comfy_transformer, tmp_path / tiny.comfy_transformer.name)
    info = detect_model(str(copy))
    assert info.family == variant
    assert info.kind == "flux"
    assert info.params == _numel(tiny.comfy_transformer, "model.diffusion_model.")
    assert info.width == 32  # the tiny transformer's width (3072 for the real ones)
    assert info.extra_params == family_info(variant).frozen_params  # no encoders in the file: the published sizes
    assert copy.name in info.source


def test_a_bare_diffusers_transformer_file_is_told_too(tiny_flux_schnell):
    file = tiny_flux_schnell.folder / "transformer" / "diffusion_pytorch_model.safetensors"
    info = detect_model(str(file))
    assert info.family == "flux-schnell"
    assert info.params == _numel(file)


@pytest.mark.parametrize("fixture, variant", [("tiny_flux_dev", "flux-dev"), ("tiny_flux_schnell", "flux-schnell"),
                                              ("tiny_chroma", "chroma")])
def test_a_diffusers_folder_is_told_by_its_configs_and_sized_by_its_headers(fixture, variant, request):
    tiny = request.getfixturevalue(fixture)
    info = detect_model(str(tiny.folder))
    assert info.family == variant
    assert info.params == _numel(next((tiny.folder / "transformer").glob("*.safetensors")))
    parts = [p for name in ("text_encoder", "text_encoder_2", "vae") for p in (tiny.folder / name).glob("*.safetensors")]
    assert info.extra_params == sum(_numel(p) for p in parts)
    assert info.width == 32
    assert info.label.startswith(family_info(variant).label + " (")


@pytest.mark.parametrize("name, variant, params", [
    ("black-forest-labs/FLUX.1-dev", "flux-dev", FLUX_DEV),
    ("black-forest-labs/FLUX.1-schnell", "flux-schnell", FLUX_SCHNELL),
    ("lodestones/Chroma1-HD", "chroma", CHROMA),
])
def test_a_hub_id_gets_the_published_size_from_the_family_table(name, variant, params):
    info = detect_model(name)
    assert (info.family, info.params, info.width) == (variant, params, 3072)
    assert info.kind == "flux"


def test_the_label_says_the_family_and_size_in_words():
    assert detect_model("black-forest-labs/FLUX.1-dev").label == "FLUX.1-dev (11.9B parameters)"
    assert detect_model("lodestones/Chroma1-HD").label == "Chroma (8.9B parameters)"
    assert detect_model("stabilityai/stable-diffusion-xl-base-1.0").label == "SDXL (2.6B parameters)"


def test_sd_single_files_are_not_taken_for_flux(tmp_path):
    from safetensors.torch import save_file
    import torch

    file = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 768)},
              str(file))
    assert detect_model(str(file)).family == "sd1"
    assert "model.diffusion_model.input_blocks.0.0.weight" in safetensors_header(file)
