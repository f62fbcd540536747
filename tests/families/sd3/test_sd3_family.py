"""SD3 / SD3.5: the registry rows against the real shapes, detection, loading every layout users have,
the MMDiT names against diffusers' own converter, and the LoRA files against what ComfyUI and diffusers
read (ComfyUI's key map re-implemented from comfy/lora.py + comfy/utils.py, not copied)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from core.families.sd3 import keys as sd3_keys
from core.families.sd3 import load as sd3_load
from core.family_api.registry import FAMILIES
from tests.families.comfy_keys import comfy_load, unet_key_map


def _write_keys(path: Path, keys: list[str]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


# --- the registry rows -------------------------------------------------------------------------------


def test_published_sizes_are_the_real_configs_counted_on_the_meta_device():
    from core.families.sd3.memory import shape_counts

    assert FAMILIES["sd3"].trained_params == shape_counts("5-medium")["total"] == 2_243_171_520
    assert FAMILIES["sd35-large"].trained_params == shape_counts("5-large")["total"] == 8_056_627_520
    assert FAMILIES["sd3"].width == shape_counts("5-medium")["width"] == 1536
    assert FAMILIES["sd35-large"].width == shape_counts("5-large")["width"] == 2432
    for name in ("sd3", "sd35-large"):
        info = FAMILIES[name]
        assert info.kind == "dit" and info.is_flow_matching and info.preset_family == "sd3"
        assert info.impl == "core.families.sd3.family" and info.config_groups == ("flow",)
        assert info.pipeline_class == "StableDiffusion3Pipeline"
    # sd-scripts' names: ss_base_model_version is the MMDiT model_type, the architecture "stable-diffusion-3-" + it.
    assert FAMILIES["sd3"].ss_base_model_version == "5-medium"
    assert FAMILIES["sd35-large"].modelspec_architecture == "stable-diffusion-3-5-large"


# --- detection ---------------------------------------------------------------------------------------

MMDIT = ["joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.x_block.attn.proj.weight",
         "joint_blocks.0.context_block.attn.qkv.weight", "x_embedder.proj.weight", "pos_embed"]
QK = ["joint_blocks.0.context_block.attn.ln_k.weight", "joint_blocks.0.x_block.attn.ln_k.weight"]


@pytest.mark.parametrize("keys, prefix, expected", [
    (MMDIT, "model.diffusion_model.", "medium"),                       # SD3 medium: no qk norm
    (MMDIT + QK + ["joint_blocks.0.x_block.attn2.qkv.weight"], "model.diffusion_model.", "5-medium"),
    (MMDIT + QK, "", "5-large"),                                       # transformer-only, no prefix
    (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "", None),
])
def test_model_type_from_a_single_file_header(tmp_path, keys, prefix, expected):
    path = _write_keys(tmp_path / "model.safetensors", [prefix + k for k in keys])
    assert sd3_load.detect_model_type(path) == expected
    assert sd3_load.detect(str(path)) == (None if expected is None else sd3_load.variant_of(expected))


def test_folders_and_the_image_family_of_every_layout(tiny_sd3, tiny_sd35_large, tiny_flux_dev):
    from core.family_api.lookup import detect_image_family, family_for_model
    from core.families.sd3.family import FAMILY

    assert detect_image_family(str(tiny_sd3.folder)) == "sd3"
    assert detect_image_family(str(tiny_sd35_large.folder)) == "sd35-large"
    assert detect_image_family(str(tiny_sd3.comfy_transformer)) == "sd3"
    assert detect_image_family(str(tiny_sd3.comfy_checkpoint)) == "sd3"
    assert family_for_model(str(tiny_sd3.folder)) is FAMILY
    assert sd3_load.detect(str(tiny_flux_dev.folder)) is None
    assert sd3_load.model_type_from_config({"qk_norm": None}) == "medium"


def test_model_info_reads_sizes_from_headers(tiny_sd3):
    from core.model_info import detect_model

    info = detect_model(str(tiny_sd3.comfy_transformer))
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3.folder, subfolder="transformer")
    # The header counts every tensor of the file: the parameters and the positional-embedding table.
    assert info.family == "sd3" and info.width == 32
    assert info.params == sum(v.numel() for v in transformer.state_dict().values())
    assert detect_model("stabilityai/stable-diffusion-3.5-large").family == "sd35-large"
    assert detect_model("sd3.5_medium.safetensors").family == "sd3"


# --- the MMDiT names ---------------------------------------------------------------------------------


def test_our_mmdit_names_are_what_diffusers_single_file_converter_reads(tiny_sd3):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3.folder, subfolder="transformer")
    state = transformer.state_dict()
    native = sd3_keys.diffusers_to_mmdit(state, prefix="model.diffusion_model.")
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(native))
    assert set(back) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value)


@pytest.mark.parametrize("layout", ["transformer file", "all-in-one file", "fp8 transformer file"])
def test_comfyui_layouts_load_the_same_weights_as_the_diffusers_folder(tiny_sd3, tmp_path, layout):
    from safetensors.torch import load_file, save_file

    reference = sd3_load.load_sd3_model(str(tiny_sd3.folder))
    path = tiny_sd3.comfy_checkpoint if layout == "all-in-one file" else tiny_sd3.comfy_transformer
    if layout.startswith("fp8"):
        models = tmp_path / "ComfyUI" / "models"
        for sub in ("text_encoders", "vae"):
            (models / sub).mkdir(parents=True)
            for f in (tiny_sd3.comfy_root / sub).iterdir():
                (models / sub / f.name).symlink_to(f)
        state = load_file(str(tiny_sd3.comfy_transformer))
        path = models / "diffusion_models" / "sd3.5_medium_fp8_e4m3fn.safetensors"
        path.parent.mkdir(parents=True)
        save_file({k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in state.items()}, str(path))
    model = sd3_load.load_sd3_model(str(path), config_source=str(tiny_sd3.folder))
    assert model.is_single_file and model.model_type == "5-medium" and model.variant == "sd3"
    tol = dict(atol=0.07, rtol=0.07) if layout.startswith("fp8") else dict(atol=1e-3, rtol=1e-3)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        ours, ref = getattr(model, name).state_dict(), getattr(reference, name).state_dict()
        assert set(ours) == set(ref), name
        for key in ref:
            torch.testing.assert_close(ours[key].float(), ref[key].float(), **(tol if name == "transformer" else
                                                                              dict(atol=1e-3, rtol=1e-3)))
    if layout.startswith("fp8"):
        assert any("is fp8" in n for n in model.notes)


def test_a_missing_text_encoder_file_is_named_before_any_weights_are_read(tiny_sd3, tmp_path):
    from core.family_api.contract import ModelLoadError

    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    target = models / "diffusion_models" / "sd3.5_medium.safetensors"
    shutil.copy(tiny_sd3.comfy_transformer, target)
    with pytest.raises(ModelLoadError, match="clip_l.safetensors"):
        sd3_load.load_sd3_model(str(target), config_source=str(tiny_sd3.folder))


def test_without_t5_the_prompt_encoding_has_zeros_in_its_place(tiny_sd3, tmp_path):
    from core.families.sd3.text import encode_prompts

    model = sd3_load.load_sd3_model(str(tiny_sd3.folder))
    full = encode_prompts(model, ["a red thing"], torch.device("cpu"))
    model.text_encoder_3 = None
    no_t5 = encode_prompts(model, ["a red thing"], torch.device("cpu"))
    assert full.prompt_embeds.shape == no_t5.prompt_embeds.shape == (1, 77 + 256, 64)
    assert full.pooled.shape == (1, 64)
    assert not no_t5.prompt_embeds[:, 77:].any() and full.prompt_embeds[:, 77:].any()
    torch.testing.assert_close(no_t5.prompt_embeds[:, :77], full.prompt_embeds[:, :77])


# --- the LoRA files ----------------------------------------------------------------------------------


def _trained_lora(folder: Path, rank: int = 4, alpha: float = 2.0, seed: int = 0):
    """The tiny transformer with a LoRA on our targets, its B matrices random (as after training)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from core.families.sd3.family import lora_targets

    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_targets(transformer),
                        init_lora_weights="gaussian")
    transformer.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    return transformer, config


