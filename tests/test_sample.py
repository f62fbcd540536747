"""A trained LoRA does what it should: it lowers the loss on its images, its WebUI file gives
in diffusers exactly the UNet that was trained, and previews / comparison grids show it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.fixtures.tiny_sd import make_image_folder, run_collect, tiny_run_config


@pytest.fixture(scope="module")
def trained(tiny_sd1, tmp_path_factory):
    """One image, overfitted for a few steps with attention + LoCon conv LoRA, saved in fp32."""
    root = tmp_path_factory.mktemp("sample_run")
    data = make_image_folder(root / "one", count=1)
    raw = tiny_run_config(tiny_sd1.folder, data, root / "out", batch_size=1, max_train_steps=12, save_steps=12,
                          learning_rate=1e-2, conv_rank=2, conv_alpha=1, lora_rank=4, lora_alpha=8,
                          output_name="overfit")
    outputs, events = run_collect(raw)
    return raw, outputs, data


def _fixed_inputs(tiny_sd1, data: Path):
    """Latents of the training image, its caption embedding, fixed noise and timesteps."""
    from diffusers import StableDiffusionPipeline

    from core.data.buckets import prepare_image
    from core.data.image_io import load_rgb

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1.folder))
    pixels = prepare_image(load_rgb(next(data.glob("*.png"))), (64, 64)).pixels[None]
    caption = (data / "metadata.csv").read_text().splitlines()[1].split(",", 1)[1]
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds = pipe.encode_prompt(caption, "cpu", 1, False)[0]
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([50, 200, 400, 600, 800])
    latents = latents.repeat(len(timesteps), 1, 1, 1)
    noise = torch.randn(latents.shape, generator=generator)
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    return pipe, noisy, timesteps, embeds.repeat(len(timesteps), 1, 1), noise


@torch.no_grad()
def _unet_out(unet, noisy, timesteps, embeds):
    return unet(noisy, timesteps, embeds).sample


def test_the_webui_file_through_diffusers_is_the_trained_unet_and_lowers_the_loss(trained, tiny_sd1):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from core.config import config_from_dict
    from core.families.sd.lora import add_unet_lora
    from core.lora import load_peft_state

    raw, outputs, data = trained
    kohya = load_file(outputs["lora"])
    # LoCon: the conv layers are there, at their own rank and alpha.
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert kohya[f"{conv}.lora_down.weight"].shape[0] == 2 and float(kohya[f"{conv}.alpha"]) == 1.0
    assert kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 4

    # The model as training left it: base UNet + the exact PEFT weights of the last checkpoint.
    cfg = config_from_dict(raw)
    trained_unet = UNet2DConditionModel.from_pretrained(str(tiny_sd1.folder), subfolder="unet")
    add_unet_lora(trained_unet, cfg)
    checkpoint = Path(outputs["checkpoint"])
    load_peft_state(trained_unet, load_file(str(checkpoint / "unet_peft.safetensors")), "UNet")

    pipe, noisy, timesteps, embeds, noise = _fixed_inputs(tiny_sd1, data)
    base_out = _unet_out(pipe.unet, noisy, timesteps, embeds)
    expected = _unet_out(trained_unet, noisy, timesteps, embeds)
    pipe.load_lora_weights(outputs["lora"], adapter_name="webui")
    got = _unet_out(pipe.unet, noisy, timesteps, embeds)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, base_out, atol=1e-3)
    # Overfitting one image: the loss on fixed noise and timesteps falls.
    base_loss = torch.nn.functional.mse_loss(base_out, noise)
    lora_loss = torch.nn.functional.mse_loss(got, noise)
    assert lora_loss < base_loss * 0.95, (float(base_loss), float(lora_loss))


def test_previews_change_with_the_lora_weight_and_a_grid_compares_them(trained, tiny_sd1, tmp_path):
    from core.sample import clear_pipeline_cache, compare_grid, generate_images

    raw, outputs, data = trained
    kwargs = dict(seed=3, steps=2, guidance=5.0, width=64, height=64)
    base = generate_images(str(tiny_sd1.folder), None, ["a red thing"], **kwargs)
    zero = generate_images(str(tiny_sd1.folder), outputs["lora"], ["a red thing"], weight=0.0, **kwargs)
    full = generate_images(str(tiny_sd1.folder), outputs["lora"], ["a red thing"], weight=1.0, **kwargs)
    again = generate_images(str(tiny_sd1.folder), None, ["a red thing"], **kwargs)
    assert base[0].size == (64, 64)
    assert base[0].tobytes() == zero[0].tobytes() == again[0].tobytes()  # no LoRA left behind
    assert full[0].tobytes() != base[0].tobytes()

    grid = compare_grid(str(tiny_sd1.folder), [outputs["diffusers"]], ["a red thing"], tmp_path / "grid.png",
                        weights=(0.0, 1.0), **kwargs)
    with Image.open(grid) as image:
        column = image.width // 2  # two equal columns, each at least as wide as its caption
        assert image.height == 64 + 18 and column >= 64
        # The weight-1.0 cell of the diffusers file shows what the kohya file gave (centred in its column).
        left = column + (column - 64) // 2
        cell = image.crop((left, 18, left + 64, 82)).convert("RGB")
    assert cell.tobytes() == full[0].tobytes()
    clear_pipeline_cache()


def test_grid_captions_stay_legible_at_small_sizes():
    """At 64 px a caption like 'my_style_lora w=0.4' is wider than the image: the cell widens instead of
    letting the captions of neighbouring columns run into each other."""
    from PIL import ImageDraw

    from core.sample import label_cell

    caption = "my_style_lora-step-000200 w=0.4"
    cell = label_cell(Image.new("RGB", (64, 64), "red"), caption)
    assert cell.width >= ImageDraw.Draw(cell).textlength(caption) + 8 > 64
    assert cell.height == 64 + 18
    big = label_cell(Image.new("RGB", (512, 512), "red"), caption)
    assert big.size == (512, 512 + 18)  # wide images keep their size


def test_a_grid_of_cells_with_captions_of_different_widths_keeps_every_image_whole():
    """At 64 px 'style_a w=0.4' is wider than 'style_a w=0': the columns are as wide as the widest cell, so
    no cell is pasted over its neighbour (the compare grid's weights 0, 0.4, 0.6, 0.8, 1)."""
    import numpy as np

    from core.sample import COMPARE_WEIGHTS, grid_image, label_cell

    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]
    cells = [label_cell(Image.new("RGB", (64, 64), colour), f"style_a w={w:g}")
             for colour, w in zip(colours, COMPARE_WEIGHTS)]
    assert len({cell.width for cell in cells}) > 1  # the case that overlapped
    grid = np.asarray(grid_image([cells]).convert("RGB"))
    column = max(cell.width for cell in cells)
    assert grid.shape[1] == column * len(cells)
    for index, colour in enumerate(colours):
        left = index * column + (column - 64) // 2
        assert (grid[18:82, left:left + 64] == colour).all(), f"the image at weight {COMPARE_WEIGHTS[index]} is cut"


