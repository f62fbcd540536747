"""Wan 2.2 A14B: two experts (`transformer` for the noisy steps above boundary_ratio, `transformer_2` below), one
trained at a time. A tiny A14B trains each expert from its diffusers folder and from ComfyUI's high_noise /
low_noise files; each expert sees only its own noise levels, the file says which model node it goes on, and
diffusers' loader puts it on that expert (`load_into_transformer_2` for the low-noise one)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_sd import run_collect, tiny_run_config


@pytest.fixture(scope="module")
def tiny_a14b(tmp_path_factory):
    from core.families.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("a14b"), a14b=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from core.families.tiny_parts import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("a14b_data") / "images", count=2)


def test_each_expert_draws_only_its_side_of_the_boundary():
    from types import SimpleNamespace

    from core.families.wan.loss import expert_sigma_range

    assert expert_sigma_range(SimpleNamespace(expert="high", boundary_ratio=0.875)) == (0.875, 1.0)
    assert expert_sigma_range(SimpleNamespace(expert="low", boundary_ratio=0.875)) == (0.0, 0.875)
    assert expert_sigma_range(SimpleNamespace(expert="")) == (0.0, 1.0)


@pytest.mark.parametrize("expert", ["high", "low"])
def test_an_expert_of_the_diffusers_folder_trains_and_its_files_load_onto_that_expert(tiny_a14b, data, tmp_path,
                                                                                    monkeypatch, expert):
    import core.families.wan.loss as wan_loss
    from diffusers import WanPipeline

    drawn: list[tuple[float, float]] = []
    real = wan_loss.wan_loss

    def spy(*args, **kwargs):
        drawn.append(kwargs["sigma_range"])
        return real(*args, **kwargs)

    monkeypatch.setattr(wan_loss, "wan_loss", spy)
    outputs, events = run_collect(tiny_run_config(tiny_a14b.folder, data, tmp_path / expert, batch_size=1,
                                                  max_train_steps=2, learning_rate=5e-2, wan_expert=expert,
                                                  sample_prompts=["a red thing"]))
    assert set(drawn) == {(0.875, 1.0) if expert == "high" else (0.0, 0.875)}
    assert Path(outputs["lora"]).name == f"{tmp_path.joinpath(expert).name}_{expert}_noise.safetensors"
    assert any(e.kind == "sample" for e in events)
    pipe = WanPipeline.from_pretrained(str(tiny_a14b.folder))
    pipe.load_lora_weights(outputs["diffusers"], adapter_name="t", load_into_transformer_2=expert == "low")
    pipe.load_lora_weights(outputs["lora"], adapter_name="k", load_into_transformer_2=expert == "low")
    trained, other = ((pipe.transformer, pipe.transformer_2) if expert == "high"
                      else (pipe.transformer_2, pipe.transformer))
    layers = [m for m in trained.modules() if "t" in getattr(m, "lora_A", {})]
    assert layers and not any("t" in getattr(m, "lora_A", {}) for m in other.modules())
    for layer in layers:
        torch.testing.assert_close(layer.get_delta_weight("k"), layer.get_delta_weight("t"), rtol=1e-3, atol=1e-5)


def test_comfyuis_low_noise_file_trains_the_low_expert_with_the_high_one_beside_it_for_previews(tiny_a14b, data,
                                                                                              tmp_path):
    from safetensors import safe_open

    low = tiny_a14b.comfy_transformer.with_name("wan2.2_t2v_low_noise_14B_fp16.safetensors")
    outputs, events = run_collect(tiny_run_config(low, data, tmp_path / "comfy", batch_size=1, max_train_steps=1,
                                                  base_model_config=str(tiny_a14b.folder),
                                                  sample_prompts=["a red thing"]))
    logs = [e.message for e in events if e.kind == "log"]
    assert any("training the low-noise expert (wan2.2_t2v_low_noise_14B_fp16.safetensors), boundary 0.875" in m
               for m in logs), logs
    with safe_open(outputs["lora"], "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_wan_expert"] == "low_noise" and meta["ss_base_model_version"] == "wan2.2_t2v_a14b"
