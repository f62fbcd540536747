"""The FLUX.1 / Chroma memory estimate, the flux presets, `preset: auto` and the out-of-memory
ladder for FLUX (fp8 -> blocks in CPU memory -> NF4). Devices are simulated as in test_presets."""
from __future__ import annotations

import dataclasses

import pytest

import core.devices
from core import presets
from core.families.flux import memory as memory_flux
from core.devices import GIB, DeviceInfo
from core.families.flux.lora import flux_param_counts
from core.family_api.registry import FLUX_DEV
from core.memory import estimate_memory, fitting_changes
from core.model_info import detect_model

FLUX1_DEV = detect_model("black-forest-labs/FLUX.1-dev")
CHROMA = detect_model("lodestones/Chroma1-HD")
FLUX_TIERS = ["flux-8gb", "flux-12gb", "flux-16gb", "flux-24gb"]


def gpu(name: str, total: float, *, bf16: bool = True, bnb: bool = True, used: float = 0.4) -> DeviceInfo:
    return DeviceInfo("cuda", name, total, total - used, bf16=bf16, bitsandbytes=bnb)


RTX_4060_LAPTOP = gpu("RTX 4060 Laptop 8GB", 7.6)
RTX_3060 = gpu("RTX 3060 12GB", 11.7)
RTX_4060_TI = gpu("RTX 4060 Ti 16GB", 15.6)
RTX_4090 = gpu("RTX 4090 24GB", 23.6)
FLUX_RAW = {"task_type": "image-generation", "base_model": "black-forest-labs/FLUX.1-dev", "preset": "auto"}


@pytest.fixture
def device(monkeypatch):
    def use(info: DeviceInfo) -> DeviceInfo:
        monkeypatch.setattr(core.devices, "detect_device", lambda index=0: info)
        return info
    return use


def _cfg(name: str, **extra):
    return presets.loose_config({**presets.load_preset(name), **extra})


# --- the closed forms against the real architecture -----------------------------------------------

@pytest.mark.parametrize("variant", ["flux-dev", "chroma"])
@pytest.mark.parametrize("blocks", ["all", "attention", "single_blocks"])
def test_lora_size_closed_form_equals_the_real_model_on_the_meta_device(variant, blocks):
    counts = flux_param_counts(variant, 4, blocks)
    assert memory_flux.flux_lora_params(4, blocks) == counts["lora"]


@pytest.mark.parametrize("variant", ["flux-dev", "chroma"])
def test_block_sizes_closed_form_is_within_half_a_percent_of_the_real_blocks(variant):
    counts = flux_param_counts(variant, 4)
    double, single = memory_flux.block_params(variant)
    assert double == pytest.approx(counts["per_double_block"], rel=0.005)
    assert single == pytest.approx(counts["per_single_block"], rel=0.005)


# --- the estimate ------------------------------------------------------------------------------------

def test_bf16_flux_dev_weights_alone_do_not_fit_24gb_so_the_24gb_preset_stores_them_smaller():
    card = gpu("24", 23.6)
    plain = estimate_memory(_cfg("flux-24gb", fp8_base=False), FLUX1_DEV, card)
    assert plain.parts["transformer weights"] > 22
    assert not plain.fits
    values = presets.load_preset("flux-24gb")
    assert values["fp8_base"] or values["blocks_to_swap"] or values["base_quantization"] != "none"


@pytest.mark.parametrize("name", FLUX_TIERS)
def test_every_flux_preset_is_under_its_tier_and_above_its_stored_weights(name):
    info = presets.preset_info(name)
    cfg = _cfg(name)
    estimate = estimate_memory(cfg, FLUX1_DEV, gpu(name, info.memory_gb))
    assert estimate.total_gb < info.memory_gb, estimate.summary()
    # Floor: the weights that stay on the GPU, counted independently of the estimate's parts.
    per_weight = 0.5 if cfg.base_quantization == "nf4" else 1.0 if cfg.fp8_base else 2.0
    stored = FLUX_DEV * per_weight * (1 - cfg.blocks_to_swap / 57) / GIB
    assert estimate.total_gb > stored + 0.5, estimate.summary()


