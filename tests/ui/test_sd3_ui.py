"""The app with SD3 / SD3.5: the Train tab names the family and shows the flow-matching keys (not
FLUX's own), ComfyUI's checkpoints folder is listed, and the Tools tab reads and converts SD3 LoRAs."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from ui import form


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_SCRIPTS_WORKDIR", str(tmp_path))
    import ui.catalog
    import ui.state
    import ui.train_tab

    modules = [importlib.reload(m) for m in (ui.state, ui.catalog, ui.train_tab)]
    yield tmp_path, modules
    monkeypatch.delenv("LORA_SCRIPTS_WORKDIR")
    for module in (ui.state, ui.catalog, ui.train_tab):
        importlib.reload(module)


def test_the_train_tab_names_sd3_and_shows_the_flow_keys_only(work, tiny_sd3):
    root, (_state, catalog, train_tab) = work
    target = root / "models" / "checkpoints" / "sd3.5_medium.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(tiny_sd3.comfy_checkpoint.read_bytes())
    assert "./models/checkpoints/sd3.5_medium.safetensors" in catalog.image_models()
    specs = form.field_specs()
    kinds = form.kind_specs(specs)
    line, *updates = train_tab.on_base_model(specs, "image-generation", str(target))
    assert "SD3.5 / SD3 Medium (" in line, line
    shown = {s.name for s, u in zip(kinds, updates) if u["visible"]}
    assert {"fp8_base", "timestep_sampling", "discrete_flow_shift", "blocks_to_swap"} <= shown
    assert not shown & {"clip_l", "t5", "lora_blocks", "train_guidance"}
    line, *_ = train_tab.on_base_model(specs, "image-generation", "stabilityai/stable-diffusion-3.5-large")
    assert line.startswith("**Base model:** SD3.5 Large (8.1B parameters)"), line


def test_the_tools_tab_inspects_converts_and_resizes_an_sd3_lora(tmp_path, tiny_sd3):
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from core.families.sd3.family import lora_targets
    from core.families.sd3.lora_files import write_kohya_file
    from ui import tools_tab

    model = SD3Transformer2DModel.from_pretrained(tiny_sd3.folder, subfolder="transformer")
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=lora_targets(model)))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    file = write_kohya_file(get_peft_model_state_dict(model), tmp_path / "sd3.safetensors", model_type="5-medium",
                            alpha=4)
    report = tools_tab.inspect_action(str(file))
    assert "SD3.5 / SD3 Medium" in report and "rank    4  alpha 4" in report, report
    message = tools_tab.convert_action(str(file), "diffusers folder", "", "keep")
    assert message.startswith("✅"), message
    assert Path(tmp_path / "sd3_diffusers" / "pytorch_lora_weights.safetensors").is_file()
    message = tools_tab.resize_action(str(file), "rank", 2, 0.95, "", "fp16")
    assert message.startswith("✅"), message
    assert "SD3.5 / SD3 Medium" in tools_tab.inspect_action(str(tmp_path / "sd3_r2.safetensors"))
