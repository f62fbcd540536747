"""The Qwen-Image memory estimate (closed forms against the real model on the meta device), the
qwen-image presets under their tiers, `preset: auto` and the out-of-memory ladder ending in NF4."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import core.devices
from core import presets
from core.devices import GIB, DeviceInfo
from core.families.qwen_image import memory as qwen_memory
from core.family_api.registry import QWEN_IMAGE
from core.memory import estimate_memory
from core.model_info import detect_model

QWEN = detect_model("Qwen/Qwen-Image")
EDIT = detect_model("Qwen/Qwen-Image-Edit")
TIERS = ["qwen-image-8gb", "qwen-image-12gb", "qwen-image-16gb", "qwen-image-24gb"]
RAW = {"task_type": "image-generation", "base_model": "Qwen/Qwen-Image", "preset": "auto"}


def gpu(name: str, total: float, *, bnb: bool = True) -> DeviceInfo:
    return DeviceInfo("cuda", name, total, total - 0.4, bf16=True, bitsandbytes=bnb)


def _cfg(name: str, **extra):
    return presets.loose_config({**presets.load_preset(name), **extra})


@pytest.fixture(scope="module")
def meta_model():
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return QwenImageTransformer2DModel(num_layers=60, attention_head_dim=128, num_attention_heads=24,
                                           joint_attention_dim=3584, in_channels=64, out_channels=16)


def test_the_closed_forms_are_the_real_model(meta_model):
    from core.families.qwen_image.load import lora_targets

    modules = dict(meta_model.named_modules())
    lora = sum(4 * (modules[n].in_features + modules[n].out_features) for n in lora_targets(meta_model))
    assert qwen_memory.qwen_lora_params(4) == lora
    block = sum(p.numel() for n, p in meta_model.transformer_blocks[0].named_parameters() if n.endswith("weight"))
    assert pytest.approx(block, rel=0.005) == qwen_memory.BLOCK_WEIGHTS_PER_H2 * 3072 ** 2
    assert QWEN.family == "qwen-image" and QWEN.params == QWEN_IMAGE and EDIT.family == "qwen-image-edit"


@pytest.mark.parametrize("name", TIERS)
def test_every_preset_is_under_its_tier_and_above_its_stored_weights(name):
    info = presets.preset_info(name)
    cfg = _cfg(name)
    for model in (QWEN, EDIT):
        estimate = estimate_memory(cfg, model, gpu(name, info.memory_gb))
        assert estimate.total_gb < info.memory_gb, estimate.summary()
        per_weight = 0.5 if cfg.base_quantization == "nf4" else 1.0 if cfg.fp8_base else 2.0
        stored = QWEN_IMAGE * per_weight * (1 - cfg.blocks_to_swap / 60) / GIB
        assert estimate.total_gb > stored + 0.5, estimate.summary()


def test_bf16_weights_alone_do_not_fit_24gb_and_each_saving_lowers_the_estimate():
    card = gpu("48", 48.0)
    base = _cfg("qwen-image-24gb", fp8_base=False, blocks_to_swap=0)
    plain = estimate_memory(base, QWEN, card)
    assert plain.parts["transformer weights"] > 37
    steps = [dict(fp8_base=True), dict(fp8_base=True, blocks_to_swap=20), dict(base_quantization="nf4")]
    totals = [estimate_memory(dataclasses.replace(base, **s), QWEN, card).total_gb for s in steps]
    assert plain.total_gb > totals[0] > totals[1] and totals[2] < totals[0]
    no_gc = estimate_memory(dataclasses.replace(base, gradient_checkpointing=False), QWEN, card)
    assert no_gc.parts["activations"] > 10 * plain.parts["activations"]
    # Edit appends the control image's tokens: more activations at the same size.
    assert estimate_memory(base, EDIT, card).parts["activations"] > plain.parts["activations"] * 1.8


@pytest.mark.parametrize("machine, expected", [(gpu("8", 7.6), "qwen-image-8gb"), (gpu("12", 11.7), "qwen-image-12gb"),
                                               (gpu("16", 15.6), "qwen-image-16gb"),
                                               (gpu("24", 23.6), "qwen-image-24gb")])
def test_preset_auto_picks_the_tier_of_the_gpu(monkeypatch, machine, expected):
    monkeypatch.setattr(core.devices, "detect_device", lambda index=0: machine)
    merged = presets.apply_preset(dict(RAW))
    assert merged["preset"] == expected


def test_the_out_of_memory_ladder_ends_in_nf4():
    cfg = dataclasses.replace(_cfg("qwen-image-24gb"), preset="qwen-image-24gb")
    walked = []
    while (step := presets.next_smaller_preset(cfg, QWEN, gpu("24", 23.6))) is not None:
        name, changes = step
        walked.append(name)
        cfg = dataclasses.replace(cfg, **changes)
        assert cfg.lora_rank == 16 and cfg.batch_size * cfg.gradient_accumulation_steps == 2
    assert walked == ["qwen-image-16gb", "qwen-image-12gb", "qwen-image-8gb"]
    assert cfg.base_quantization == "nf4" and cfg.resolution == 512
