"""Wan LoRA files: ours uses Wan's native names under `diffusion_model.` with alpha (ComfyUI has no other map for
Wan); musubi-tuner's `lora_unet_blocks_...` and diffusion-pipe's `diffusion_model....lora_A/B` files read to the
same LoRA, and diffusers' Wan loader takes ours and musubi-tuner's with the deltas of the LoRA we wrote."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.families.table import FAMILIES

WAN = next(f for f in FAMILIES if f.name == "wan2.1-t2v-1.3b")
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def lora(built, tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """A random LoRA on every target of the tiny Wan (PEFT names) and our file of it."""
    from diffusers import WanTransformer3DModel

    from core.families.wan.load import lora_targets
    from core.families.wan.lora_files import write_kohya_file

    transformer = WanTransformer3DModel.from_pretrained(str(built(WAN).folder / "transformer"))
    modules = dict(transformer.named_modules())
    generator = torch.Generator().manual_seed(0)
    peft = {}
    for path in lora_targets(transformer):
        layer = modules[path]
        peft[f"{path}.lora_A.weight"] = torch.randn(RANK, layer.in_features, generator=generator)
        peft[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=generator)
    path = write_kohya_file(peft, tmp_path_factory.mktemp("files") / "ours.safetensors", variant=WAN.name,
                            alpha=ALPHA, dtype=None)
    return peft, path


def _deltas(peft: dict[str, torch.Tensor], alphas: dict[str, float] | float) -> dict[str, torch.Tensor]:
    out = {}
    for key in peft:
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            alpha = alphas if isinstance(alphas, float) else alphas[path]
            out[path] = peft[f"{path}.lora_B.weight"] @ peft[key] * alpha / RANK
    return out


def test_our_file_names_every_module_natively_under_diffusion_model_with_alpha(lora):
    _, path = lora
    keys = list(load_file(str(path)))
    native = re.compile(r"^diffusion_model\.blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])"
                        r"\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert keys and all(native.match(k) for k in keys), [k for k in keys if not native.match(k)][:3]
    assert sum(k.endswith(".alpha") for k in keys) == 2 * 10  # 2 blocks x (8 attention + 2 FFN)


def test_musubi_and_diffusion_pipe_files_read_to_the_same_lora(lora, tmp_path):
    from core.families.wan.lora_files import read_lora

    peft, path = lora
    want = _deltas(peft, ALPHA)
    ours = load_file(str(path))
    musubi = {re.sub(r"^diffusion_model\.(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$",
                     lambda m: "lora_unet_" + m[1].replace(".", "_") + "." + m[2], k): v for k, v in ours.items()}
    # diffusion-pipe: PEFT's lora_A / lora_B under diffusion_model., no alpha (the scale folded into B)
    pipe_form = {}
    for key, value in ours.items():
        if key.endswith(".lora_down.weight"):
            pipe_form[key.replace(".lora_down.", ".lora_A.")] = value
        elif key.endswith(".lora_up.weight"):
            pipe_form[key.replace(".lora_up.", ".lora_B.")] = value * ALPHA / RANK
    for name, tensors in (("musubi", musubi), ("diffusion_pipe", pipe_form)):
        file = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(file))
        got_peft, alphas, _ = read_lora(file)
        got = _deltas(got_peft, alphas)
        assert got.keys() == want.keys(), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_diffusers_wan_loader_takes_ours_and_musubis_file_with_the_same_deltas(built, lora, tmp_path):
    from diffusers import WanPipeline

    peft, path = lora
    want = _deltas(peft, ALPHA)
    ours = load_file(str(path))
    musubi = tmp_path / "musubi.safetensors"
    save_file({re.sub(r"^diffusion_model\.(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$",
                      lambda m: "lora_unet_" + m[1].replace(".", "_") + "." + m[2], k): v for k, v in ours.items()},
              str(musubi))
    for file in (path, musubi):
        pipe = WanPipeline.from_pretrained(str(built(WAN).folder))
        pipe.load_lora_weights(str(file), adapter_name="t")
        got = {name: layer.get_delta_weight("t") for name, layer in pipe.transformer.named_modules()
               if "t" in getattr(layer, "lora_A", {})}
        assert got.keys() == want.keys(), file.name
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{file.name} {key}")


def test_inspect_names_the_family_of_each_form(lora, tmp_path):
    from core.export.inspect import inspect_lora

    _, path = lora
    info = inspect_lora(path)
    assert (info.format, info.family) == ("comfyui", WAN.name) and info.ranks == [RANK]
