"""The family packages may move (issue 21), the files a user gets must not: for the same config and seed,
each family's two LoRA files (the kohya-style one WebUI / Forge / ComfyUI load, and diffusers'
pytorch_lora_weights.safetensors) are byte for byte the golden files written before the move, apart
from the metadata values that change on every run (golden_outputs.VOLATILE_METADATA says which, and why).

Regenerate with `python -m tests.families.make_golden` only when an output is meant to change.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from tests.families.golden_outputs import (
    DIFFUSERS_FILE, ENVIRONMENT_FILE, FAMILIES, PLACEHOLDER, VOLATILE_METADATA, compare_files, environment_differences,
    golden_files, kohya_file_name, read_parts, train_family,
)


def _exact() -> bool:
    """Byte for byte on the machine and libraries that wrote the golden files; by value elsewhere."""
    differences = environment_differences()
    if differences:
        warnings.warn(f"Golden LoRA files compared by value (rtol 1e-5, atol 1e-6), not byte for byte: this machine "
                      f"differs from {ENVIRONMENT_FILE.name} ({'; '.join(differences)}).", stacklevel=2)
    return not differences


def assert_outputs_unchanged(family: str, tmp_path: Path) -> None:
    out = train_family(family, tmp_path)
    exact = _exact()
    how = "byte for byte" if exact else f"by value only ({'; '.join(environment_differences())})"
    fresh = (out / kohya_file_name(family), out / DIFFUSERS_FILE)
    for new, golden in zip(fresh, golden_files(family)):
        problems = compare_files(new, golden, exact=exact)
        assert not problems, (
            f"{FAMILIES[family].label}: {golden.name} is no longer what it was before the family move (compared {how}):\n  "
            + "\n  ".join(problems[:20])
            + "\nIf this change is meant, regenerate with `python -m tests.families.make_golden "
            + f"{family}` and say why in the commit.")


def test_an_sd15_lora_is_byte_for_byte_what_it_was_before_the_family_move(tmp_path):
    assert_outputs_unchanged("sd1", tmp_path)


def test_an_sdxl_lora_is_byte_for_byte_what_it_was_before_the_family_move(tmp_path):
    assert_outputs_unchanged("sdxl", tmp_path)


def test_a_flux_lora_is_byte_for_byte_what_it_was_before_the_family_move(tmp_path):
    assert_outputs_unchanged("flux-dev", tmp_path)


def test_a_chroma_lora_is_byte_for_byte_what_it_was_before_the_family_move(tmp_path):
    assert_outputs_unchanged("chroma", tmp_path)


def test_an_sd3_lora_is_byte_for_byte_what_it_was_before_the_family_move(tmp_path):
    assert_outputs_unchanged("sd3", tmp_path)


def test_a_z_image_lora_is_byte_for_byte_what_it_was_before_the_family_move(tmp_path):
    assert_outputs_unchanged("z-image", tmp_path)


def test_a_qwen_image_lora_is_byte_for_byte_what_it_was_before_the_family_move(tmp_path):
    assert_outputs_unchanged("qwen-image", tmp_path)


def test_a_flux2_klein_lora_is_byte_for_byte_what_it_was_when_the_family_was_added(tmp_path):
    assert_outputs_unchanged("flux2-klein-4b", tmp_path)


def test_a_krea2_lora_is_byte_for_byte_what_it_was_when_the_family_was_added(tmp_path):
    assert_outputs_unchanged("krea2", tmp_path)


def test_a_wan_lora_is_byte_for_byte_what_it_was_when_the_family_was_added(tmp_path):
    assert_outputs_unchanged("wan2.1-t2v-1.3b", tmp_path)


# --- the comparison itself can fail ------------------------------------------------------------

def _rewrite(source: Path, target: Path, *, metadata: dict[str, str] | None = None, flip: tuple[int, int] | None = None):
    """A copy of a golden file with some metadata values replaced and/or one data byte flipped."""
    import json
    import struct

    parts = read_parts(source)
    raw = bytearray(parts.data)
    if flip is not None:
        raw[flip[0]] ^= flip[1]
    header = {"__metadata__": {**parts.metadata, **(metadata or {})}, **dict(parts.tensors)}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    target.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(raw))
    return target


def test_a_flipped_bit_or_a_changed_metadata_value_is_caught_but_a_new_session_id_is_not(tmp_path):
    kohya, _ = golden_files("flux-dev")
    # A rewritten header (other metadata order, other session id and times) with the same tensors: unchanged.
    volatile = {key: "12345" for key in VOLATILE_METADATA}
    assert compare_files(_rewrite(kohya, tmp_path / "same.safetensors", metadata=volatile), kohya) == []

    # fp32, little-endian: byte 100 holds the lowest mantissa bits of a float, byte 103 its sign bit.
    flipped = compare_files(_rewrite(kohya, tmp_path / "bit.safetensors", flip=(100, 0x01)), kohya)
    assert len(flipped) == 1 and flipped[0].startswith("data bytes differ, first at byte 100"), flipped
    # By value (another CPU), a last-bit difference is within tolerance; a flipped sign is not.
    assert compare_files(tmp_path / "bit.safetensors", kohya, exact=False) == []
    assert compare_files(_rewrite(kohya, tmp_path / "sign.safetensors", flip=(103, 0x80)), kohya, exact=False)

    alpha = compare_files(_rewrite(kohya, tmp_path / "alpha.safetensors", metadata={"ss_network_alpha": "8"}), kohya)
    assert alpha == ["metadata 'ss_network_alpha': '8' != golden '4'"]
    assert PLACEHOLDER not in "".join(alpha)

    # Another family's file: other tensor names (and other metadata).
    problems = compare_files(golden_files("sd3")[0], kohya)
    assert problems[0].startswith("tensor names or order differ"), problems


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_has_both_golden_files_small_enough_to_keep_in_git(family):
    for path in golden_files(family):
        assert path.is_file(), f"{path} is missing: run `python -m tests.families.make_golden {family}`."
        assert path.stat().st_size < 256 * 1024
