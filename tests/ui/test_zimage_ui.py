"""The Train tab with Z-Image: it names the family from the ComfyUI file and shows the "flow" keys
(text_encoder_files, fp8_base, ...) but not FLUX's own (clip_l, t5, lora_blocks)."""
from __future__ import annotations

from tests.ui.test_flux_ui import work  # noqa: F401 - the fixture
from ui import form


def test_the_train_tab_names_z_image_and_shows_the_flow_keys_only(work, tiny_zimage):  # noqa: F811
    _root, (_state, _catalog, train_tab) = work
    specs = form.field_specs()
    names = [s.name for s in form.kind_specs(specs)]
    line, *updates = train_tab.on_base_model(specs, "image-generation", str(tiny_zimage.comfy_transformer))
    assert "Z-Image-Turbo (" in line and tiny_zimage.comfy_transformer.name in line
    shown = {name for name, update in zip(names, updates) if update["visible"]}
    assert {"text_encoder_files", "fp8_base", "blocks_to_swap", "timestep_sampling"} <= shown
    assert not shown & {"clip_l", "t5", "lora_blocks", "train_guidance"}
    line, *_ = train_tab.on_base_model(specs, "image-generation", "Tongyi-MAI/Z-Image")
    assert line.startswith("**Base model:** Z-Image (6.2B parameters)")
