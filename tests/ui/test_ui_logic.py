"""The app's logic without a browser: plots, status lines, uploads, captions, CLI flags."""
from __future__ import annotations

import zipfile

import pytest
from PIL import Image

from core.events import ErrorEvent, ProgressEvent, SampleEvent, WarningEvent
from core.job import JobSnapshot
from ui import app, plots, status
from ui.caption_edit import read_captions, save_captions, search_replace
from ui.state import safe_name
from ui.uploads import import_files, safe_member_path


# -- loss plot ------------------------------------------------------------------------------
def test_the_loss_plot_draws_raw_smoothed_and_learning_rate_lines():
    losses = [(s, 1.0 / s, None, 1e-4) for s in range(1, 21)]
    fig = plots.loss_figure(losses)
    main = fig.axes[0]
    assert [line.get_label() for line in main.lines] == ["loss", "smoothed"]
    assert fig.axes[1].lines[0].get_label() == "learning rate"
    assert list(main.lines[0].get_xdata()) == list(range(1, 21))


def test_a_nan_loss_is_left_out_of_the_plot_instead_of_breaking_it():
    data = plots.loss_series([(1, 0.5, 0.5, None), (2, float("nan"), None, None), (3, 0.4, 0.45, None)])
    assert data["step"] == [1.0, 3.0]
    assert data["lr"] == []


def test_the_smoothed_curve_follows_the_loss_without_starting_at_zero():
    smoothed = plots.ema([2.0, 2.0, 2.0])
    assert smoothed == pytest.approx([2.0, 2.0, 2.0])


def test_an_empty_run_shows_a_plot_that_says_the_loss_comes_later():
    fig = plots.loss_figure([])
    assert "after the first steps" in fig.axes[0].texts[0].get_text()


# -- status ---------------------------------------------------------------------------------
def running(**progress) -> JobSnapshot:
    return JobSnapshot(state="running", kind="train", name="my_lora",
                       progress=ProgressEvent(**{"step": 25, "total": 100, "epoch": 2, "loss": 0.2,
                                                 "smoothed_loss": 0.1234, "seconds_per_step": 1.5,
                                                 "eta_seconds": 112.0, **progress}))


def test_the_progress_line_shows_step_epoch_speed_eta_and_loss():
    line = status.progress_line(running())
    assert line == "step 25/100 · epoch 2 · 1.50 s/it · ETA 1:52 · smoothed loss 0.1234"
    assert "25%" not in line and status.progress_fraction(running()) == 0.25


def test_fast_steps_are_shown_as_iterations_per_second():
    assert "4.00 it/s" in status.progress_line(running(seconds_per_step=0.25))


def test_a_failed_run_shows_the_error_and_what_to_change():
    snap = JobSnapshot(state="failed", kind="train",
                       error=ErrorEvent(message="CUDA out of memory", advice="Lower batch_size"),
                       warnings=[WarningEvent("3 images skipped", "see the Dataset tab")])
    page = status.progress_html(snap, "train")
    assert "CUDA out of memory" in page and "What to change: Lower batch_size" in page
    assert "3 images skipped" in page


def test_the_caption_tab_says_a_training_run_holds_the_device():
    page = status.progress_html(running(), "caption")
    assert "Another job is running (train" in page


def test_sample_previews_are_labelled_by_step_newest_first(tmp_path):
    paths = []
    for step in (100, 200):
        path = tmp_path / f"step-{step}.png"
        Image.new("RGB", (8, 8)).save(path)
        paths.append(path)
    snap = JobSnapshot(kind="train", samples=[SampleEvent(step=100, images=[str(paths[0])]),
                                              SampleEvent(step=200, images=[str(paths[1]), str(tmp_path / "gone.png")])])
    assert status.sample_gallery(snap) == [(str(paths[1]), "step 200 #1"), (str(paths[0]), "step 100")]


def test_text_previews_show_the_base_and_the_lora_answer_side_by_side():
    snap = JobSnapshot(kind="train", samples=[SampleEvent(step=50, texts=[{"prompt": "Hi | there", "base": "b",
                                                                           "lora": "l\nx"}])])
    table = status.sample_texts_markdown(snap)
    assert "| 50 | Hi \\| there | b | l<br>x |" in table


# -- uploads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("member", ["../evil.png", "/etc/evil.png", "a/../../evil.png", "C:/evil.png", "..\\evil.png"])
def test_a_zip_member_that_points_outside_the_data_set_is_refused(tmp_path, member):
    assert safe_member_path(member, tmp_path / "set") is None


def test_an_uploaded_zip_is_unpacked_inside_its_folder_only(tmp_path):
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pics/a.png", b"png")
        zf.writestr("../../escape.png", b"bad")
        zf.writestr("notes.exe", b"MZ")
    target = tmp_path / "data" / "set"
    result = import_files([archive], target)
    assert [p.relative_to(target).as_posix() for p in result.saved] == ["pics/a.png"]
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "data" / "escape.png").exists()
    assert any("outside" in s for s in result.skipped) and any("notes.exe" in s for s in result.skipped)


