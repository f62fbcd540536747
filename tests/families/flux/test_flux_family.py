"""FLUX.1 / Chroma family: detection, loading both layouts, prompt and latent handling, the
training math, and the story that matters: a tiny FLUX learns one image with a LoRA,
also with its base weights stored in fp8.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from core.families.dit import flow, low_memory, prompt_cache, weights
from core.families.flux import convert as flux_convert
from core.families.flux import load as flux_load
from core.families.flux import lora as flux_lora
from core.families.flux import loss as flux_loss
from core.families.flux import single_file as flux_single_file
from core.families.flux import text as flux_text
from core.family_api.contract import ModelLoadError


def _write_keys(path: Path, keys: list[str]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


BFL_COMMON = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight",
              "txt_in.weight", "final_layer.linear.weight"]


# --- detection -------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys, prefix, expected", [
    (BFL_COMMON + ["guidance_in.in_layer.weight", "time_in.in_layer.weight"], "", "flux-dev"),
    (BFL_COMMON + ["time_in.in_layer.weight"], "model.diffusion_model.", "flux-schnell"),
    (BFL_COMMON + ["guidance_in.in_layer.weight"], "model.diffusion_model.", "flux-dev"),
    (BFL_COMMON + ["distilled_guidance_layer.in_proj.weight"], "diffusion_model.", "chroma"),
    (["transformer_blocks.0.attn.add_q_proj.weight", "single_transformer_blocks.0.proj_mlp.weight",
      "time_text_embed.guidance_embedder.linear_1.weight"], "", "flux-dev"),
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"], "", None),
])
def test_variant_from_a_single_file_header(tmp_path, keys, prefix, expected):
    path = _write_keys(tmp_path / "model.safetensors", [prefix + k if not k.startswith("model.") else k
                                                          for k in keys])
    assert flux_load.detect_variant(path) == expected


def test_variant_from_diffusers_folders(tiny_flux_dev, tiny_flux_schnell, tiny_chroma, tmp_path):
    assert flux_load.detect_variant(tiny_flux_dev.folder) == "flux-dev"
    assert flux_load.detect_variant(tiny_flux_schnell.folder) == "flux-schnell"
    assert flux_load.detect_variant(tiny_chroma.folder) == "chroma"
    # A bare transformer folder (config.json only) is recognised too; an SD folder is not FLUX.
    assert flux_load.detect_variant(tiny_flux_dev.folder / "transformer") == "flux-dev"
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert flux_load.detect_variant(tmp_path) is None


# --- the BFL <-> diffusers mapping --------------------------------------------------------------------


def _real_width_bfl_state(inner: int = 3072, mlp: int = 12288, cols: int = 2) -> dict[str, torch.Tensor]:
    """A BFL-named FLUX.1 state with the real output widths but 2 input columns (small, real layout)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    state = {}
    for name, rows in [("time_in.in_layer", inner), ("time_in.out_layer", inner), ("vector_in.in_layer", inner),
                       ("vector_in.out_layer", inner), ("guidance_in.in_layer", inner),
                       ("guidance_in.out_layer", inner), ("txt_in", inner), ("img_in", inner),
                       ("final_layer.linear", 64), ("final_layer.adaLN_modulation.1", 2 * inner)]:
        state[f"{name}.weight"], state[f"{name}.bias"] = r(rows, cols), r(rows)
    d = "double_blocks.0."
    for stream in ("img", "txt"):
        for name, rows in [("_mod.lin", 6 * inner), ("_attn.qkv", 3 * inner), ("_attn.proj", inner),
                           ("_mlp.0", mlp), ("_mlp.2", inner)]:
            state[f"{d}{stream}{name}.weight"], state[f"{d}{stream}{name}.bias"] = r(rows, cols), r(rows)
        state[f"{d}{stream}_attn.norm.query_norm.scale"] = r(128)
        state[f"{d}{stream}_attn.norm.key_norm.scale"] = r(128)
    s = "single_blocks.0."
    for name, rows in [("modulation.lin", 3 * inner), ("linear1", 3 * inner + mlp), ("linear2", inner)]:
        state[f"{s}{name}.weight"], state[f"{s}{name}.bias"] = r(rows, cols), r(rows)
    state[f"{s}norm.query_norm.scale"], state[f"{s}norm.key_norm.scale"] = r(128), r(128)
    return state


