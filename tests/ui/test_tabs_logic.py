"""What the Train and Test tabs compute, without a browser: presets into the form, YAML, LoRA lists."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from core.config import read_yaml


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The ui modules re-imported over a temporary work folder (data/, models/, output/)."""
    monkeypatch.setenv("LORA_SCRIPTS_WORKDIR", str(tmp_path))
    import ui.catalog
    import ui.state
    import ui.tryout_tab
    import ui.train_tab

    modules = [importlib.reload(m) for m in (ui.state, ui.catalog, ui.train_tab, ui.tryout_tab)]
    yield tmp_path, modules
    monkeypatch.delenv("LORA_SCRIPTS_WORKDIR")
    for module in (ui.state, ui.catalog, ui.train_tab, ui.tryout_tab):
        importlib.reload(module)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_a_named_preset_fills_the_form_and_says_what_it_is(work):
    from ui import train_tab

    values, reason = train_tab.apply_preset_values({"preset": "sd15-8gb", "task_type": "image-generation"})
    assert values["lora_rank"] and "preset" not in values
    assert "sd15-8gb" in reason


def test_an_unknown_preset_is_reported_instead_of_breaking_the_form(work):
    from ui import train_tab

    values, reason = train_tab.apply_preset_values({"preset": "sd15-3gb"})
    assert values == {} and "sd15-3gb" in reason


def test_the_memory_line_estimates_the_forms_own_values(work):
    from ui import train_tab

    line = train_tab.memory_line({"task_type": "image-generation", "base_model": "", "resolution": 512})
    assert line.startswith("**Memory:**") or "unavailable" in line


def test_models_loras_and_data_sets_are_found_in_the_webui_layout(work):
    root, (state, catalog, *_) = work
    touch(root / "models" / "Stable-diffusion" / "v1-5.safetensors")
    touch(root / "models" / "Stable-diffusion" / "sd-folder" / "model_index.json")
    touch(root / "models" / "Lora" / "style.safetensors")
    touch(root / "models" / "llm" / "smol.gguf")
    touch(root / "output" / "run" / "run.safetensors")
    touch(root / "output" / "run" / "checkpoints" / "step-000100" / "pytorch_lora_weights.safetensors")
    touch(root / "output" / "run" / "checkpoints" / "step-000100" / "unet_peft.safetensors")
    touch(root / "output" / "chat" / "adapter" / "adapter_config.json")
    (root / "data" / "cats").mkdir(parents=True)
    touch(root / "data" / "faq.csv")
    assert catalog.image_models() == ["./models/Stable-diffusion/sd-folder", "./models/Stable-diffusion/v1-5.safetensors"]
    assert catalog.text_models() == ["./models/llm/smol.gguf"]
    assert catalog.lora_files() == ["./output/run/run.safetensors",
                                    "./output/run/checkpoints/step-000100/pytorch_lora_weights.safetensors",
                                    "./models/Lora/style.safetensors"]
    assert catalog.text_adapters() == ["./output/chat/adapter"]
    assert catalog.datasets() == ["./data/cats", "./data/faq.csv"]
    assert catalog.checkpoint_loras(root / "output" / "run" / "run.safetensors") == [
        (100, root / "output" / "run" / "checkpoints" / "step-000100" / "pytorch_lora_weights.safetensors")]


def test_compare_over_checkpoints_puts_them_before_the_final_file_and_saves_in_the_run(work):
    root, (state, catalog, train_tab, tryout_tab) = work
    final = touch(root / "output" / "run" / "run.safetensors")
    step = touch(root / "output" / "run" / "checkpoints" / "step-000100" / "run.safetensors")
    files = tryout_tab.compare_files("./output/run/run.safetensors", True)
    assert [p.resolve() for p in files] == [step.resolve(), final.resolve()]
    assert tryout_tab.compare_files("./output/run/run.safetensors", False)[0].resolve() == final.resolve()
    grid = tryout_tab.grid_path("./output/run/run.safetensors")
    assert grid.parent == (root / "output" / "run" / "compare").resolve() and grid.name.startswith("run-")


