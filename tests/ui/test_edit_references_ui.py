"""The app with an edit data set of several references: the Dataset tab shows each target after its
references in one row of thumbnails, counts the pairs and the plain images, and its health check names a
missing or unreadable reference; the Test tab passes the uploaded reference images on in order."""
from __future__ import annotations

from PIL import Image

from tests.fixtures.edit_data import make_edit_folder


def test_the_dataset_tab_shows_each_target_beside_its_references_and_names_bad_ones(tmp_path, monkeypatch):
    import ui.thumbs
    from ui import dataset_tab

    monkeypatch.setattr(ui.thumbs, "CACHE_DIR", tmp_path / "cache")
    data = make_edit_folder(tmp_path / "edits", pairs=3, references=2, plain=1)
    (data / "control_2" / "pair_1.png").write_bytes(b"not an image")   # unreadable
    (data / "control_2" / "pair_2.png").unlink()                        # missing
    summary, gallery, health, _, paths, *_ = dataset_tab.open_dataset(str(data), 64)
    assert "Edit pairs: 3 target(s) with reference images (1 with 1, 2 with 2), 1 plain image(s)" in summary
    # No reference image is offered as a training image; the plain image shows alone.
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["pair_0.png", "pair_1.png", "pair_2.png", "plain_0.png"]
    captions = {caption.split(" · ")[0]: (thumb, caption) for thumb, caption in gallery}
    strip, caption = captions["pair_0.png"]
    assert caption.endswith("after its 2 reference(s): control/pair_0.png, control_2/pair_0.png")
    single = Image.open(captions["plain_0.png"][0])
    assert Image.open(strip).width > 2.5 * single.width  # references, then the target, in one row
    assert "after its" not in captions["plain_0.png"][1]
    assert Image.open(captions["pair_1.png"][0]).width == single.width  # an unreadable reference: the target alone
    problems = {(row[1], row[0]): row[2] for row in health}
    assert "reference image unreadable" in problems[("control_2/pair_1.png", "error")]
    assert "control_2/pair_2.*" in problems[("pair_2.png", "warning")]


def test_the_test_tab_passes_the_uploaded_references_in_order(monkeypatch):
    from ui import tryout_tab

    seen = {}

    def fake_target(base, loras, prompt, paths, **options):
        seen.update(options)
        return lambda ctx: None

    monkeypatch.setattr("core.tryout.generate_target", fake_target)
    monkeypatch.setattr(tryout_tab, "ensure_device_free", lambda: None)
    monkeypatch.setattr(tryout_tab, "image_paths", lambda base, lora: (base, None))
    monkeypatch.setattr(tryout_tab, "start_job", lambda target, kind, name: "")
    _, message = tryout_tab.generate_with_references("klein", "", "put the hat on", "", 0.8, 1, 4, 1.0, 64, 1,
                                                     ["/up/cat.png", "/up/hat.png"])
    assert message.startswith("Generating") and seen["references"] == ["/up/cat.png", "/up/hat.png"]
    seen.clear()
    tryout_tab.generate_with_references("klein", "", "a cat", "", 0.8, 1, 4, 1.0, 64, 1, None)
    assert "references" not in seen