def test_each_saving_lowers_the_estimate():
    card = gpu("48", 48.0)
    base = _cfg("flux-24gb", fp8_base=False, batch_size=1)
    steps = [dict(fp8_base=True), dict(fp8_base=True, blocks_to_swap=20), dict(base_quantization="nf4")]
    totals = [estimate_memory(dataclasses.replace(base, **s), FLUX1_DEV, card).total_gb for s in steps]
    assert estimate_memory(base, FLUX1_DEV, card).total_gb > totals[0] > totals[1]
    assert totals[2] < totals[0]
    no_gc = estimate_memory(dataclasses.replace(base, gradient_checkpointing=False), FLUX1_DEV, card)
    assert no_gc.parts["activations"] > 10 * estimate_memory(base, FLUX1_DEV, card).parts["activations"]
    # T5 / CLIP stay on the GPU when their outputs are not cached.
    uncached = estimate_memory(dataclasses.replace(base, cache_text_encoder_outputs=False), FLUX1_DEV, card)
    assert uncached.parts["text encoder weights"] > 8


def test_chroma_is_smaller_than_flux_dev_with_the_same_preset():
    card = gpu("24", 23.6)
    assert estimate_memory(_cfg("flux-24gb"), CHROMA, card).total_gb < \
        estimate_memory(_cfg("flux-24gb"), FLUX1_DEV, card).total_gb


def test_advice_for_flux_reaches_for_fp8_and_offload_before_the_resolution():
    cfg = _cfg("flux-24gb", fp8_base=False, batch_size=1)
    changes, fits = fitting_changes(cfg, FLUX1_DEV, RTX_4060_TI)
    keys = [key for key, _old, _new in changes]
    assert fits
    assert keys[0] == "fp8_base" and "resolution" not in keys


# --- preset: auto and the downshift ladder -----------------------------------------------------------

@pytest.mark.parametrize("machine, expected", [
    (RTX_4060_LAPTOP, "flux-8gb"), (RTX_3060, "flux-12gb"), (RTX_4060_TI, "flux-16gb"), (RTX_4090, "flux-24gb"),
])
def test_preset_auto_picks_the_flux_tier_of_the_gpu(device, machine, expected):
    device(machine)
    merged = presets.apply_preset(dict(FLUX_RAW))
    assert merged["preset"] == expected
    choice = presets.choose_preset(dict(FLUX_RAW))
    assert choice.fits and "FLUX.1-dev (11.9B parameters)" in choice.reason


def test_nf4_without_bitsandbytes_becomes_fp8_with_more_blocks_in_cpu_memory():
    values, notes = presets.adapt_to_device(presets.load_preset("flux-8gb"), gpu("8", 7.6, bnb=False))
    assert values["base_quantization"] == "none" and values["fp8_base"] and values["blocks_to_swap"] >= 40
    assert any("NF4" in note for note in notes)


def test_out_of_memory_ladder_walks_the_flux_tiers_down_to_nf4():
    card = RTX_4090
    cfg = dataclasses.replace(_cfg("flux-24gb"), preset="flux-24gb")
    walked = []
    while (step := presets.next_smaller_preset(cfg, FLUX1_DEV, card)) is not None:
        name, changes = step
        walked.append(name)
        before = cfg
        cfg = dataclasses.replace(cfg, **changes)
        # The LoRA's shape and the optimizer stay, so the checkpoint loads; the effective batch stays.
        assert (cfg.lora_rank, cfg.lora_blocks, cfg.optimizer) == (before.lora_rank, before.lora_blocks,
                                                                   before.optimizer)
        assert cfg.batch_size * cfg.gradient_accumulation_steps == 2
    assert walked == ["flux-16gb", "flux-12gb", "flux-8gb"]
    assert cfg.fp8_base and cfg.blocks_to_swap == 20 and cfg.base_quantization == "nf4"
