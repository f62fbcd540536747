"""The app with FLUX.1 / Chroma: the Train tab names the base model's family and shows the FLUX
keys only for FLUX-kind models, the base-model list has ComfyUI's transformer folders (never the
parts of a diffusers folder), and the Tools tab reads and writes FLUX LoRA files."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from core.families.flux.lora_files import write_flux_kohya_file
from ui import form


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The ui modules re-imported over a temporary work folder (models/, output/)."""
    monkeypatch.setenv("LORA_SCRIPTS_WORKDIR", str(tmp_path))
    import ui.catalog
    import ui.state
    import ui.train_tab

    modules = [importlib.reload(m) for m in (ui.state, ui.catalog, ui.train_tab)]
    yield tmp_path, modules
    monkeypatch.delenv("LORA_SCRIPTS_WORKDIR")
    for module in (ui.state, ui.catalog, ui.train_tab):
        importlib.reload(module)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_the_catalog_lists_comfyui_transformers_and_a_diffusers_folder_but_never_its_parts(work):
    root, (_state, catalog, _train) = work
    touch(root / "models" / "Stable-diffusion" / "v1-5.safetensors")
    touch(root / "models" / "Stable-diffusion" / "FLUX.1-dev" / "model_index.json")
    for part in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        touch(root / "models" / "Stable-diffusion" / "FLUX.1-dev" / part / "diffusion_pytorch_model.safetensors")
    touch(root / "models" / "diffusion_models" / "flux1-dev.safetensors")
    touch(root / "models" / "diffusion_models" / "chroma" / "chroma1-hd.safetensors")
    touch(root / "models" / "unet" / "flux1-schnell.safetensors")
    touch(root / "models" / "unet" / "notes.txt")
    assert catalog.image_models() == [
        "./models/Stable-diffusion/FLUX.1-dev",
        "./models/Stable-diffusion/v1-5.safetensors",
        "./models/diffusion_models/chroma/chroma1-hd.safetensors",
        "./models/diffusion_models/flux1-dev.safetensors",
        "./models/unet/flux1-schnell.safetensors",
    ]


def test_flux_keys_show_only_for_a_flux_kind_base_model_and_an_image_task():
    specs = {s.name: s for s in form.field_specs()}
    flux_keys = [s.name for s in form.kind_specs(list(specs.values()))]
    assert {"clip_l", "t5", "fp8_base", "blocks_to_swap", "base_quantization", "lora_blocks"} <= set(flux_keys)
    assert specs["fp8_base"].shown_for("image-generation", "flux-dev")
    assert not specs["fp8_base"].shown_for("image-generation", "sd1")
    assert not specs["fp8_base"].shown_for("image-generation")
    assert not specs["fp8_base"].shown_for("text-generation", "flux-dev")
    assert specs["resolution"].shown_for("image-generation", "flux-dev")  # other image keys stay


def test_the_train_tab_names_the_family_and_toggles_the_flux_keys(work, tiny_flux_dev):
    _root, (_state, _catalog, train_tab) = work
    specs = form.field_specs()
    kinds = form.kind_specs(specs)
    line, *updates = train_tab.on_base_model(specs, "image-generation", str(tiny_flux_dev.comfy_transformer))
    assert "FLUX.1-dev (" in line and tiny_flux_dev.comfy_transformer.name in line
    assert len(updates) == len(kinds) and all(u["visible"] for u in updates)
    line, *updates = train_tab.on_base_model(specs, "image-generation", "black-forest-labs/FLUX.1-dev")
    assert line == "**Base model:** FLUX.1-dev (11.9B parameters), read from the name 'black-forest-labs/FLUX.1-dev'."
    line, *updates = train_tab.on_base_model(specs, "image-generation", "stabilityai/stable-diffusion-xl-base-1.0")
    assert "SDXL" in line and not any(u["visible"] for u in updates)
    # Switching the task back to images keeps the FLUX keys for a FLUX base model.
    updates = train_tab.on_task(specs, "image-generation", "black-forest-labs/FLUX.1-schnell")
    index = [s.name for s in specs].index("fp8_base")
    assert updates[index]["visible"]
    assert not train_tab.on_task(specs, "text-generation", "black-forest-labs/FLUX.1-schnell")[index]["visible"]


def test_the_tools_tab_inspects_converts_and_resizes_a_flux_lora(tmp_path):
    from peft.utils import get_peft_model_state_dict

    from core.families.flux.lora import add_flux_lora
    from core.families.flux.tiny import tiny_flux_transformer
    from ui import tools_tab

    model = tiny_flux_transformer()
    add_flux_lora(model, 4, 4)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    file = write_flux_kohya_file(get_peft_model_state_dict(model), tmp_path / "flux.safetensors",
                                 variant="flux-dev", alpha=4)
    report = tools_tab.inspect_action(str(file))
    assert "FLUX.1-dev" in report and "rank    4  alpha 4" in report
    message = tools_tab.convert_action(str(file), "diffusers folder", "", "keep")
    assert message.startswith("✅"), message
    assert (tmp_path / "flux_diffusers" / "pytorch_lora_weights.safetensors").is_file()
    message = tools_tab.resize_action(str(file), "rank", 2, 0.95, "", "fp16")
    assert message.startswith("✅"), message
    assert "FLUX.1-dev" in tools_tab.inspect_action(str(tmp_path / "flux_r2.safetensors"))


def test_the_memory_line_follows_the_flux_switches(work, monkeypatch):
    import core.devices
    from core.devices import DeviceInfo

    _root, (_state, _catalog, train_tab) = work
    card = DeviceInfo("cuda", "RTX 4090 24GB", 23.6, 23.2, bf16=True, bitsandbytes=True)
    monkeypatch.setattr(core.devices, "detect_device", lambda index=0: card)
    raw = {"task_type": "image-generation", "base_model": "black-forest-labs/FLUX.1-dev", "resolution": 1024,
           "batch_size": 1, "gradient_checkpointing": True, "cache_text_encoder_outputs": True,
           "mixed_precision": "bf16"}
    assert {"fp8_base", "blocks_to_swap", "base_quantization", "lora_blocks"} <= set(train_tab.MEMORY_KEYS)
    plain, fp8 = train_tab.memory_line(raw), train_tab.memory_line({**raw, "fp8_base": True})
    assert "transformer weights 22.2" in plain and "transformer weights 11.1" in fp8


def test_the_training_guidance_shows_for_every_guidance_distilled_model_and_no_other():
    """FLUX.2 dev trains with a guidance value as FLUX.1-dev does: the form shows the key for both (and Kontext),
    not for schnell, Chroma, klein or the other flow families, which have no guidance input."""
    guidance = {s.name: s for s in form.field_specs()}["train_guidance"]
    for family in ("flux-dev", "flux-kontext", "flux2-dev"):
        assert guidance.shown_for("image-generation", family), family
    for family in ("flux-schnell", "chroma", "flux2-klein-4b", "qwen-image", "sd1"):
        assert not guidance.shown_for("image-generation", family), family
