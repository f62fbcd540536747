"""Video clips beside images in a data set: scan, frame windows, health check, preview clips (PyAV)."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from core.config import ConfigError, TrainConfig, config_from_dict
from core.data.health import health_check
from core.data.images import scan_image_dataset, still_images_only
from core.data.video_io import frame_bucket, frame_windows, probe_video, read_frames, write_clip


def write_test_clip(path: Path, frames: int, size: tuple[int, int] = (96, 64), fps: float = 8.0) -> Path:
    pictures = [Image.new("RGB", size, (20 * i % 255, 90, 200 - 10 * i % 200)) for i in range(frames)]
    return write_clip(pictures, path, fps)


@pytest.fixture()
def clip_folder(tmp_path: Path) -> Path:
    write_test_clip(tmp_path / "walk.mp4", 20)
    write_test_clip(tmp_path / "short.mp4", 6)
    Image.new("RGB", (96, 64), (10, 200, 30)).save(tmp_path / "still.png")
    (tmp_path / "walk.txt").write_text("a person walking")
    (tmp_path / "short.txt").write_text("a short clip")
    (tmp_path / "still.txt").write_text("a still picture")
    return tmp_path


def test_a_clip_written_with_pyav_reads_back_with_its_frame_count_and_fps(tmp_path: Path) -> None:
    info = probe_video(write_test_clip(tmp_path / "c.mp4", 12, fps=12.0))
    assert (info.width, info.height, info.frames, info.fps) == (96, 64, 12, 12.0)
    assert [f.size for f in read_frames(info.path, (0, 11))] == [(96, 64)] * 2


def test_frame_windows_take_4k_plus_1_frames_at_a_stride_or_fps_from_the_head_uniformly_or_sliding() -> None:
    assert frame_windows(40, 16, frames=9) == [tuple(range(9))]
    assert frame_windows(40, 16, frames=9, stride=2) == [tuple(range(0, 18, 2))]
    assert frame_windows(40, 16, frames=5, target_fps=8) == [(0, 2, 4, 6, 8)]
    assert [w[0] for w in frame_windows(40, 16, frames=9, mode="uniform", count=3)] == [0, 16, 31]
    assert [w[0] for w in frame_windows(40, 16, frames=9, mode="slide", count=0)] == [0, 9, 18, 27]
    assert frame_bucket(7, 17) == 5 and frame_bucket(40, 17) == 17 and frame_bucket(1, 17) == 1


def test_a_folder_of_clips_and_images_scans_into_clip_windows_and_stills(clip_folder: Path) -> None:
    cfg = TrainConfig(train_data_dir=str(clip_folder), video_frames=9, video_windows="slide", video_window_count=0)
    data = scan_image_dataset(cfg)
    clips = [i for i in data.items if i.is_clip]
    assert sorted((i.relpath, len(i.frames)) for i in clips) == [("short.mp4", 5), ("walk.mp4", 9),
                                                                 ("walk.mp4", 9)]
    assert [i.caption for i in data.items if not i.is_clip] == ["a still picture"]
    assert any("short.mp4" in w and "shorter than video_frames 9" in w for w in data.warnings)
    kept, dropped = still_images_only(data.items)
    assert [i.relpath for i in kept] == ["still.png"] and sorted(dropped) == ["short.mp4", "walk.mp4"]


def test_the_health_check_names_unreadable_clips_short_clips_and_mixed_aspect_ratios(clip_folder: Path) -> None:
    (clip_folder / "broken.mp4").write_bytes(b"not a video at all")
    write_test_clip(clip_folder / "tall.mp4", 20, size=(64, 96))
    report = health_check(clip_folder, resolution=64, video_frames=17)
    by_file = {(i.file, i.severity): i.problem for i in report.issues}
    assert "will be skipped" in by_file[("broken.mp4", "error")]
    assert "too short for video_frames 17" in by_file[("short.mp4", "warning")]
    assert "aspect ratios" in by_file[("(clips)", "warning")]
    assert {c.path.name for c in report.clips} == {"walk.mp4", "short.mp4", "tall.mp4"}


def test_video_frames_that_are_not_4k_plus_1_are_refused_with_the_nearest_counts() -> None:
    with pytest.raises(ConfigError, match="Use 13 or 17"):
        config_from_dict({"train_data_dir": "x", "video_frames": 16}, check_paths=False)


def test_captioners_see_a_clips_middle_frame(clip_folder: Path) -> None:
    from core.caption.run import _load_batch, find_images

    found = [p.name for p in find_images(clip_folder)]
    assert "walk.mp4" in found and "still.png" in found
    (path, frame), = _load_batch([clip_folder / "walk.mp4"], True)
    assert frame.size == (96, 64) and frame.getpixel((0, 0))[0] == 20 * 10 % 255  # frame 10 of 20


def test_the_dataset_tab_shows_a_clips_first_frame_duration_fps_and_frame_count(clip_folder: Path, monkeypatch,
                                                                                 tmp_path: Path) -> None:
    from ui import dataset_tab, state, thumbs

    monkeypatch.setattr(thumbs, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(state, "resolve_user_path", lambda text: Path(text))
    monkeypatch.setattr(state, "allow_folder", lambda folder: None)
    summary, items, *_ = dataset_tab.open_dataset(str(clip_folder), 64)
    captions = {caption.split(" · ")[0]: caption for _, caption in items}
    assert captions["walk.mp4"] == "walk.mp4 · 96×64 · 2.5 s, 8 fps, 20 frames"
    assert "Video clips: 2" in summary


def test_a_clip_is_saved_as_its_first_frame_and_an_mp4_and_a_grid_cell_shows_first_middle_last(tmp_path: Path):
    from core.sample import clip_image, label_cell, save_image

    frames = [Image.new("RGB", (32, 32), (i * 20, 0, 0)) for i in range(9)]
    picture = clip_image(frames, 16)
    path = save_image(picture, tmp_path / "step-000001-0.png")
    assert path.is_file() and probe_video(path.with_suffix(".mp4")).frames == 9
    cell = label_cell(picture, "w=1")
    assert cell.width == 3 * 32 + 4 and cell.getpixel((32 + 2 + 16, 30))[0] == 80  # the middle frame (4 of 9)
