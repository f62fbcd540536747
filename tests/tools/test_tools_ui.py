"""The Tools tab: its actions as a user clicks them (no browser), and the tab builds."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from tests.fixtures.tool_loras import make_sd_lora
from ui import tools_tab


@pytest.fixture(scope="module")
def made(tiny_sd1, tmp_path_factory):
    return make_sd_lora(tiny_sd1.folder, tmp_path_factory.mktemp("ui_lora"), seed=31)


def test_the_tools_tab_builds_with_its_four_sections():
    import gradio as gr

    with gr.Blocks():
        parts = tools_tab.create_tools_tab()
    assert {"inspect_file", "convert_to", "resize_file", "merge_loras", "merge_out"} <= set(parts)


def test_inspect_shows_the_report_and_warns_about_nan(made, tmp_path):
    text = tools_tab.inspect_action(str(made.kohya))
    assert "rank    4  alpha 8" in text and "⚠" not in text
    tensors = load_file(str(made.kohya))
    tensors[next(k for k in tensors if k.endswith("lora_down.weight"))][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    assert tools_tab.inspect_action(str(tmp_path / "bad.safetensors")).startswith("⚠ This LoRA holds NaN/inf")
    assert tools_tab.inspect_action("").startswith("❌ Choose the LoRA file")
    assert "does not exist" in tools_tab.inspect_action(str(tmp_path / "nope.safetensors"))


def test_convert_resize_and_combine_write_beside_the_source_by_default(made):
    message = tools_tab.convert_action(str(made.diffusers), "WebUI / ComfyUI (kohya .safetensors)", "", "fp16")
    assert message.startswith("✅") and (made.diffusers.parent / "pytorch_lora_weights_webui.safetensors").is_file()
    message = tools_tab.resize_action(str(made.kohya), "rank", 2, 0.95, "", "fp16")
    assert message.startswith("✅") and "relative error overall" in message
    assert (made.kohya.parent / f"{made.kohya.stem}_r2.safetensors").is_file()
    message = tools_tab.merge_action("", f"{made.kohya}:0.5\n# a comment\n{made.kohya}:0.5", "", "fp32", 4)
    assert message.startswith("✅ Combined 2 LoRAs") and (made.kohya.parent / f"{made.kohya.stem}_merged.safetensors").is_file()


def test_merging_into_a_base_model_writes_a_checkpoint(made, tiny_sd1, tmp_path):
    out = tmp_path / "baked.safetensors"
    message = tools_tab.merge_action(str(tiny_sd1.folder), f"{made.kohya}:0.8", str(out), "fp16")
    assert message.startswith("✅") and out.is_file()
    assert tools_tab.merge_action(str(tiny_sd1.folder), "", str(out), "fp16").startswith("❌ List at least one LoRA")


def test_a_dora_lora_is_made_plain_against_its_base_model_and_asks_for_it_first(tiny_sd1, tmp_path):
    dora = make_sd_lora(tiny_sd1.folder, tmp_path / "dora", variant="dora", conv_rank=0, seed=32)
    plain = "DoRA made plain: works the same in WebUI, ComfyUI, diffusers (needs the base model)"
    assert "Choose the base model" in tools_tab.convert_action(str(dora.kohya), plain, "", "fp16", "")
    message = tools_tab.convert_action(str(dora.kohya), plain, "", "fp16", str(tiny_sd1.folder))
    assert message.startswith("✅") and "relative error overall" in message
    assert (dora.kohya.parent / f"{dora.kohya.stem}_plain.safetensors").is_file()