def test_bfl_conversion_matches_diffusers_converter_on_real_widths():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    state = _real_width_bfl_state()
    prefixed = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(prefixed))
    ours = flux_convert.bfl_to_diffusers(prefixed)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    back = flux_convert.diffusers_to_bfl(ours)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_unknown_tensor_in_a_bfl_file_is_reported():
    state = _real_width_bfl_state()
    state["double_blocks.0.img_attn.lora_extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="lora_extra"):
        flux_convert.bfl_to_diffusers(state)


# --- loading -----------------------------------------------------------------------------------------


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.allclose(sa[k].float(), sb[k].float(), atol=atol) for k in sa)


def test_comfy_layout_loads_the_same_model_as_the_diffusers_folder(tiny_flux_dev):
    folder = flux_load.load_flux_model(str(tiny_flux_dev.folder))
    single = flux_load.load_flux_model(str(tiny_flux_dev.comfy_transformer), config_source=str(tiny_flux_dev.folder))
    assert folder.variant == single.variant == "flux-dev" and single.is_single_file and folder.has_guidance
    assert _same_weights(folder.transformer, single.transformer)
    assert _same_weights(folder.text_encoder, single.text_encoder)
    assert _same_weights(folder.vae, single.vae)
    # The fixture stores T5 in fp16 without encoder.embed_tokens (as t5xxl_fp16 files are): tied back, upcast.
    assert _same_weights(folder.text_encoder_2, single.text_encoder_2, atol=2e-3)
    assert single.text_encoder_2.dtype == torch.float32
    assert [n.split(":")[0] for n in single.notes] == ["CLIP-L", "T5", "AE"]
    # Same model, same prediction: the conversion is exact end to end.
    batch = _batch(folder, ["a red cat"])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.no_grad():
        assert torch.equal(flux_loss.flux_loss(folder.transformer, batch, g1), flux_loss.flux_loss(single.transformer, batch, g2))


def test_training_loads_the_transformer_last_with_the_same_weights(tiny_flux_dev):
    deferred = flux_load.load_flux_model(str(tiny_flux_dev.folder), defer_transformer=True)
    assert deferred.transformer is None and deferred.text_encoder_2 is not None  # encoders first, for caching
    deferred.load_network()
    assert _same_weights(deferred.transformer, flux_load.load_flux_model(str(tiny_flux_dev.folder)).transformer)


def test_a_missing_component_file_is_named_with_where_it_goes(tiny_flux_dev, tmp_path):
    root = tmp_path / "ComfyUI"
    shutil.copytree(tiny_flux_dev.comfy_root, root / "models")
    (root / "models" / "vae" / "ae.safetensors").unlink()
    transformer = root / "models" / "diffusion_models" / tiny_flux_dev.comfy_transformer.name
    with pytest.raises(ModelLoadError, match="ae.safetensors") as info:
        flux_load.load_flux_model(str(transformer), config_source=str(tiny_flux_dev.folder))
    assert str(root / "models" / "vae") in info.value.advice
    # Given explicitly, a part can live anywhere.
    model = flux_load.load_flux_model(str(transformer), config_source=str(tiny_flux_dev.folder),
                                 vae=str(tiny_flux_dev.comfy_root / "vae" / "ae.safetensors"))
    assert model.vae is not None


