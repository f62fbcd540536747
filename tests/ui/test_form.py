"""The Train tab's form is derived from TrainConfig: every key, its help, limits and round trips."""
from __future__ import annotations

import pytest

from core.config import FIELDS, ConfigError, TrainConfig, config_from_dict
from ui import form


def test_every_config_key_gets_exactly_one_widget_with_its_help_text():
    specs = form.field_specs()
    assert [s.name for s in specs] == list(FIELDS)
    assert all(s.help for s in specs)
    kinds = {s.name: s.kind for s in specs}
    assert kinds["mixed_precision"] == "choice"
    assert kinds["gradient_checkpointing"] == "bool"
    assert kinds["lora_rank"] == "int" and kinds["learning_rate"] == "float"
    assert kinds["sample_prompts"] == "list"


def test_the_seed_keys_are_up_front_and_the_rest_under_advanced_groups():
    grouped = form.groups(form.field_specs())
    assert list(grouped)[0] == "basic"
    basic = [s.name for s in grouped["basic"]]
    for key in ("train_data_dir", "base_model", "lora_rank", "learning_rate", "resolution", "batch_size"):
        assert key in basic
    assert "snr_gamma" not in basic


def test_image_only_keys_hide_for_a_text_run_and_come_back_for_images():
    specs = {s.name: s for s in form.field_specs()}
    assert not specs["resolution"].shown_for("text-generation")
    assert specs["resolution"].shown_for("image-generation")
    assert specs["max_seq_length"].shown_for("text-generation")
    assert not specs["max_seq_length"].shown_for("image-generation")
    assert specs["learning_rate"].shown_for("text-generation")


def test_a_config_shown_in_the_form_and_read_back_is_the_same_config():
    specs = form.field_specs()
    cfg = TrainConfig(train_data_dir="data/x", base_model="models/m.safetensors", lora_rank=16, learning_rate=2e-4,
                      sample_prompts=["a cat", "a dog, smiling"], target_modules=["to_q", "to_v"],
                      gradient_checkpointing=True, mixed_precision="fp16")
    values = form.config_values(specs, cfg)
    raw = form.form_to_raw(specs, values)
    assert config_from_dict(raw, check_paths=False) == cfg


def test_an_emptied_number_field_falls_back_to_the_default_and_lists_split_per_line():
    specs = {s.name: s for s in form.field_specs()}
    assert form.from_widget(specs["lora_rank"], None) == 8
    assert form.from_widget(specs["lora_rank"], 16.0) == 16
    assert form.from_widget(specs["sample_prompts"], "a cat, sitting\n\n a dog ") == ["a cat, sitting", "a dog"]
    assert form.from_widget(specs["target_modules"], "to_q, to_k\nto_v") == ["to_q", "to_k", "to_v"]


def test_a_wrong_value_from_the_form_is_reported_under_its_key():
    specs = form.field_specs()
    raw = form.form_to_raw(specs, form.config_values(specs, {"train_data_dir": "d", "base_model": "m/x"}))
    raw["resolution"] = 500
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, check_paths=False)
    assert "resolution" in info.value.errors


def test_the_command_line_runs_the_saved_yaml_with_train_py():
    assert form.command_line("./configs/my lora.yaml") == "python train.py --config './configs/my lora.yaml'"


def test_changed_keys_keeps_only_what_differs_from_the_defaults():
    specs = form.field_specs()
    raw = form.form_to_raw(specs, form.config_values(specs, {"lora_rank": 32}))
    assert form.changed_keys(specs, raw) == {"lora_rank": 32}


def test_a_wrong_key_says_so_under_its_field_and_gets_its_help_back_once_fixed():
    specs = form.field_specs()
    infos = {s.name: s.help for s in specs}
    names = [s.name for s in specs]
    with pytest.raises(ConfigError) as err:
        config_from_dict({"base_model": "m", "train_data_dir": "d", "lora_rank": 0, "batch_size": 0},
                         check_paths=False)
    first = form.error_marks(specs, err.value.errors, infos, [])
    rank = first[names.index("lora_rank")]
    assert rank["elem_classes"] == ["ls-invalid"] and rank["info"].startswith("⚠ ")
    assert err.value.errors["lora_rank"] in rank["info"]
    assert first[names.index("resolution")] is None  # untouched fields are left alone

    # Next attempt: the rank is fixed, the batch size still wrong.
    second = form.error_marks(specs, {"batch_size": err.value.errors["batch_size"]}, infos, sorted(err.value.errors))
    assert second[names.index("lora_rank")] == {"info": infos["lora_rank"], "elem_classes": []}
    assert second[names.index("batch_size")]["elem_classes"] == ["ls-invalid"]


def test_the_flux_and_flow_sections_show_only_for_their_families_and_text_settings_only_for_text():
    """The README promises the FLUX settings appear only for FLUX models: their whole sections, not just the keys."""
    from ui import train_tab

    specs = form.field_specs()
    sections = list(form.section_visibility(specs, "image-generation"))

    def shown(task_type: str, base_model: str) -> set[str]:
        updates = train_tab.on_sections(specs, task_type, base_model)
        return {group for group, update in zip(sections, updates) if update["visible"]}

    sd15 = shown("image-generation", "runwayml/stable-diffusion-v1-5")
    assert not sd15 & {"flux", "flow"} and {"data", "model", "lora", "optim"} <= sd15
    assert {"flux", "flow"} <= shown("image-generation", "black-forest-labs/FLUX.1-dev")
    assert not shown("image-generation", "") & {"flux", "flow"}  # no model chosen yet: nothing family-specific
    text = shown("text-generation", "black-forest-labs/FLUX.1-dev")
    assert "text" in text and not text & {"flux", "flow"}


def test_the_form_is_built_with_the_family_sections_hidden_until_a_model_asks_for_them():
    import gradio as gr

    sections: dict[str, object] = {}
    with gr.Blocks():
        form.build_form(form.field_specs(), sections=sections)
    assert not sections["flux"].visible and not sections["flow"].visible
    assert sections["lora"].visible and sections["sample"].visible
