"""The kohya/WebUI LoRA file and the diffusers LoRA file, proven with code we did not write.

Every file here is loaded back with diffusers' own `pipe.load_lora_weights` (which reads
kohya files, incl. SDXL's sgm block names) into a fresh copy of a tiny but real SD 1.x /
SDXL pipeline, and must give the same UNet and text-encoder outputs as the in-memory
PEFT model it was written from.
"""
from __future__ import annotations

import hashlib
import logging
import math

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from core.export.diffusers_format import DIFFUSERS_WEIGHT_NAME, diffusers_lora_to_peft, save_diffusers_lora
from core.export.kohya import (
    LoraFormatError,
    TEXT_ENCODER_NAMES,
    kohya_alphas_from_model,
    kohya_to_peft,
    load_kohya_lora,
    peft_to_kohya,
    save_kohya_lora,
)
from core.export.sgm_names import diffusers_to_sgm, path_to_underscored, sgm_to_diffusers, underscored_to_path
from tests.fixtures.export_models import add_random_lora, run_models, text_encoders

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
ATOL = 1e-4


def _lora(rank=4, alpha=8.0, targets=ATTENTION, **kw) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian", **kw)


def _conv_names(unet) -> list[str]:
    """The LoCon layers kohya adapts: ResNet convs and the down/up samplers."""
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)
            and any(part in n for part in (".resnets.", ".downsamplers.", ".upsamplers."))]


def _peft_states(pipe):
    return get_peft_model_state_dict(pipe.unet), [get_peft_model_state_dict(e) if hasattr(e, "peft_config") else {}
                                                  for e in text_encoders(pipe)]


def _all_alphas(pipe) -> dict[str, float]:
    alphas = {f"unet.{k}": v for k, v in kohya_alphas_from_model(pipe.unet).items()}
    for name, encoder in zip(TEXT_ENCODER_NAMES, text_encoders(pipe)):
        alphas.update({f"{name}.{k}": v for k, v in kohya_alphas_from_model(encoder).items()})
    return alphas


def _write_kohya(pipe, family, path, dtype=None):
    unet_sd, te_sds = _peft_states(pipe)
    tensors = peft_to_kohya(unet_sd, te_sds, family, alphas=_all_alphas(pipe))
    return save_kohya_lora(path, tensors, {"ss_network_dim": "4", "ss_output_name": "tiny"}, dtype=dtype)


def _assert_same(got, want, base, *, text_encoder=True):
    assert torch.allclose(got.unet, want.unet, atol=ATOL), (got.unet - want.unet).abs().max()
    assert not torch.allclose(base.unet, want.unet, atol=1e-2), "the LoRA must change the UNet output"
    if text_encoder:
        for g, w, b in zip(got.text_encoders, want.text_encoders, base.text_encoders, strict=True):
            assert torch.allclose(g, w, atol=ATOL), (g - w).abs().max()
            assert not torch.allclose(b, w, atol=1e-2), "the LoRA must change the text encoder output"


def _load_fresh(factory, path):
    fresh = factory()
    base = run_models(fresh)
    fresh.load_lora_weights(str(path))
    return base, run_models(fresh)


# --- the proof: diffusers' own loader ---------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_sd1_kohya_file_loads_in_diffusers_with_the_trained_strength(tiny_sd1_factory, tmp_path, rslora):
    pipe = tiny_sd1_factory()
    # alpha != rank on both parts (and rsLoRA's alpha/sqrt(rank)): the strength must survive.
    add_random_lora(pipe, _lora(4, 8.0, use_rslora=rslora), _lora(4, 2.0, CLIP_ATTENTION + ["fc1", "fc2"]))
    want = run_models(pipe)
    path = _write_kohya(pipe, "sd1", tmp_path / "style.safetensors")

    tensors, _ = load_kohya_lora(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in tensors
    alpha = tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]
    assert alpha.dim() == 0 and alpha.item() == pytest.approx(8.0 * (math.sqrt(4) if rslora else 1.0))

    base, got = _load_fresh(tiny_sd1_factory, path)
    _assert_same(got, want, base)