def test_the_kohya_file_loads_in_comfyui_key_for_key_with_the_trained_delta(tiny_sd3, tmp_path):
    from safetensors.torch import load_file

    from core.families.sd3.lora_files import write_kohya_file
    from core.lora import peft_state

    transformer, config = _trained_lora(tiny_sd3.folder)
    state = peft_state(transformer)
    path = write_kohya_file(state, tmp_path / "lora.safetensors", model_type="5-medium", alpha=2.0, dtype=None)
    lora = load_file(str(path))
    # The MMDiT's own weights: the model ComfyUI builds from sd3.5_medium.safetensors.
    plain = {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    mmdit = {"diffusion_model." + k: v for k, v in sd3_keys.diffusers_to_mmdit(plain).items()}
    patches, not_loaded = comfy_load(lora, unet_key_map({k for k in mmdit if k.endswith(".weight")}))
    assert not not_loaded, sorted(not_loaded)[:5]
    assert "diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in patches
    assert "diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in patches
    assert "diffusion_model.joint_blocks.1.context_block.attn.qkv.weight" in patches  # the pre-only block
    assert len(patches) == 15  # 10 Linears in block 0 (incl. attn2), 5 in the last block
    # ComfyUI's patch: W += (alpha / rank) * up @ down; the fused delta is the three diffusers deltas stacked.
    scale = config.lora_alpha / config.r
    modules = dict(transformer.named_modules())
    for target, (up, down, alpha) in patches.items():
        delta = (alpha / down.shape[0]) * (up @ down)
        assert delta.shape == mmdit[target].shape
        native = target[len("diffusion_model."):-len(".weight")]
        _, parts = sd3_keys.lora_module_from_native(native)
        expected = torch.cat([scale * modules[p].lora_B["default"].weight @ modules[p].lora_A["default"].weight
                              for p in parts])
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)


