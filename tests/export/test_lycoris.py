"""LoKr and LoHa (LyCORIS) on the SD family and for text: the file's keys are the ones WebUI/Forge and
ComfyUI load, and the update each key set makes there equals the one we trained.

`comfy_delta` re-implements, in this test only, what ComfyUI's `comfy/weight_adapter/lokr.py` and
`loha.py` (`calculate_weight`) compute from a file module's tensors and its alpha (read Dec 2026): the
rank that alpha is divided by is w2_b's, else w1_b's, and alpha is ignored when both LoKr factors are
whole; LoHa divides by hada_w1_b's rank. WebUI's `network_lokr.py` / `network_hada.py` use the same rule.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from core.config import TrainConfig
from core.export.lycoris import group_file, kohya_name_to_module_path, module_delta, peft_to_lycoris, scales_from_model
from core.families.sd.tiny import tiny_unet
from core.families.tiny_parts import clip_text_encoder
from tests.fixtures.tiny_sd import run_collect, tiny_run_config


def comfy_delta(parts: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The weight change ComfyUI applies for one LyCORIS module at strength 1."""
    alpha = parts.get("alpha")
    if "hada_w1_a" in parts:
        scale = float(alpha) / parts["hada_w1_b"].shape[0] if alpha is not None else 1.0
        m1 = torch.mm(parts["hada_w1_a"].float(), parts["hada_w1_b"].float())
        m2 = torch.mm(parts["hada_w2_a"].float(), parts["hada_w2_b"].float())
        return scale * (m1 * m2).reshape(shape)
    dim = None
    if "lokr_w1" in parts:
        w1 = parts["lokr_w1"].float()
    else:
        dim = parts["lokr_w1_b"].shape[0]
        w1 = torch.mm(parts["lokr_w1_a"].float(), parts["lokr_w1_b"].float())
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"].float()
    else:
        dim = parts["lokr_w2_b"].shape[0]
        w2 = torch.mm(parts["lokr_w2_a"].float(), parts["lokr_w2_b"].float())
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(shape)


VARIANTS = {
    "lokr": dict(lora_variant="lokr", lokr_factor=4),
    "lokr-decompose-both": dict(lora_variant="lokr", lokr_factor=4, lokr_decompose_both=True, lora_rank=1),
    "lokr-full-matrix": dict(lora_variant="lokr", lokr_full_matrix=True),
    "lokr-auto-factor": dict(lora_variant="lokr", lokr_factor=-1, lora_rank=2),
    "loha": dict(lora_variant="loha"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_key_of_a_lycoris_file_maps_to_a_layer_and_comfyui_rebuilds_our_exact_update(name):
    from core.families.sd.lora import add_text_encoder_lora, add_unet_lora
    from core.lora import peft_state

    cfg = dataclasses.replace(TrainConfig(), **{**dict(lora_rank=4, lora_alpha=3.0, conv_rank=4, conv_alpha=2.0),
                                                **VARIANTS[name]})
    unet, encoder = tiny_unet(), clip_text_encoder(32, seed=3)
    add_unet_lora(unet, cfg)
    add_text_encoder_lora(encoder, cfg)
    torch.manual_seed(0)
    for module in (unet, encoder):  # trained-looking adapters: no factor left at its zero start
        for param_name, param in module.named_parameters():
            if "lokr_" in param_name or "hada_" in param_name:
                param.data.normal_(0, 0.3)
    scales = {f"unet.{k}": v for k, v in scales_from_model(unet).items()}
    scales.update({f"text_encoder.{k}": v for k, v in scales_from_model(encoder).items()})
    tensors = peft_to_lycoris(peft_state(unet), [peft_state(encoder)], "sd1", scales=scales)

    modules = group_file(tensors)
    assert sum(len(parts) for parts in modules.values()) == len(tensors)  # every key belongs to a module
    kinds = set()
    for file_name, parts in modules.items():
        component, path = kohya_name_to_module_path(file_name, "sd1")
        model = unet if component == "unet" else encoder
        layer = model.get_submodule(path if component == "unet" else path.removeprefix("text_model."))
        ours = layer.get_delta_weight("default")
        theirs = comfy_delta(parts, layer.get_base_layer().weight.shape)
        assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-6), file_name
        assert torch.allclose(module_delta(parts, ours.shape), ours, rtol=1e-4, atol=1e-6), file_name
        kinds.add((component, ours.dim()))
    assert kinds == {("unet", 2), ("unet", 4), ("text_encoder", 2)}  # Linears, LoCon convs, CLIP
    if name == "lokr-full-matrix":
        assert all("lokr_w1" in p and "lokr_w2" in p and "alpha" not in p for p in modules.values())
    if name == "lokr-decompose-both":
        assert any("lokr_w1_a" in p for p in modules.values())
    if name.startswith("lokr"):
        assert all(k.rsplit(".", 1)[1] in {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                           "lokr_w2_b", "alpha"} for k in tensors)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lokr", "loha"])
def test_an_sd_run_trains_a_lycoris_file_that_resumes_and_its_update_is_the_trained_one(
        variant, tiny_sd1, sd_image_folder, tmp_path):
    common = dict(lora_variant=variant, lokr_factor=4, conv_rank=4, train_text_encoder=True, max_train_steps=4,
                  save_steps=2, cache_text_encoder_outputs=False, output_name="lyco")
    straight = tmp_path / "straight"
    outputs, events = run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, straight, **common))
    assert "diffusers" not in outputs or not outputs["diffusers"]
    tensors = load_file(outputs["lora"])
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    part = "lokr_w1" if variant == "lokr" else "hada_w1_a"
    assert any(k.endswith("." + part) for k in tensors)
    from safetensors import safe_open

    with safe_open(outputs["lora"], "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and f'"algo": "{variant}"' in meta["ss_network_args"]

    stopped = tmp_path / "stopped"
    run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, stopped, **common), stop_at=2)
    _, resumed = run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, stopped, resume_from="latest",
                                             **common))
    assert [e.step for e in resumed if e.kind == "progress"] == [3, 4]
    again = load_file(str(stopped / "lyco.safetensors"))
    assert again.keys() == tensors.keys()
    for key in tensors:
        assert torch.allclose(again[key], tensors[key], atol=1e-5), key


