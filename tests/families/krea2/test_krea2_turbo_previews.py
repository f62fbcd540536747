"""Krea 2: train on Raw, preview on Turbo. Raw's registry row names Turbo as its sample_base; a run on Raw draws
its previews on Turbo (at Turbo's 8 steps without CFG) when Turbo is on the machine, and says in one sentence that
it falls back to Raw when it is not; the Train tab says the same, and the Test tab follows Turbo."""
from __future__ import annotations

import dataclasses
import shutil

import pytest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from core.families.krea2.tiny import build_tiny_krea2

    return build_tiny_krea2(tmp_path_factory.mktemp("tiny_krea2"))


@pytest.fixture()
def with_turbo(tiny, tmp_path):
    """ComfyUI's models/ with Raw and (the tiny Raw's weights under) Turbo's name side by side."""
    models = shutil.copytree(tiny.comfy_root, tmp_path / "ComfyUI" / "models") / "diffusion_models"
    shutil.copy(tiny.comfy_transformer, models / "krea2_turbo_bf16.safetensors")
    return models / tiny.comfy_transformer.name


def test_raws_row_names_turbo_to_preview_on_and_turbos_row_names_raw_to_train_on():
    from core.family_api.registry import distilled_warning, family_info

    raw, turbo = family_info("krea2"), family_info("krea2-turbo")
    assert raw.sample_base == turbo.hub_repo == "krea/Krea-2-Turbo" and not raw.distilled
    assert turbo.distilled and turbo.training_base == raw.hub_repo == "krea/Krea-2-Raw"
    assert (raw.preview_steps, raw.preview_guidance, turbo.preview_steps, turbo.preview_guidance) == (28, 4.5, 8, 0.0)
    warning = distilled_warning("krea2-turbo", "")
    assert warning.count(". ") == 0 and "train on its base model krea/Krea-2-Raw" in warning


def test_turbo_beside_raw_is_found_and_a_missing_turbo_falls_back_to_raw_in_one_sentence(tiny, with_turbo):
    from core.sample_base import default_sample_base

    found = default_sample_base(str(with_turbo), "krea2")
    assert found.model == str(with_turbo.parent / "krea2_turbo_bf16.safetensors")
    assert found.sentence.startswith("Previews and the Test tab draw on Krea 2 Turbo")
    missing = default_sample_base(str(tiny.comfy_transformer), "krea2")
    assert missing.model == "" and missing.sentence.count(". ") == 0
    assert missing.sentence.startswith("Krea 2 Turbo (krea/Krea-2-Turbo) is not on this machine")
    assert default_sample_base(str(with_turbo), "krea2", "chosen").model == "chosen"  # the setting wins
    assert default_sample_base(str(with_turbo), "krea2-turbo") == default_sample_base("x", "flux2-dev")  # none


def test_previews_on_turbo_use_turbos_steps_and_guidance_unless_set(with_turbo):
    from core.config import TrainConfig
    from core.train.image_outputs import sample_model_regime

    cfg = dataclasses.replace(TrainConfig(), sample_base=str(with_turbo.parent / "krea2_turbo_bf16.safetensors"))
    assert sample_model_regime(cfg) == (8, 0.0)
    assert sample_model_regime(dataclasses.replace(cfg, sample_num_inference_steps=5)) == (5, 0.0)


def test_a_raw_run_previews_on_turbo_when_it_is_there_and_on_raw_when_not(tiny, with_turbo, tmp_path):
    from tests.fixtures.tiny_sd import make_image_folder, run_collect, tiny_run_config

    data = make_image_folder(tmp_path / "data", count=2)
    for base, expect in ((with_turbo, "Previews and the Test tab draw on Krea 2 Turbo"),
                         (tiny.comfy_transformer, "Krea 2 Turbo (krea/Krea-2-Turbo) is not on this machine")):
        out = tmp_path / f"out_{len(expect)}"
        _, events = run_collect(tiny_run_config(
            base, data, out, batch_size=1, max_train_steps=1, output_name="k", base_model_config=str(tiny.folder),
            sample_prompts=["a red thing"], sample_steps=1, save_steps=0))
        logs = [e.message for e in events if e.kind == "log"]
        assert any(m.startswith(expect) for m in logs), logs
        assert (out / "samples" / "step-000001-0.png").is_file()


def test_the_train_tab_says_where_previews_are_drawn_and_the_test_tab_follows_turbo(tiny, with_turbo):
    from ui.train_tab import sample_base_line
    from ui.tryout_tab import follow_trained_model

    assert "draw on Krea 2 Turbo" in sample_base_line({"base_model": str(with_turbo)})
    assert "is not on this machine" in sample_base_line({"base_model": str(tiny.comfy_transformer)})
    assert sample_base_line({"base_model": str(with_turbo), "sample_base": "x"}) == ""
    image_box, _ = follow_trained_model(str(with_turbo), "image-generation")
    assert image_box["value"] == str(with_turbo.parent / "krea2_turbo_bf16.safetensors")
    image_box, _ = follow_trained_model(str(tiny.comfy_transformer), "image-generation")
    assert image_box["value"] == str(tiny.comfy_transformer)
