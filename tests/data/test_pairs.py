"""Paired data sets (control + target + caption): found from a control/ folder or a metadata.csv control
column, listed by the health check when missing, unreadable or of another size, and never trained on as
targets themselves."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from core.config import config_from_dict
from core.data.health import health_check
from core.data.images import scan_image_dataset
from core.data.pairs import find_controls, pair_issues


def make_pairs(folder: Path, count: int = 3, *, size=(64, 64), column: bool = False) -> Path:
    """`count` targets with captions, and a control for each (a control/ folder or a control column)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["filename,prompt" + (",control" if column else "")]
    for i in range(count):
        Image.new("RGB", size, (40 * i, 100, 200)).save(folder / f"img_{i}.png")
        where = folder / ("sources" if column else "control")
        where.mkdir(exist_ok=True)
        Image.new("RGB", size, (200, 40 * i, 10)).save(where / f"img_{i}.jpg")
        rows.append(f"img_{i}.png,make it blue {i}" + (f",sources/img_{i}.jpg" if column else ""))
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def _cfg(folder: Path):
    return config_from_dict({"base_model": "x", "train_data_dir": str(folder), "output_dir": str(folder / "out")},
                            check_paths=False)


def test_a_control_folder_pairs_by_stem_and_is_not_scanned_as_targets(tmp_path):
    data = make_pairs(tmp_path / "d")
    dataset = scan_image_dataset(_cfg(data))
    assert [i.path.name for i in dataset.items] == ["img_0.png", "img_1.png", "img_2.png"]
    assert [i.control.relative_to(data).as_posix() for i in dataset.items] == [
        "control/img_0.jpg", "control/img_1.jpg", "control/img_2.jpg"]


def test_a_metadata_control_column_pairs_by_name(tmp_path):
    data = make_pairs(tmp_path / "d", column=True)
    scan = find_controls(data, sorted(data.glob("img_*.png")), data / "metadata.csv")
    assert scan.has_pairs and not scan.missing
    assert {p.name: c.relative_to(data).as_posix() for p, c in scan.controls.items()}["img_1.png"] == \
        "sources/img_1.jpg"
    dataset = scan_image_dataset(_cfg(data))  # the named controls are not training targets themselves
    assert [(i.path.name, i.control.name) for i in dataset.items] == [
        ("img_0.png", "img_0.jpg"), ("img_1.png", "img_1.jpg"), ("img_2.png", "img_2.jpg")]


def test_a_plain_data_set_has_no_pairs(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    assert not find_controls(folder, [folder / "a.png"]).has_pairs
    assert scan_image_dataset(_cfg(folder)).items[0].control is None
    assert pair_issues(folder, [folder / "a.png"]) == []


def test_the_health_check_lists_missing_unreadable_and_mismatched_controls(tmp_path):
    data = make_pairs(tmp_path / "d", count=4)
    (data / "control" / "img_0.jpg").unlink()                          # missing
    (data / "control" / "img_1.jpg").write_bytes(b"not an image")      # unreadable
    Image.new("RGB", (96, 64)).save(data / "control" / "img_2.jpg")    # another shape
    Image.new("RGB", (128, 128)).save(data / "control" / "img_3.jpg")  # same shape, other size
    report = health_check(data, resolution=64)
    rows = {(i.file, i.severity): i.problem for i in report.issues}
    assert "no control image" in rows[("img_0.png", "warning")]
    assert "control image unreadable" in rows[("control/img_1.jpg", "error")]
    assert "differ in shape" in rows[("img_2.png", "warning")]
    assert rows[("img_3.png", "info")].startswith("control 128x128 and target 64x64 differ")
    assert report.image_count == 4  # the control/ folder is not counted as training images


def test_the_caption_tab_captions_the_targets_and_leaves_the_control_images_alone(tmp_path):
    from core.caption.run import find_images

    data = make_pairs(tmp_path / "d")
    assert [p.relative_to(data).as_posix() for p in find_images(data)] == ["img_0.png", "img_1.png", "img_2.png"]


def test_a_target_may_have_several_references_in_control_n_folders_or_columns(tmp_path):
    """control/, control_2/, control_3/ folders (or control, control_2 ... columns): a target's references in order;
    none of them is a training target; a missing or unreadable further reference is named by the health check."""
    data = make_pairs(tmp_path / "d")
    for n in (2, 3):
        (data / f"control_{n}").mkdir()
        for i in range(3 if n == 2 else 2):  # img_2 lacks its third reference
            Image.new("RGB", (64, 64), (n * 30, i, 0)).save(data / f"control_{n}" / f"img_{i}.png")
    dataset = scan_image_dataset(_cfg(data))
    assert [i.path.name for i in dataset.items] == ["img_0.png", "img_1.png", "img_2.png"]
    assert [[r.relative_to(data).as_posix() for r in i.references] for i in dataset.items] == [
        ["control_2/img_0.png", "control_3/img_0.png"], ["control_2/img_1.png", "control_3/img_1.png"],
        ["control_2/img_2.png"]]
    assert dataset.items[0].control.relative_to(data).as_posix() == "control/img_0.jpg"
    (data / "control_2" / "img_1.png").write_bytes(b"not an image")
    issues = pair_issues(data, sorted(data.glob("img_*.png")))
    assert any(f == "img_2.png" and "control_3/img_2.*" in problem for f, _, problem, _ in issues), issues
    assert any(f == "control_2/img_1.png" and sev == "error" for f, sev, _, _ in issues), issues
    report = health_check(str(data))
    assert "control_3/img_2.*" in str(report)


def test_control_n_columns_name_further_references(tmp_path):
    data = make_pairs(tmp_path / "d", column=True)
    (data / "more").mkdir()
    Image.new("RGB", (64, 64)).save(data / "more" / "a.png")
    rows = (data / "metadata.csv").read_text().splitlines()
    rows = [rows[0] + ",control_2"] + [r + (",more/a.png" if i == 0 else ",more/missing.png" if i == 1 else ",")
                                       for i, r in enumerate(rows[1:])]
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    scan = find_controls(data, sorted(data.glob("img_*.png")), data / "metadata.csv")
    assert {p.name: [r.name for r in refs] for p, refs in scan.references.items()} == {"img_0.png": ["a.png"]}
    assert [(p.name, named) for p, named in scan.missing_references] == [("img_1.png", "more/missing.png")]
