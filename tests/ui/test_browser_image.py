"""A user's image story in a real browser: pictures -> captions -> a LoRA -> test images.

The app runs as its own process (the way launch.py starts it) over a temporary work
folder with a tiny SD 1.x model under models/Stable-diffusion/ and a tiny BLIP
captioner; Chromium (Debian's) is driven by Playwright. Screenshots of every tab go to
docs/screenshots/ for the README.
"""
from __future__ import annotations

import re
import shutil

import pytest

from tests.ui.conftest import screenshot, start_app, stop_app
from tests.ui.gradio_page import choose, fill, has_option, in_viewport, open_accordion, tab, text_of, wait_for

pytestmark = pytest.mark.slow  # the app in its own process and a browser: about a minute


@pytest.fixture
def image_app(tmp_path, tiny_sd1, tiny_blip_dir):
    work = tmp_path / "work"
    shutil.copytree(tiny_sd1.folder, work / "models" / "Stable-diffusion" / "tiny-sd1")
    shutil.copy(tiny_sd1.single_file, tmp_path / "tiny-sd1.safetensors")  # copied into models/ later, while the app runs
    shutil.copytree(tiny_blip_dir, work / "models" / "captioners" / "tiny-blip")
    # The photos a user would drop in: real pictures from scikit-image, in a few sizes and modes.
    from tests.fixtures.image_folders import photo

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for index, name in enumerate(["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]):
        image = photo(name, 96)
        image.convert("RGB" if index % 2 else image.mode).save(uploads / f"my photo {index}.png")
    app = start_app(work, {"OMP_NUM_THREADS": "2"})
    yield app, uploads
    stop_app(app)


def test_pictures_become_a_tested_lora_without_a_terminal(page, image_app):
    app, uploads = image_app
    page.goto(app.url)

    # Dataset: upload the pictures into a new data set, see the gallery and the health check.
    open_accordion(page, "Upload images")
    fill(page, "data-new-name", "cats")
    page.locator("#data-upload input[type=file]").set_input_files(sorted(str(p) for p in uploads.iterdir()))
    page.wait_for_timeout(1500)
    page.locator("#data-create").click()
    wait_for(lambda: "4 images" in text_of(page, "data-summary"), 120, "the data set summary")
    assert (app.work / "data" / "cats" / "my photo 0.png").is_file()
    assert "caption" in text_of(page, "data-health").lower()  # no captions yet: the check says so
    page.locator("#data-gallery .thumbnail-item").first.click()
    wait_for(lambda: "bucket" in text_of(page, "data-crop-text"), 60, "the crop / bucket preview")
    assert page.locator("#data-crop img").count() == 1
    screenshot(page, "dataset")

    # Caption: the tiny BLIP captioner with a trigger word; captions appear in the table.
    tab(page, "Caption")
    fill(page, "cap-model", "./models/captioners/tiny-blip")
    fill(page, "cap-trigger", "sks")
    page.locator("#cap-run").click()
    wait_for(lambda: text_of(page, "cap-table").count("sks") >= 4, 240, "captions with the trigger word")
    assert "sks" in (app.work / "data" / "cats" / "metadata.csv").read_text(encoding="utf-8")
    screenshot(page, "caption")
    # Fix the trigger word everywhere with search and replace, then save (the old file is backed up).
    fill(page, "cap-find", "sks,")
    fill(page, "cap-replace", "sks cat,")
    page.locator("#cap-replace-btn").click()
    wait_for(lambda: "Changed 4 captions" in text_of(page, "cap-message"), 30, "the replacement")
    page.locator("#cap-save").click()
    wait_for(lambda: "backed up" in text_of(page, "cap-message"), 30, "the captions to be saved")
    assert (app.work / "data" / "cats" / "metadata.csv").read_text(encoding="utf-8").count("sks cat,") == 4

    # Train: the base model comes from models/Stable-diffusion, the data set from the Dataset tab.
    tab(page, "Train")
    # A checkpoint copied into models/ while the app runs appears in the list after pressing 🔄.
    late = app.work / "models" / "Stable-diffusion" / "late-model.safetensors"
    assert not has_option(page, "cfg-base_model", "late-model")
    shutil.copy(tiny_sd1_single(app), late)
    page.locator("#train-refresh-models").click()
    wait_for(lambda: has_option(page, "cfg-base_model", "late-model"), 30, "the copied model in the list")
    # A mistyped model path: Start refuses, and the field itself says what is wrong.
    fill(page, "cfg-base_model", "./models/Stable-diffusion/tiny-sd1-typo")
    page.locator("#train-start").click()
    wait_for(lambda: "Please fix" in text_of(page, "train-message"), 30, "the config error")
    wait_for(lambda: page.locator("#cfg-base_model.ls-invalid").count() == 1, 30, "the field to be marked")
    assert "⚠" in text_of(page, "cfg-base_model")
    choose(page, "cfg-base_model", "tiny-sd1")
    assert "cats" in field_value(page, "cfg-train_data_dir")
    fill(page, "cfg-output_name", "cats_lora")
    for key, value in {"resolution": 64, "batch_size": 1, "lora_rank": 4, "save_steps": 2, "epochs": 1000}.items():
        fill(page, f"cfg-{key}", str(value))
    open_accordion(page, "Advanced")
    open_accordion(page, "Sample previews")
    fill(page, "cfg-sample_steps", "2")
    fill(page, "cfg-sample_num_inference_steps", "2")
    fill(page, "cfg-sample_prompts", "sks photo")
    wait_for(lambda: "Memory" in text_of(page, "train-memory"), 60, "the memory estimate")
    page.locator("#train-start").click()
    wait_for(lambda: "Started" in text_of(page, "train-message"), 30, "the run to start")
    assert page.locator("#cfg-base_model.ls-invalid").count() == 0  # fixed: the mark is gone
    steps = []
    wait_for(lambda: steps.append(step_of(page)) or steps[-1] >= 1, 300, "the first step")
    wait_for(lambda: page.locator("#train-loss-plot img, #train-loss-plot svg").count() > 0, 60, "the loss plot")
    # The run is watched beside the settings: progress, loss and Stop in the window without scrolling.
    for elem_id in ("train-progress", "train-loss-plot", "train-stop", "train-start"):
        assert in_viewport(page, elem_id), f"#{elem_id} is not in the window after Start"
    wait_for(lambda: page.locator("#train-samples img").count() > 0, 400, "a sample preview")
    wait_for(lambda: step_of(page) > steps[0], 300, "the progress bar to move")
    assert "step 2" in text_of(page, "train-samples") or page.locator("#train-samples img").count() > 0
    screenshot(page, "train")
    # The run is long (many epochs) so that it is still running here on a fast machine; Stop ends it.
    page.locator("#train-stop").click()
    wait_for(lambda: "Stopped" in text_of(page, "train-progress"), 300, "the run to stop")
    run = app.work / "output" / "cats_lora"
    assert (run / "cats_lora.safetensors").is_file() and list((run / "checkpoints").glob("step-*"))

    # Test: generate at weight 0.8 with the run's file, then a compare grid over weights.
    # A LoRA copied into models/Lora/ shows up when the tab is selected (the tab rescans its lists).
    shutil.copy(run / "cats_lora.safetensors", app.work / "models" / "Lora" / "copied_style.safetensors")
    tab(page, "Test")
    wait_for(lambda: has_option(page, "test-lora", "copied_style"), 30, "the copied LoRA in the Test tab's list")
    page.locator("#test-refresh").click()
    choose(page, "test-base", "tiny-sd1")
    choose(page, "test-lora", "cats_lora/cats_lora.safetensors")
    wait_for(lambda: "<lora:cats_lora:0.8>" in field_value(page, "test-syntax"), 30, "the WebUI prompt syntax")
    fill(page, "test-prompt", "sks photo")
    fill(page, "test-steps", "2")
    fill(page, "test-size", "64")
    page.locator("#test-generate").click()
    wait_for(lambda: "weight 0.8" in text_of(page, "test-message"), 300, "a generated image")
    assert page.locator("#test-image img").count() == 1
    assert "Finished" in text_of(page, "test-progress")  # generating ran as a job with a progress bar
    page.locator("#test-compare").click()
    wait_for(lambda: "Grid saved" in text_of(page, "test-message"), 400, "the compare grid")
    grids = list((run / "compare").glob("cats_lora-*.png"))
    assert len(grids) == 1 and page.locator("#test-grid img").count() == 1
    screenshot(page, "test")


def tiny_sd1_single(app) -> str:
    """The tiny model's single-file checkpoint, copied into the work folder by the fixture below."""
    return str(app.work.parent / "tiny-sd1.safetensors")


def field_value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").locator("textarea, input").first.input_value()


def step_of(page) -> int:
    found = re.search(r"data-step='?\"?(\d+)", page.locator("#train-progress").inner_html())
    return int(found.group(1)) if found else 0


def test_three_loras_together_in_the_test_tab_and_a_grid_over_one_with_the_others_fixed(page, image_app, tmp_path):
    """Three LoRAs from models/Lora/ at their own weights: the WebUI line names all three, the image is drawn
    with all three, and the compare grid sweeps the first while the other two stay at theirs in every cell."""
    import numpy as np
    from PIL import Image

    from tests.fixtures.tool_loras import make_sd_lora

    app, _ = image_app
    base = app.work / "models" / "Stable-diffusion" / "tiny-sd1"
    for seed, name in ((3, "style_a"), (11, "style_b"), (17, "style_c")):
        made = make_sd_lora(base, tmp_path / name, seed=seed, name=name)
        shutil.copy(made.kohya, app.work / "models" / "Lora" / f"{name}.safetensors")
    page.goto(app.url)
    tab(page, "Test")  # selecting the tab rescans its lists: the three files are offered
    choose(page, "test-base", "tiny-sd1")
    choose(page, "test-lora", "style_a")
    open_accordion(page, "More LoRAs, applied together with the first")
    choose(page, "test-lora-2", "style_b")
    fill(page, "test-weight-2", "0.5")
    choose(page, "test-lora-3", "style_c")
    fill(page, "test-weight-3", "1.2")
    line = "<lora:style_a:0.8> <lora:style_b:0.5> <lora:style_c:1.2>"
    wait_for(lambda: field_value(page, "test-syntax") == line, 30, "the WebUI prompt line with all three")
    fill(page, "test-prompt", "a red thing")
    fill(page, "test-steps", "2")
    fill(page, "test-size", "64")
    page.locator("#test-generate").click()
    wait_for(lambda: "with LoRAs style_a at 0.8, style_b at 0.5 and style_c at 1.2" in text_of(page, "test-message"),
             300, "an image with the three LoRAs")
    assert page.locator("#test-image img").count() == 1
    generated = sorted((app.work / ".cache" / "ui" / "generate").glob("style_a-*.png"))
    assert len(generated) == 1
    screenshot(page, "test_multi_lora")
    # The grid sweeps style_a over the compare weights; style_b and style_c stay at 0.5 and 1.2 in every cell.
    page.locator("#test-compare").click()
    wait_for(lambda: "Grid saved" in text_of(page, "test-message"), 400, "the compare grid")
    assert page.locator("#test-grid img").count() == 1
    grids = list((app.work / ".cache" / "ui" / "compare").glob("style_a-*.png"))
    assert len(grids) == 1
    # Its weight-0.8 cell is the generated image (same seed, same three LoRAs) and no other cell is:
    # had the other two not been applied in the grid, no cell would match.
    with Image.open(generated[0]) as image:
        want = np.asarray(image.convert("RGB"), dtype=np.int16)
    with Image.open(grids[0]) as image:
        grid = np.asarray(image.convert("RGB"), dtype=np.int16)
    from core.sample import COMPARE_WEIGHTS

    column = grid.shape[1] // len(COMPARE_WEIGHTS)
    matches = [x // column for x in range(grid.shape[1] - 63)
               if np.abs(grid[18:82, x:x + 64] - want).max() <= 1]
    assert matches == [COMPARE_WEIGHTS.index(0.8)], matches
