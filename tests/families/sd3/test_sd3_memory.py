"""The SD3 / SD3.5 memory estimate (core.families.sd3.memory, calibrated on the real shapes), the sd3
presets, `preset: auto` and the out-of-memory ladder down to NF4. Devices are simulated as in test_presets."""
from __future__ import annotations

import dataclasses

import pytest

import core.devices
from core import presets
from core.devices import GIB, DeviceInfo
from core.families.sd3 import memory as sd3_memory
from core.family_api.registry import SD35_LARGE
from core.memory import estimate_memory
from core.model_info import detect_model

MEDIUM = detect_model("stabilityai/stable-diffusion-3.5-medium")
LARGE = detect_model("stabilityai/stable-diffusion-3.5-large")
TIERS = ["sd3-8gb", "sd3-12gb", "sd3-16gb", "sd3-24gb"]


def gpu(name: str, total: float, *, bnb: bool = True, used: float = 0.4) -> DeviceInfo:
    return DeviceInfo("cuda", name, total, total - used, bf16=True, bitsandbytes=bnb)


def _cfg(name: str, **extra):
    return presets.loose_config({**presets.load_preset(name), **extra})


def test_the_lora_size_is_counted_from_the_real_blocks():
    counts = sd3_memory.shape_counts("5-medium")
    # 24 blocks; 13 with a second attention; the last block's context stream has no output / MLP.
    h = 1536
    per_block = 8 * 2 * h + 2 * (h + 4 * h) * 2  # x + context attention (q, k, v, out) and both MLPs
    expected = 24 * per_block + 13 * 4 * 2 * h - (2 * h + 2 * (5 * h))  # attn2; minus to_add_out and ff_context
    assert counts["lora_per_rank"] == expected
    assert sd3_memory.lora_params("sd35-large", 16) == 16 * sd3_memory.shape_counts("5-large")["lora_per_rank"]


@pytest.mark.parametrize("name", TIERS)
@pytest.mark.parametrize("model", [MEDIUM, LARGE], ids=["medium", "large"])
def test_every_sd3_preset_is_under_its_tier_for_both_sizes_and_above_the_stored_weights(name, model):
    info = presets.preset_info(name)
    cfg = _cfg(name)
    estimate = estimate_memory(cfg, model, gpu(name, info.memory_gb))
    assert estimate.total_gb < info.memory_gb, estimate.summary()
    per_weight = 0.5 if cfg.base_quantization == "nf4" else 1.0 if cfg.fp8_base else 2.0
    assert estimate.total_gb > model.params * per_weight / GIB + 0.3, estimate.summary()


def test_each_saving_lowers_the_estimate_and_bf16_large_needs_more_than_16gb():
    card = gpu("48", 48.0)
    base = _cfg("sd3-24gb", batch_size=1)
    bf16 = estimate_memory(base, LARGE, card).total_gb
    assert bf16 > 16 > SD35_LARGE * 2 / GIB - 1
    fp8 = estimate_memory(dataclasses.replace(base, fp8_base=True), LARGE, card).total_gb
    swap = estimate_memory(dataclasses.replace(base, fp8_base=True, blocks_to_swap=19), LARGE, card).total_gb
    nf4 = estimate_memory(dataclasses.replace(base, base_quantization="nf4"), LARGE, card).total_gb
    assert bf16 > fp8 > swap and nf4 < fp8
    no_gc = estimate_memory(dataclasses.replace(base, gradient_checkpointing=False), LARGE, card)
    assert no_gc.parts["activations"] > 10 * estimate_memory(base, LARGE, card).parts["activations"]
    assert estimate_memory(base, MEDIUM, card).total_gb < bf16 / 2


@pytest.fixture
def device(monkeypatch):
    def use(info: DeviceInfo) -> DeviceInfo:
        monkeypatch.setattr(core.devices, "detect_device", lambda index=0: info)
        return info
    return use


@pytest.mark.parametrize("machine, expected", [(gpu("8", 7.6), "sd3-8gb"), (gpu("12", 11.7), "sd3-12gb"),
                                               (gpu("16", 15.6), "sd3-16gb"), (gpu("24", 23.6), "sd3-24gb")])
def test_preset_auto_picks_the_sd3_tier_of_the_gpu(device, machine, expected):
    device(machine)
    raw = {"task_type": "image-generation", "base_model": "stabilityai/stable-diffusion-3.5-large", "preset": "auto"}
    assert presets.apply_preset(dict(raw))["preset"] == expected
    assert presets.choose_preset(dict(raw)).fits


def test_out_of_memory_ladder_walks_the_sd3_tiers_down_to_nf4():
    cfg = dataclasses.replace(_cfg("sd3-24gb"), preset="sd3-24gb")
    walked = []
    while (step := presets.next_smaller_preset(cfg, LARGE, gpu("24", 23.6))) is not None:
        name, changes = step
        walked.append(name)
        before = cfg
        cfg = dataclasses.replace(cfg, **changes)
        assert (cfg.lora_rank, cfg.optimizer) == (before.lora_rank, before.optimizer)
        assert cfg.batch_size * cfg.gradient_accumulation_steps == 2
    assert walked == ["sd3-16gb", "sd3-12gb", "sd3-8gb"]
    assert cfg.base_quantization == "nf4" and cfg.resolution == 768
