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


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.skipif(os.name == "nt", reason="Unix permissions")
def test_metadata_its_backup_and_a_lora_file_get_the_same_permissions_as_an_image_beside_them(tmp_path, umask_022):
    from core.atomic import save_file_atomic

    import torch

    image = tmp_path / "cat.png"
    image.write_bytes(b"png")  # a plain open(): what the user's other files get
    metadata = atomic_write_text(tmp_path / "metadata.csv", "file_name,text\ncat.png,a cat\n")
    backup = backup_file(metadata)
    lora = save_file_atomic({"w": torch.zeros(2)}, tmp_path / "my_lora.safetensors")
    with atomic_dir(tmp_path / "checkpoints" / "step-000010") as folder:
        (folder / "state.txt").write_text("x")
    assert _mode(image) == 0o644
    assert [_mode(p) for p in (metadata, backup, lora)] == [0o644, 0o644, 0o644]
    assert _mode(tmp_path / "checkpoints" / "step-000010") == 0o755


@pytest.mark.skipif(os.name == "nt", reason="Unix permissions")
def test_a_rewritten_file_keeps_the_permissions_its_owner_gave_it(tmp_path, umask_022):
    private = tmp_path / "metadata.csv"
    private.write_text("old")
    os.chmod(private, 0o600)
    shared = tmp_path / "captions.txt"
    shared.write_text("old")
    os.chmod(shared, 0o664)
    atomic_write_text(private, "new")
    atomic_write_text(shared, "new")
    assert (_mode(private), _mode(shared)) == (0o600, 0o664)
    assert _mode(backup_file(private)) == 0o600  # a backup is as private as the file it saves


@pytest.mark.skipif(os.name == "nt", reason="Unix permissions")
def test_a_stricter_umask_is_followed_too(tmp_path):
    old = os.umask(0o027)
    try:
        written = atomic_write_text(tmp_path / "notes.txt", "x")
    finally:
        os.umask(old)
    assert _mode(written) == 0o640
