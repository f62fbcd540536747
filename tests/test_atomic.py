"""Writes never leave a half-written file where a good one was."""
import os

import pytest

from core.atomic import atomic_dir, atomic_path, atomic_write_text, backup_file, is_complete_dir


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"good")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_an_empty_binary_result_never_replaces_a_good_file(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"good")
    with pytest.raises(OSError):
        with atomic_path(target):
            pass
    assert target.read_bytes() == b"good"


def test_a_checkpoint_folder_is_complete_only_when_whole(tmp_path):
    target = tmp_path / "step-000010"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.bin").write_bytes(b"1")
            raise RuntimeError("killed")
    assert not target.exists()
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"1")
    assert is_complete_dir(target)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_backup_before_replacing_metadata(tmp_path):
    target = tmp_path / "metadata.csv"
    atomic_write_text(target, "filename,prompt\na.png,old\n")
    backup = backup_file(target)
    atomic_write_text(target, "filename,prompt\na.png,new\n")
    assert backup.read_text() == "filename,prompt\na.png,old\n"
    assert "new" in target.read_text()
    assert oct(os.stat(target).st_mode)  # a real file