def test_training_previews_are_saved_per_step_with_the_fixed_seed(tiny_sd1, tmp_path):
    data = make_image_folder(tmp_path / "imgs", count=2)
    raw = tiny_run_config(tiny_sd1.folder, data, tmp_path / "out", max_train_steps=2, sample_steps=1,
                          sample_prompts=["a red thing", "a blue thing"], learning_rate=1e-9)
    _, events = run_collect(raw)
    samples = [e for e in events if e.kind == "sample"]
    assert [e.step for e in samples] == [1, 2]
    assert [Path(p).name for p in samples[0].images] == ["step-000001-0.png", "step-000001-1.png"]
    # Same seed, (almost) unchanged weights: the previews of both steps match.
    first, second = (Image.open(p).convert("RGB") for p in (samples[0].images[0], samples[1].images[0]))
    diff = max(abs(a - b) for a, b in zip(first.tobytes(), second.tobytes()))
    assert diff <= 2
    assert dataclasses.is_dataclass(samples[0])


def test_a_pissa_lora_applies_to_the_original_base_model(tiny_sd1, tmp_path):
    """PiSSA moves the LoRA's start out of the base weights; the exported file must not add it back.
    Trained with a vanishing learning rate, the exported LoRA must leave the base output unchanged."""
    data = make_image_folder(tmp_path / "imgs", count=1)
    raw = tiny_run_config(tiny_sd1.folder, data, tmp_path / "out", batch_size=1, max_train_steps=1,
                          learning_rate=1e-12, lora_variant="pissa", lora_rank=4, lora_alpha=4)
    outputs, _ = run_collect(raw)
    from safetensors.torch import load_file

    tensors = load_file(outputs["lora"])
    down = tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    assert down.shape[0] == 8  # rank 2r: [A; A0]
    pipe, noisy, timesteps, embeds, _ = _fixed_inputs(tiny_sd1, data)
    base_out = _unet_out(pipe.unet, noisy, timesteps, embeds)
    for source in (outputs["lora"], outputs["diffusers"]):
        pipe.load_lora_weights(source, adapter_name="pissa")
        torch.testing.assert_close(_unet_out(pipe.unet, noisy, timesteps, embeds), base_out, rtol=1e-3, atol=1e-4)
        pipe.delete_adapters("pissa")