def test_the_diffusers_file_loads_in_diffusers_and_comfyui_and_gives_the_trained_output(tiny_sd3, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from core.families.sd3.lora_files import read_lora, write_diffusers_file, write_kohya_file
    from core.lora import peft_state

    transformer, config = _trained_lora(tiny_sd3.folder, alpha=2.0)
    state = peft_state(transformer)
    path = write_diffusers_file(state, tmp_path, lora_config=config)
    kohya = write_kohya_file(state, tmp_path / "k.safetensors", model_type="5-medium", alpha=2.0, dtype=None)
    keys = StableDiffusion3Pipeline.lora_state_dict(str(path))
    assert len(keys) == len(state) and all(k.startswith("transformer.") for k in keys)
    # ComfyUI's SD3 branch maps `transformer.<diffusers module>` of every weight mmdit_to_diffusers knows.
    plain = {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    modules = {k.rsplit(".lora_", 1)[0] for k in keys}
    assert all(m.removeprefix("transformer.") + ".weight" in plain for m in modules)
    # The kohya file reads back into exactly the diffusers file's modules and values.
    peft, alphas, _ = read_lora(kohya)
    assert {f"transformer.{k}" for k in peft} == set(keys) and set(alphas.values()) == {2.0}
    for key, value in peft.items():
        torch.testing.assert_close(value, keys[f"transformer.{key}"].float())

    # diffusers' own loader: every key is used and the output is the trained transformer's.
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3.folder)
    pipe.load_lora_weights(str(path))
    assert not any(getattr(m, "lora_A", None) is None for n, m in pipe.transformer.named_modules()
                   if n in {x.removeprefix("transformer.") for x in modules})
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, 16, generator=gen), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 12, 64, generator=gen),
                  pooled_projections=torch.randn(1, 64, generator=gen), return_dict=False)
    with torch.no_grad():
        ours, theirs = transformer(**inputs)[0], pipe.transformer(**inputs)[0]
        base = SD3Transformer2DModel.from_pretrained(tiny_sd3.folder, subfolder="transformer")(**inputs)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(base, ours, atol=1e-4)


