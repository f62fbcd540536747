"""LoKr and LoHa on the transformer families (Z-Image, FLUX.1, SD3, Qwen-Image: the shared default):
the file's keys are diffusers' module names, which ComfyUI maps onto the native (fused) weights, and the
update ComfyUI rebuilds there equals the one we trained; a run trains, resumes, previews and the Test
tab applies the file.

ComfyUI's map is read from its comfy/lora.py (Dec 2026): for FLUX (`flux_to_diffusers`) and Z-Image
(Lumina2's `z_image_to_diffusers`) `transformer.<diffusers module>` points at the native weight, with
(dim 0, row offset, rows) for a module fused there (qkv, the single blocks' linear1), and
`calculate_weight` narrows the weight to that offset before the adapter adds its update; SD3's
`mmdit_to_diffusers` the same, and Qwen-Image's native names are diffusers' own. The test
builds that map from the tiny model itself: each diffusers weight is found, by value, as the native
weight or a row slice of it (the tiny weights are random, so each matches once), as
tests/families/comfy_keys.py does for the UNet's diffusers names. The adapter math is
tests/export/test_lycoris.py's `comfy_delta`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.config import TrainConfig
from tests.fixtures.tiny_sd import run_collect, tiny_run_config
from tests.export.test_lycoris import VARIANTS, comfy_delta


def _zimage() -> tuple[torch.nn.Module, object]:
    from core.families.zimage.tiny import native_transformer_state, tiny_zimage_transformer

    return tiny_zimage_transformer(), native_transformer_state


def _flux() -> tuple[torch.nn.Module, object]:
    from core.families.flux.convert import diffusers_to_bfl
    from core.families.flux.tiny import tiny_flux_transformer

    return tiny_flux_transformer(), diffusers_to_bfl


def _sd3() -> tuple[torch.nn.Module, object]:
    from core.families.sd3.keys import diffusers_to_mmdit
    from core.families.sd3.tiny import tiny_sd3_transformer

    return tiny_sd3_transformer(), diffusers_to_mmdit


def _qwen() -> tuple[torch.nn.Module, object]:
    from core.families.qwen_image.tiny import tiny_qwen_transformer

    return tiny_qwen_transformer(), dict  # ComfyUI's Qwen-Image has diffusers' names


BUILDERS = {"z-image-turbo": _zimage, "flux-dev": _flux, "sd3": _sd3, "qwen-image": _qwen}
FUSED = {"z-image-turbo": 3, "flux-dev": 3, "sd3": 3, "qwen-image": 0}  # modules that land on a row slice


def comfy_targets(diffusers: dict[str, torch.Tensor], native: dict[str, torch.Tensor]
                  ) -> dict[str, tuple[str, tuple[int, int, int] | None]]:
    """`transformer.<module>` -> (native weight, offset or None), as ComfyUI's map has it, found by value."""
    out = {}
    for name, weight in diffusers.items():
        if not name.endswith(".weight") or weight.dim() != 2:
            continue
        for native_name, full in native.items():
            if full.dim() != 2 or full.shape[1] != weight.shape[1] or full.shape[0] < weight.shape[0]:
                continue
            rows = torch.nonzero(torch.all(full == weight[0], dim=1)).flatten().tolist()
            hit = next((r for r in rows if torch.equal(full[r:r + weight.shape[0]], weight)), None)
            if hit is not None:
                offset = None if full.shape[0] == weight.shape[0] else (0, hit, weight.shape[0])
                out[f"transformer.{name[:-len('.weight')]}"] = (native_name, offset)
                break
    return out


