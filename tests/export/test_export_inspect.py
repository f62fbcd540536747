"""Inspecting LoRA files and the metadata WebUI reads (family, name, hash, tags, buckets)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig

from core.config import config_from_dict
from core.export.diffusers_format import save_diffusers_lora
from core.export.inspect import LoraReadError, family_from_metadata, inspect_lora, lora_family_mismatch
from core.export.kohya import peft_to_kohya, save_kohya_lora
from core.export.metadata import kohya_metadata


def _cfg(**overrides):
    raw = {"base_model": "model.safetensors", "train_data_dir": "data/cats", "lora_rank": 4, "lora_alpha": 8,
           "output_name": "cat_style", "resolution": 512}
    raw.update(overrides)
    return config_from_dict(raw, check_paths=False)


def _peft_module(path: str, rank: int, in_dim: int, out_dim: int, conv: bool = False) -> dict[str, torch.Tensor]:
    shape_a = (rank, in_dim, 3, 3) if conv else (rank, in_dim)
    shape_b = (out_dim, rank, 1, 1) if conv else (out_dim, rank)
    return {f"{path}.lora_A.weight": torch.randn(shape_a), f"{path}.lora_B.weight": torch.randn(shape_b)}


def _metadata(family: str, **cfg_overrides) -> dict[str, str]:
    return kohya_metadata(_cfg(**cfg_overrides), family=family, base_model_name="/models/base.safetensors",
                          num_images=12, tag_frequency={"cat": 12, "sks": 12, "red hat": 3},
                          bucket_info={"buckets": {"0": {"resolution": [512, 512], "count": 12}},
                                       "mean_img_ar_error": 0.0},
                          steps=300, epochs=10, started_at=1_700_000_000.0, dataset_dir="data/cats",
                          conv_dims=(2, 1.0), finished_at=1_700_000_600.0, session_id=7)


# --- metadata ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family, version, v2, arch", [
    ("sd1", "sd_v1", "False", "stable-diffusion-v1/lora"),
    ("sd2", "sd_v2", "True", "stable-diffusion-v2-512/lora"),
    ("sdxl", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora"),
])
def test_metadata_tells_webui_the_family_so_the_lora_is_shown_for_the_right_checkpoints(family, version, v2, arch):
    meta = _metadata(family)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == v2
    assert meta["modelspec.architecture"] == arch
    assert family_from_metadata(meta) == family


def test_metadata_carries_what_the_webui_info_panel_shows():
    meta = _metadata("sd1", trigger_word="sks", repeats=2)
    assert meta["ss_output_name"] == "cat_style" and meta["modelspec.title"] == "cat_style"
    assert json.loads(meta["ss_tag_frequency"]) == {"cats": {"cat": 12, "sks": 12, "red hat": 3}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"cats": {"n_repeats": 2, "img_count": 12}}
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"] == {"resolution": [512, 512], "count": 12}
    assert meta["ss_resolution"] == "(512, 512)" and meta["modelspec.resolution"] == "512x512"
    assert meta["ss_sd_model_name"] == "base.safetensors"
    assert meta["ss_num_train_images"] == "24"  # images x repeats, as sd-scripts counts
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert (meta["ss_steps"], meta["ss_epoch"]) == ("300", "10")
    assert meta["ss_training_started_at"] == "1700000000.0"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.trigger_phrase"] == "sks"


def test_metadata_of_dora_and_rslora_runs_describes_what_the_file_holds():
    dora = _metadata("sdxl", lora_variant="dora")
    assert dora["ss_network_module"] == "lycoris.kohya"
    assert json.loads(dora["ss_network_args"])["wd_on_output"] == "True"
    assert dora["modelspec.implementation"].startswith("https://github.com/Stability-AI")
    rs = _metadata("sd1", lora_variant="rslora")
    assert float(rs["ss_network_alpha"]) == pytest.approx(8 * math.sqrt(4))
    pissa = _metadata("sd1", lora_variant="pissa")  # written as the rank-2r LoRA for the original base
    assert (pissa["ss_network_dim"], pissa["ss_network_alpha"]) == ("8", "16")


def test_v_prediction_sd2_is_named_like_sd_scripts_names_it():
    meta = _metadata("sd2", prediction_type="v_prediction")
    assert meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"


# --- inspecting files --------------------------------------------------------------------------

def test_inspect_reports_format_family_ranks_alphas_and_metadata_of_a_kohya_file(tmp_path):
    unet = {**_peft_module("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 4, 2048, 640),
            **_peft_module("down_blocks.0.resnets.0.conv1", 2, 320, 320, conv=True)}
    unet["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_magnitude_vector"] = torch.rand(640)
    te2 = _peft_module("text_model.encoder.layers.0.self_attn.q_proj", 4, 1280, 1280)
    tensors = peft_to_kohya(unet, [{}, te2], "sdxl", alphas={"down_blocks.0.resnets.0.conv1": 1.0}, default_alpha=8)
    path = save_kohya_lora(tmp_path / "cat.safetensors", tensors, _metadata("sdxl"))

    info = inspect_lora(path)
    assert (info.format, info.family) == ("kohya", "sdxl")
    assert info.modules["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"] == (4, 8.0)
    assert info.modules["lora_unet_input_blocks_1_0_in_layers_2"] == (2, 1.0)
    assert info.has_text_encoder and info.has_conv and info.has_dora
    assert any("per output channel" in note and "AUTOMATIC1111" in note for note in info.notes)
    assert info.metadata["ss_output_name"] == "cat_style" and "sshs_model_hash" in info.metadata
    assert info.num_tensors == len(tensors) and info.nonfinite == []
    assert lora_family_mismatch(info, "sdxl") is None
    sentence = lora_family_mismatch(info, "sd1")
    assert "trained for SDXL" in sentence and "SD 1.x" in sentence and "cat.safetensors" in sentence


@pytest.mark.parametrize("context, te_hidden, family", [(768, 768, "sd1"), (1024, 1024, "sd2")])
def test_family_comes_from_layer_widths_when_a_file_has_no_metadata(tmp_path, context, te_hidden, family):
    unet = _peft_module("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 4, context, 320)
    te = _peft_module("text_model.encoder.layers.0.self_attn.q_proj", 4, te_hidden, te_hidden)
    path = save_kohya_lora(tmp_path / "x.safetensors", peft_to_kohya(unet, [te], "sd1", alphas={}, default_alpha=4), {})
    assert inspect_lora(path).family == family
    only_te = save_kohya_lora(tmp_path / "te.safetensors", peft_to_kohya({}, [te], "sd1", alphas={}, default_alpha=4), {})
    assert inspect_lora(only_te).family == family


def test_a_diverged_lora_with_nan_is_flagged(tmp_path):
    unet = _peft_module("mid_block.attentions.0.proj_in", 4, 64, 64)
    unet["mid_block.attentions.0.proj_in.lora_B.weight"][0, 0] = float("nan")
    path = save_kohya_lora(tmp_path / "nan.safetensors", peft_to_kohya(unet, [], "sd1", alphas={}, default_alpha=4),
                           _metadata("sd1"))
    info = inspect_lora(path)
    assert info.nonfinite == ["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"]
    assert any("NaN" in note for note in info.notes)


def test_a_kohya_file_without_alpha_counts_as_alpha_equal_rank(tmp_path):
    tensors = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 64),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(64, 4)}
    info = inspect_lora(save_kohya_lora(tmp_path / "old.safetensors", tensors, {}))
    assert info.modules["lora_unet_mid_block_attentions_0_proj_in"] == (4, 4.0)
    assert any("alpha = rank" in note for note in info.notes)


def test_inspect_reads_alpha_of_a_diffusers_folder_from_its_adapter_metadata(tmp_path):
    unet = {**_peft_module("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, 320, 320),
            **_peft_module("down_blocks.0.resnets.0.conv1", 2, 320, 320, conv=True)}
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "conv1"],
                        rank_pattern={"^down_blocks.0.resnets.0.conv1$": 2},
                        alpha_pattern={"^down_blocks.0.resnets.0.conv1$": 3})
    folder = save_diffusers_lora(tmp_path / "run", "sd1", unet, [], unet_lora_config=config).parent
    info = inspect_lora(folder)
    assert info.format == "diffusers"
    assert info.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == (4, 16.0)
    assert info.modules["unet.down_blocks.0.resnets.0.conv1"] == (2, 3.0)
    assert info.has_conv and not info.has_text_encoder and info.notes == []


def test_a_text_lora_adapter_folder_is_a_language_model_lora(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 8)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16}))
    info = inspect_lora(folder)
    assert (info.format, info.family) == ("peft", "llm")
    assert info.modules["base_model.model.model.layers.0.self_attn.q_proj"] == (8, 16.0)
    assert "language model" in lora_family_mismatch(info, "sdxl")


def test_pickles_and_broken_files_are_refused_with_a_reason(tmp_path):
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    with pytest.raises(LoraReadError, match="pickle"):
        inspect_lora(ckpt)
    broken = tmp_path / "cut.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(LoraReadError, match="cut.safetensors"):
        inspect_lora(broken)
    with pytest.raises(LoraReadError, match="holds no LoRA"):
        inspect_lora(tmp_path)