def test_sdxl_kohya_file_uses_sgm_block_names_and_loads_in_diffusers(tiny_sdxl_factory, tmp_path):
    pipe = tiny_sdxl_factory()
    conv = _conv_names(pipe.unet)
    extra = ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj", "conv_in", "conv_out",
             "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2"]
    # Modest strength: a LoRA on every layer incl. the time embeddings amplifies float rounding.
    add_random_lora(pipe, _lora(4, 8.0, ATTENTION + conv + extra), _lora(2, 1.0, CLIP_ATTENTION), strength=0.05)
    want = run_models(pipe)
    path = _write_kohya(pipe, "sdxl", tmp_path / "xl.safetensors", dtype=torch.float32)

    keys = set(load_kohya_lora(path)[0])
    unet_keys = [k for k in keys if k.startswith("lora_unet_")]
    assert not any(p in k for k in unet_keys for p in ("down_blocks", "mid_block", "up_blocks")), \
        "WebUI maps SDXL keys onto sgm modules: no diffusers block names may remain"
    for name in ("input_blocks_4_1_transformer_blocks_0_attn1_to_q",   # down_blocks.1.attentions.0
                 "input_blocks_8_1_transformer_blocks_1_attn2_to_k",   # down_blocks.2.attentions.1, depth 2
                 "middle_block_1_transformer_blocks_1_ff_net_2",       # mid_block.attentions.0
                 "output_blocks_2_1_proj_out",                         # up_blocks.0.attentions.2
                 "output_blocks_5_2_conv",                             # up_blocks.1.upsamplers.0
                 "input_blocks_3_0_op",                                # down_blocks.0.downsamplers.0
                 "input_blocks_1_0_in_layers_2", "input_blocks_2_0_emb_layers_1",
                 "output_blocks_8_0_out_layers_3", "output_blocks_0_0_skip_connection",
                 "middle_block_2_in_layers_2", "input_blocks_0_0", "out_2", "time_embed_0", "label_emb_0_2"):
        assert f"lora_unet_{name}.lora_down.weight" in keys, name
    assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight" in keys

    base, got = _load_fresh(tiny_sdxl_factory, path)
    _assert_same(got, want, base)


def test_sd1_locon_from_the_project_config_loads_with_its_own_conv_rank_and_alpha(tiny_sd1_factory, tmp_path):
    from core.config import config_from_dict
    from core.lora import make_lora_config

    cfg = config_from_dict({"base_model": "x", "train_data_dir": "d", "lora_rank": 4, "lora_alpha": 8,
                            "conv_rank": 2, "conv_alpha": 1}, check_paths=False)
    pipe = tiny_sd1_factory()
    unet_config = make_lora_config(cfg, ATTENTION, conv_modules=_conv_names(pipe.unet))
    unet_config.init_lora_weights = "gaussian"
    add_random_lora(pipe, unet_config)
    want = run_models(pipe)
    path = _write_kohya(pipe, "sd1", tmp_path / "locon.safetensors")

    tensors, _ = load_kohya_lora(path)
    down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    assert down.shape[0] == 2 and down.shape[2:] == (3, 3) and up.shape[2:] == (1, 1)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.alpha"].item() == 8.0
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in tensors
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight" in tensors

    base, got = _load_fresh(tiny_sd1_factory, path)
    _assert_same(got, want, base, text_encoder=False)


