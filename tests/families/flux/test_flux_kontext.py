"""FLUX.1 Kontext trains on the same paired data as Qwen-Image-Edit: named from its pipeline class (or
its file name), the control image's latents appended with position ids (1, row, col) as
FluxKontextPipeline does, and its LoRA written as a FLUX LoRA (flux1, BFL names)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from tests.fixtures.tiny_sd import run_collect, tiny_run_config
from tests.data.test_pairs import make_pairs


def test_kontext_is_named_from_its_folder_and_its_file_name(tiny_flux_kontext, tiny_flux_dev, tmp_path):
    import shutil

    from core.family_api.lookup import detect_image_family
    from core.model_info import detect_model

    assert detect_image_family(str(tiny_flux_kontext.folder)) == "flux-kontext"
    assert detect_image_family(str(tiny_flux_dev.folder)) == "flux-dev"
    renamed = tmp_path / "flux1-kontext-dev.safetensors"
    shutil.copy(tiny_flux_dev.comfy_transformer, renamed)
    assert detect_image_family(str(renamed)) == "flux-kontext"
    assert detect_model("black-forest-labs/FLUX.1-Kontext-dev").family == "flux-kontext"


def test_the_kontext_loss_appends_the_control_with_position_id_1(tiny_flux_kontext):
    from diffusers import FluxTransformer2DModel

    from core.families.flux.text import PromptEmbeds, text_ids
    from core.families.flux.loss import FluxBatch, flux_loss

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_kontext.folder, subfolder="transformer")
    seen = {}
    real = transformer.forward

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    transformer.forward = spy
    prompts = PromptEmbeds(torch.randn(1, 6, 32), torch.randn(1, 32), text_ids(6), None)
    x0, noise, sigmas = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), torch.tensor([0.5])
    with_control = flux_loss(transformer, FluxBatch(x0, prompts, torch.randn(1, 1, 8, 8)), sigmas=sigmas, noise=noise)
    assert seen["hidden_states"].shape[1] == 2 * 16 and seen["img_ids"].shape == (32, 3)
    assert seen["img_ids"][:16, 0].eq(0).all() and seen["img_ids"][16:, 0].eq(1).all()
    plain = flux_loss(transformer, FluxBatch(x0, prompts), sigmas=sigmas, noise=noise)
    assert torch.isfinite(with_control) and float(with_control.detach()) != float(plain.detach())


def test_kontext_trains_on_pairs_and_writes_a_flux_lora(tiny_flux_kontext, tmp_path):
    data = make_pairs(tmp_path / "pairs", count=2)
    out = tmp_path / "out"
    outputs, events = run_collect(tiny_run_config(tiny_flux_kontext.folder, data, out, batch_size=1,
                                                  max_train_steps=2, caption_dropout=0.5))
    logs = [e.message for e in events if e.kind == "log"]
    assert any(m.startswith("Model: FLUX.1 Kontext (diffusers)") for m in logs), logs
    losses = [e.loss for e in events if e.kind == "progress"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    with safe_open(outputs["lora"], "pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-kontext-dev/lora"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert Path(outputs["diffusers"]).is_file()