def adapted(family: str, variant: dict) -> tuple[torch.nn.Module, dict[str, torch.Tensor], object]:
    """The family's tiny transformer with a trained-looking LoKr / LoHa (the run's own add_lora), its base weights."""
    from core.family_api.lookup import family_impl

    transformer, to_native = BUILDERS[family]()
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    cfg = dataclasses.replace(TrainConfig(), **{"lora_rank": 4, "lora_alpha": 3.0, **variant})
    family_impl(family).add_lora(SimpleNamespace(transformer=transformer, variant=family), cfg, None, lambda _: None)
    torch.manual_seed(0)
    for name, param in transformer.named_parameters():
        if "lokr_" in name or "hada_" in name:
            param.data.normal_(0, 0.3)
    return transformer, base, to_native


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_key_maps_through_comfyui_onto_the_native_weights_and_rebuilds_our_exact_update(family, name):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from core.export.lycoris import scales_from_model
    from core.export.lycoris_transformer import group_file, peft_to_file_tensors
    from core.lora import peft_state

    transformer, base, to_native = adapted(family, VARIANTS[name])
    tensors = peft_to_file_tensors(peft_state(transformer), scales_from_model(transformer))
    assert all(k.startswith("transformer.") for k in tensors)
    modules = group_file(tensors)
    assert sum(len(parts) for parts in modules.values()) == len(tensors)  # every key belongs to a module

    # What we trained: base + each layer's delta, in the native layout.
    expected = dict(base)
    layers = {n: m for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    assert set(layers) == set(modules)
    for path, layer in layers.items():
        expected[f"{path}.weight"] = base[f"{path}.weight"] + layer.get_delta_weight("default")
    expected_native = to_native(expected)

    # What ComfyUI does: its key map, then each adapter's update added into the (narrowed) native weight.
    native = {k: v.clone() for k, v in to_native(base).items()}
    targets = comfy_targets(base, native)
    fused = 0
    for path, parts in modules.items():
        native_name, offset = targets[f"transformer.{path}"]  # a KeyError: ComfyUI would not load it
        weight = native[native_name]
        view = weight.narrow(*offset) if offset else weight
        view += comfy_delta(parts, view.shape)
        fused += offset is not None
    assert fused >= FUSED[family]  # q, k, v into the fused qkv (FLUX: also the single blocks' linear1)
    for key, value in expected_native.items():
        torch.testing.assert_close(native[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_native_fused_lokr_file_is_refused_in_one_sentence():
    from core.export.kohya import LoraFormatError
    from core.export.lycoris_transformer import refuse_fused

    with pytest.raises(LoraFormatError, match=r"^A LoKr / LoHa of FLUX.1 cannot be written in the native fused layout"):
        refuse_fused("FLUX.1")



def _run(model: Path, data: Path, out: Path, variant: str, **overrides):
    return run_collect(tiny_run_config(model, data, out, **{
        "batch_size": 1, "max_train_steps": 2, "save_steps": 1, "output_name": "lyco", "lora_variant": variant,
        "lokr_factor": 4, "learning_rate": 5e-2, "sample_guidance_scale": 0.0, **overrides}))


@pytest.mark.slow
@pytest.mark.parametrize(("fixture", "variant"), [("tiny_zimage", "lokr"), ("tiny_zimage", "loha"),
                                                  ("tiny_flux_dev", "lokr")])
def test_a_transformer_run_trains_resumes_previews_and_the_test_tab_applies_its_file(
        fixture, variant, two_images, tmp_path, request):
    from core.sample import clear_pipeline_cache, generate_images

    tiny = request.getfixturevalue(fixture)
    out = tmp_path / "straight"
    outputs, events = _run(tiny.folder, two_images, out, variant, sample_prompts=["a red thing"])
    kind = "LoKr" if variant == "lokr" else "LoHa"
    assert any(e.message.startswith(f"{kind} (rank 4") for e in events if e.kind == "log")
    tensors = load_file(outputs["lora"])
    part = "lokr_w1" if variant == "lokr" else "hada_w1_a"
    assert any(k.endswith("." + part) for k in tensors) and all(k.startswith("transformer.") for k in tensors)
    assert not outputs["diffusers"]

    stopped = tmp_path / "stopped"
    _run(tiny.folder, two_images, stopped, variant)
    (stopped / "lyco.safetensors").unlink()
    import shutil

    shutil.rmtree(stopped / "checkpoints" / "step-000002")
    _, resumed = _run(tiny.folder, two_images, stopped, variant, resume_from="latest")
    assert [e.step for e in resumed if e.kind == "progress"] == [2]
    again = load_file(str(stopped / "lyco.safetensors"))
    assert again.keys() == tensors.keys()
    for key in tensors:
        torch.testing.assert_close(again[key], tensors[key], atol=1e-5, rtol=1e-4, msg=key)

    preview = Image.open(out / "samples" / "step-000002-0.png")
    kwargs = dict(seed=1234, steps=2, guidance=0.0, width=preview.width, height=preview.height)
    try:
        base = np.asarray(generate_images(str(tiny.folder), None, ["a red thing"], **kwargs)[0], dtype=int)
        tab = np.asarray(generate_images(str(tiny.folder), outputs["lora"], ["a red thing"], weight=1.0,
                                         **kwargs)[0], dtype=int)
        after = np.asarray(generate_images(str(tiny.folder), None, ["a red thing"], **kwargs)[0], dtype=int)
    finally:
        clear_pipeline_cache()
    assert np.abs(tab - np.asarray(preview, dtype=int)).max() <= 2  # the Test tab applies what previews drew
    assert np.abs(tab - base).max() >= 4 and np.array_equal(after, base)  # ...and leaves the base as it was