@pytest.mark.parametrize("family", ["flux-dev", "sd3", "z-image-turbo", "qwen-image"])
@pytest.mark.parametrize("variant", ["dora", "pissa"])
def test_the_transformer_families_take_lokr_and_loha_and_refuse_dora_and_pissa_in_one_sentence(family, variant):
    from core.family_api.lookup import family_impl

    for lycoris in ("lokr", "loha"):  # trained there too (tests/export/test_lycoris_transformers.py)
        family_impl(family).check(dataclasses.replace(TrainConfig(), lora_variant=lycoris))
    cfg = dataclasses.replace(TrainConfig(), lora_variant=variant)
    with pytest.raises(ValueError, match=f"lora_variant: {variant} is not available for .* use lora, rslora, lokr"):
        family_impl(family).check(cfg)


@pytest.mark.parametrize("variant", ["lokr", "loha"])
def test_a_lycoris_file_baked_into_an_sd_checkpoint_gives_base_plus_adapter_and_resize_says_why_not(
        variant, tiny_sd1, tmp_path):
    from core.families.sd.load import load_sd_model
    from core.tools.merge import bake_into_sd, scale_peft_adapter
    from core.tools.modules import LoraToolError
    from core.tools.extract import resize_file
    from tests.fixtures.tool_loras import make_sd_lora
    from tests.tools.test_tools_merge import text_out, unet_out

    made = make_sd_lora(tiny_sd1.folder, tmp_path / "lora", variant=variant, seed=3)
    assert made.diffusers is None and any(f".{'lokr' if variant == 'lokr' else 'hada'}_" in k
                                          for k in load_file(str(made.kohya)))
    out, report = bake_into_sd(str(tiny_sd1.single_file), [(made.kohya, 0.7)], tmp_path / "merged.safetensors",
                               dtype=None, model_config=str(tiny_sd1.folder))
    assert report.merged
    merged = load_sd_model(str(out), model_config=str(tiny_sd1.folder))
    reference = made.model
    scale_peft_adapter(reference.unet, 0.7)
    scale_peft_adapter(reference.text_encoders[0], 0.7)
    torch.testing.assert_close(unet_out(merged.unet), unet_out(reference.unet), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_out(merged.text_encoders[0]), text_out(reference.text_encoders[0]),
                               rtol=1e-4, atol=1e-5)
    base = load_sd_model(str(tiny_sd1.single_file), model_config=str(tiny_sd1.folder))
    assert (unet_out(base.unet) - unet_out(merged.unet)).abs().max() > 1e-4

    kind = "LoKr" if variant == "lokr" else "LoHa"
    with pytest.raises(LoraToolError, match=f"is a {kind} file: .*no (single )?rank to cut"):
        resize_file(made.kohya, tmp_path / "small.safetensors", rank=2)


@pytest.mark.slow
def test_the_test_tab_applies_a_lokr_beside_a_lora_like_both_baked_in_and_leaves_the_base_untouched(
        tiny_sd1, tmp_path):
    from core.sample import clear_pipeline_cache, generate_images
    from core.tools.merge import bake_into_sd
    from tests.fixtures.tool_loras import make_sd_lora
    from tests.export.test_multi_lora import PROMPT, SETTINGS, max_diff

    lokr = make_sd_lora(tiny_sd1.folder, tmp_path / "k", variant="lokr", seed=5, name="k").kohya
    lora = make_sd_lora(tiny_sd1.folder, tmp_path / "l", seed=11, name="l").kohya
    folder = str(tiny_sd1.folder)
    both = [(lokr, 0.8), (lora, 0.5)]
    try:
        baked, _ = bake_into_sd(folder, both, tmp_path / "baked.safetensors", dtype=None)
        reference = generate_images(str(baked), None, PROMPT, model_config=folder, **SETTINGS)[0]
        base = generate_images(folder, None, PROMPT, **SETTINGS)[0]
        for fuse in (True, False):
            image = generate_images(folder, None, PROMPT, loras=both, fuse=fuse, **SETTINGS)[0]
            assert max_diff(image, reference) <= 1, fuse
        assert max_diff(image, base) >= 4  # the LoKr changes the picture...
        # ...and is gone after: the cached pipeline draws the base image again, exactly.
        assert generate_images(folder, None, PROMPT, **SETTINGS)[0].tobytes() == base.tobytes()
    finally:
        clear_pipeline_cache()


def test_on_a_full_size_sd15_unet_a_lokr_is_a_fraction_of_a_lora_and_a_loha_twice_it():
    from bench.lycoris_sizes import adapter_megabytes

    lora, lokr, loha = (adapter_megabytes("sd15", v, 16, 0, -1) for v in ("lora", "lokr", "loha"))
    assert lokr < lora / 10 and loha == pytest.approx(2 * lora)
