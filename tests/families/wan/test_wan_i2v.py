"""Wan image to video (Wan 2.1 I2V 14B with CLIP vision, Wan 2.2 I2V A14B): each clip trains conditioned on its
first frame exactly as WanImageToVideoPipeline conditions on a start image; tiny models are recognised from their
diffusers folder and ComfyUI file, train a few steps on clips and images, preview from the data's first frame,
and write files the pipeline's load_lora_weights reads with the trained deltas."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.data.test_video_data import write_test_clip
from tests.fixtures.tiny_sd import run_collect, tiny_run_config


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    from core.families.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("i2v"), i2v=True)


@pytest.fixture(scope="module")
def tiny_i2v_a14b(tmp_path_factory):
    from core.families.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("i2v_a14b"), a14b=True, i2v=True)


@pytest.fixture(scope="module")
def clips_and_images(tmp_path_factory) -> Path:
    from core.families.tiny_parts import make_image_folder

    data = make_image_folder(tmp_path_factory.mktemp("i2v_data") / "data", count=1)
    rows = (data / "metadata.csv").read_text()
    for i in range(2):
        write_test_clip(data / f"clip_{i}.mp4", 9, size=(64, 64))
        rows += f"clip_{i}.mp4,a red thing moving {i}\n"
    (data / "metadata.csv").write_text(rows)
    return data


def test_i2v_models_are_recognised_from_their_folder_file_and_hub_name(tiny_i2v, tiny_i2v_a14b):
    from core.families.wan.load import detect

    assert detect(str(tiny_i2v.folder)) == "wan2.1-i2v-14b"
    assert detect(str(tiny_i2v.comfy_transformer)) == "wan2.1-i2v-14b"
    assert detect(str(tiny_i2v_a14b.folder)) == "wan2.2-i2v-a14b"
    assert detect(str(tiny_i2v_a14b.comfy_transformer)) == "wan2.2-i2v-a14b"
    assert detect("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers") == "wan2.1-i2v-14b"
    assert detect("Wan-AI/Wan2.2-I2V-A14B-Diffusers") == "wan2.2-i2v-a14b"
    from core.model_info import detect_model  # what the app's lists and the memory line read

    for tiny, name in ((tiny_i2v, "wan2.1-i2v-14b"), (tiny_i2v_a14b, "wan2.2-i2v-a14b")):
        assert detect_model(str(tiny.folder)).family == detect_model(str(tiny.comfy_transformer)).family == name


def test_the_condition_a_clip_trains_with_is_the_pipelines_for_its_first_frame(tiny_i2v):
    from diffusers import WanImageToVideoPipeline

    from core.families.wan.i2v import condition_moments, first_frame_mask, mark_vae, normalize_condition_latents, split

    pipe = WanImageToVideoPipeline.from_pretrained(str(tiny_i2v.folder))
    torch.manual_seed(0)
    pixels = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    mark_vae(pipe.vae)
    moments = condition_moments(pipe.vae, pixels)
    mean, _ = moments.chunk(2, dim=1)
    _, condition = split(normalize_condition_latents(pipe.vae.config, mean), 16)
    _, expected = pipe.prepare_latents(pixels[:, :, 0], 1, 16, 32, 32, 9, torch.float32, torch.device("cpu"),
                                       torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.cat([first_frame_mask(condition), condition], dim=1), expected,
                               rtol=1e-4, atol=1e-5)


def _loaded_deltas_match(pipeline, folder: Path, outputs: dict, *, into_2: bool = False) -> list:
    pipe = pipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(outputs["diffusers"], adapter_name="d", load_into_transformer_2=into_2)
    pipe.load_lora_weights(outputs["lora"], adapter_name="k", load_into_transformer_2=into_2)
    network = pipe.transformer_2 if into_2 else pipe.transformer
    layers = [m for m in network.modules() if "d" in getattr(m, "lora_A", {})]
    assert layers
    for layer in layers:
        torch.testing.assert_close(layer.get_delta_weight("k"), layer.get_delta_weight("d"), rtol=1e-3, atol=1e-5)
    return layers


def test_wan21_i2v_trains_on_clips_and_images_previews_from_the_first_frame_and_its_files_load(
        tiny_i2v, clips_and_images, tmp_path, monkeypatch):
    import core.families.wan.loss as wan_loss
    from diffusers import WanImageToVideoPipeline

    seen: list[tuple] = []
    real = wan_loss.wan_loss

    def spy(network, latents, prompts, **kwargs):
        seen.append((tuple(kwargs["condition"].shape), tuple(kwargs["image_embeds"].shape)))
        return real(network, latents, prompts, **kwargs)

    monkeypatch.setattr(wan_loss, "wan_loss", spy)
    outputs, events = run_collect(tiny_run_config(tiny_i2v.folder, clips_and_images, tmp_path / "out", batch_size=1,
                                                  max_train_steps=2, video_frames=9, learning_rate=5e-2,
                                                  caption_dropout=0.5, sample_prompts=["a red thing"]))
    logs = [e.message for e in events if e.kind == "log"]
    assert any("conditioned on its first frame" in m for m in logs), logs
    # each step: the 16 condition channels beside the latents, the start image's 1025 CLIP tokens (32 px, patch 1)
    assert len(seen) == 2 and all(c[1] == 16 and i == (1, 1025, 4) for c, i in seen), seen
    assert [e for e in events if e.kind == "sample"]
    layers = _loaded_deltas_match(WanImageToVideoPipeline, tiny_i2v.folder, outputs)
    names = {n for n, m in WanImageToVideoPipeline.from_pretrained(str(tiny_i2v.folder)).transformer.named_modules()}
    assert any(n.endswith("attn2.add_k_proj") for n in names)
    assert any(float(layer.get_delta_weight("k").abs().max()) > 0 for layer in layers)
    # ComfyUI applies every module of ours to a weight of its Wan I2V model, the image keys / values too
    from safetensors import safe_open

    from tests.families.comfy_keys import comfy_lora_key_map

    with safe_open(outputs["lora"], "pt") as handle:
        modules = {k.rsplit(".", 2)[0] for k in handle.keys() if k.endswith(".lora_down.weight")}
    key_map = comfy_lora_key_map(tiny_i2v.comfy_transformer)
    assert modules and all(m in key_map for m in modules), sorted(modules - set(key_map))[:3]
    assert "diffusion_model.blocks.0.cross_attn.k_img" in modules


def test_wan22_i2v_a14b_trains_both_experts_from_comfyuis_file_and_writes_the_pair(tiny_i2v_a14b, clips_and_images,
                                                                                   tmp_path):
    from diffusers import WanImageToVideoPipeline

    outputs, events = run_collect(tiny_run_config(tiny_i2v_a14b.comfy_transformer, clips_and_images, tmp_path / "ab",
                                                  batch_size=1, max_train_steps=3, video_frames=5, wan_expert="both",
                                                  base_model_config=str(tiny_i2v_a14b.folder),
                                                  sample_prompts=["a red thing"]))
    assert [e for e in events if e.kind == "sample"]
    _loaded_deltas_match(WanImageToVideoPipeline, tiny_i2v_a14b.folder, outputs)
    _loaded_deltas_match(WanImageToVideoPipeline, tiny_i2v_a14b.folder,
                         {"lora": outputs["lora_low_noise"], "diffusers": outputs["diffusers_low_noise"]}, into_2=True)


def test_an_i2v_file_builds_its_image_attention_from_its_own_shapes_even_with_a_t2v_config(tiny_i2v, tmp_path):
    from diffusers import WanImageToVideoPipeline

    from core.families.wan.single_file import load_transformer_file
    from core.families.wan.tiny import build_tiny_wan

    t2v = build_tiny_wan(tmp_path / "t2v")
    loaded = load_transformer_file(tiny_i2v.comfy_transformer, config_source=str(t2v.folder))
    assert (loaded.config.in_channels, loaded.config.image_dim, loaded.config.added_kv_proj_dim) == (36, 4, 24)
    reference = WanImageToVideoPipeline.from_pretrained(str(tiny_i2v.folder)).transformer.state_dict()
    state = loaded.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, msg=key)


def test_wan21_i2v_from_comfyuis_files_takes_clip_vision_h_from_models_clip_vision(tmp_path):
    """A ComfyUI user has clip_vision_h.safetensors in models/clip_vision (with its projection, which Wan does not
    use): the image encoder is that file, not a second download from the hub; a file in another layout is named."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    from core.families.wan.load import load_model
    from core.families.wan.tiny import build_tiny_wan
    from core.family_api.contract import ModelLoadError

    tiny = build_tiny_wan(tmp_path / "i2v", i2v=True)
    reference = CLIPVisionModel.from_pretrained(str(tiny.folder), subfolder="image_encoder").eval()
    clip = tiny.comfy_root / "clip_vision" / "clip_vision_h.safetensors"
    clip.parent.mkdir()
    # ComfyUI's file: transformers' names under vision_model. (as CLIPVisionModelWithProjection saved them)
    state = {f"vision_model.{k}": v.half().contiguous() for k, v in reference.state_dict().items()}
    save_file({**state, "visual_projection.weight": torch.zeros(4, 4, dtype=torch.float16)}, str(clip))

    model = load_model(str(tiny.comfy_transformer), config_source=str(tiny.folder))
    assert "image encoder (CLIP vision): clip_vision_h.safetensors" in model.notes
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ours = model.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
        theirs = reference(pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=2e-3)  # the file is fp16

    save_file({"visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(12, 4)}, str(clip))
    with pytest.raises(ModelLoadError, match="not a CLIP vision file in transformers' names"):
        load_model(str(tiny.comfy_transformer), config_source=str(tiny.folder))
