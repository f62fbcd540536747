"""The app with Qwen-Image: the Train tab names the family and shows the flow-matching keys (not FLUX's
own), and the Tools tab reads and converts a Qwen-Image LoRA."""
from __future__ import annotations

import importlib

import pytest
import torch

from ui import form


@pytest.fixture
def train_tab(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_SCRIPTS_WORKDIR", str(tmp_path))
    import ui.catalog
    import ui.state
    import ui.train_tab

    for module in (ui.state, ui.catalog, ui.train_tab):
        importlib.reload(module)
    yield ui.train_tab
    monkeypatch.delenv("LORA_SCRIPTS_WORKDIR")
    for module in (ui.state, ui.catalog, ui.train_tab):
        importlib.reload(module)


def test_the_train_tab_names_qwen_image_and_shows_the_flow_keys_only(train_tab, tiny_qwen_image):
    specs = form.field_specs()
    by_name = {s.name: s for s in specs}
    assert by_name["fp8_base"].shown_for("image-generation", "qwen-image")
    assert by_name["blocks_to_swap"].shown_for("image-generation", "qwen-image-edit")
    assert not by_name["lora_blocks"].shown_for("image-generation", "qwen-image")  # FLUX's own
    line, *_ = train_tab.on_base_model(specs, "image-generation", "Qwen/Qwen-Image")
    assert line.startswith("**Base model:** Qwen-Image (20.4B parameters)"), line
    line, *_ = train_tab.on_base_model(specs, "image-generation", str(tiny_qwen_image.comfy_transformer))
    assert "Qwen-Image (" in line and tiny_qwen_image.comfy_transformer.name in line


def test_the_tools_tab_inspects_and_converts_a_qwen_lora(tmp_path):
    from core.families.qwen_image.lora_files import write_kohya_file
    from tests.families.qwen_image.test_qwen_files import _peft_state
    from ui import tools_tab

    file = write_kohya_file(_peft_state(), tmp_path / "qwen.safetensors", variant="qwen-image", alpha=4,
                            dtype=torch.float32)
    report = tools_tab.inspect_action(str(file))
    assert "Qwen-Image" in report and "rank    4  alpha 4" in report
    message = tools_tab.convert_action(str(file), "diffusers folder", "", "keep")
    assert message.startswith("✅"), message
    assert (tmp_path / "qwen_diffusers" / "pytorch_lora_weights.safetensors").is_file()
