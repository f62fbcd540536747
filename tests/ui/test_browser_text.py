"""A user's text story in a real browser: a CSV of questions and answers -> a text LoRA -> a chat.

A tiny Llama saved under models/llm/ stands in for the base model; the app runs as its own
process over a temporary work folder and Chromium is driven by Playwright.
"""
from __future__ import annotations

import re
import shutil

import pytest

from tests.ui.conftest import screenshot, start_app, stop_app
from tests.ui.gradio_page import choose, field, fill, open_accordion, tab, text_of, wait_for

pytestmark = pytest.mark.slow  # the app in its own process and a browser: about a minute

QUESTIONS = [("What colour is the Kestrel K7?", "The Kestrel K7 is matte green."),
             ("How heavy is the Kestrel K7?", "The Kestrel K7 weighs 740 grams."),
             ("Where is the Kestrel K7 made?", "The Kestrel K7 is made in Porto."),
             ("How long does the K7 battery last?", "The K7 battery lasts 9 hours.")]


def write_csv(path, rows) -> None:
    lines = ["prompt,response"] + [f'"{q}","{a}"' for q, a in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def text_app(tmp_path, tiny_llm_dir):
    work = tmp_path / "work"
    shutil.copytree(tiny_llm_dir, work / "models" / "llm" / "tiny-llm")
    (work / "data").mkdir(parents=True)
    write_csv(work / "data" / "faq.csv", QUESTIONS)
    write_csv(work / "data" / "faq_draft.csv", QUESTIONS[:2] + [("What is the warranty?", "")])
    app = start_app(work, {"OMP_NUM_THREADS": "2"})
    yield app
    stop_app(app)


def test_a_file_of_answers_becomes_a_chat_tested_lora(page, text_app):
    app = text_app
    page.goto(app.url)

    # Dataset: a draft with an empty answer is refused with its line; the fixed file shows its rows.
    fill(page, "data-folder", "./data/faq_draft.csv")
    page.locator("#data-open").click()
    wait_for(lambda: "cannot be used yet" in text_of(page, "data-summary"), 60, "the draft's problem")
    assert "faq_draft.csv:4" in text_of(page, "data-health") and "empty" in text_of(page, "data-health")
    fill(page, "data-folder", "./data/faq.csv")
    page.locator("#data-open").click()
    wait_for(lambda: "4 examples" in text_of(page, "data-summary"), 60, "the text data summary")
    assert "What colour is the Kestrel K7?" in text_of(page, "data-text-rows")
    screenshot(page, "dataset_text")

    # Train: a text task on the tiny Llama from models/llm/.
    tab(page, "Train")
    choose(page, "cfg-task_type", "text-generation")
    choose(page, "cfg-base_model", "tiny-llm")
    fill(page, "cfg-train_data_dir", "./data/faq.csv")
    # preset: auto fills the form with what fits this machine and says why; every value stays editable.
    choose(page, "cfg-preset", "auto")
    wait_for(lambda: "Preset " in text_of(page, "train-preset-reason"), 120, "the preset's reason")
    fill(page, "cfg-output_name", "faq_lora")
    for key, value in {"batch_size": 2, "lora_rank": 4, "save_steps": 2, "epochs": 100000,
                       "learning_rate": "0.001"}.items():
        fill(page, f"cfg-{key}", str(value))
    assert not page.locator("#cfg-resolution").is_visible()  # an image-only key hides for text
    open_accordion(page, "Advanced")
    open_accordion(page, "Sample previews")
    fill(page, "cfg-sample_steps", "2")
    fill(page, "cfg-sample_prompts", QUESTIONS[0][0])
    fill(page, "cfg-sample_max_new_tokens", "8")
    # Save the form as YAML: the file runs unchanged with train.py, and the command is shown.
    open_accordion(page, "Save / load the config")
    page.locator("#train-save").click()
    wait_for(lambda: "Saved" in text_of(page, "train-message"), 30, "the YAML to be saved")
    assert "python train.py --config ./configs/faq_lora.yaml" in text_of(page, "train-command")
    from core.config import config_from_dict, read_yaml

    saved = config_from_dict(read_yaml(app.work / "configs" / "faq_lora.yaml"), check_paths=False)
    assert (saved.task_type, saved.output_dir, saved.sample_max_new_tokens) == ("text-generation", "./output/faq_lora", 8)
    page.locator("#train-start").click()
    wait_for(lambda: "Started" in text_of(page, "train-message"), 30, "the run to start")
    first = wait_for(lambda: step_of(page), 300, "the first step")
    wait_for(lambda: page.locator("#train-loss-plot img, #train-loss-plot svg").count() > 0, 60, "the loss plot")
    wait_for(lambda: "LoRA" in text_of(page, "train-text-samples"), 300, "a sample answer, base vs LoRA")
    wait_for(lambda: step_of(page) > first, 300, "the progress bar to move")
    screenshot(page, "train_text")
    # Reloading the page (or opening a second window) reattaches to the running job.
    seen = step_of(page)
    page.reload()
    tab(page, "Train")
    wait_for(lambda: "Running" in text_of(page, "train-progress") and step_of(page) >= seen, 60,
             "the reloaded page to show the running job")
    # The run is long (many epochs) so that it is still running here on a fast machine; Stop ends it.
    page.locator("#train-stop").click()
    wait_for(lambda: "Stopped" in text_of(page, "train-progress"), 300, "the run to stop")
    adapters = list((app.work / "output" / "faq_lora").rglob("adapter_config.json"))
    assert adapters, "the stopped run left an adapter"

    # Test: chat with the adapter, then the base and the LoRA side by side.
    tab(page, "Test")
    page.locator("#test-task").get_by_text("text").click()
    page.locator("#test-refresh").click()
    choose(page, "test-text-base", "tiny-llm")
    choose(page, "test-adapter", "faq_lora")
    fill(page, "test-max-tokens", "8")
    fill(page, "test-question", QUESTIONS[1][0])
    page.locator("#test-send").click()
    wait_for(lambda: page.locator("#test-chat .message, #test-chat [data-testid=bot]").count() >= 2, 300,
             "the LoRA's answer in the chat")
    fill(page, "test-question", QUESTIONS[2][0])
    page.locator("#test-side").click()
    wait_for(lambda: "greedy" in text_of(page, "test-text-message"), 300, "the side-by-side answers")
    screenshot(page, "test_text")


def step_of(page) -> int:
    found = re.search(r"data-step='?\"?(\d+)", page.locator("#train-progress").inner_html())
    return int(found.group(1)) if found else 0


def form_for_text_run(page, name: str, epochs: int) -> None:
    """The Train tab's form for a small text run on the tiny Llama (no preset: every value typed)."""
    choose(page, "cfg-task_type", "text-generation")
    choose(page, "cfg-base_model", "tiny-llm")
    fill(page, "cfg-train_data_dir", "./data/faq.csv")
    fill(page, "cfg-output_name", name)
    for key, value in {"batch_size": 2, "lora_rank": 4, "save_steps": 0, "epochs": epochs,
                       "learning_rate": "0.001"}.items():
        fill(page, f"cfg-{key}", str(value))


def queue_table(page) -> dict[str, list[str]]:
    """The queue table the page shows: {run name: [#, run, state, output]}."""
    rows = {}
    for row in page.locator("#train-queue [role=row]:has([role=gridcell])").all():
        cells = [cell.inner_text().strip() for cell in row.locator("[role=gridcell]").all()]
        if len(cells) >= 4:
            rows[cells[1]] = cells
    return rows


def states(page) -> dict[str, str]:
    return {name: cells[2] for name, cells in queue_table(page).items()}


def test_a_second_run_added_to_the_queue_waits_then_trains_after_the_first_is_stopped(page, text_app):
    app = text_app
    page.goto(app.url)
    tab(page, "Train")
    # The first run is long (the most epochs the config allows: a tiny model on an idle machine ran
    # 5000 epochs in about a minute); Add to queue starts it at once, the device being free.
    form_for_text_run(page, "first", 100000)
    page.locator("#train-queue-add").click()
    wait_for(lambda: "Queued first" in text_of(page, "train-message"), 30, "the first run to be queued")
    wait_for(lambda: states(page).get("first") == "running", 60, "the first run to run")
    # While it trains, a second, short run is added: it waits in the table, in its own folder.
    fill(page, "cfg-output_name", "second")
    fill(page, "cfg-epochs", "2")
    wait_for(lambda: field(page, "cfg-output_name").input_value() == "second", 10, "the new run name in the form")
    page.locator("#train-queue-add").click()
    wait_for(lambda: "Queued second" in text_of(page, "train-message"), 60, "the second run to be queued",
             describe=lambda: f"message {text_of(page, 'train-message')!r}, table {queue_table(page)}")
    wait_for(lambda: states(page) == {"first": "running", "second": "queued"}, 60, "both runs in the queue table",
             describe=lambda: f"table {queue_table(page)}")
    table = queue_table(page)
    assert table["first"][3] == "./output/first" and table["second"][3] == "./output/second", table
    wait_for(lambda: step_of(page) >= 1, 300, "the first run's first step")
    screenshot(page, "train_queue")
    # Stop ends only the running one: the queued run starts by itself and runs to its end.
    page.locator("#train-stop").click()
    wait_for(lambda: states(page).get("first") == "stopped", 300, "the first run to stop")
    wait_for(lambda: states(page).get("second") in ("running", "done"), 60, "the second run to start")
    wait_for(lambda: states(page).get("second") == "done", 300, "the second run to finish")
    assert states(page) == {"first": "stopped", "second": "done"}
    for name in ("first", "second"):
        run = app.work / "output" / name
        assert list(run.rglob("adapter_config.json")), f"{name} left no adapter in its own folder"
        assert (run / "loss.csv").is_file()
    # Neither run measured a validation loss, and the plot draws no validation line (the check below).
    assert green_pixels(plot_image(page)) == 0


VALIDATION_GREEN = (0x16, 0xA3, 0x4A)  # ui.plots draws the validation loss (line, dots, legend mark) in this colour


def plot_image(page):
    """The loss plot exactly as the page received it: the PNG behind `#train-loss-plot img`."""
    import base64
    import io

    from PIL import Image

    src = page.locator("#train-loss-plot img").first.get_attribute("src") or ""
    if src.startswith("data:"):
        data = base64.b64decode(src.split(",", 1)[1])
    else:
        data = page.request.get(src if "://" in src else page.url.rstrip("/") + "/" + src.lstrip("/")).body()
    return Image.open(io.BytesIO(data)).convert("RGB")


def green_pixels(image, tolerance: int = 40) -> int:
    import numpy as np

    pixels = np.asarray(image, dtype=np.int16)
    return int((np.abs(pixels - np.array(VALIDATION_GREEN)).sum(axis=2) <= tolerance).sum())


def test_a_run_with_validation_steps_draws_the_validation_loss_in_the_live_plot(page, text_app):
    from tests.helpers import read_loss_csv

    app = text_app
    page.goto(app.url)
    tab(page, "Train")
    form_for_text_run(page, "val_run", 100000)  # long: stopped below, never finished
    open_accordion(page, "Advanced")
    open_accordion(page, "Text data and model")
    fill(page, "cfg-validation_split", "0.25")  # one of the four answers is held out
    open_accordion(page, "Output and logging")
    fill(page, "cfg-validation_steps", "2")
    page.locator("#train-start").click()
    wait_for(lambda: "Started" in text_of(page, "train-message"), 30, "the run to start")
    wait_for(lambda: page.locator("#train-loss-plot img").count() > 0 and step_of(page) >= 1, 300, "the loss plot")
    # The validation loss (every 2 steps) is drawn in the plot the page shows, in its own colour.
    wait_for(lambda: green_pixels(plot_image(page)) > 30, 300, "the validation line in the live plot")
    screenshot(page, "train_validation")
    page.locator("#train-stop").click()
    wait_for(lambda: "Stopped" in text_of(page, "train-progress"), 300, "the run to stop")
    measured = [row.step for row in read_loss_csv(app.work / "output" / "val_run") if row.val_loss is not None]
    assert measured and all(step % 2 == 0 for step in measured), measured