def test_the_webui_prompt_syntax_names_the_lora_and_its_weight(work):
    from ui import tryout_tab

    assert tryout_tab.webui_syntax("./output/cats/cats.safetensors", 0.8) == "<lora:cats:0.8>"
    assert tryout_tab.webui_syntax("./output/cats/pytorch_lora_weights.safetensors", 1.0) == "<lora:cats:1>"
    # Several LoRAs: one line with all of them, the rows left empty skipped.
    rows = ("./output/cats/cats.safetensors", 0.8, "", 1.0, "./models/Lora/style.safetensors", 0.5)
    assert tryout_tab.chosen_loras(*rows) == [("./output/cats/cats.safetensors", 0.8),
                                              ("./models/Lora/style.safetensors", 0.5)]
    assert tryout_tab.on_weights(*rows) == "<lora:cats:0.8> <lora:style:0.5>"
    assert tryout_tab.on_weights("", 0.8, "", 0.8) == "<lora:your_lora:0.8>"


def test_a_saved_config_runs_unchanged_with_train_py(work, tmp_path):
    from core.config import TrainConfig, config_from_dict, save_config
    from ui import form

    specs = form.field_specs()
    cfg = TrainConfig(train_data_dir="./data/cats", base_model="./models/x.safetensors", lora_rank=4)
    raw = form.form_to_raw(specs, form.config_values(specs, cfg))
    path = save_config(config_from_dict(raw, check_paths=False), tmp_path / "c.yaml", only_changed=True)
    assert config_from_dict(read_yaml(path), check_paths=False) == cfg


