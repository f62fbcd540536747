"""Captioning a folder with a tiny BLIP: the seed command, outputs, options, progress and stop."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.caption import CaptionOptions, caption_folder, load_captioner
from core.data.captions import read_metadata_csv
from core.data.image_io import load_rgb
from core.events import ProgressEvent, RunContext, WarningEvent
from core.job import Job
from tools import auto_label

ROOT = Path(__file__).resolve().parents[2]
OLD_CSV = ('filename,prompt\n'
           'gone_from_folder.png,"an old row, with a comma and ""quotes"""\n'
           'astronaut.png,hand written caption\n')


def csv_rows(path: Path) -> dict[str, str]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["filename", "prompt"]
    return {name: prompt for name, prompt in rows[1:]}


def run_cli(*args: str) -> int:
    return auto_label.main([str(a) for a in args])


def test_the_seed_command_captions_a_mixed_folder_and_keeps_the_older_metadata_csv(tiny_blip_dir,
                                                                                     caption_photo_folder):
    folder, names = caption_photo_folder
    (folder / "metadata.csv").write_text(OLD_CSV, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "tools/auto_label.py", "--input", str(folder), "--output",
                           str(folder / "metadata.csv"), "--model", str(tiny_blip_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = csv_rows(folder / "metadata.csv")
    # one row per good image, the old row of an image no longer there kept, the hand-written one untouched
    assert set(rows) == set(names["good"]) | {"gone_from_folder.png"}
    assert rows["gone_from_folder.png"] == 'an old row, with a comma and "quotes"'
    assert rows["astronaut.png"] == "hand written caption"
    assert all(rows[name].strip() for name in names["good"])
    # the corrupt file is reported by name, the markdown file is not an image at all
    assert "broken.jpg" in done.stderr and "broken.jpg" in done.stdout
    assert "notes.md" not in rows and "broken.jpg" not in rows
    # the comma in a file name is quoted, so the file reads back through the project's reader too
    assert '"coffee, cup.jpg",' in (folder / "metadata.csv").read_text(encoding="utf-8")
    assert read_metadata_csv(folder / "metadata.csv").captions == rows
    backups = list(folder.glob("metadata.csv.bak-*"))
    assert len(backups) == 1 and backups[0].read_text(encoding="utf-8") == OLD_CSV


def test_a_trigger_word_and_suffix_go_around_every_caption_and_are_not_stacked_on_a_rerun(
        tiny_blip_dir, caption_photo_folder):
    folder, names = caption_photo_folder
    assert run_cli("--input", folder, "--model", tiny_blip_dir, "--trigger-word", "sks style,",
                   "--suffix", "high quality", "--max-length", "6") == 0
    first = csv_rows(folder / "metadata.csv")
    assert set(first) == set(names["good"])
    for caption in first.values():
        assert caption.startswith("sks style, ") and caption.endswith(", high quality")
        assert len(caption) > len("sks style, , high quality")
    assert run_cli("--input", folder, "--model", tiny_blip_dir, "--trigger-word", "sks style",
                   "--suffix", "high quality", "--max-length", "6", "--overwrite") == 0
    assert csv_rows(folder / "metadata.csv") == first  # greedy: same captions, prefix once


def test_skip_existing_keeps_hand_edits_and_overwrite_captions_again_with_a_backup(tiny_blip_dir,
                                                                                   caption_photo_folder):
    folder, names = caption_photo_folder
    options = CaptionOptions(input_dir=folder, model=str(tiny_blip_dir), max_length=6, batch_size=4)
    first = caption_folder(options)
    assert sorted(first.captions) == names["good"] and first.csv_backup is None
    rows = csv_rows(folder / "metadata.csv")
    rows["camera_grey.png"] = "my own careful caption"
    (folder / "metadata.csv").write_text(
        "filename,prompt\n" + "".join(f'"{k}","{v}"\n' for k, v in rows.items()), encoding="utf-8")

    skipped = caption_folder(options)  # default: skip images that have a caption
    assert skipped.captions == {} and sorted(skipped.kept) == names["good"]
    assert csv_rows(folder / "metadata.csv")["camera_grey.png"] == "my own careful caption"

    redone = caption_folder(CaptionOptions(input_dir=folder, model=str(tiny_blip_dir), max_length=6,
                                           existing="overwrite"))
    assert sorted(redone.captions) == names["good"] and not redone.kept
    new_rows = csv_rows(folder / "metadata.csv")
    assert new_rows["camera_grey.png"] != "my own careful caption"
    assert new_rows == {name: first.captions[name] for name in names["good"]}
    assert redone.csv_backup is not None
    assert "my own careful caption" in redone.csv_backup.read_text(encoding="utf-8")


def test_an_image_listed_under_another_spelling_keeps_its_row_instead_of_getting_a_second(
        tiny_blip_dir, caption_photo_folder):
    folder, names = caption_photo_folder
    (folder / "metadata.csv").write_text("filename,prompt\n./astronaut.png,hand written\n", encoding="utf-8")
    result = caption_folder(CaptionOptions(input_dir=folder, model=str(tiny_blip_dir), max_length=4))
    rows = csv_rows(folder / "metadata.csv")
    assert result.kept == {"astronaut.png": "hand written"}
    assert rows["./astronaut.png"] == "hand written" and "astronaut.png" not in rows
    assert len(rows) == len(names["good"])


def test_txt_output_writes_a_caption_beside_each_image_and_no_csv(tiny_blip_dir, caption_photo_folder):
    folder, names = caption_photo_folder
    assert run_cli("--input", folder, "--model", tiny_blip_dir, "--txt", "--prefix", "mychar",
                   "--max-length", "6") == 0
    assert not (folder / "metadata.csv").exists()
    for name in names["good"]:
        text = (folder / name).with_suffix(".txt").read_text(encoding="utf-8")
        assert text.endswith("\n") and text.startswith("mychar, ") and text.count("\n") == 1
    assert not (folder / "broken.txt").exists()


def test_csv_and_txt_together_agree_and_a_txt_only_caption_is_carried_into_the_csv(tiny_blip_dir,
                                                                                     caption_photo_folder):
    folder, names = caption_photo_folder
    (folder / "rocket_tall.txt").write_text("a rocket on its launch pad\n", encoding="utf-8")
    assert run_cli("--input", folder, "--model", tiny_blip_dir, "--csv", "--txt", "--max-length", "6") == 0
    rows = csv_rows(folder / "metadata.csv")
    assert set(rows) == set(names["good"])
    assert rows["rocket_tall.jpg"] == "a rocket on its launch pad"
    for name in names["good"]:
        assert (folder / name).with_suffix(".txt").read_text(encoding="utf-8").strip() == rows[name]


def test_batched_captions_equal_one_image_at_a_time(tiny_blip_dir, caption_photo_folder):
    folder, names = caption_photo_folder
    captioner = load_captioner(str(tiny_blip_dir), device="cpu")
    paths = [folder / name for name in names["good"]]
    images = [load_rgb(path) for path in paths]
    batched = captioner.caption_batch(paths, images, 8)
    single = [captioner.caption_batch([path], [image], 8)[0] for path, image in zip(paths, images)]
    assert batched == single
    assert len(set(batched)) > 1, "the tiny model should tell the photos apart"


def test_progress_events_count_every_image_and_name_the_file_and_caption(tiny_blip_dir, caption_photo_folder):
    folder, names = caption_photo_folder
    events: list = []
    result = caption_folder(CaptionOptions(input_dir=folder, model=str(tiny_blip_dir), max_length=6,
                                           batch_size=3), RunContext(listeners=[events.append]))
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    total = len(names["good"]) + len(names["bad"])
    assert [e.step for e in progress] == list(range(1, total + 1))
    assert all(e.total == total for e in progress)
    for name, caption in result.captions.items():
        assert any(e.message == f"{name}: {caption}" for e in progress)
    assert any(isinstance(e, WarningEvent) and "broken.jpg" in e.message for e in events)
    assert list(result.failed) == ["broken.jpg"]


def test_stopping_a_caption_job_part_way_keeps_what_was_written(tiny_blip_dir, caption_photo_folder):
    folder, names = caption_photo_folder
    (folder / "metadata.csv").write_text(OLD_CSV, encoding="utf-8")
    job = Job()
    options = CaptionOptions(input_dir=folder, model=str(tiny_blip_dir), max_length=6, batch_size=2,
                             existing="overwrite", write_txt=True)

    def stop_after_first_batch(event) -> None:
        if isinstance(event, ProgressEvent) and event.step == 2:
            job.stop()

    job.subscribe(stop_after_first_batch)
    job.run(lambda ctx: caption_folder(options, ctx), kind="caption")
    snapshot = job.wait(120)
    assert snapshot.state == "stopped", snapshot.log
    result = job.result
    assert result.stopped and 0 < len(result.captions) < len(names["good"])
    rows = csv_rows(folder / "metadata.csv")
    assert rows["gone_from_folder.png"] == 'an old row, with a comma and "quotes"'
    for name, caption in result.captions.items():
        assert rows[name] == caption
        assert (folder / name).with_suffix(".txt").read_text(encoding="utf-8").strip() == caption
    assert snapshot.progress is not None and snapshot.progress.step == 2
    assert len(list(folder.glob("metadata.csv.bak-*"))) == 1


def test_the_filename_captioner_needs_no_model_and_reports_camera_names(tmp_path, capsys):
    from PIL import Image

    for name in ("red_dragon_02.png", "Blue-Car (3).jpg", "IMG_1234.jpg"):
        Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / name)
    assert run_cli("--input", tmp_path, "--model", "filename", "--prefix", "toy") == 0
    rows = csv_rows(tmp_path / "metadata.csv")
    assert rows == {"Blue-Car (3).jpg": "toy, blue car", "red_dragon_02.png": "toy, red dragon"}
    assert "IMG_1234.jpg" in capsys.readouterr().out


def test_a_folder_of_only_broken_images_fails_with_the_files_named(tiny_blip_dir, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert run_cli("--input", tmp_path, "--model", tiny_blip_dir) == 1
    assert "bad.png" in capsys.readouterr().err
    assert not (tmp_path / "metadata.csv").exists()


def test_an_empty_or_missing_folder_is_refused_with_the_folder_named(tmp_path, capsys):
    assert run_cli("--input", tmp_path / "nope", "--model", "filename") == 1
    assert "nope" in capsys.readouterr().err
    assert run_cli("--input", tmp_path, "--model", "filename") == 1
    assert "no images" in capsys.readouterr().err


@pytest.mark.parametrize("variable, value", [("LORA_MODELS_DIR", "models"), ("LORA_SCRIPTS_WORKDIR", "."),
                                             ("", "")])
def test_a_short_name_loads_from_models_captioners_when_offline(tiny_blip_dir, caption_photo_folder,
                                                               tmp_path, monkeypatch, variable, value):
    import shutil

    monkeypatch.delenv("LORA_MODELS_DIR", raising=False)
    monkeypatch.delenv("LORA_SCRIPTS_WORKDIR", raising=False)
    if variable:  # the GUI's work folder, or an explicit models folder
        monkeypatch.setenv(variable, str(tmp_path / value))
    else:  # the seed's ./models/... relative to the folder the command runs in
        monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_blip_dir, tmp_path / "models" / "captioners" / "blip-base")
    folder, names = caption_photo_folder
    result = caption_folder(CaptionOptions(input_dir=folder, model="blip-base", max_length=4))
    assert sorted(result.captions) == names["good"]


def test_a_missing_short_name_says_where_to_put_the_files(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("LORA_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    assert run_cli("--input", tmp_path, "--model", "blip-large") == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "models" / "captioners" / "blip-large") in err
    assert "Salesforce/blip-image-captioning-large" in err


@pytest.mark.parametrize("name", ["no-such-captioner", "./not/a/folder"])
def test_an_unknown_captioner_lists_the_names_that_exist(tmp_path, capsys, name):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    assert run_cli("--input", tmp_path, "--model", name) == 1
    assert "blip-base" in capsys.readouterr().err


def test_a_stop_during_a_long_batch_ends_generation_at_once_and_drops_that_batch(tiny_blip_dir,
                                                                                caption_photo_folder):
    folder, names = caption_photo_folder
    ctx = RunContext()
    polls = {"n": 0}

    def should_stop() -> bool:  # the user presses Stop while the first batch is generating
        polls["n"] += 1
        return polls["n"] > 3

    ctx.should_stop = should_stop  # type: ignore[method-assign]
    result = caption_folder(CaptionOptions(input_dir=folder, model=str(tiny_blip_dir), max_length=200,
                                           batch_size=8), ctx)
    assert result.stopped and result.captions == {}
    assert polls["n"] < 20  # not 200 tokens' worth of polling: generation ended at once
    assert not (folder / "metadata.csv").exists()
