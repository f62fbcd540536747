"""A new image family plugs in with its registry row and its own module: nothing else names it.

The story: a developer adds "Toy-DiT" (a flow-matching transformer) as a row of the family table
and one module with its `FAMILY`. Without another edit the app reads its diffusers folder and its
single file from the headers, names it from a hub id, shows the flow-matching keys in the form,
estimates its memory with the family's own parts, tells its LoRA files from their keys and hands
the LoRA tools its file layout.
"""
import dataclasses
import json
import sys
import types

import pytest
from safetensors.torch import save_file

from core.family_api import registry as registry


@pytest.fixture()
def toy_family(monkeypatch):
    import torch

    from core.families.dit.default import transformer_family
    from core.families.zimage.family import SPEC as ZIMAGE_SPEC
    from core.family_api.contract import ImageFamily, LoraFileFormat, ModelLoadError

    module = types.ModuleType("toy_dit_family")
    seen: list[str] = []

    def detect(base_model: str):
        seen.append(base_model)
        return "toy-dit" if "toy" in base_model else None

    def parts(cfg, model, device, *, compute_bytes, lora_state_bytes, cached_images):
        return {"toy transformer weights": model.params * compute_bytes, "toy activations": 1e9}

    lora_files = LoraFileFormat(to_kohya=lambda path, tensors: {"lora_unet_toy": torch.zeros(1)},
                                write_kohya=lambda *a, **k: None, write_diffusers=lambda *a, **k: None,
                                to_peft=lambda path: ({}, {}))
    # A transformer family is a spec and the default (docs/adding-a-family.md): Toy-DiT's borrows Z-Image's
    # loss and prompt encoding (it has no weights to train here) and states its own name and detection.
    spec = dataclasses.replace(ZIMAGE_SPEC, label="Toy-DiT", trains="Toy-DiT trains every block")
    def no_weights(*args, **kwargs):
        raise ModelLoadError("Toy-DiT has no weights to draw with in this story.")

    module.FAMILY = transformer_family(spec, detect=detect, lora_files=lora_files, previews=lambda *a: [],
                                       tryout_pipeline=no_weights, generate=no_weights)
    module.memory_parts = parts
    monkeypatch.setitem(sys.modules, "toy_dit_family", module)
    info = registry.FamilyInfo(
        "toy-dit", "Toy-DiT", "dit", 1024, "toy", "toy_dit", "toy-dit", (), ("text_encoder",), "ToyPipeline",
        "someone/toy-dit", 2_000_000_000, 1_000_000_000, impl="toy_dit_family",
        diffusers_class_names=("ToyPipeline", "ToyTransformer2DModel"), single_file_markers=("toy_in.weight",),
        name_words=("toy-dit",), width=2048, config_groups=("flow",), resolution_floor=512,
        memory_parts="toy_dit_family:memory_parts", lora_key_markers=(r"^diffusion_model\.toy_blocks\.",))
    monkeypatch.setitem(registry.FAMILIES, "toy-dit", info)
    assert isinstance(module.FAMILY, ImageFamily)
    return seen


def test_a_new_family_is_read_from_its_folder_file_and_name_without_naming_it_anywhere_else(toy_family, tmp_path):
    import torch

    from core.family_api.lookup import detect_image_family, family_impl
    from core.model_info import detect_model

    folder = tmp_path / "toy-model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline"}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "ToyTransformer2DModel",
                                                                     "num_attention_heads": 4,
                                                                     "attention_head_dim": 8}))
    save_file({"w": torch.zeros(10, 10)}, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    info = detect_model(str(folder))
    assert (info.family, info.params, info.width, info.kind) == ("toy-dit", 100, 32, "dit")

    single = tmp_path / "toy_single.safetensors"
    save_file({"model.diffusion_model.toy_in.weight": torch.zeros(64, 16),
               "text_encoders.x": torch.zeros(7)}, str(single))
    info = detect_model(str(single))
    assert (info.family, info.params, info.width, info.extra_params) == ("toy-dit", 64 * 16, 64, 7)

    assert detect_model("someone/Toy-DiT-v1").family == "toy-dit"
    assert detect_image_family(str(folder)) == "toy-dit" and family_impl("toy-dit").detect is not None


def test_its_form_keys_memory_and_lora_files_come_from_its_row(toy_family):
    from core.config import TrainConfig
    from core.devices import DeviceInfo
    from core.export.inspect import family_from_keys, lora_files_of
    from core.memory import estimate_memory
    from core.model_info import family_defaults
    from ui import form

    specs = {s.name: s for s in form.field_specs()}
    assert specs["fp8_base"].shown_for("image-generation", "toy-dit")      # the "flow" group
    assert not specs["clip_l"].shown_for("image-generation", "toy-dit")    # FLUX's own keys stay hidden

    device = DeviceInfo("cuda", "GPU", 24.0, 24.0, bf16=True, bitsandbytes=True)
    estimate = estimate_memory(TrainConfig(base_model="x", train_data_dir="d"), family_defaults("toy-dit"), device)
    assert {"toy transformer weights", "toy activations"} <= set(estimate.parts)

    assert family_from_keys({"diffusion_model.toy_blocks.0.attn.lora_A.weight": (4, 8)}, "kohya", None) == "toy-dit"
    assert lora_files_of("toy-dit") is not None and lora_files_of("sd1") is None
