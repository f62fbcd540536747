"""Wan 2.2 TI2V-5B (text or image to video, its own 48-channel VAE): recognised from its folder and ComfyUI file
(which takes wan2.2_vae, not the Wan 2.1 VAE beside it); a clip trains with its first latent frame clean and a
timestep per token as the pipelines' expand_timesteps has it, an image as text to video; previews and the Test
tab draw from a start image or from text alone; the files load into WanPipeline."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.data.test_video_data import write_test_clip
from tests.fixtures.tiny_sd import run_collect, tiny_run_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from core.families.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("ti2v"), ti2v=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from core.families.tiny_parts import make_image_folder

    folder = make_image_folder(tmp_path_factory.mktemp("ti2v_data") / "data", count=1)
    rows = (folder / "metadata.csv").read_text()
    write_test_clip(folder / "clip.mp4", 9, size=(64, 64))
    (folder / "metadata.csv").write_text(rows + "clip.mp4,a red thing moving\n")
    return folder


def test_the_ti2v_5b_is_recognised_from_its_folder_file_and_name(tiny):
    from core.families.wan.load import detect

    assert detect(str(tiny.folder)) == "wan2.2-ti2v-5b"
    assert detect(str(tiny.comfy_transformer)) == "wan2.2-ti2v-5b"
    assert detect("Wan-AI/Wan2.2-TI2V-5B-Diffusers") == "wan2.2-ti2v-5b"


def test_a_clip_keeps_its_first_latent_frame_clean_at_timestep_zero_as_the_pipeline_does():
    from core.families.wan.i2v import expanded

    torch.manual_seed(0)
    x0, noisy = torch.randn(2, 48, 3, 4, 4), torch.randn(2, 48, 3, 4, 4)
    sigmas = torch.tensor([0.5, 0.25])
    hidden, timestep, first = expanded(noisy, x0, sigmas, (1, 2, 2))
    assert first == 1 and torch.equal(hidden[:, :, 0], x0[:, :, 0]) and torch.equal(hidden[:, :, 1:], noisy[:, :, 1:])
    # WanImageToVideoPipeline (expand_timesteps): temp_ts = (first_frame_mask[0][0][:, ::2, ::2] * t).flatten()
    mask = torch.ones(1, 1, 3, 4, 4)
    mask[:, :, 0] = 0
    for row, sigma in zip(timestep, sigmas):
        torch.testing.assert_close(row, (mask[0][0][:, ::2, ::2] * sigma * 1000).flatten())
    image_hidden, image_timestep, image_first = expanded(noisy[:, :, :1], x0[:, :, :1], sigmas, (1, 2, 2))
    assert image_first == 0 and torch.equal(image_hidden, noisy[:, :, :1])
    assert torch.equal(image_timestep, (sigmas * 1000)[:, None].expand(2, 4))


def test_the_ti2v_trains_from_comfyuis_file_with_its_own_vae_previews_from_a_start_image_and_its_files_load(
        tiny, data, tmp_path, monkeypatch):
    import core.families.wan.loss as wan_loss
    from diffusers import WanPipeline

    seen: list[tuple] = []
    real = wan_loss.wan_loss

    def spy(network, latents, prompts, **kwargs):
        seen.append((latents.shape[1], latents.shape[2], kwargs["expand_timesteps"]))
        return real(network, latents, prompts, **kwargs)

    monkeypatch.setattr(wan_loss, "wan_loss", spy)
    outputs, events = run_collect(tiny_run_config(tiny.comfy_transformer, data, tmp_path / "out", batch_size=1,
                                                  max_train_steps=2, video_frames=9, learning_rate=5e-2,
                                                  base_model_config=str(tiny.folder), sample_prompts=["a red thing"]))
    logs = [e.message for e in events if e.kind == "log"]
    assert any("VAE: wan2.2_vae.safetensors" in m for m in logs), logs
    assert {s[0] for s in seen} == {48} and all(s[2] for s in seen), seen
    assert [e for e in events if e.kind == "sample"]
    pipe = WanPipeline.from_pretrained(str(tiny.folder))
    pipe.load_lora_weights(outputs["diffusers"], adapter_name="d")
    pipe.load_lora_weights(outputs["lora"], adapter_name="k")
    layers = [m for m in pipe.transformer.modules() if "d" in getattr(m, "lora_A", {})]
    assert layers
    for layer in layers:
        torch.testing.assert_close(layer.get_delta_weight("k"), layer.get_delta_weight("d"), rtol=1e-3, atol=1e-5)


def test_the_test_tab_draws_a_ti2v_clip_from_text_alone_or_from_a_start_image(tiny, tmp_path):
    from core.sample import CLIP_FPS, CLIP_FRAMES, clear_pipeline_cache, generate_images

    start = tmp_path / "start.png"
    Image.new("RGB", (40, 40), (20, 200, 30)).save(start)
    try:
        for image in (None, str(start)):
            clip = generate_images(str(tiny.folder), None, ["a red thing"], steps=2, guidance=1.0, width=32,
                                   height=32, start_image=image)[0]
            assert len(clip.info[CLIP_FRAMES]) == 17 and clip.size == (32, 32) and clip.info[CLIP_FPS] == 24
        # The Test tab's sizes come in steps of 8: the 5B draws in whole 32 px latent patches.
        clip = generate_images(str(tiny.folder), None, ["a red thing"], steps=1, guidance=1.0, width=56, height=40)[0]
        assert clip.size == (32, 32)
    finally:
        clear_pipeline_cache()