def test_single_file_without_a_config_source_says_what_to_give(tiny_flux_dev, monkeypatch):
    from core.families.flux import load as flux_load

    # Offline, the default config source (a hub id) is not in any cache: the error says what to give.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(flux_load.HUB_CONFIGS, "flux-dev", "lora-scripts-tests/no-such-flux")
    with pytest.raises(ModelLoadError, match="no-such-flux") as info:
        flux_load.load_flux_model(str(tiny_flux_dev.comfy_transformer))
    assert "base_model_config" in info.value.advice


def test_fp8_transformer_file_loads_upcast_to_the_compute_dtype(tiny_flux_dev, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_flux_dev.comfy_transformer))
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file(fp8, str(path))
    assert weights.file_has_fp8(path) and not weights.file_has_fp8(tiny_flux_dev.comfy_transformer)
    model = flux_single_file.load_transformer_file(path, config_source=str(tiny_flux_dev.folder), dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    expected = flux_convert.bfl_to_diffusers({k: v.float() for k, v in fp8.items()})
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


def test_an_all_in_one_checkpoint_gives_its_diffusion_model(tiny_flux_dev, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_flux_dev.comfy_transformer))
    state["vae.decoder.conv_in.weight"] = torch.zeros(2, 2)  # what ComfyUI's all-in-one files add
    state["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "flux1-dev-aio.safetensors"))
    model = flux_single_file.load_transformer_file(tmp_path / "flux1-dev-aio.safetensors",
                                                   config_source=str(tiny_flux_dev.folder))
    reference = flux_single_file.load_transformer_file(tiny_flux_dev.comfy_transformer, config_source=str(tiny_flux_dev.folder))
    assert _same_weights(model, reference)


@pytest.mark.parametrize("layout", ["models/diffusion_models", "models/unet", "models/diffusion_models/flux"])
def test_comfy_models_root_is_found_from_the_transformer_folder(tmp_path, layout):
    folder = tmp_path / "ComfyUI" / layout
    folder.mkdir(parents=True)
    assert weights.comfy_models_root(folder / "flux1-dev.safetensors") == (tmp_path / "ComfyUI" / "models").resolve()
    assert weights.comfy_models_root(tmp_path / "elsewhere" / "flux1-dev.safetensors") is None


def test_scaled_fp8_files_are_rescaled(tmp_path):
    from safetensors.torch import save_file

    weight = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    save_file({"layer.weight": (weight / 2).to(torch.float8_e4m3fn), "layer.scale_weight": torch.tensor(2.0),
               "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, str(tmp_path / "t5.safetensors"))
    state = weights.read_upcast(tmp_path / "t5.safetensors", torch.float32)
    assert set(state) == {"layer.weight"} and torch.equal(state["layer.weight"], weight)


def test_chroma_loads_without_clip_from_both_layouts(tiny_chroma):
    model = flux_load.load_flux_model(str(tiny_chroma.folder))
    assert model.variant == "chroma" and model.text_encoder is None and model.tokenizer is None
    assert not model.has_guidance
    assert not (tiny_chroma.comfy_root / "text_encoders" / "clip_l.safetensors").exists()
    single = flux_load.load_flux_model(str(tiny_chroma.comfy_transformer), config_source=str(tiny_chroma.folder))
    assert single.variant == "chroma" and single.text_encoder is None
    assert _same_weights(model.transformer, single.transformer) and _same_weights(model.vae, single.vae)
    assert _same_weights(model.text_encoder_2, single.text_encoder_2, atol=2e-3)


def _chroma_from_flux_state(state: dict[str, torch.Tensor], inner: int = 3072, cols: int = 2):
    """Chroma's BFL layout from FLUX's: no modulation / guidance / vector inputs, plus the approximator."""
    g = torch.Generator().manual_seed(1)
    drop = ("time_in.", "vector_in.", "guidance_in.", "final_layer.adaLN_modulation.")
    out = {k: v for k, v in state.items() if not k.startswith(drop) and "_mod.lin" not in k
           and "modulation.lin" not in k}
    out["distilled_guidance_layer.in_proj.weight"] = torch.randn(5120, cols, generator=g)
    out["distilled_guidance_layer.in_proj.bias"] = torch.randn(5120, generator=g)
    out["distilled_guidance_layer.out_proj.weight"] = torch.randn(inner, cols, generator=g)
    out["distilled_guidance_layer.out_proj.bias"] = torch.randn(inner, generator=g)
    for i in range(2):
        for name in ("in_layer", "out_layer"):
            out[f"distilled_guidance_layer.layers.{i}.{name}.weight"] = torch.randn(5120, cols, generator=g)
            out[f"distilled_guidance_layer.layers.{i}.{name}.bias"] = torch.randn(5120, generator=g)
        out[f"distilled_guidance_layer.norms.{i}.scale"] = torch.randn(5120, generator=g)
    return out


def test_chroma_conversion_matches_diffusers_converter_on_real_widths():
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    state = _chroma_from_flux_state(_real_width_bfl_state())
    assert flux_load.variant_from_keys(state) == "chroma"
    theirs = convert_chroma_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v
                                                                 for k, v in state.items()})
    ours = flux_convert.bfl_to_diffusers(state)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    back = flux_convert.diffusers_to_bfl(ours)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


# --- prompts -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_model(tiny_flux_dev):
    return flux_load.load_flux_model(str(tiny_flux_dev.folder))


def _encode(model, captions, length=16):
    return flux_text.encode_prompts(model.text_encoder, model.tokenizer, model.text_encoder_2, model.tokenizer_2,
                               captions, max_sequence_length=length, chroma=model.variant == "chroma")


def test_prompt_encoding_matches_the_pipeline(dev_model):
    from diffusers import FluxPipeline

    ours = _encode(dev_model, ["a red cat", "sks person in a painting"], length=24)
    assert ours.prompt_embeds.shape == (2, 24, 32) and ours.pooled.shape == (2, 32)
    assert ours.attention_mask is None and torch.equal(ours.text_ids, torch.zeros(24, 3))
    pipe = FluxPipeline(scheduler=None, vae=dev_model.vae, text_encoder=dev_model.text_encoder,
                        tokenizer=dev_model.tokenizer, text_encoder_2=dev_model.text_encoder_2,
                        tokenizer_2=dev_model.tokenizer_2, transformer=dev_model.transformer)
    embeds, pooled, ids = pipe.encode_prompt(["a red cat", "sks person in a painting"], device="cpu",
                                             max_sequence_length=24)
    # Not bitwise: the pipeline runs with autograd on, which picks other attention kernels.
    assert torch.allclose(ours.prompt_embeds, embeds, atol=1e-5) and torch.allclose(ours.pooled, pooled, atol=1e-5)
    assert torch.equal(ours.text_ids, ids)


def test_chroma_encoding_keeps_one_padding_token_visible(tiny_chroma):
    model = flux_load.load_flux_model(str(tiny_chroma.folder))
    out = _encode(model, ["a red cat", "a tiny blue dog with a big cat"])
    assert out.pooled is None
    # "a red cat" + </s> = 4 tokens, plus one visible pad -> 5; the longer prompt 9 + 1.
    assert out.attention_mask.sum(dim=1).tolist() == [5, 10]


def test_prompt_cache_is_written_once_and_keyed_by_encoder(dev_model, tmp_path):
    calls: list[list[str]] = []

    def encode(captions):
        calls.append(list(captions))
        return _encode(dev_model, captions).entries()

    identity = prompt_cache.encoder_identity(dev_model.text_encoder, dev_model.text_encoder_2, settings="flux-dev|16")
    captions = ["a red cat", "a blue dog", "a red cat"]
    first, hits = prompt_cache.cache_encodings(captions, encode, tmp_path, identity)
    assert hits == 0 and calls == [["a red cat", "a blue dog"]] and set(first) == {"a red cat", "a blue dog"}
    files = sorted((tmp_path / identity).iterdir())
    assert len(files) == 2 and all(f.suffix == ".safetensors" for f in files)  # no temp files left behind
    again, hits = prompt_cache.cache_encodings(captions, encode, tmp_path, identity)
    assert hits == 2 and len(calls) == 1
    assert torch.equal(again["a blue dog"]["prompt_embeds"], first["a blue dog"]["prompt_embeds"])
    batch = flux_text.stack_embeds([again[c] for c in captions])
    assert batch.prompt_embeds.shape == (3, 16, 32) and batch.pooled.shape == (3, 32)
    other = prompt_cache.encoder_identity(dev_model.text_encoder, dev_model.text_encoder_2, settings="flux-dev|8")
    assert other != identity
    _, hits = prompt_cache.cache_encodings(["a red cat"], encode, tmp_path, other)
    assert hits == 0 and len(calls) == 2


def test_free_text_encoders_drops_them(tiny_flux_dev):
    model = flux_load.load_flux_model(str(tiny_flux_dev.folder))
    freed = prompt_cache.free_text_encoders(model)
    assert freed > 0 and model.text_encoder is None and model.text_encoder_2 is None


# --- latents -----------------------------------------------------------------------------------------


def test_packing_round_trip_is_exact_and_matches_the_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    packed = flow.pack_latents(latents)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(flow.unpack_latents(packed, 6, 10), latents)
    # The pipeline's unpack takes pixel sizes; with an 8x VAE 48x80 px is this 6x10 latent.
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), latents)
    assert torch.equal(flux_loss.latent_image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu",
                                                                                            torch.float32))
    with pytest.raises(ValueError, match="even"):
        flow.pack_latents(torch.randn(1, 16, 5, 10))


