"""Wan on video: a folder of 3 short clips (written here with PyAV) and 2 images trains the tiny Wan on the CPU
(clips as [16, F, h, w] latents in frame-count buckets, images as one frame), previews a clip (mp4 beside its first
frame), and a run stopped and resumed equals the uninterrupted one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.families.table import FAMILIES
from tests.fixtures.tiny_sd import run_collect, tiny_run_config
from tests.helpers import read_loss_csv
from tests.data.test_video_data import write_test_clip

WAN = next(f for f in FAMILIES if f.name == "wan2.1-t2v-1.3b")


@pytest.fixture(scope="module")
def clips_and_images(tmp_path_factory) -> Path:
    from core.families.tiny_parts import make_image_folder

    data = make_image_folder(tmp_path_factory.mktemp("video") / "data", count=2)
    rows = (data / "metadata.csv").read_text()
    for i, frames in enumerate((12, 12, 6)):  # the last is shorter than video_frames: it trains at 5 frames
        write_test_clip(data / f"clip_{i}.mp4", frames, size=(64, 64))
        rows += f"clip_{i}.mp4,a red thing moving {i}\n"
    (data / "metadata.csv").write_text(rows)
    return data


def _events(events, kind):
    return [e for e in events if e.kind == kind]


def test_three_clips_and_two_images_train_in_frame_buckets_and_preview_a_clip(built, clips_and_images, tmp_path):
    from core.data.video_io import probe_video
    from core.tools.convert import read_lora

    tiny = built(WAN)
    outputs, events = run_collect(tiny_run_config(tiny.folder, clips_and_images, tmp_path / "out", batch_size=1,
                                                  max_train_steps=3, video_frames=9, sample_prompts=["a red thing"],
                                                  sample_steps=3))
    logs = [e.message for e in _events(events, "log")]
    assert any("3 clip window(s) and 2 image(s); frame buckets: 1, 5, 9" in m for m in logs), logs
    assert len(_events(events, "progress")) == 3
    assert read_lora(outputs["lora"], family=WAN.name).modules
    preview = Path(_events(events, "sample")[-1].images[0])
    clip = probe_video(preview.with_suffix(".mp4"))
    assert preview.is_file() and clip.frames == 9 and (clip.width, clip.height) == (64, 64)


def test_a_clip_run_stopped_and_resumed_equals_the_uninterrupted_run(built, clips_and_images, tmp_path):
    from core.tools.convert import read_lora

    tiny = built(WAN)

    def config(out: Path, **more) -> dict:
        return tiny_run_config(tiny.single_file, clips_and_images, out, batch_size=1, max_train_steps=4, save_steps=2,
                               video_frames=9, caption_dropout=0.3, base_model_config=str(tiny.folder), **more)

    first, _ = run_collect(config(tmp_path / "straight"))
    run_collect(config(tmp_path / "stopped"), stop_at=2)
    second, resumed = run_collect(config(tmp_path / "stopped", resume_from="latest"))
    assert [e.step for e in _events(resumed, "progress")] == [3, 4]
    a, b = read_loss_csv(tmp_path / "straight"), read_loss_csv(tmp_path / "stopped")
    assert [r.loss for r in a] == pytest.approx([r.loss for r in b], rel=1e-5)
    x, y = read_lora(first["lora"], family=WAN.name), read_lora(second["lora"], family=WAN.name)
    for key, module in x.modules.items():
        torch.testing.assert_close(y.modules[key].delta(), module.delta(), atol=1e-6, rtol=1e-5, msg=key)


def test_fp8_base_with_bf16_and_checkpointing_trains_the_lora_and_previews(built, clips_and_images, tmp_path):
    tiny = built(WAN)
    _, events = run_collect(tiny_run_config(tiny.folder, clips_and_images, tmp_path / "fp8", batch_size=1,
                                            max_train_steps=2, video_frames=5, fp8_base=True, mixed_precision="bf16",
                                            gradient_checkpointing=True, sample_prompts=["a red thing"]))
    logs = [e.message for e in _events(events, "log")]
    assert any(m.startswith("fp8 storage: 20 frozen layers") for m in logs), logs
    assert len(_events(events, "progress")) == 2 and _events(events, "sample")