def test_an_sdxl_lora_on_an_sd1_model_is_refused_with_the_reason(work, tiny_sd1):
    from safetensors.torch import save_file
    import torch

    root, (state, catalog, train_tab, tryout_tab) = work
    lora = root / "models" / "Lora" / "xl_style.safetensors"
    lora.parent.mkdir(parents=True)
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 64), f"{key}.lora_up.weight": torch.zeros(64, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(lora),
              metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"})
    note = tryout_tab.family_note(str(lora), str(tiny_sd1.folder))
    assert "trained for SDXL" in note and "SD 1.x" in note
    with pytest.raises(ValueError, match="SDXL"):
        tryout_tab.check_family(str(lora), str(tiny_sd1.folder))
    # Each LoRA is checked: as the second LoRA it is refused too, before any job starts.
    syntax, note = tryout_tab.on_loras(str(tiny_sd1.folder), "", 0.8, str(lora), 0.5)
    assert syntax == "<lora:xl_style:0.5>" and "trained for SDXL" in note
    image, message = tryout_tab.generate(str(tiny_sd1.folder), "", "a cat", "", 0.8, 1, 2, 1.0, 64, 1, str(lora), 0.5)
    assert image is None and "trained for SDXL" in message
    first = touch(root / "output" / "run" / "run.safetensors")
    grid, message = tryout_tab.compare(str(tiny_sd1.folder), str(first), "a cat", "", 1, 2, 1.0, 64, False,
                                       str(lora), 0.5)
    assert grid is None and "trained for SDXL" in message
    assert state.JOB.snapshot().state == "idle"


def test_auto_picks_a_preset_for_this_machine_and_says_why(work):
    from ui import train_tab

    values, reason = train_tab.apply_preset_values({"preset": "auto", "task_type": "text-generation"})
    assert reason.startswith("Preset ") and "predicted peak" in reason
    assert {"batch_size", "lora_rank", "mixed_precision"} <= set(values)


def test_a_long_chinese_answer_is_flagged_as_longer_than_max_seq_length(tmp_path):
    from core.data.text_report import describe_text_data

    long_answer = "空腹抽血前八小时不要进食，可以喝少量清水。" * 20  # 400 characters
    data = tmp_path / "clinic.csv"
    data.write_text("prompt,response\n"
                    f"抽血前可以吃东西吗？,{long_answer}\n"
                    "Can I drink water before the test?,Yes: plain water is fine.\n", encoding="utf-8")
    result = describe_text_data(data, max_seq_length=512)
    flagged = [issue for issue in result.issues if "max_seq_length" in issue.problem]
    assert len(flagged) == 1 and "clinic.csv:2" in flagged[0].file
    assert int(result.rows[1][-1]) < 30  # the short English pair is nowhere near


# -- the tabs' handlers, called as Gradio calls them ---------------------------------------
def test_a_wrong_key_is_marked_on_save_and_a_saved_yaml_loads_back_into_the_form(work):
    from ui import form

    root, (state, catalog, train_tab, tryout_tab) = work
    specs = form.field_specs()
    train_form = train_tab.TrainForm(specs, {})
    values = form.config_values(specs, {"train_data_dir": "./data/cats", "base_model": "./models/x.safetensors",
                                       "lora_rank": 4})
    rank = [s.name for s in specs].index("lora_rank")
    wrong = list(values)
    wrong[rank] = -3
    message, command, yaml_text, *marks = train_tab.on_save(train_form, "./configs/cats.yaml", *wrong, [])
    assert "`lora_rank`" in message and marks[-1] == ["lora_rank"]
    assert "ls-invalid" in marks[rank]["elem_classes"] and not (root / "configs" / "cats.yaml").exists()
    message, command, yaml_text, *marks = train_tab.on_save(train_form, "./configs/cats", *values, ["lora_rank"])
    assert message == "Saved `./configs/cats.yaml`." and "lora_rank: 4" in yaml_text
    assert command == form.command_line("./configs/cats.yaml")
    assert marks[-1] == [] and marks[rank]["elem_classes"] == []  # the fixed key gets its help back
    note, *loaded = train_tab.on_load(specs, "./configs/cats.yaml")
    assert note == "Loaded `cats.yaml`." and loaded == values


def test_a_yaml_with_an_unknown_key_loads_the_rest_and_names_that_key(work):
    from ui import form

    root, (state, catalog, train_tab, tryout_tab) = work
    path = root / "mine.yaml"
    path.write_text("lora_rank: 16\nno_such_key: 1\n", encoding="utf-8")
    specs = form.field_specs()
    note, *loaded = train_tab.on_upload(specs, str(path))
    assert "`no_such_key`: unknown key, not loaded" in note
    assert loaded[[s.name for s in specs].index("lora_rank")] == 16
    assert train_tab.on_upload(specs, None) == [train_tab.gr.skip()] * (len(specs) + 1)


def test_an_old_runs_config_with_a_retired_key_loads_without_complaint(work):
    from ui import form

    root, (state, catalog, train_tab, tryout_tab) = work
    path = root / "old.yaml"
    path.write_text("lora_rank: 8\nnum_workers: 0\n", encoding="utf-8")
    specs = form.field_specs()
    note, *loaded = train_tab.on_upload(specs, str(path))
    assert "num_workers" not in note
    assert loaded[[s.name for s in specs].index("lora_rank")] == 8


def test_the_run_name_names_its_output_folder_and_config_file(work):
    _, (state, catalog, train_tab, tryout_tab) = work
    assert train_tab.on_output_name("my cats") == ("./output/my cats", "./configs/my cats.yaml")
    assert train_tab.on_output_name("../../etc") == ("./output/etc", "./configs/etc.yaml")


def test_the_tryout_handlers_say_what_is_missing_before_loading_a_model(work):
    _, (state, catalog, train_tab, tryout_tab) = work
    assert tryout_tab.generate("", "", "a cat", "", 0.8, 1, 20, 7.0, 0) == (None, "Choose a base model first.")
    image, message = tryout_tab.compare("./models/x", "", "a cat", "", 1, 20, 7.0, 0, False)
    assert image is None and message == "Choose a LoRA to compare."
    assert tryout_tab.send("", "", 1.0, 16, [], "  ") == ([], "", "Type a message first.")
    *_, note = tryout_tab.side_by_side("", "", 1.0, 16, "hello")
    assert note == "Choose an adapter to compare with the base model."
    *_, note = tryout_tab.send("", "./output/nope/adapter", 1.0, 16, [], "hello")
    assert note == "./output/nope/adapter does not exist."


# -- live lists --------------------------------------------------------------------------------
def test_a_model_copied_in_while_the_app_runs_is_listed_on_the_next_rescan_and_parts_never_are(work):
    from ui import lists

    root, (state, catalog, *_) = work
    touch(root / "models" / "Stable-diffusion" / "v1-5.safetensors")
    live = [lists.LiveList(None, catalog.image_models), lists.LiveList(None, catalog.text_models)]
    before = lists.rescan([(item.choices, 0) for item in live])
    assert before[0]["choices"] == ["./models/Stable-diffusion/v1-5.safetensors"] and before[1]["choices"] == []
    # A diffusers folder copied in part by part: while model_index.json is missing nothing is listed;
    # once it is there the folder is one model and its parts never appear.
    tiny = root / "models" / "Stable-diffusion" / "tiny-sd"
    touch(tiny / "unet" / "config.json")
    touch(tiny / "unet" / "diffusion_pytorch_model.safetensors")
    touch(tiny / "text_encoder" / "config.json")
    touch(tiny / "text_encoder" / "model.safetensors")
    assert catalog.image_models() == ["./models/Stable-diffusion/v1-5.safetensors"]
    touch(tiny / "model_index.json")
    touch(root / "models" / "diffusion_models" / "flux1-dev.safetensors")
    touch(root / "models" / "diffusion_models" / "flux-diffusers" / "transformer" / "config.json")
    touch(root / "models" / "diffusion_models" / "flux-diffusers" / "transformer" /
          "diffusion_pytorch_model-00001-of-00003.safetensors")
    touch(root / "models" / "Stable-diffusion" / "styles" / "anime.ckpt")  # WebUI's sub-folders are searched
    touch(root / "models" / "llm" / "tiny-llm" / "config.json")
    touch(root / "models" / "llm" / "tiny-llm" / "model.safetensors")
    touch(root / "models" / "llm" / "q4.gguf")
    touch(root / "models" / "llm" / "notes.txt")
    touch(root / "models" / "llm" / "stray.safetensors")
    touch(root / "models" / "Lora" / "new.safetensors")
    after = lists.rescan([(item.choices, 0) for item in live] + [(catalog.lora_files, 0)])
    assert after[0]["choices"] == ["./models/Stable-diffusion/styles/anime.ckpt", "./models/Stable-diffusion/tiny-sd",
                                   "./models/Stable-diffusion/v1-5.safetensors",
                                   "./models/diffusion_models/flux1-dev.safetensors"]
    assert after[1]["choices"] == ["./models/llm/q4.gguf", "./models/llm/tiny-llm"]
    assert after[2]["choices"] == ["./models/Lora/new.safetensors"]
    # A tab with a single live dropdown gets the update itself: Gradio would take a one-item list
    # returned for one output as that dropdown's value.
    single = lists.rescan_one((catalog.lora_files, 0))
    assert isinstance(single, dict) and single["choices"] == ["./models/Lora/new.safetensors"]


def test_the_train_tabs_base_model_list_follows_the_task_type(work):
    from ui import lists

    root, (state, catalog, *_) = work
    touch(root / "models" / "Stable-diffusion" / "v1-5.safetensors")
    touch(root / "models" / "llm" / "q4.gguf")
    updates = lists.rescan([(catalog.base_models, 1), (catalog.datasets, 0)], "text-generation")
    assert updates[0]["choices"] == ["./models/llm/q4.gguf"] and updates[1]["choices"] == []
    assert lists.rescan([(catalog.base_models, 1)], "image-generation")[0]["choices"] == [
        "./models/Stable-diffusion/v1-5.safetensors"]


# -- the memory line ---------------------------------------------------------------------------
def test_the_memory_line_says_the_estimate_of_the_form_in_plain_words(work, monkeypatch):
    from core.devices import DeviceInfo
    from core.memory import MemoryEstimate
    from ui import memory_line

    fits = MemoryEstimate(total_gb=9.8, parts={"UNet weights": 3.2, "activations": 6.6}, fits=True, budget_gb=11.0)
    line = memory_line.memory_words(fits, "SD 1.x", "RTX 3060 (12.0 GB, 11.9 GB free)")
    assert line.startswith("**Memory:** Estimated peak memory: 9.8 GB of your 11.0 GB usable (fits) — SD 1.x on RTX")
    tight = MemoryEstimate(total_gb=14.0, fits=False, budget_gb=11.0, advice="Change batch_size 4 -> 2 to fit.")
    assert "(will likely NOT fit)" in memory_line.memory_words(tight, "SDXL", "x") and "batch_size 4 -> 2" in \
        memory_line.memory_words(tight, "SDXL", "x")
    # After `preset: auto` filled the form, the line is the form's estimate, never "No preset: ...".
    import core.presets

    monkeypatch.setattr(core.presets, "detect_device", lambda: DeviceInfo("cuda", "RTX 3060", 12.0, 11.9))
    line = memory_line.memory_line({"preset": "auto", "task_type": "image-generation", "base_model": "",
                                    "resolution": 512, "batch_size": 1, "gradient_checkpointing": True})
    assert line.startswith("**Memory:** Estimated peak memory: ") and "No preset" not in line
    assert "of your 10.9 GB usable" in line and "RTX 3060" in line


# -- generate and compare as jobs -------------------------------------------------------------
def test_generating_runs_as_a_job_a_reloaded_page_sees_and_a_stop_ends(work, tiny_sd1):
    root, (state, catalog, train_tab, tryout_tab) = work
    state.JOB.subscribe(lambda event: event.kind == "sample" and state.JOB.stop())  # Stop after the first image
    image, message = tryout_tab.generate(str(tiny_sd1.folder), "", "a cat", "", 0.8, 1, 2, 1.0, 64, 3)
    assert image is None and message == "Generating 3 image(s) …"
    progress, *_ = tryout_tab.poll(None)  # a page (re)loaded now shows the job, not an empty bar
    assert "data-state='running'" in progress or "data-state='stopping'" in progress
    snap = state.JOB.wait(300)
    assert snap.kind == "generate" and snap.state == "stopped"
    written = sorted((root / ".cache" / "ui" / "generate").glob("*.png"))
    assert len(written) == 1 and snap.progress.step == 1 and snap.progress.total == 3
    progress, image, grid, message, seen = tryout_tab.poll({})
    assert image == str(written[0]) and message.startswith("Stopped: Generated 1 of 3 image(s)")
    assert "data-state='stopped'" in progress
    assert tryout_tab.poll(seen)[1:4] == (tryout_tab.gr.skip(),) * 3  # nothing redrawn twice
    assert tryout_tab.stop_tryout() == "No image job is running."


def test_a_stopped_compare_saves_no_grid_with_holes(work, tiny_sd1):
    root, (state, catalog, train_tab, tryout_tab) = work
    lora = touch(root / "output" / "run" / "run.safetensors")
    state.JOB.subscribe(lambda event: event.kind == "progress" and state.JOB.stop())
    grid, message = tryout_tab.compare(str(tiny_sd1.folder), "./output/run/run.safetensors", "a cat", "", 1, 2,
                                       1.0, 64, False)
    assert grid is None and message.startswith("Rendering 5 images into `./output/run/compare/run-")
    snap = state.JOB.wait(60)
    assert snap.kind == "compare" and snap.state == "stopped" and lora.is_file()
    assert not list((root / "output" / "run" / "compare").glob("*.png"))
    assert tryout_tab.poll({})[3] == "Stopped after 0 of 5 images; no grid saved."


# -- the queue in the Train tab ---------------------------------------------------------------
def test_add_to_queue_lists_the_run_in_the_table_and_a_queued_one_can_be_removed(work, tiny_sd1, sd_image_folder):
    from ui import form

    root, (state, catalog, train_tab, tryout_tab) = work
    state.QUEUE.close()  # the entries stay queued: this test looks at the table, not at training
    specs = form.field_specs()
    train_form = train_tab.TrainForm(specs, {})
    values = form.config_values(specs, {"train_data_dir": str(sd_image_folder), "base_model": str(tiny_sd1.folder),
                                        "output_dir": "./output/cats", "output_name": "cats"})
    message, *marks = train_tab.on_queue(train_form, *values, [])
    assert message.startswith("Queued **cats** (#1) → `./output/cats`") and marks[-1] == []
    message, *_ = train_tab.on_queue(train_form, *values, [])
    assert "**cats-2** (#2) → `./output/cats-2`" in message  # the same settings again: its own folder
    *_, table, seen = train_tab.poll(None)
    assert table["value"] == [["1", "cats", "queued", "./output/cats"], ["2", "cats-2", "queued", "./output/cats-2"]]
    assert table["visible"] is True
    assert train_tab.on_remove(1) == "Removed #1 from the queue."
    assert train_tab.on_remove(1).startswith("#1 is not waiting") and train_tab.on_remove(None).startswith("Type")
    *_, table, seen = train_tab.poll(seen)
    assert table["value"] == [["2", "cats-2", "queued", "./output/cats-2"]]
    assert train_tab.poll(seen)[-2] == train_tab.gr.skip()  # unchanged: not redrawn
    wrong = list(values)
    wrong[[s.name for s in specs].index("lora_rank")] = 0
    message, *_ = train_tab.on_queue(train_form, *wrong, [])
    assert "Please fix" in message and len(state.QUEUE.entries()) == 1


def test_the_train_form_reads_in_words_with_the_yaml_key_beside_them():
    from ui import form

    assert form.field_label("learning_rate") == "Learning rate · learning_rate"
    assert form.field_label("train_data_dir") == "Data set · train_data_dir"
    assert form.human_label("sample_max_new_tokens") == "Preview answer length (tokens)"
    assert form.human_label("some_new_lr_key") == "Some new learning rate key"  # a new key labels itself
    assert all(form.field_label(s.name).endswith(f" · {s.name}") for s in form.field_specs())


def test_a_folder_of_questions_and_answers_opens_as_text_data_and_its_files_are_offered_for_training(work):
    """The Dataset tab used to call such a folder "0 images, 0 usable ... no problems found"."""
    root, (state, catalog, train_tab, tryout_tab) = work
    from ui import dataset_tab

    clinic = root / "data" / "clinic"
    clinic.mkdir(parents=True)
    (clinic / "faq.csv").write_text("prompt,response\nOpen on Sunday?,No.\nOpen on Sunday?,No.\n", encoding="utf-8")
    (clinic / "draft.csv").write_text("prompt,response\nOpen on Sunday?,No.\nParking?,\n", encoding="utf-8")
    (clinic / "prefs.csv").write_text("prompt,chosen,rejected\nHi?,Hello!,Go away.\n", encoding="utf-8")
    cats = root / "data" / "cats"
    cats.mkdir()
    touch(cats / "cat.png")
    (cats / "cat.txt").write_text("a cat", encoding="utf-8")
    # The Train tab's data list: the text folder and each of its files; an image folder's captions are not data.
    assert catalog.datasets() == ["./data/cats", "./data/clinic", "./data/clinic/draft.csv", "./data/clinic/faq.csv",
                                  "./data/clinic/prefs.csv"]

    summary, gallery, health, table, *_ = dataset_tab.open_dataset("./data/clinic/faq.csv", 512, "", 512, False)
    assert summary.startswith("**faq.csv** — 2 examples (chat).") and "images" not in summary
    assert "Tokens per example, estimated from words and marks" in summary and "reads up to 8192" in summary
    assert health[0][:3] == ["info", "faq.csv:3", "same as faq.csv:2"]
    assert table["visible"] and table["value"][0][2:4] == ["Open on Sunday?", "No."]
    summary, gallery, health, *_ = dataset_tab.open_dataset("./data/clinic/draft.csv", 512)
    assert summary.startswith("**draft.csv** cannot be used yet") and "draft.csv:3" in health[0][2]
    summary, *_ = dataset_tab.open_dataset("./data/clinic/prefs.csv", 512)
    assert "1 preference comparisons" in summary


def test_an_empty_choice_reads_what_it_means_instead_of_a_bare_tick(work):
    root, (state, catalog, train_tab, tryout_tab) = work
    from ui import dataset_tab, tools_tab

    for choices in (train_tab.preset_choices(), tools_tab.image_model_choices(), tools_tab.text_model_choices(),
                    tools_tab.any_model_choices(), dataset_tab.text_model_choices()):
        label, value = choices[0]
        assert value == "" and label.startswith("(") and len(label) > 3
    assert ("auto", "auto") in train_tab.preset_choices()


def test_a_reloaded_page_shows_the_running_runs_settings_and_state_instead_of_a_blank_idle_form(work):
    root, (state, catalog, train_tab, tryout_tab) = work
    from core.config import config_from_dict
    from ui import form

    specs = form.field_specs()
    message, progress, *values = train_tab.on_page_load(specs)
    assert "Idle" in progress and len(values) == len(specs)  # nothing started yet: the form stays as it is
    cfg = config_from_dict({"task_type": "text-generation", "train_data_dir": "./data/faq.csv",
                            "output_dir": str(root / "output" / "faq_lora"), "lora_rank": 4, "epochs": 3},
                           check_paths=False)
    state.remember_run(cfg)
    message, progress, *values = train_tab.on_page_load(specs)
    by_name = dict(zip([s.name for s in specs], values))
    assert (by_name["task_type"], by_name["lora_rank"], by_name["epochs"]) == ("text-generation", 4, 3)
    assert "the last run **faq_lora**" in message


def test_after_a_resume_the_plot_draws_the_whole_run_from_loss_csv(work):
    root, (state, catalog, train_tab, tryout_tab) = work
    from core.config import config_from_dict
    from core.job import JobSnapshot
    from ui.plots import loss_series

    out = root / "output" / "cats"
    out.mkdir(parents=True)
    # The first run's 6 steps (and a 7th the checkpoint at step 6 did not keep: the resume drops it).
    (out / "loss.csv").write_text("step,loss,lr,val_loss\n" + "".join(f"{s},{1.0 / s:.4f},0.001,\n" for s in range(1, 8)),
                                  encoding="utf-8")
    resumed = JobSnapshot(state="running", kind="train", name="cats",
                          losses=[(7, 0.15, 0.15, 0.001, None), (8, 0.12, 0.14, 0.001, None)])
    state.remember_run(config_from_dict({"train_data_dir": "./data/cats", "output_dir": str(out), "base_model": "x",
                                         "resume_from": "latest"}, check_paths=False))
    assert loss_series(train_tab.run_losses(resumed))["step"] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert train_tab.run_losses(resumed)[-2:] == resumed.losses  # this process's own rows win
    # A fresh run in the same folder never shows the old curve.
    state.remember_run(config_from_dict({"train_data_dir": "./data/cats", "output_dir": str(out), "base_model": "x"},
                                        check_paths=False))
    assert train_tab.run_losses(resumed) == resumed.losses


def test_the_dataset_tab_reads_a_file_as_the_picked_methods_data_and_names_its_format():
    from ui import dataset_tab

    data = Path(__file__).resolve().parents[2] / "data"
    summary, _, health, table, *_ = dataset_tab.open_dataset(str(data / "clinic_kto.csv"), 512, "", 512, False, "kto")
    assert "Format for text_method kto: prompt,completion,label rows" in summary and health == []
    assert table["headers"] == ["where", "prompt", "completion", "label", "tokens"]
    summary, _, health, *_ = dataset_tab.open_dataset(str(data / "math_grpo.csv"), 512, "", 512, False, "grpo")
    assert "40 prompts (prompt, optional answer: for text_method grpo)" in summary and "Format for text_method grpo" \
        in summary
    summary, _, health, *_ = dataset_tab.open_dataset(str(data / "clinic_qa.csv"), 512, "", 512, False, "kto")
    assert len(health) == 1 and "needs the columns prompt,completion,label" in health[0][2]
