"""Presets: `preset: auto` picks the richest preset that fits the user's GPU and base model,
says why, and leaves every value editable. Devices are simulated by mocking the one
detection call, `core.devices.detect_device`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import core.devices
from core import presets
from core.config import FIELDS, config_from_dict
from core.devices import DeviceInfo
from core.model_info import SMOLLM2_135M, detect_model
from core.family_api.registry import FAMILIES


def gpu(name: str, total: float, *, bf16: bool = True, bnb: bool = True, used: float = 0.4) -> DeviceInfo:
    return DeviceInfo("cuda", name, total, total - used, bf16=bf16, bitsandbytes=bnb)


GTX_1650 = gpu("GTX 1650 4GB", 3.8, bf16=False, bnb=False)
GTX_1060 = gpu("GTX 1060 6GB", 5.9, bf16=False)
RTX_4060_LAPTOP = gpu("RTX 4060 Laptop 8GB", 7.6)
RTX_3060 = gpu("RTX 3060 12GB", 11.7)
RTX_4060_TI = gpu("RTX 4060 Ti 16GB", 15.6)
RTX_4090 = gpu("RTX 4090 24GB", 23.6)
RTX_3090_BUSY = gpu("RTX 3090 24GB", 23.6, used=15.0)  # a game or another job holds 15 GB
CPU = DeviceInfo("cpu", "CPU", 32.0, 20.0)
APPLE = DeviceInfo("mps", "Apple M2", 16.0, 10.0)

SD15 = {"task_type": "image-generation", "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
SDXL = {"task_type": "image-generation", "base_model": "stabilityai/stable-diffusion-xl-base-1.0"}
SMOL = {"task_type": "text-generation", "base_model": ""}
LLAMA_1B = {"task_type": "text-generation", "base_model": "meta-llama/Llama-3.2-1B-Instruct"}
LLAMA_8B = {"task_type": "text-generation", "base_model": "meta-llama/Llama-3.1-8B-Instruct"}


@pytest.fixture
def device(monkeypatch):
    """Set the simulated device: `device(RTX_3060)`."""
    def use(info: DeviceInfo) -> DeviceInfo:
        monkeypatch.setattr(core.devices, "detect_device", lambda index=0: info)
        return info
    return use


@pytest.mark.parametrize("model, machine, expected", [
    (SD15, GTX_1650, "sd15-4gb"),
    (SD15, GTX_1060, "sd15-6gb"),
    (SD15, RTX_4060_LAPTOP, "sd15-8gb"),
    (SD15, RTX_3060, "sd15-12gb"),
    (SD15, RTX_4060_TI, "sd15-12gb"),
    (SD15, RTX_4090, "sd15-24gb"),
    (SDXL, RTX_4060_LAPTOP, "sdxl-8gb"),
    (SDXL, RTX_3060, "sdxl-12gb"),
    (SDXL, RTX_4060_TI, "sdxl-16gb"),
    (SDXL, RTX_4090, "sdxl-24gb"),
    (SDXL, RTX_3090_BUSY, "sdxl-12gb"),  # 24 GB card, but only 8.6 GB free
    (SMOL, GTX_1650, "llm-4gb"),
    (SMOL, RTX_3060, "llm-12gb"),
    (SMOL, RTX_4090, "llm-24gb"),
    (LLAMA_1B, RTX_4060_LAPTOP, "llm-8gb"),
    (LLAMA_8B, RTX_4090, "llm-16gb"),  # 16 GB of weights leave room only for shorter batches
    (SD15, CPU, "cpu"),
    (SMOL, CPU, "cpu"),
    (SDXL, APPLE, "mps"),
])
def test_auto_picks_the_richest_preset_that_fits_each_machine(device, model, machine, expected):
    device(machine)
    merged = presets.apply_preset({**model, "preset": "auto"})
    assert merged["preset"] == expected


def test_the_users_own_values_win_over_the_chosen_preset(device):
    device(RTX_3060)
    cfg = presets.resolve_config({**SD15, "preset": "auto", "batch_size": 7, "train_data_dir": "x"}, check_paths=False)
    assert cfg.preset == "sd15-12gb"
    assert cfg.batch_size == 7  # the user's
    assert cfg.lora_rank == 32 and cfg.gradient_checkpointing is False  # the preset's


def test_a_gpu_without_bf16_gets_fp16_and_no_bitsandbytes_means_plain_adamw(device):
    device(GTX_1650)
    merged = presets.apply_preset({**SD15, "preset": "auto"})
    assert merged["mixed_precision"] == "fp16" and merged["optimizer"] == "adamw"
    reason = presets.describe_choice({**SD15, "preset": "auto"})
    assert "fp16 because this GPU has no bf16" in reason


def test_a_named_preset_is_adapted_to_the_gpu_but_a_users_precision_is_not(device):
    device(GTX_1060)
    assert presets.apply_preset({"preset": "sd15-8gb"})["mixed_precision"] == "fp16"
    assert presets.apply_preset({"preset": "sd15-8gb", "mixed_precision": "bf16"})["mixed_precision"] == "bf16"


def test_the_reason_names_the_preset_the_gpu_the_model_and_the_predicted_memory(device):
    device(RTX_3060)
    reason = presets.describe_choice({**SDXL, "preset": "auto"})
    assert reason.startswith("Preset sdxl-12gb: SDXL (2.6B parameters)")
    assert "RTX 3060 12GB" in reason and "predicted peak about" in reason and "GB" in reason
    assert "sdxl-16gb" not in reason  # meant for a bigger GPU: not even tried


def test_the_reason_says_why_a_bigger_tier_was_passed_over(device):
    device(RTX_3090_BUSY)
    reason = presets.describe_choice({**SDXL, "preset": "auto"})
    assert "sdxl-24gb was predicted to need" in reason and "usable" in reason


def test_a_model_too_big_for_the_gpu_gets_the_smallest_preset_and_a_plain_warning(device):
    device(GTX_1650)
    choice = presets.choose_preset({**LLAMA_8B, "preset": "auto"})
    assert choice.name == "llm-4gb" and not choice.fits
    assert "NOT to fit" in choice.reason and "smaller base model" in choice.reason


def test_cpu_choice_says_it_will_be_slow_and_uses_the_models_native_resolution(device):
    device(CPU)
    choice = presets.choose_preset({**SDXL, "preset": "auto"})
    assert choice.name == "cpu" and choice.values["resolution"] == 1024
    assert "slowly" in choice.reason and choice.values["mixed_precision"] == "no"


def test_describe_choice_warns_when_a_named_preset_is_for_another_family(device):
    device(RTX_3060)
    text = presets.describe_choice({**SD15, "preset": "sdxl-12gb"})
    assert "meant for SDXL models" in text and "SD 1.x" in text


def test_describe_choice_without_preset_estimates_the_users_values(device):
    device(GTX_1650)
    text = presets.describe_choice({**SDXL, "resolution": 1024, "batch_size": 4})
    assert text.startswith("No preset") and "NOT to fit" in text and "gradient_checkpointing off -> on" in text


def test_an_unknown_preset_is_refused_with_the_names_that_exist():
    with pytest.raises(Exception) as caught:
        presets.resolve_config({**SD15, "preset": "sd15-9gb", "train_data_dir": "x"}, check_paths=False)
    assert "sd15-8gb" in str(caught.value) and "auto" in str(caught.value)


@pytest.mark.parametrize("name", presets.preset_names())
def test_every_preset_file_has_a_description_a_family_a_tier_and_only_config_keys(name):
    raw = yaml.safe_load((presets.PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    assert len(raw["description"]) > 30
    assert raw["family"] in {i.preset_family for i in FAMILIES.values()} | {"llm", "any"}
    values = presets.load_preset(name)
    assert set(values) <= set(FIELDS)
    for key in ("batch_size", "gradient_accumulation_steps", "lora_rank", "mixed_precision",
                "gradient_checkpointing", "optimizer"):
        assert key in values, f"{name} does not set {key}"
    cfg = config_from_dict({**SD15, "train_data_dir": "x", **values}, check_paths=False)  # values validate
    assert cfg.batch_size == values["batch_size"]


@pytest.mark.parametrize("name", [n for n in presets.preset_names() if n not in ("cpu", "mps")])
def test_every_gpu_preset_fits_its_own_tier_with_the_real_model(name):
    info = presets.preset_info(name)
    model = {"sd1": detect_model(SD15["base_model"]), "sdxl": detect_model(SDXL["base_model"]),
             "flux": detect_model("black-forest-labs/FLUX.1-dev"),
             "llm": detect_model(LLAMA_1B["base_model"], "text-generation")}.get(info.family)
    if model is None:  # another family's presets: the largest model of the table they serve
        model = max((detect_model(i.hub_repo) for i in FAMILIES.values() if i.preset_family == info.family),
                    key=lambda m: m.params)
    if info.family == "llm" and info.memory_gb <= 4:
        model = SMOLLM2_135M
    card = gpu(f"{info.memory_gb:g} GB card", info.memory_gb * 0.96)
    values, _ = presets.adapt_to_device(presets.load_preset(name), card)
    from core.memory import estimate_memory

    estimate = estimate_memory(presets.loose_config(values), model, card)
    assert estimate.fits, f"{name}: {estimate.describe()}"


def test_effective_batch_is_the_same_across_a_familys_tiers_so_a_downshift_keeps_the_schedule():
    for family in {"llm"} | {i.preset_family for i in FAMILIES.values()}:
        effective = {info.name: presets.load_preset(info.name)["batch_size"]
                     * presets.load_preset(info.name)["gradient_accumulation_steps"]
                     for info in presets.family_presets(family)}
        assert len(set(effective.values())) == 1, effective


# --- detecting the base model from headers only ---------------------------------------------------

def _tiny_file(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


def test_a_single_file_checkpoint_is_recognised_from_its_key_names(tmp_path):
    sdxl = _tiny_file(tmp_path / "xl.safetensors", {"conditioner.embedders.1.model.ln_final.weight": (4,),
                                                     "model.diffusion_model.out.2.weight": (4, 8)})
    sd1 = _tiny_file(tmp_path / "v15.safetensors", {"cond_stage_model.transformer.x.weight": (2,),
                                                     "model.diffusion_model.out.2.weight": (4, 8)})
    sd2 = _tiny_file(tmp_path / "v2.safetensors", {"cond_stage_model.model.ln_final.weight": (2,),
                                                    "model.diffusion_model.out.2.weight": (4, 8)})
    assert detect_model(str(sdxl)).family == "sdxl"
    assert detect_model(str(sd1)).family == "sd1"
    assert detect_model(str(sd2)).family == "sd2"
    assert detect_model(str(sdxl)).params == 32  # counted from the header's shapes


def test_an_llm_safetensors_file_gives_its_shape(tmp_path):
    keys = {"model.embed_tokens.weight": (100, 16)}
    for layer in range(3):
        keys[f"model.layers.{layer}.self_attn.k_proj.weight"] = (8, 16)
        keys[f"model.layers.{layer}.mlp.gate_proj.weight"] = (40, 16)
    info = detect_model(str(_tiny_file(tmp_path / "model.safetensors", keys)), "text-generation")
    assert (info.family, info.hidden_size, info.num_layers, info.intermediate_size, info.vocab_size,
            info.kv_dim) == ("llm", 16, 3, 40, 100, 8)


def test_the_bundled_gguf_model_is_read_from_its_header_quickly():
    import time

    from core.models.llm import ModelLoadError, default_text_model

    try:
        path = Path(default_text_model())
    except ModelLoadError:
        pytest.skip("the SmolLM2 GGUF is not in models/llm/ (python launch.py downloads it)")
    start = time.perf_counter()
    info = detect_model(str(path), "text-generation")
    assert time.perf_counter() - start < 2.0
    assert (info.hidden_size, info.num_layers, info.vocab_size, info.kv_dim) == (576, 30, 49152, 192)
    assert 130e6 < info.params < 140e6


def test_folders_are_recognised_from_their_config_files(tmp_path):
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (pipe / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time",
                                                           "block_out_channels": [32, 64]}))
    info = detect_model(str(pipe))
    assert info.family == "sdxl" and info.width == 32
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 500,
                                                 "intermediate_size": 128, "num_attention_heads": 4,
                                                 "num_key_value_heads": 2}))
    info = detect_model(str(llm), "text-generation")
    assert (info.hidden_size, info.num_layers, info.kv_dim) == (64, 2, 32)
    assert info.params == 500 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


def test_hub_ids_are_never_downloaded_only_read_by_name():
    assert detect_model("stabilityai/stable-diffusion-xl-base-1.0").family == "sdxl"
    assert detect_model("stabilityai/stable-diffusion-2-1").family == "sd2"
    info = detect_model("Qwen/Qwen2.5-0.5B-Instruct", "text-generation")
    assert info.params == 500_000_000 and "name" in info.source


def test_a_broken_gpu_driver_reads_as_the_cpu_instead_of_breaking_every_config(monkeypatch):
    def broken(index=0):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(core.devices, "detect_device", broken)
    merged = presets.apply_preset({**SD15, "preset": "auto"})
    assert merged["preset"] == "cpu"
    assert "GPU detection failed" in presets.describe_choice({**SD15, "preset": "auto"})


def test_on_the_cpu_a_model_too_big_for_the_ram_gets_gradient_checkpointing_unless_the_user_said_no(device):
    device(DeviceInfo("cpu", "CPU", 24.0, 19.0))
    choice = presets.choose_preset({**SDXL, "preset": "auto"})
    assert choice.values["gradient_checkpointing"] is True and choice.fits
    assert "gradient_checkpointing off -> on to fit in memory" in choice.reason
    mine = presets.choose_preset({**SDXL, "preset": "auto", "gradient_checkpointing": False})
    assert not mine.fits and "NOT to fit" in mine.reason