def test_uploaded_file_names_are_sanitised_and_never_overwrite(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    odd = source / "my cat;rm -rf.png"
    odd.write_bytes(b"x")
    target = tmp_path / "set"
    first = import_files([odd], target).saved[0]
    second = import_files([odd], target).saved[0]
    assert first.name == "my cat_rm -rf.png" and second.name == "my cat_rm -rf_1.png"
    assert safe_name("../../etc/passwd") == "passwd" and safe_name("..") == "file"


# -- captions --------------------------------------------------------------------------------
def test_search_and_replace_changes_only_matching_captions():
    rows, changed = search_replace([["a.png", "a cat on a mat"], ["b.png", "a dog"]], "cat", "tiger")
    assert rows == [["a.png", "a tiger on a mat"], ["b.png", "a dog"]] and changed == 1
    with pytest.raises(ValueError, match="regular expression"):
        search_replace(rows, "(", "", regex=True)


def test_saved_captions_go_to_metadata_csv_with_a_backup_and_to_txt_files(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "metadata.csv").write_text("filename,prompt\na.png,old\n", encoding="utf-8")
    images = sorted(tmp_path.glob("*.png"))
    assert read_captions(tmp_path, images) == [["a.png", "old"], ["b.png", ""]]
    result = save_captions(tmp_path, [["a.png", "new  caption"], ["b.png", ""], ["../x.png", "evil"]],
                           to_csv=True, to_txt=True)
    assert read_captions(tmp_path, images)[0] == ["a.png", "new caption"]
    assert result.csv_backup is not None and "old" in result.csv_backup.read_text(encoding="utf-8")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8").strip() == "new caption"
    assert not (tmp_path / "b.txt").exists() and not (tmp_path.parent / "x.txt").exists()
    assert "b.png" in result.summary()


def test_the_caption_tabs_handlers_edit_the_table_and_save_it(tmp_path):
    import pandas as pd

    from ui import caption_tab

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    table = pd.DataFrame([["a.png", "a cat"], ["b.png", "a dog"]], columns=["file", "caption"])
    rows, message = caption_tab.replace_in_captions(table, "cat", "tiger", False)
    assert rows == [["a.png", "a tiger"], ["b.png", "a dog"]] and message.startswith("Changed 1 captions.")
    assert "not a valid regular expression" in caption_tab.replace_in_captions(rows, "(", "", True)[1]
    assert caption_tab.save_table(str(tmp_path), rows, False, False)[0] == "Choose metadata.csv, .txt files, or both."
    message, gallery = caption_tab.save_table(str(tmp_path), rows, False, True)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8").strip() == "a tiger" and len(gallery) == 2
    assert caption_tab.load_folder(str(tmp_path / "missing"))[-1] == "Choose an existing image folder first."
    assert caption_tab.start_captioning(str(tmp_path), "blip-base", "", "", "", "skip", False, False, 8) == \
        "Choose where to write the captions: metadata.csv, .txt files, or both."


def test_the_dataset_tab_says_what_to_open_before_checking_anything(tmp_path):
    from ui import dataset_tab

    assert dataset_tab.open_dataset("", 512)[0] == "Choose or type a data set first."
    assert "does not exist" in dataset_tab.open_dataset(str(tmp_path / "nope"), 512)[0]
    assert dataset_tab.create_from_uploads("cats", [])[1] == "Add some files or a zip first."


# -- launch flags ----------------------------------------------------------------------------
def test_auth_pairs_are_parsed_and_a_pair_without_password_is_refused():
    assert app.parse_auth("alice:pw,bob:p:w") == [("alice", "pw"), ("bob", "p:w")]
    with pytest.raises(SystemExit):
        app.parse_auth("alice")


def test_a_taken_port_moves_to_the_next_free_one():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert app.find_free_port("127.0.0.1", port) != port


def test_the_cuda_notice_appears_only_for_an_nvidia_machine_with_cpu_torch():
    assert "CPU-only build" in app.cuda_notice(nvidia=True, cuda=None)
    assert app.cuda_notice(nvidia=True, cuda="12.8") is None
    assert app.cuda_notice(nvidia=False, cuda=None) is None


def test_the_default_flags_serve_on_localhost_only():
    args = app.parse_args([])
    assert not args.listen and not args.share and args.auth is None


def test_serving_beyond_localhost_without_a_login_is_warned_about():
    assert app.serving_warnings("127.0.0.1", False, False) == []
    assert "without --auth" in app.serving_warnings("0.0.0.0", False, False)[0]
    assert app.serving_warnings("0.0.0.0", True, False) == []
    assert any("--share" in w for w in app.serving_warnings("127.0.0.1", False, True))
