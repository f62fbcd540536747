"""The Dataset tab's health check and crop preview, on folders of real photographs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.config import TrainConfig
from core.data.health import (bucket_preview, count_tokens, dhash, estimate_tokens, health_check,
                              near_duplicates)
from core.data.image_io import ImageReadError
from core.data.images import DatasetError, scan_image_dataset
from tests.fixtures.image_folders import bomb_png, photo, write_image


def issues_of(report, file, severity=None):
    return [i for i in report.issues if i.file == file and (severity is None or i.severity == severity)]


def test_a_corrupt_jpeg_is_listed_in_the_health_check_and_the_scan_skips_it(mixed_image_folder):
    report = health_check(mixed_image_folder.path, resolution=128)
    [issue] = issues_of(report, "corrupt.jpg", "error")
    assert "skipped" in issue.problem and "truncated" in issue.problem and issue.advice
    skipped = dict(scan_image_dataset(TrainConfig(train_data_dir=str(mixed_image_folder.path))).skipped)
    assert "corrupt.jpg" in skipped


def test_every_broken_file_is_an_error_and_the_counts_add_up(mixed_image_folder):
    report = health_check(mixed_image_folder.path, resolution=128)
    errors = {i.file for i in report.issues if i.severity == "error"}
    assert errors == set(mixed_image_folder.broken)
    assert report.image_count == len(mixed_image_folder.usable) + len(mixed_image_folder.broken)
    assert report.usable_count == len(mixed_image_folder.usable)
    assert sorted(name for name, _, _ in report.sizes) == sorted(mixed_image_folder.usable)
    assert sum(report.formats.values()) == sum(report.modes.values()) == sum(report.buckets.values()) \
        == report.usable_count
    assert report.formats["WEBP"] == 1 and report.formats["BMP"] == 1 and report.modes["CMYK"] == 1
    assert [i.severity for i in report.issues] == sorted((i.severity for i in report.issues),
                                                        key=["error", "warning", "info"].index)


def test_a_text_file_named_png_and_an_empty_file_get_their_own_advice(mixed_image_folder):
    report = health_check(mixed_image_folder.path)
    assert "not one" in issues_of(report, "text_named.png")[0].advice
    assert "0 bytes" in issues_of(report, "empty.png")[0].problem
    assert "64 px" in issues_of(report, "tiny.png")[0].advice


def test_damage_inside_a_png_that_the_quick_scan_cannot_see_is_found(tmp_path):
    path = tmp_path / "inside.png"
    write_image(tmp_path, path.name, photo("astronaut.png", 128).convert("RGB"))
    data = bytearray(path.read_bytes())
    data[200:260] = bytes(60)  # zero part of the compressed pixels; the file's end is intact
    path.write_bytes(bytes(data))
    write_image(tmp_path, "fine.png", photo("coffee.png", 128))
    report = health_check(tmp_path, resolution=64)
    assert [i.file for i in report.issues if i.severity == "error"] == ["inside.png"]
    assert report.usable_count == 1


def test_small_images_are_flagged_as_upscaled_only_when_they_must_grow(mixed_image_folder):
    at_128 = health_check(mixed_image_folder.path, resolution=128)
    upscaled = {i.file for i in at_128.issues if "upscaled" in i.problem}
    assert "sub/nested.jpg" in upscaled  # 96 x 96 for a 128 x 128 bucket
    assert "astronaut.jpg" not in upscaled  # 128 x 128 already
    at_64 = health_check(mixed_image_folder.path, resolution=64)
    assert not any("upscaled" in i.problem for i in at_64.issues)


def test_an_extreme_panorama_warns_about_its_thin_bucket_or_the_square_crop(mixed_image_folder):
    bucketed = health_check(mixed_image_folder.path, resolution=128)
    [issue] = [i for i in issues_of(bucketed, "panorama.jpg") if "aspect" in i.problem]
    assert "4.0:1" in issue.problem and "256x64 bucket" in issue.problem
    assert bucketed.buckets["256x64"] == 1
    squared = health_check(mixed_image_folder.path, resolution=128, bucketing=False)
    [issue] = [i for i in issues_of(squared, "panorama.jpg") if "aspect" in i.problem]
    assert "keeps only 25%" in issue.problem
    assert squared.buckets == {"128x128": squared.usable_count}


def test_a_near_duplicate_names_both_files_and_different_photos_do_not(mixed_image_folder):
    report = health_check(mixed_image_folder.path, resolution=128)
    duplicates = [i for i in report.issues if "near-duplicate" in i.problem]
    assert len(duplicates) == 1
    [issue] = duplicates
    assert issue.file == "astronaut_copy.jpg" and "astronaut.jpg" in issue.problem
    assert "astronaut.jpg" in issue.advice and "astronaut_copy.jpg" in issue.advice


def test_dhash_is_stable_under_resizing_and_far_between_different_photos():
    cat = photo("chelsea.png", 256)
    same = dhash(cat), dhash(cat.resize((128, 85)))
    assert bin(same[0] ^ same[1]).count("1") <= 4
    other = dhash(photo("rocket.jpg", 256))
    assert bin(same[0] ^ other).count("1") > 10
    assert near_duplicates([("a", 0b1111), ("b", 0b1100), ("c", ~0 & (2**64 - 1))]) == [("a", "b", 2)]


def test_images_that_will_be_converted_are_noted_as_info(mixed_image_folder):
    report = health_check(mixed_image_folder.path, resolution=128)

    def info(name):
        return " ".join(i.problem for i in issues_of(report, name, "info"))

    assert "transparent parts become white" in info("logo_rgba.png")
    assert "transparent parts become white" in info("horse_palette.png")
    assert "CMYK" in info("color_cmyk.jpg")
    assert "greyscale" in info("camera_grey.png")
    assert "16-bit" in info("moon_16bit.png")
    assert "first frame" in info("animated.gif")
    assert info("astronaut.jpg") == ""


def test_metadata_problems_are_listed_with_their_lines(mixed_image_folder):
    report = health_check(mixed_image_folder.path)
    problems = [i.problem for i in issues_of(report, "metadata.csv")]
    assert any("line 18" in p and "missing_file.png" in p for p in problems)
    assert any("line 19" in p and "chelsea.webp" in p and "again" in p for p in problems)
    [missing] = issues_of(report, "rocket.bmp", "warning")[-1:]
    assert "missing caption" in missing.problem
    assert report.caption_source == "metadata"


def test_a_broken_metadata_file_is_an_error_not_a_crash(photo_image_folder):
    (photo_image_folder.path / "metadata.csv").write_text("name;caption\n", encoding="utf-8")
    report = health_check(photo_image_folder.path)
    [issue] = issues_of(report, "metadata.csv", "error")
    assert "filename,prompt" in issue.problem


def test_txt_caption_problems_are_listed_per_file(txt_caption_folder):
    report = health_check(txt_caption_folder.path, resolution=64)
    assert report.caption_source == "txt"
    assert any("not UTF-8" in i.problem for i in issues_of(report, "coffee.txt"))
    assert any("empty caption" in i.problem for i in issues_of(report, "moon.png"))
    assert any("missing caption" in i.problem for i in issues_of(report, "rocket.jpg"))
    assert not issues_of(report, "cat.png")


def test_a_folder_without_any_captions_gets_one_warning_not_one_per_image(photo_image_folder):
    (photo_image_folder.path / "metadata.csv").unlink()
    report = health_check(photo_image_folder.path, resolution=64)
    caption_issues = [i for i in report.issues if "caption" in i.problem]
    assert len(caption_issues) == 1 and "no captions" in caption_issues[0].problem
    assert report.caption_source == "none"


def test_long_captions_are_counted_with_the_tokenizer_or_estimated_with_about(photo_image_folder):
    long_caption = ", ".join(f"detail number {n}" for n in range(30))
    (photo_image_folder.path / "metadata.csv").write_text(
        f'filename,prompt\ncoffee.png,"{long_caption}"\nchelsea.png,a cat\n', encoding="utf-8")
    estimated = health_check(photo_image_folder.path, resolution=64)
    [issue] = [i for i in estimated.issues if "tokens" in i.problem]
    assert issue.file == "coffee.png" and "about" in issue.problem and "77" in issue.problem

    class WordTokenizer:  # the shape of a transformers tokenizer: text -> {"input_ids": [...]}
        def __call__(self, text):
            return {"input_ids": [0] + [1] * len(text.split()) + [2]}

    counted = health_check(photo_image_folder.path, resolution=64, tokenizer=WordTokenizer(), max_tokens=77)
    [issue] = [i for i in counted.issues if "tokens" in i.problem]
    assert f"is {len(long_caption.split()) + 2} tokens" in issue.problem and "about" not in issue.problem
    roomy = health_check(photo_image_folder.path, resolution=64, tokenizer=WordTokenizer(), max_tokens=200)
    assert not any("tokens" in i.problem for i in roomy.issues)


def test_the_token_estimate_is_conservative():
    assert estimate_tokens("a cat") == 4
    assert estimate_tokens("a cat, tabby.") == 7
    assert estimate_tokens("一杯咖啡") == 2 + 8

    class Encoded:
        ids = [1, 2, 3]

    class FastTokenizer:  # a `tokenizers.Tokenizer`: encode(text).ids, not callable
        def encode(self, text):
            return Encoded()

    assert count_tokens("anything", FastTokenizer()) == 3


def test_a_decompression_bomb_is_an_error_in_the_health_check(photo_image_folder):
    bomb_png(photo_image_folder.path / "bomb.png")
    report = health_check(photo_image_folder.path, resolution=64)
    [issue] = issues_of(report, "bomb.png", "error")
    assert "too large" in issue.problem and "16384" in issue.advice


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        health_check(tmp_path / "nope")


def test_the_issue_table_rows_are_plain_strings_for_the_gui(mixed_image_folder):
    report = health_check(mixed_image_folder.path, resolution=128)
    rows = report.rows()
    assert len(rows) == len(report.issues) and all(len(r) == 4 and all(isinstance(c, str) for c in r) for r in rows)
    assert report.count("error") == len(mixed_image_folder.broken)


# --- crop preview ------------------------------------------------------------------------

def test_the_preview_of_a_panorama_in_its_own_bucket_cuts_nothing(mixed_image_folder):
    image, sentence = bucket_preview(mixed_image_folder.path / "panorama.jpg", 128)
    assert sentence == "256x64 -> bucket 256x64, 0% cut"
    assert image.size == (256, 64)


def test_the_square_crop_preview_dims_what_is_cut_and_says_how_much(mixed_image_folder):
    path = mixed_image_folder.path / "panorama.jpg"
    image, sentence = bucket_preview(path, 128, bucketing=False)
    assert sentence.startswith("center crop to 128x128 cuts 75% from the sides")
    original = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    shown = np.asarray(image, dtype=np.float32)
    assert shown[:, :80].mean() < 0.5 * original[:, :80].mean()  # left part dimmed
    assert abs(shown[8:56, 104:152].mean() - original[8:56, 104:152].mean()) < 2  # kept part as is


def test_the_preview_says_whether_the_sides_or_top_and_bottom_are_cut(tmp_path):
    wide = photo("rocket.jpg", 256)
    write_image(tmp_path, "wide.png", wide)
    write_image(tmp_path, "tall.png", wide.transpose(Image.Transpose.ROTATE_90))
    assert "from the sides" in bucket_preview(tmp_path / "wide.png", 128, bucketing=False)[1]
    assert "from top and bottom" in bucket_preview(tmp_path / "tall.png", 128, bucketing=False)[1]


def test_the_preview_of_a_large_photo_is_shrunk_for_the_screen_and_names_its_bucket(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (1024, 768), (90, 120, 200)).save(path)
    image, sentence = bucket_preview(path, 512)
    assert max(image.size) == 512
    assert sentence.startswith("1024x768 -> bucket 576x448, ") and "% cut" in sentence


def test_the_preview_of_an_unreadable_file_raises_a_friendly_error(mixed_image_folder):
    with pytest.raises(ImageReadError, match="corrupt.jpg"):
        bucket_preview(mixed_image_folder.path / "corrupt.jpg", 128)



def test_a_real_clip_tokenizer_counts_the_tokens_the_text_encoder_sees(photo_image_folder):
    from core.families.tiny_parts import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # a real CLIPTokenizer, one token per character
    caption = "a cat sitting on a red sofa in the evening light, film grain, soft focus"
    assert count_tokens(caption, tokenizer) == len(tokenizer(caption)["input_ids"]) > 50
    (photo_image_folder.path / "metadata.csv").write_text(f'filename,prompt\ncoffee.png,"{caption}"\n',
                                                         encoding="utf-8")
    report = health_check(photo_image_folder.path, resolution=64, tokenizer=tokenizer, max_tokens=40)
    [issue] = [i for i in report.issues if "tokens" in i.problem]
    assert issue.file == "coffee.png" and f"is {count_tokens(caption, tokenizer)} tokens" in issue.problem