def test_lora_tools_read_convert_and_write_both_ways(tiny_sd3, tmp_path):
    from core.export.inspect import family_from_keys, inspect_lora
    from core.families.sd3.lora_files import read_lora, write_kohya_file
    from core.tools.convert import convert_lora
    from core.lora import peft_state

    transformer, _ = _trained_lora(tiny_sd3.folder)
    state = peft_state(transformer)
    kohya = write_kohya_file(state, tmp_path / "k.safetensors", model_type="medium", alpha=2.0, dtype=None)
    assert family_from_keys({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": (96, 12)}, "kohya",
                            None) == "sd3"
    info = inspect_lora(kohya)
    assert info.family == "sd3"
    to_diffusers = convert_lora(kohya, tmp_path / "d", "diffusers")
    back = convert_lora(to_diffusers, tmp_path / "k2.safetensors", "kohya", family="sd3")
    a, alphas_a, meta = read_lora(kohya)
    b, alphas_b, meta_b = read_lora(back)
    assert set(a) == set(b) and alphas_a == alphas_b
    assert meta_b["ss_base_model_version"] in ("medium", "5-medium")
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_merging_two_sd3_loras_adds_their_deltas_and_stays_sd3(tiny_sd3, tmp_path):
    from core.export.inspect import inspect_lora
    from core.families.sd3.lora_files import write_kohya_file
    from core.tools.convert import read_lora as read_tool_lora, write_like
    from core.tools.merge import combine_files
    from core.lora import peft_state

    files = []
    for seed in (0, 1):
        transformer, _ = _trained_lora(tiny_sd3.folder, seed=seed)
        files.append(write_kohya_file(peft_state(transformer), tmp_path / f"l{seed}.safetensors",
                                      model_type="5-medium", alpha=2.0, dtype=None))
    merged, _ = combine_files(files, [1.0, 0.5])
    a, b = read_tool_lora(files[0]), read_tool_lora(files[1])
    for name, module in merged.modules.items():
        torch.testing.assert_close(module.delta(), a.modules[name].delta() + 0.5 * b.modules[name].delta(),
                                   rtol=1e-4, atol=1e-5)
    out = write_like(merged, tmp_path / "merged.safetensors", dtype=None)
    assert inspect_lora(out).family == "sd3"


def test_text_encoder_files_and_vae_name_the_parts_of_a_bare_transformer_file(tiny_sd3, tmp_path):
    from core.family_api.contract import ModelLoadError

    target = tmp_path / "elsewhere" / "sd3.5_medium.safetensors"
    target.parent.mkdir()
    shutil.copy(tiny_sd3.comfy_transformer, target)
    encoders = tiny_sd3.comfy_root / "text_encoders"
    files = f"{encoders / 't5xxl_fp16.safetensors'}, {encoders / 'clip_g.safetensors'},{encoders / 'clip_l.safetensors'}"
    model = sd3_load.load_sd3_model(str(target), config_source=str(tiny_sd3.folder), text_encoder_files=files,
                                    vae=str(tiny_sd3.comfy_root / "vae" / "sd35_vae.safetensors"))
    assert model.text_encoder_3 is not None and any(n == "CLIP-G: clip_g.safetensors" for n in model.notes)
    with pytest.raises(ModelLoadError, match="not named as CLIP-L"):
        sd3_load.text_encoder_parts("a/encoder.safetensors")
