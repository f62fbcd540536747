"""Captioner registry, the from-filename captioner, caption joining, and the GIT / chat-VLM families."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.caption import (CAPTIONERS, CaptionerLoadError, CaptionerNotFoundError, CaptionOptions,
                          caption_folder, caption_from_filename, find_images, join_caption, load_captioner,
                          resolve_captioner)
from core.caption.models import clean_caption
from core.caption.registry import family_from_config
from core.data.image_io import load_rgb


@pytest.mark.parametrize("name, expected", [
    ("red_dragon_02.png", "red dragon"),
    ("Blue-Car (3).jpg", "blue car"),
    ("oldTownStreet.webp", "old town street"),
    ("a 3d render v2 - Copy.png", "a 3d render"),
    ("castle.at.night_0007.jpg", "castle at night"),
    ("IMG_1234.jpg", ""),
    ("PXL_20240101T123456.jpg", ""),
    ("猫_01.png", "猫"),
])
def test_the_filename_captioner_turns_file_names_into_words(name, expected):
    assert caption_from_filename(name) == expected


@pytest.mark.parametrize("prefix, caption, suffix, expected", [
    ("sks", "a cat on a mat", "", "sks, a cat on a mat"),
    ("sks style,", "a cat, sitting", ", best quality", "sks style, a cat, sitting, best quality"),
    ("", "  a cat  ", "", "a cat"),
    ("sks", "sks, a cat", "", "sks, a cat"),  # already there: not stacked
    ("sks", "a cat", "hd", "sks, a cat, hd"),
])
def test_prefix_and_suffix_join_a_caption_with_single_commas(prefix, caption, suffix, expected):
    assert join_caption(prefix, caption, suffix) == expected


def test_blip_artefacts_and_stray_spaces_are_cleaned_from_captions():
    assert clean_caption("arafed man   riding a horse\n") == "man riding a horse"
    assert clean_caption("there is a araffe dog ,") == "there is a dog"


def test_every_short_name_maps_to_a_hub_id_and_a_family():
    assert {"blip-base", "blip-large", "git-base", "git-large", "florence-2-base", "florence-2-large",
            "filename"} <= set(CAPTIONERS)
    assert any(spec.family == "vlm" for spec in CAPTIONERS.values())
    for spec in CAPTIONERS.values():
        if spec.family != "filename":
            assert spec.model_id.count("/") == 1, spec
        if spec.family in ("florence2", "vlm"):
            assert spec.prompt, spec
    assert CAPTIONERS["blip-base"].model_id == "Salesforce/blip-image-captioning-base"


@pytest.mark.parametrize("model_type, family", [
    ("blip", "blip"), ("git", "git"), ("florence2", "florence2"), ("smolvlm", "vlm"), ("qwen2_vl", "vlm"),
    ("qwen2_5_vl", "vlm"), ("llava", "vlm")])
def test_a_model_folder_family_is_read_from_its_config(model_type, family):
    assert family_from_config({"model_type": model_type}, "x") == (family, False)


def test_a_text_only_model_is_refused_as_a_captioner(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    with pytest.raises(CaptionerNotFoundError, match="not an image captioner"):
        resolve_captioner(str(tmp_path))


def test_florence2_with_its_own_code_needs_an_explicit_opt_in(tmp_path):
    # Microsoft's original Florence-2 repos carry Python code (auto_map); it must never run silently.
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "florence2", "auto_map": {"AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"}}),
        encoding="utf-8")
    resolved = resolve_captioner(str(tmp_path))
    assert resolved.family == "florence2" and resolved.remote_code
    with pytest.raises(CaptionerLoadError, match="--trust-remote-code"):
        load_captioner(str(tmp_path), device="cpu")


def test_native_florence2_is_available_in_the_installed_transformers():
    import transformers

    assert hasattr(transformers, "Florence2ForConditionalGeneration")


def test_find_images_reads_sub_folders_like_training_and_skips_hidden_and_other_files(tmp_path):
    for name in ("b.png", "A.JPG", ".hidden.png", "notes.txt", "sub/c.webp", ".cache/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in find_images(tmp_path, recursive=False)] == ["A.JPG", "b.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == [
        "A.JPG", "b.png", "sub/c.webp"]


def test_captions_of_images_in_sub_folders_use_relative_names(tmp_path):
    from PIL import Image

    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "black_cat.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "white_dog.png")
    result = caption_folder(CaptionOptions(input_dir=tmp_path, model="filename", recursive=True))
    assert result.captions == {"cats/black_cat.png": "black cat", "white_dog.png": "white dog"}


@pytest.mark.parametrize("fixture", ["tiny_git_dir", "tiny_florence2_dir", "tiny_llava_dir"])
def test_git_florence2_and_chat_vlm_captioners_batch_exactly_like_one_at_a_time(fixture, request, caption_photo_folder):
    folder, names = caption_photo_folder
    captioner = load_captioner(str(request.getfixturevalue(fixture)), device="cpu")
    paths = [folder / name for name in names["good"][:5]]  # grey, RGB, 16-bit, EXIF-rotated, CMYK
    images = [load_rgb(path) for path in paths]
    batched = captioner.caption_batch(paths, images, 6)
    assert batched == [captioner.caption_batch([p], [i], 6)[0] for p, i in zip(paths, images)]
    assert all(batched) and len(set(batched)) > 1
    # the answer is cut after the prompt: no prompt words leak into the caption
    assert not any(word in caption for caption in batched for word in ("ASSISTANT", "Describe", "<image>"))


def test_a_chat_vlm_captions_a_folder_through_the_same_job(tiny_llava_dir, caption_photo_folder):
    folder, names = caption_photo_folder
    result = caption_folder(CaptionOptions(input_dir=folder, model=str(tiny_llava_dir), max_length=6,
                                           prompt="Describe this image in detail.", batch_size=4))
    assert sorted(result.captions) == names["good"]
    assert list(result.failed) == ["broken.jpg"]


class _SmallMemoryCaptioner:
    """A stand-in for a GPU captioner that runs out of memory above two images at once."""

    name = family = "fake"
    needs_images = True

    def __init__(self) -> None:
        self.calls: list[int] = []

    def caption_batch(self, paths, images=None, max_new_tokens=None, should_stop=None):
        import torch

        self.calls.append(len(paths))
        if len(paths) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [f"picture of {Path(path).stem}" for path in paths]

    def close(self) -> None:
        pass


def test_running_out_of_memory_retries_the_batch_in_halves_and_says_so(caption_photo_folder):
    from core.events import RunContext, WarningEvent

    folder, names = caption_photo_folder
    events: list = []
    fake = _SmallMemoryCaptioner()
    result = caption_folder(CaptionOptions(input_dir=folder, batch_size=8), RunContext(listeners=[events.append]),
                            captioner=fake)
    assert result.captions == {name: f"picture of {Path(name).stem}" for name in names["good"]}
    assert max(fake.calls) > 2 and fake.calls.count(8) == 0  # 7 good images in the first batch of 8
    assert any(isinstance(e, WarningEvent) and "Out of memory" in e.message and e.advice for e in events)


def test_captioner_status_tells_where_the_files_would_come_from(tmp_path):
    from core.caption import captioner_status

    assert captioner_status("filename") == "no model needed"
    assert str(tmp_path / "captioners" / "blip-base") in captioner_status("blip-base", tmp_path)
    (tmp_path / "captioners" / "git-base").mkdir(parents=True)
    (tmp_path / "captioners" / "git-base" / "config.json").write_text("{}", encoding="utf-8")
    assert captioner_status("git-base", tmp_path).startswith("local copy in")


def test_kohya_txt_captions_count_as_existing_and_move_into_a_new_metadata_csv(tmp_path):
    from PIL import Image

    for name in ("cat_photo.png", "brown_dog.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "cat_photo.txt").write_text("my careful caption of a cat\n", encoding="utf-8")
    result = caption_folder(CaptionOptions(input_dir=tmp_path, model="filename", prefix="sks"))
    assert result.kept == {"cat_photo.png": "my careful caption of a cat"}
    assert result.captions == {"brown_dog.png": "sks, brown dog"}
    text = (tmp_path / "metadata.csv").read_text(encoding="utf-8")
    assert text == "filename,prompt\ncat_photo.png,my careful caption of a cat\nbrown_dog.png,\"sks, brown dog\"\n"


def test_an_unreadable_old_metadata_csv_is_backed_up_before_it_is_replaced(tmp_path):
    from PIL import Image

    from core.events import RunContext, WarningEvent

    Image.new("RGB", (8, 8)).save(tmp_path / "red_car.png")
    (tmp_path / "metadata.csv").write_text("these are my notes, not a caption table\n", encoding="utf-8")
    events: list = []
    result = caption_folder(CaptionOptions(input_dir=tmp_path, model="filename"), RunContext(listeners=[events.append]))
    assert result.csv_backup is not None
    assert result.csv_backup.read_text(encoding="utf-8") == "these are my notes, not a caption table\n"
    assert (tmp_path / "metadata.csv").read_text(encoding="utf-8") == "filename,prompt\nred_car.png,red car\n"
    assert any(isinstance(e, WarningEvent) and "backed up" in e.message for e in events)


def test_a_gbk_metadata_csv_keeps_its_chinese_rows_and_is_rewritten_as_utf8(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "red_car.png")
    (tmp_path / "metadata.csv").write_bytes("filename,prompt\n旧图.png,一只红色的猫\n".encode("gbk"))
    caption_folder(CaptionOptions(input_dir=tmp_path, model="filename"))
    assert (tmp_path / "metadata.csv").read_text(encoding="utf-8") == (
        "filename,prompt\n旧图.png,一只红色的猫\nred_car.png,red car\n")
