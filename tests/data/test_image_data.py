"""Scanning an image folder: what the trainer trains on, what it skips and why."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.config import TrainConfig
from core.data.image_io import ImageReadError, check_complete, load_rgb, probe_image
from core.data.images import DatasetError, apply_trigger, scan_image_dataset, short_reason
from tests.fixtures.image_folders import bomb_png, photo, write_image


def scan(folder: Path, **settings) -> object:
    return scan_image_dataset(TrainConfig(train_data_dir=str(folder), **settings))


def test_a_mixed_folder_keeps_every_readable_image_and_skips_the_broken_ones(mixed_image_folder):
    dataset = scan(mixed_image_folder.path)
    assert {item.relpath for item in dataset.items} == set(mixed_image_folder.usable)
    assert {name: short_reason(reason) for name, reason in dataset.skipped} == mixed_image_folder.broken
    assert dataset.caption_source == "metadata"


def test_a_corrupt_jpeg_is_skipped_with_a_reason_that_says_what_to_do(mixed_image_folder):
    reasons = dict(scan(mixed_image_folder.path).skipped)
    assert "damaged or truncated" in reasons["corrupt.jpg"] and "Re-export" in reasons["corrupt.jpg"]
    assert "0 bytes" in reasons["empty.png"]
    assert "40x40" in reasons["tiny.png"] and "64 px" in reasons["tiny.png"]


def test_sizes_are_the_displayed_sizes_after_exif_rotation(mixed_image_folder):
    items = {item.relpath: item for item in scan(mixed_image_folder.path).items}
    for name, (width, height) in mixed_image_folder.usable.items():
        assert (items[name].width, items[name].height) == (width, height), name
    rotated = items["rotated.jpg"]
    assert rotated.height > rotated.width  # stored landscape, EXIF says portrait
    # What the trainer decodes later has exactly the size the scan promised.
    for item in items.values():
        decoded = load_rgb(item.path)
        assert decoded.mode == "RGB" and decoded.size == (item.width, item.height), item.relpath


def test_hidden_folders_backups_and_other_files_are_never_training_images(mixed_image_folder):
    names = {item.relpath for item in scan(mixed_image_folder.path).items}
    assert not any(n.startswith((".hidden", "backup")) or ".bak-" in n or n.endswith(".txt") for n in names)


def test_metadata_with_bom_crlf_quotes_commas_and_chinese_gives_the_exact_captions(mixed_image_folder):
    dataset = scan(mixed_image_folder.path)
    captions = {item.relpath: item.caption for item in dataset.items}
    for name, caption in mixed_image_folder.captions.items():
        if name in mixed_image_folder.usable:
            assert captions[name] == caption, name
    assert captions["coffee.png"] == "咖啡杯, 白色瓷盘, 特写"
    assert captions["astronaut.jpg"] == 'an astronaut, "Eileen Collins", white suit, flag'


def test_metadata_names_may_be_relative_paths_bare_names_or_windows_paths(tmp_path):
    folder = tmp_path / "data"
    write_image(folder, "a/b/deep.png", photo("coffee.png", 96))
    write_image(folder, "top.png", photo("chelsea.png", 96))
    write_image(folder, "c/win.png", photo("rocket.jpg", 96))
    write_image(folder, "SHOUT.png", photo("astronaut.png", 96))
    (folder / "metadata.csv").write_text(
        "file_name,text\ndeep.png,bare name\n./top.png,dot slash\nc\\win.png,backslashes\n"
        "shout.png,another case\n", encoding="utf-8")
    captions = {item.relpath: item.caption for item in scan(folder).items}
    assert captions == {"a/b/deep.png": "bare name", "top.png": "dot slash", "c/win.png": "backslashes",
                        "SHOUT.png": "another case"}


def test_a_metadata_file_outside_the_folder_names_images_relative_to_itself(tmp_path):
    folder = tmp_path / "project" / "images"
    write_image(folder, "cat.png", photo("chelsea.png", 96))
    csv = tmp_path / "project" / "captions.csv"
    csv.write_text("filename,prompt\nimages/cat.png,a cat\n", encoding="utf-8")
    dataset = scan(folder, metadata_path=str(csv))
    assert [(i.relpath, i.caption) for i in dataset.items] == [("cat.png", "a cat")]
    assert dataset.warnings == []


def test_a_row_naming_a_missing_file_is_a_warning_with_its_line(mixed_image_folder):
    warnings = " ".join(scan(mixed_image_folder.path).warnings)
    assert "missing_file.png (line 18)" in warnings


def test_an_image_without_a_caption_row_still_trains_and_is_named_in_a_warning(mixed_image_folder):
    dataset = scan(mixed_image_folder.path, trigger_word="sks")
    rocket = next(item for item in dataset.items if item.relpath == "rocket.bmp")
    assert rocket.caption == "sks"
    assert any("rocket.bmp" in w and "no caption" in w for w in dataset.warnings)


def test_the_trigger_word_is_put_in_front_once(mixed_image_folder):
    dataset = scan(mixed_image_folder.path, trigger_word="sks_style")
    assert all(item.caption.startswith("sks_style") for item in dataset.items)
    assert all(item.caption.count("sks_style") == 1 for item in dataset.items)
    assert apply_trigger("  a cat, tabby ", "sks") == "sks, a cat, tabby"
    assert apply_trigger("a photo of SKS cat", "sks") == "a photo of SKS cat"
    assert apply_trigger("", "sks") == "sks"
    assert apply_trigger("skservice logo", "sks") == "sks, skservice logo"  # a word, not a substring
    assert apply_trigger(" a cat ", "") == "a cat"


def test_txt_captions_beside_the_images_are_read_with_their_problems_named(txt_caption_folder):
    dataset = scan(txt_caption_folder.path)
    assert dataset.caption_source == "txt"
    captions = {item.relpath: item.caption for item in dataset.items}
    assert captions["cat.png"] == "a cat, tabby"
    assert captions["coffee.jpg"] == "一杯咖啡, 特写"  # GBK bytes decoded
    assert captions["sub/astronaut.png"] == "an astronaut second line"
    assert captions["rocket.jpg"] == "" and captions["moon.png"] == ""
    warnings = "\n".join(dataset.warnings)
    assert "coffee.txt is not UTF-8" in warnings
    assert "rocket.jpg" in warnings and "moon.png" in warnings


def test_caption_source_can_be_forced(mixed_image_folder, txt_caption_folder):
    (mixed_image_folder.path / "coffee.txt").write_text("from a txt file", encoding="utf-8")
    forced = {i.relpath: i.caption for i in scan(mixed_image_folder.path, caption_source="txt").items}
    assert forced["coffee.png"] == "from a txt file" and forced["astronaut.jpg"] == ""
    with pytest.raises(DatasetError, match="does not exist"):
        scan(txt_caption_folder.path, caption_source="metadata")


def test_a_folder_without_captions_trains_on_the_trigger_word_and_says_so(photo_image_folder):
    (photo_image_folder.path / "metadata.csv").unlink()
    dataset = scan(photo_image_folder.path, trigger_word="sks")
    assert dataset.caption_source == "none"
    assert {item.caption for item in dataset.items} == {"sks"}
    assert any("No captions found" in w for w in dataset.warnings)


def test_a_metadata_file_without_the_expected_columns_is_refused_naming_it(photo_image_folder):
    (photo_image_folder.path / "metadata.csv").write_text("name;caption\na.png;x\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="filename,prompt"):
        scan(photo_image_folder.path)


def test_a_folder_of_only_broken_files_is_refused_listing_each_file(mixed_image_folder, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in mixed_image_folder.broken:
        shutil.copy(mixed_image_folder.path / name, folder / name)
    with pytest.raises(DatasetError) as caught:
        scan(folder)
    message = str(caught.value)
    assert str(folder) in message and "4 file(s), none readable" in message
    for name, reason in mixed_image_folder.broken.items():
        assert f"{name} ({reason})" in message


def test_an_empty_or_missing_folder_is_refused_with_what_was_found(tmp_path):
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"No images .*notes\.txt"):
        scan(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        scan(tmp_path / "nope")


def test_a_decompression_bomb_is_skipped_with_a_message_not_a_crash(photo_image_folder):
    bomb_png(photo_image_folder.path / "bomb.png")
    dataset = scan(photo_image_folder.path)
    reasons = dict(dataset.skipped)
    assert "too large" in reasons["bomb.png"] and "16384" in reasons["bomb.png"]
    assert len(dataset.items) == len(photo_image_folder.usable)
    with pytest.raises(ImageReadError, match="too large"):
        load_rgb(photo_image_folder.path / "bomb.png")


def test_the_scan_reads_headers_only_and_never_decodes_healthy_images(photo_image_folder, monkeypatch):
    decoded = []
    original = ImageFile.ImageFile.load

    def counting_load(self):
        decoded.append(self.filename)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    dataset = scan(photo_image_folder.path)
    assert len(dataset.items) == len(photo_image_folder.usable)
    assert decoded == []


def test_a_jpeg_with_bytes_after_its_end_marker_is_decoded_to_be_sure_and_kept(tmp_path):
    image = tmp_path / "motion_photo.jpg"
    write_image(tmp_path, image.name, photo("rocket.jpg", 96))
    image.write_bytes(image.read_bytes() + b"ftypmp42" + bytes(300))  # like a phone's motion photo
    check_complete(image)
    assert [item.relpath for item in scan(tmp_path).items] == ["motion_photo.jpg"]


def test_truncated_files_of_every_format_are_found(tmp_path):
    for fmt, ext in (("PNG", ".png"), ("WEBP", ".webp"), ("GIF", ".gif"), ("BMP", ".bmp"), ("JPEG", ".jpg")):
        whole = tmp_path / f"whole{ext}"
        write_image(tmp_path, whole.name, photo("coffee.png", 128).convert("RGB"), format=fmt)
        check_complete(whole)
        cut = tmp_path / f"cut{ext}"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
        try:
            probe_image(cut)
        except ImageReadError:
            continue  # some formats already fail at the header
        with pytest.raises(ImageReadError, match="damaged or truncated"):
            check_complete(cut)


def test_tag_frequency_counts_each_tag_once_per_caption(mixed_image_folder):
    frequency = scan(mixed_image_folder.path, trigger_word="sks").tag_frequency()
    assert frequency["sks"] == len(mixed_image_folder.usable)
    assert frequency["an astronaut"] == 2
    assert frequency["a cat"] == 2
    assert frequency["特写"] == 1
    assert "" not in frequency


def test_a_non_utf8_metadata_file_is_read_with_a_warning(tmp_path):
    write_image(tmp_path, "cup.png", photo("coffee.png", 96))
    (tmp_path / "metadata.csv").write_bytes("filename,prompt\ncup.png,一杯咖啡\n".encode("gbk"))
    dataset = scan(tmp_path)
    assert dataset.items[0].caption == "一杯咖啡"
    assert any("not UTF-8" in w for w in dataset.warnings)


def test_item_modes_and_formats_are_reported_for_the_trainer(mixed_image_folder):
    items = {item.relpath: item for item in scan(mixed_image_folder.path).items}
    assert items["color_cmyk.jpg"].mode == "CMYK"
    assert items["moon_16bit.png"].mode.startswith("I")
    assert items["chelsea.webp"].format == "WEBP"
    with Image.open(items["animated.gif"].path) as gif:
        assert gif.n_frames == 3


def test_a_png_with_an_exif_rotation_is_measured_upright_without_decoding_it(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CCW to display"
    write_image(tmp_path, "turned.png", photo("coffee.png", 128), exif=exif.tobytes())
    info = probe_image(tmp_path / "turned.png")
    assert (info.width, info.height) == (85, 128)
    assert load_rgb(tmp_path / "turned.png").size == (85, 128)


def test_sixteen_bit_colour_pngs_are_recognised_from_the_header(tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    width, height = 80, 70
    rows = b"".join(b"\0" + bytes(width * 6) for _ in range(height))  # filter byte + 16-bit RGB zeros
    (tmp_path / "deep.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    info = probe_image(tmp_path / "deep.png")
    assert info.bits == 16 and info.mode == "RGB"
    assert load_rgb(tmp_path / "deep.png").size == (80, 70)


def test_what_the_trainer_decodes_transparent_parts_white_and_deep_images_scaled(mixed_image_folder):
    folder = mixed_image_folder.path
    logo = np.asarray(load_rgb(folder / "logo_rgba.png"))
    with Image.open(folder / "logo_rgba.png") as raw:
        alpha = np.asarray(raw.getchannel("A"))
    assert (logo[alpha == 0] == 255).all()  # transparent -> white, not black
    horse = np.asarray(load_rgb(folder / "horse_palette.png"))
    with Image.open(folder / "horse_palette.png") as raw:
        see_through = np.asarray(raw) == raw.info["transparency"]
    assert see_through.any() and (horse[see_through] == 255).all()
    moon = np.asarray(load_rgb(folder / "moon_16bit.png"), dtype=np.int16)
    expected = np.asarray(photo("moon.png", 128).convert("L"), dtype=np.int16)
    assert np.abs(moon[..., 0] - expected).max() <= 1  # 16 bits scaled down, not clipped to white
    first = np.asarray(load_rgb(folder / "animated.gif"), dtype=np.int16)
    with Image.open(folder / "animated.gif") as gif:
        gif.seek(1)
        second = np.asarray(gif.convert("RGB"), dtype=np.int16)
    assert np.abs(first - second).mean() > 5  # the first frame, not a later one
    assert load_rgb(folder / "color_cmyk.jpg").mode == "RGB"


def test_a_run_output_folder_inside_the_data_folder_is_not_trained_on(photo_image_folder):
    output = photo_image_folder.path / "output" / "my_lora"
    write_image(output / "samples", "step-000100-0.png", photo("rocket.jpg", 96))
    dataset = scan(photo_image_folder.path, output_dir=str(output))
    assert {item.relpath for item in dataset.items} == set(photo_image_folder.usable)
