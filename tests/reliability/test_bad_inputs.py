"""Bad input of every kind gets a message naming the file, key or line, and what to do.

Nothing crashes, nothing is lost. Each case is one row a user could hit.
"""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from PIL import Image

from core.config import ConfigError, config_from_dict, load_config
from core.data.captions import CaptionFileError, read_metadata_csv
from core.data.image_io import ImageReadError, load_rgb, probe_image


# --- images --------------------------------------------------------------------------------

def _png(path: Path, mode: str = "RGB", size=(32, 24)) -> Path:
    Image.new(mode, size).save(path)
    return path


def _bomb(path: Path) -> Path:
    """A valid PNG header claiming 40000 x 40000 pixels (1.6 GP) with almost no data."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("case, make, words", [
    ("zero-byte image", lambda p: (p / "empty.png").write_bytes(b"") and p / "empty.png" or p / "empty.png",
     "empty"),
    ("text file named .png", lambda p: (p / "notes.png").write_text("hello") and p / "notes.png", "not a readable image"),
    ("truncated JPEG", lambda p: _truncated_jpeg(p / "cut.jpg"), "damaged"),
    ("decompression bomb", lambda p: _bomb(p / "bomb.png"), "too large"),
])
def test_unusable_images_are_named_with_what_to_do(tmp_path, case, make, words):
    path = make(tmp_path)
    with pytest.raises(ImageReadError) as err:
        load_rgb(path)
    assert path.name in str(err.value) and words in str(err.value), case


def _truncated_jpeg(path: Path) -> Path:
    Image.effect_noise((128, 128), 60).convert("RGB").save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    image = Image.new(mode, (20, 10))
    path = tmp_path / f"img.{'tiff' if mode in ('CMYK', 'F', 'I') else 'png'}"
    image.save(path)
    assert load_rgb(path).mode == "RGB" and load_rgb(path).size == (20, 10)


def test_animated_gif_and_webp_use_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    for ext in ("gif", "webp"):
        path = tmp_path / f"anim.{ext}"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        assert probe_image(path).frames == 2
        red, green, _ = load_rgb(path).getpixel((8, 8))
        assert red > 200 and green < 60


# --- metadata.csv -----------------------------------------------------------------------------

def test_metadata_with_bom_crlf_quotes_and_chinese_reads_right(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_bytes('\ufefffilename,prompt\r\na.png,"a cat, ""sitting"""\r\nb.png,一只猫\r\n'.encode("utf-8"))
    rows = read_metadata_csv(path).captions
    assert rows == {"a.png": 'a cat, "sitting"', "b.png": "一只猫"}


def test_metadata_with_wrong_columns_names_the_file_and_line(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_text("image_name;description\na.png;cat\n", encoding="utf-8")
    with pytest.raises(CaptionFileError) as err:
        read_metadata_csv(path)
    assert "metadata.csv, line 1" in str(err.value) and "filename,prompt" in str(err.value)


def test_metadata_in_gbk_is_read_with_a_warning(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_bytes("filename,prompt\na.png,一只可爱的小猫在窗边睡觉\n".encode("gbk"))
    read = read_metadata_csv(path)
    assert read.captions["a.png"] == "一只可爱的小猫在窗边睡觉"
    assert any("not UTF-8" in w for w in read.warnings)


def test_duplicate_and_short_rows_are_warned_about_not_fatal(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_text("filename,prompt\na.png,one\na.png,two\nb.png\n", encoding="utf-8")
    read = read_metadata_csv(path)
    assert read.captions == {"a.png": "two"}
    assert any("twice" in w for w in read.warnings) and any("line 4" in w for w in read.warnings)


# --- YAML and config ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, key, words", [
    ({"lora_rank": 0}, "lora_rank", "too small"),
    ({"batch_size": -2}, "batch_size", "too small"),
    ({"resolution": 500}, "resolution", "multiple of 64"),
    ({"learning_rate": "fast"}, "learning_rate", "number"),
    ({"epochs": "ten"}, "epochs", "whole number"),
    ({"bucketing": "maybe"}, "bucketing", "true or false"),
    ({"mixed_precision": "fp8"}, "mixed_precision", "choose one of"),
    ({"batchsize": 4}, "batchsize", "batch_size"),
    ({"sample_prompts": {"a": 1}}, "sample_prompts", "list"),
])
def test_wrong_config_values_name_the_key(tmp_path, raw, key, words):
    base = {"train_data_dir": str(tmp_path), "base_model": "org/model"}
    with pytest.raises(ConfigError) as err:
        config_from_dict({**base, **raw})
    assert key in err.value.errors and words in err.value.errors[key]


def test_yaml_that_is_not_a_mapping_or_broken_says_where(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    path.write_text("lora_rank: [8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line"):
        load_config(path)


# --- base models -------------------------------------------------------------------------------------

def test_a_folder_of_something_else_as_base_model_is_explained(tmp_path):
    folder = tmp_path / "holiday_photos"
    folder.mkdir()
    _png(folder / "beach.png")
    cfg = config_from_dict({"train_data_dir": str(tmp_path), "base_model": str(folder)})
    with pytest.raises(Exception) as err:
        _load_image_model(cfg)
    assert "holiday_photos" in str(err.value)


def test_a_truncated_safetensors_checkpoint_is_explained(tmp_path, tiny_sd1):
    broken = tmp_path / "model.safetensors"
    data = tiny_sd1.single_file.read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    cfg = config_from_dict({"train_data_dir": str(tmp_path), "base_model": str(broken)})
    with pytest.raises(Exception) as err:
        _load_image_model(cfg)
    text = str(err.value)
    assert "model.safetensors" in text and ("damaged" in text or "truncated" in text or "incomplete" in text)


def _load_image_model(cfg):
    from core.families.sd.load import load_sd_model  # the loader every run takes

    return load_sd_model(cfg.base_model, allow_pickle=cfg.allow_pickle)