def test_vae_latents_use_shift_and_scale(dev_model):
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    latents = flux_loss.encode_latents(dev_model.vae, pixels, g)
    with torch.no_grad():
        raw = dev_model.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    assert torch.allclose(latents, (raw - 0.0609) * 1.5035)
    assert torch.allclose(flux_loss.latents_for_decode(latents, dev_model.vae), raw, atol=1e-6)
    moments = dev_model.vae.encode(pixels).latent_dist.parameters.detach()
    from_cache = flux_loss.latents_from_moments(moments, dev_model.vae.config, torch.Generator().manual_seed(0))
    assert torch.allclose(from_cache, latents, atol=1e-6)


# --- sigma sampling ------------------------------------------------------------------------------------


def test_shift_sampling_is_the_shifted_sigmoid_of_a_normal():
    s = flux_loss.DEFAULT_SHIFT
    sigmas = flow.sample_sigmas(1000, "shift", shift=s, generator=torch.Generator().manual_seed(3))
    t = torch.sigmoid(torch.randn(1000, generator=torch.Generator().manual_seed(3)))
    assert torch.allclose(sigmas, s * t / (1 + (s - 1) * t))
    assert s == 3.1582 and float(flow.shift_sigmas(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    plain = flow.sample_sigmas(1000, "sigmoid", shift=s, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(plain, t)
    # The shift moves training toward the noisy end: every sigma grows.
    assert bool((sigmas >= plain).all()) and sigmas.mean() > plain.mean() + 0.15


@pytest.mark.parametrize("method", ["uniform", "logit_normal", "sigmoid", "shift"])
def test_every_sampling_gives_sigmas_inside_zero_one(method):
    sigmas = flow.sample_sigmas(500, method, shift=flux_loss.DEFAULT_SHIFT, generator=torch.Generator().manual_seed(1))
    assert sigmas.dtype == torch.float32 and sigmas.shape == (500,)
    assert bool(((sigmas > 0) & (sigmas < 1)).all())
    assert 0.3 < float(sigmas.mean()) < 0.9


def test_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match="shift, sigmoid"):
        flow.sample_sigmas(2, "cosine", shift=3.0)


def test_noisy_input_and_target():
    x0, noise = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    noisy = flow.noisy_latents(x0, noise, torch.tensor([0.0, 0.25]))
    assert torch.equal(noisy[0], x0[0]) and torch.allclose(noisy[1], torch.full((1, 2, 2), 1.25))
    assert torch.equal(flow.flow_target(x0, noise), noise - x0)


# --- the loss -----------------------------------------------------------------------------------------


def _batch(model, captions, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(len(captions), 3, size, size, generator=g) * 2 - 1
    return flux_loss.FluxBatch(flux_loss.encode_latents(model.vae, pixels, g), _encode(model, captions))


class _Spy(torch.nn.Module):
    """Records the keyword arguments of the wrapped transformer's calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []
        self.config = inner.config

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return self.inner(**kwargs)


def test_loss_is_the_mse_of_the_velocity_and_dev_gets_guidance_one(dev_model):
    batch = _batch(dev_model, ["a red cat", "a blue dog"])
    spy = _Spy(dev_model.transformer)
    sigmas = torch.tensor([0.3, 0.8])
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = flux_loss.flux_loss(spy, batch, sigmas=sigmas, noise=noise)
        call = spy.calls[0]
        expected_pred = dev_model.transformer(**call)[0]
    assert loss.dtype == torch.float32
    assert torch.equal(call["guidance"], torch.ones(2)) and torch.equal(call["timestep"], sigmas)
    assert call["hidden_states"].shape == (2, 64, 4) and call["img_ids"].shape == (64, 3)
    assert torch.equal(call["pooled_projections"], batch.prompts.pooled)
    x0 = batch.latents
    assert torch.equal(call["hidden_states"], flow.pack_latents((1 - sigmas.view(-1, 1, 1, 1)) * x0
                                                                + sigmas.view(-1, 1, 1, 1) * noise))
    target = flow.pack_latents(noise - x0)
    assert loss.item() == pytest.approx(((expected_pred - target) ** 2).mean().item(), rel=1e-6)


def test_schnell_gets_no_guidance(tiny_flux_schnell):
    model = flux_load.load_flux_model(str(tiny_flux_schnell.folder))
    spy = _Spy(model.transformer)
    with torch.no_grad():
        loss = flux_loss.flux_loss(spy, _batch(model, ["a cat"]), torch.Generator().manual_seed(0))
    assert spy.calls[0]["guidance"] is None and torch.isfinite(loss)


def test_chroma_gets_the_text_mask_plus_image_tokens(tiny_chroma):
    model = flux_load.load_flux_model(str(tiny_chroma.folder))
    batch = _batch(model, ["a red cat", "a tiny blue dog with a big cat"])
    spy = _Spy(model.transformer)
    with torch.no_grad():
        loss = flux_loss.flux_loss(spy, batch, torch.Generator().manual_seed(0), timestep_sampling="sigmoid")
    call = spy.calls[0]
    assert "pooled_projections" not in call and "guidance" not in call
    assert call["attention_mask"].shape == (2, 16 + 64) and call["attention_mask"].dtype == torch.bool
    assert call["attention_mask"].sum(dim=1).tolist() == [5 + 64, 10 + 64]
    assert torch.isfinite(loss)


def test_same_generator_same_loss(dev_model):
    batch = _batch(dev_model, ["a cat"])
    with torch.no_grad():
        a = flux_loss.flux_loss(dev_model.transformer, batch, torch.Generator().manual_seed(5))
        b = flux_loss.flux_loss(dev_model.transformer, batch, torch.Generator().manual_seed(5))
        c = flux_loss.flux_loss(dev_model.transformer, batch, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- LoRA ---------------------------------------------------------------------------------------------


def test_lora_presets_pick_the_right_layers():
    from core.families.flux.tiny import tiny_chroma_transformer, tiny_flux_transformer

    model = tiny_flux_transformer()
    every = flux_lora.flux_lora_targets(model, "all")
    assert len(every) == 12 + 5
    assert "transformer_blocks.0.attn.to_add_out" in every and "transformer_blocks.0.ff_context.net.2" in every
    assert "single_transformer_blocks.0.proj_out" in every and "proj_out" not in every
    attention = flux_lora.flux_lora_targets(model, "attention")
    assert not any(".ff" in n or "proj_mlp" in n or n.endswith("blocks.0.proj_out") for n in attention)
    assert len(attention) == 8 + 3
    singles = flux_lora.flux_lora_targets(model, "single_blocks")
    assert singles and all(n.startswith("single_transformer_blocks.") for n in singles)
    norms = set(flux_lora.flux_lora_targets(model, "all", include_norms=True)) - set(every)
    assert norms == {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                     "single_transformer_blocks.0.norm.linear"}
    # Chroma's pruned norms have no Linear: the norm option adds nothing there, the rest is the same.
    chroma = tiny_chroma_transformer()
    assert flux_lora.flux_lora_targets(chroma, "all", include_norms=True) == flux_lora.flux_lora_targets(chroma, "all")
    with pytest.raises(ValueError, match="single_blocks"):
        flux_lora.flux_lora_targets(model, "mlp")


def _train(transformer, batch, steps=30, lr=1e-2, dtype=torch.float32):
    """LoRA steps on one batch; returns the fixed-noise validation loss before and after."""
    params = low_memory.lora_parameters(transformer)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    val_g = torch.Generator().manual_seed(123)
    val_sigmas = flow.sample_sigmas(4, "shift", shift=flux_loss.DEFAULT_SHIFT, generator=val_g)
    val_noise = torch.randn((4,) + tuple(batch.latents.shape[1:]), generator=val_g)
    val_batch = flux_loss.FluxBatch(batch.latents.expand(4, -1, -1, -1), flux_text.stack_embeds(
        batch.prompts.entries()[:1] * 4))

    def validation() -> float:
        with torch.no_grad():
            return flux_loss.flux_loss(transformer, val_batch, sigmas=val_sigmas, noise=val_noise, dtype=dtype).item()

    before = validation()
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = flux_loss.flux_loss(transformer, batch, g, dtype=dtype)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return before, validation(), losses


def test_a_tiny_flux_learns_one_image(tiny_flux_dev):
    """30 LoRA steps with AdamW on one image + caption lower its loss (same noise before/after)."""
    model = flux_load.load_flux_model(str(tiny_flux_dev.folder))
    base = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    targets = flux_lora.add_flux_lora(model.transformer, rank=4, preset="all")
    assert len(targets) == 17
    batch = _batch(model, ["sks a tiny flux learns one image"], seed=4)
    before, after, losses = _train(model.transformer, batch)
    assert after < 0.85 * before, (before, after)  # 4.08 -> 3.17 here
    assert sum(losses[-5:]) < sum(losses[:5])
    # Only the LoRA trained: every base weight is unchanged.
    state = model.transformer.state_dict()
    for key, value in base.items():
        name = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state.get(key, state.get(name)), value), key


def test_fp8_storage_trains_on_the_cpu_with_the_lora_in_fp32(tiny_flux_dev):
    model = flux_load.load_flux_model(str(tiny_flux_dev.folder))
    with pytest.raises(ValueError, match="Add the LoRA"):
        low_memory.enable_fp8_storage(model.transformer, torch.float32)
    flux_lora.add_flux_lora(model.transformer, rank=4)
    # The realistic setup: bf16 compute (what stays out of fp8 moves to bf16), the LoRA in fp32.
    cast = low_memory.enable_fp8_storage(model.transformer, torch.bfloat16)
    low_memory.enable_gradient_checkpointing(model.transformer)
    blocks = model.transformer.transformer_blocks[0]
    assert blocks.attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert blocks.ff.net[2].base_layer.weight.dtype == torch.float8_e4m3fn
    # diffusers' default: every Linear but norm* (incl. the modulation ones) and the final proj_out:
    # the 17 LoRA'd base layers + 8 embedder Linears (x, context, time, text, guidance).
    assert cast == 17 + 8
    assert blocks.norm1.linear.weight.dtype == torch.bfloat16
    assert {p.dtype for p in low_memory.lora_parameters(model.transformer)} == {torch.float32}
    assert model.transformer.gradient_checkpointing
    batch = _batch(model, ["sks a tiny flux learns one image"], seed=4)
    before, after, losses = _train(model.transformer, batch, steps=10, dtype=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(losses))) and after < before
    assert blocks.attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn  # still stored in fp8 after steps


def test_fp8_storage_can_cast_the_modulation_linears_too(tiny_flux_dev):
    model = flux_load.load_flux_model(str(tiny_flux_dev.folder))
    flux_lora.add_flux_lora(model.transformer, rank=4)
    cast = low_memory.enable_fp8_storage(model.transformer, torch.float32, cast_modulation=True)
    block = model.transformer.transformer_blocks[0]
    assert block.norm1.linear.weight.dtype == torch.float8_e4m3fn
    assert model.transformer.x_embedder.weight.dtype == torch.float32
    assert block.attn.norm_q.weight.dtype == torch.float32
    assert cast == 17 + 3
    with torch.no_grad():
        loss = flux_loss.flux_loss(model.transformer, _batch(model, ["a cat"]), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_gpu_only_switches_explain_themselves_on_the_cpu():
    from core.families.flux.tiny import tiny_flux_transformer

    applied, message = low_memory.apply_group_offload(tiny_flux_transformer())
    assert not applied and "needs a CUDA GPU" in message and message.endswith(".")
    with pytest.raises(ValueError, match="NF4 quantization needs a CUDA GPU"):
        low_memory.nf4_config()


# --- memory shapes ---------------------------------------------------------------------------------------


def test_real_flux1_parameter_counts_from_the_meta_device():
    counts = flux_lora.flux_param_counts("flux-dev", rank=16)
    assert counts["total"] == pytest.approx(11.9e9, rel=0.01)
    assert (counts["double_blocks"], counts["single_blocks"]) == (19, 38)
    assert counts["total"] == (19 * counts["per_double_block"] + 38 * counts["per_single_block"] + counts["other"])
    # Width 3072: a double block's Linears are 4*3072^2*... ; cross-check one Linear's LoRA by hand.
    width, mlp = 3072, 12288
    double = 16 * (8 * 2 * width + 2 * (width + mlp) + 2 * (mlp + width))
    single = 16 * (3 * 2 * width + (width + mlp) + (width + mlp + width))
    assert counts["lora"] == 19 * double + 38 * single
    schnell = flux_lora.flux_param_counts("flux-schnell", rank=16)
    assert schnell["total"] < counts["total"] and schnell["lora"] == counts["lora"]
    assert flux_lora.flux_param_counts("flux-dev", rank=16, preset="single_blocks")["lora"] == 38 * single


def test_another_models_vae_is_refused_by_name(tiny_flux_dev, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from core.families.sd.convert import vae_to_ldm

    # An SD-style VAE (4 latent channels) where the FLUX AE belongs.
    sd_vae = AutoencoderKL(block_out_channels=(4,), layers_per_block=1, latent_channels=4, norm_num_groups=1)
    path = tmp_path / "sdxl_vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(sd_vae.state_dict(), dict(sd_vae.config)).items()}, str(path))
    with pytest.raises(ModelLoadError, match="'sdxl_vae.safetensors' is not the FLUX autoencoder") as info:
        flux_single_file.load_vae_file(path, config_source=str(tiny_flux_dev.folder), variant="flux-dev")
    assert "ae.safetensors" in info.value.advice
