"""Z-Image's memory estimate (closed forms against the real model, presets under their tiers, `preset: auto`,
the out-of-memory ladder down to NF4) and the LoRA tools' hook (convert both ways keeps every dW)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import core.devices
from core import presets
from core.devices import GIB, DeviceInfo
from core.families.zimage import memory as zimage_memory
from core.family_api.registry import Z_IMAGE
from core.memory import estimate_memory
from core.model_info import family_defaults

TIERS = ("z-image-24gb", "z-image-16gb", "z-image-12gb", "z-image-8gb")
ZI = family_defaults("z-image-turbo")
RAW = {"task_type": "image-generation", "base_model": "Tongyi-MAI/Z-Image-Turbo", "preset": "auto"}


def gpu(name: str, total: float, *, bnb: bool = True) -> DeviceInfo:
    return DeviceInfo("cuda", name, total, total - 0.4, bf16=True, bitsandbytes=bnb)


def _cfg(name: str, **extra):
    return presets.loose_config({**presets.load_preset(name), **extra})


def test_lora_and_block_closed_forms_equal_the_real_model_on_the_meta_device():
    from diffusers import ZImageTransformer2DModel

    from core.families.zimage.load import lora_targets

    with torch.device("meta"):
        model = ZImageTransformer2DModel()
    modules = dict(model.named_modules())
    targets = lora_targets(model)
    assert len(targets) == 34 * 7
    features = sum(modules[t].in_features + modules[t].out_features for t in targets)
    assert zimage_memory.lora_params(4) == 4 * features
    block = sum(p.numel() for n, p in model.layers[0].named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert zimage_memory.block_params() == block


@pytest.mark.parametrize("name", TIERS)
def test_every_preset_is_under_its_tier_and_above_its_stored_weights(name):
    info = presets.preset_info(name)
    cfg = _cfg(name)
    estimate = estimate_memory(cfg, ZI, gpu(name, info.memory_gb))
    assert estimate.total_gb < info.memory_gb, estimate.summary()
    per_weight = 0.5 if cfg.base_quantization == "nf4" else 1.0 if cfg.fp8_base else 2.0
    assert estimate.total_gb > Z_IMAGE * per_weight / GIB + 0.5, estimate.summary()


def test_no_checkpointing_at_1024_px_does_not_fit_24gb():
    estimate = estimate_memory(_cfg("z-image-24gb", gradient_checkpointing=False), ZI, gpu("24", 23.6))
    assert estimate.parts["activations"] > 30 and not estimate.fits


@pytest.mark.parametrize("total, expected", [(7.6, "z-image-8gb"), (11.7, "z-image-12gb"), (15.6, "z-image-16gb"),
                                             (23.6, "z-image-24gb")])
def test_preset_auto_picks_the_z_image_tier_of_the_gpu(monkeypatch, total, expected):
    monkeypatch.setattr(core.devices, "detect_device", lambda index=0: gpu("card", total))
    assert presets.apply_preset(dict(RAW))["preset"] == expected


def test_out_of_memory_ladder_walks_the_tiers_down_to_nf4():
    cfg = dataclasses.replace(_cfg("z-image-24gb"), preset="z-image-24gb")
    walked = []
    while (step := presets.next_smaller_preset(cfg, ZI, gpu("24", 23.6))) is not None:
        name, changes = step
        walked.append(name)
        cfg = dataclasses.replace(cfg, **changes)
        assert cfg.lora_rank == 16 and cfg.batch_size * cfg.gradient_accumulation_steps == 2
    assert walked == ["z-image-16gb", "z-image-12gb", "z-image-8gb"]
    assert cfg.base_quantization == "nf4"


def test_the_tools_hook_converts_both_ways_with_the_same_dw(tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict

    from core.family_api.lookup import family_impl
    from core.families.zimage.lora_files import read_lora, write_kohya_file
    from core.tools.modules import LoraModule
    from core.families.zimage.tiny import tiny_zimage_transformer

    from core.families.zimage.load import lora_targets

    model = tiny_zimage_transformer()
    model.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=lora_targets(model), init_lora_weights=False))
    state = get_peft_model_state_dict(model)
    kohya_file = write_kohya_file(state, tmp_path / "z.safetensors", variant="z-image-turbo", alpha=2.0,
                                  dtype=torch.float32)
    files = family_impl("z-image-turbo").lora_files
    from core.export.kohya import load_kohya_lora

    tensors, meta = load_kohya_lora(kohya_file)
    kohya = files.to_kohya(kohya_file, tensors)
    names = {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".lora_down.weight")}
    modules = {n: LoraModule(kohya[f"{n}.lora_down.weight"], kohya[f"{n}.lora_up.weight"],
                             float(kohya[f"{n}.alpha"])) for n in names}
    diffusers_file = files.write_diffusers(modules, tmp_path / "d", dtype=torch.float32)
    back = files.write_kohya(modules, tmp_path / "back.safetensors", variant="z-image-turbo", metadata=meta,
                             dtype=torch.float32)

    def dw(path):
        peft, alphas, _ = read_lora(path)
        out = {}
        for k, v in peft.items():
            if k.endswith(".lora_A.weight"):
                path = k[: -len(".lora_A.weight")]
                out[path] = peft[f"{path}.lora_B.weight"] @ v * alphas[path] / v.shape[0]
        return out

    a, b, c = dw(kohya_file), dw(diffusers_file), dw(back)
    assert set(a) == set(b) == set(c) and len(a) == 28
    for key in a:
        torch.testing.assert_close(a[key], b[key])
        torch.testing.assert_close(a[key], c[key])
    peft, _ = files.to_peft(diffusers_file)
    assert len(peft) == 56