def _merge_kohya_by_lycoris_formula(unet, tensors: dict[str, torch.Tensor]) -> None:
    """Apply a kohya LoRA with DoRA the way LyCORIS does for dora_scale [out, 1...] (wd_on_output=True):
    W' = (W + alpha/rank * up @ down) * dora_scale / ||W + alpha/rank * up @ down||_row."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            key = "lora_unet_" + path_to_underscored(name)
            if f"{key}.lora_down.weight" not in tensors:
                continue
            down, up = tensors[f"{key}.lora_down.weight"].float(), tensors[f"{key}.lora_up.weight"].float()
            scale = tensors[f"{key}.alpha"].item() / down.shape[0]
            weight = module.weight
            merged = weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
            weight.copy_(merged * tensors[f"{key}.dora_scale"] / norm)


def test_dora_file_holds_per_output_dora_scale_that_reproduces_the_peft_model(tiny_sd1_factory, tmp_path, caplog):
    pipe = tiny_sd1_factory()
    conv = _conv_names(pipe.unet)[:3]
    add_random_lora(pipe, _lora(4, 8.0, ATTENTION + conv, use_dora=True))
    want = run_models(pipe)
    path = _write_kohya(pipe, "sd1", tmp_path / "dora.safetensors")
    tensors, _ = load_kohya_lora(path)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert tensors[f"{q}.dora_scale"].shape == (32, 1)               # Linear: [out, 1]
    assert tensors[f"lora_unet_{path_to_underscored(conv[0])}.dora_scale"].shape == (32, 1, 1, 1)  # conv

    # The math LyCORIS applies to this layout gives the PEFT DoRA model's output.
    merged = tiny_sd1_factory()
    _merge_kohya_by_lycoris_formula(merged.unet, tensors)
    assert torch.allclose(run_models(merged).unet, want.unet, atol=ATOL)

    # diffusers drops dora_scale (with a warning) and applies the plain LoRA part: exactly what the
    # same file without dora_scale gives.
    with caplog.at_level(logging.WARNING):
        base, got = _load_fresh(tiny_sd1_factory, path)
    assert "dora_scale" in caplog.text
    plain = tmp_path / "plain.safetensors"
    save_kohya_lora(plain, {k: v for k, v in tensors.items() if not k.endswith("dora_scale")}, {}, dtype=None)
    _, lora_only = _load_fresh(tiny_sd1_factory, plain)
    assert torch.allclose(got.unet, lora_only.unet, atol=ATOL)
    assert not torch.allclose(got.unet, base.unet, atol=1e-2)


# --- round trips and key names ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_to_peft_gives_back_the_same_lora(family, tiny_sd1_factory, tiny_sdxl_factory):
    pipe = (tiny_sdxl_factory if family == "sdxl" else tiny_sd1_factory)()
    conv = _conv_names(pipe.unet)
    add_random_lora(pipe, _lora(4, 8.0, ATTENTION + conv, use_dora=True,
                                rank_pattern={f"^{conv[0]}$": 2}, alpha_pattern={f"^{conv[0]}$": 3.0}),
                    _lora(2, 1.0, CLIP_ATTENTION))
    unet_sd, te_sds = _peft_states(pipe)
    alphas = _all_alphas(pipe)
    unet_back, tes_back, alphas_back = kohya_to_peft(peft_to_kohya(unet_sd, te_sds, family, alphas=alphas), family)
    assert unet_back.keys() == unet_sd.keys()
    assert all(torch.equal(unet_back[k], unet_sd[k]) for k in unet_sd)
    assert alphas_back[f"unet.{conv[0]}"] == 3.0 and alphas_back[f"unet.{conv[1]}"] == 8.0
    for back, original in zip(tes_back, te_sds, strict=True):
        # transformers 5's CLIPTextModel has no `text_model.` wrapper; files always carry it.
        assert {k.removeprefix("text_model.") for k in back} == {k.removeprefix("text_model.") for k in original}


def _sdxl_base_unet_on_meta():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():  # the real SDXL base layout, no memory
        return UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)


def test_every_module_of_the_real_sdxl_unet_maps_to_sgm_as_diffusers_reads_it_back():
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    unet = _sdxl_base_unet_on_meta()
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(names) > 700
    dummy = torch.zeros(1)
    kohya = {}
    for name in names:
        sgm = diffusers_to_sgm(name)
        assert sgm_to_diffusers(sgm) == name
        assert underscored_to_path(path_to_underscored(sgm)) == sgm
        for part in ("lora_down.weight", "lora_up.weight"):
            kohya[f"lora_unet_{path_to_underscored(sgm)}.{part}"] = dummy
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(kohya), unet.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    back = {k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith(".lora_A.weight")}
    assert back == set(names)


def test_sd1_and_clip_module_names_survive_the_underscore_encoding(tiny_sd1_factory):
    pipe = tiny_sd1_factory()
    for model in (pipe.unet, pipe.text_encoder):
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                assert underscored_to_path(path_to_underscored(name)) == name


def test_a_peft_model_wrapped_text_encoder_converts_like_an_adapted_one():
    from peft import get_peft_model
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2))
    wrapped = get_peft_model(encoder, _lora(2, 4.0, ["q_proj"]))
    state = get_peft_model_state_dict(wrapped)
    assert next(iter(state)).startswith("base_model.model.")
    alphas = {f"text_encoder.{k}": v for k, v in kohya_alphas_from_model(wrapped).items()}
    tensors = peft_to_kohya({}, [state], "sd1", alphas=alphas)
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 4.0


def test_files_from_other_tools_that_peft_cannot_hold_are_refused_with_the_reason():
    loha = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}
    with pytest.raises(LoraFormatError, match="LoHa"):
        kohya_to_peft(loha, "sd1")
    per_input = {"lora_unet_x_to_q.lora_down.weight": torch.zeros(2, 8),
                 "lora_unet_x_to_q.lora_up.weight": torch.zeros(4, 2),
                 "lora_unet_x_to_q.dora_scale": torch.ones(1, 8)}
    with pytest.raises(LoraFormatError, match="per-input"):
        kohya_to_peft(per_input, "sd1")
    sgm = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 8),
           "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(LoraFormatError, match="SDXL"):
        kohya_to_peft(sgm, "sd1")
    with pytest.raises(LoraFormatError, match="alpha"):
        peft_to_kohya({"to_q.lora_A.weight": torch.zeros(2, 8), "to_q.lora_B.weight": torch.zeros(8, 2)},
                      [], "sd1", alphas={})


# --- the file itself ---------------------------------------------------------------------------

def test_saved_file_has_webui_hash_string_metadata_fp16_weights_and_exact_alpha(tmp_path):
    tensors = {"lora_unet_a_to_q.lora_down.weight": torch.randn(4, 8),
               "lora_unet_a_to_q.lora_up.weight": torch.randn(8, 4),
               "lora_unet_a_to_q.alpha": torch.tensor(16 * math.sqrt(8))}
    path = save_kohya_lora(tmp_path / "out" / "my.safetensors", tensors, {"ss_network_dim": 4, "ss_v2": False},
                           dtype=torch.float16)
    assert [p.name for p in path.parent.iterdir()] == ["my.safetensors"]  # no temporary file left behind
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("lora_unet_a_to_q.lora_down.weight").dtype == torch.float16
        assert handle.get_tensor("lora_unet_a_to_q.alpha").item() == pytest.approx(16 * math.sqrt(8), rel=1e-6)
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest()  # WebUI's addnet hash
    assert len(meta["sshs_legacy_hash"]) == 8
    assert meta["ss_network_dim"] == "4" and meta["ss_v2"] == "False"
    # The hash covers the tensors only: other metadata gives the same hash.
    again = save_kohya_lora(tmp_path / "other.safetensors", tensors, {"ss_output_name": "x"}, dtype=torch.float16)
    assert load_kohya_lora(again)[1]["sshs_model_hash"] == meta["sshs_model_hash"]


# --- diffusers' own format ---------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_file_keeps_alpha_so_it_loads_at_the_trained_strength(family, tiny_sd1_factory,
                                                                       tiny_sdxl_factory, tmp_path):
    factory = tiny_sdxl_factory if family == "sdxl" else tiny_sd1_factory
    pipe = factory()
    conv = _conv_names(pipe.unet)[:4]  # a few LoCon layers: DoRA on many convs is slow on CPU
    add_random_lora(pipe, _lora(4, 16.0, ATTENTION + conv, rank_pattern={f"^{conv[0]}$": 2},
                                alpha_pattern={f"^{conv[0]}$": 7.0}, use_dora=family == "sdxl"),
                    _lora(4, 1.0, CLIP_ATTENTION + ["fc1", "fc2"]))
    want = run_models(pipe)
    unet_sd, te_sds = _peft_states(pipe)
    written = save_diffusers_lora(tmp_path / "out", family, unet_sd, te_sds,
                                  unet_lora_config=pipe.unet.peft_config["default"],
                                  text_encoder_lora_configs=[e.peft_config["default"] for e in text_encoders(pipe)])
    assert written == tmp_path / "out" / DIFFUSERS_WEIGHT_NAME
    assert sorted(p.name for p in written.parent.iterdir()) == [DIFFUSERS_WEIGHT_NAME]
    base, got = _load_fresh(factory, written.parent)
    _assert_same(got, want, base)

    tensors, meta = load_kohya_lora(written)
    unet_back, _, alphas = diffusers_lora_to_peft(tensors, meta)
    assert unet_back.keys() == unet_sd.keys()
    assert alphas[f"unet.{conv[0]}"] == 7.0 and alphas[f"unet.{conv[1]}"] == 16.0


def test_without_adapter_metadata_a_diffusers_file_loads_at_the_wrong_strength(tiny_sd1_factory, tmp_path):
    """The FIELD-NOTES alpha trap, shown with diffusers itself: why the metadata must be written."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    pipe = tiny_sd1_factory()
    add_random_lora(pipe, _lora(4, 16.0))
    want = run_models(pipe)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    _, got = _load_fresh(tiny_sd1_factory, tmp_path)
    assert not torch.allclose(got.unet, want.unet, atol=1e-2)
