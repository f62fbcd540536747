"""FLUX.1-dev / schnell and Chroma behind the `ImageFamily` interface.

Built from the family's building blocks (`core.families.flux`): loading a diffusers folder,
hub id or ComfyUI single file; CLIP-L + T5 (Chroma: T5 with its mask) encoded once into a
disk cache and then freed, sample prompts included, so previews need no text encoder;
flow-matching loss with the configured timestep sampling, shift and guidance; LoRA on the
transformer blocks of `lora_blocks`, then fp8 storage / gradient checkpointing / block
offload; the LoRA written in BFL kohya names (WebUI, Forge, ComfyUI) and as diffusers'
`pytorch_lora_weights.safetensors`.
"""
from __future__ import annotations

from collections.abc import Iterable, Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.hub import offline
from core.config import TrainConfig
from core.family_api.contract import Adapted, Batch, ImageFamily, Log, RunFacts
from core.family_api.registry import family_info
from core.families.dit.common import check_transformer, config_from_lora_file, load_dtype_and_quantization


def vae_scale_factor(model: Any) -> int:
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def timestep_sampling(cfg: TrainConfig, variant: str) -> str:
    """The configured sampling, or the family's (`auto`): shift for FLUX.1, sigmoid for Chroma."""
    if cfg.timestep_sampling != "auto":
        return cfg.timestep_sampling
    return family_info(variant).default_timestep_sampling


def train_guidance(cfg: TrainConfig, variant: str) -> float | None:
    """The guidance input while training: FLUX.1-dev only (schnell and Chroma have none)."""
    return cfg.train_guidance if family_info(variant).has_guidance_embedding else None


# --- before loading ------------------------------------------------------------------------------

def detect(base_model: str) -> str | None:
    """"flux-dev" / "flux-schnell" / "chroma" for a FLUX-family file, folder or cached hub id; else None."""
    from core.families.flux.load import detect_variant

    variant = detect_variant(base_model)
    if variant is None and not Path(base_model).exists() and not base_model.lower().endswith(".safetensors"):
        variant = _hub_variant(base_model)
    return variant


def variant_from_keys(keys: Iterable[str]) -> str | None:
    """"flux-dev" / "flux-schnell" / "chroma" from a single file's tensor names (its header alone)."""
    from core.families.flux.load import variant_from_keys as from_keys

    return from_keys(keys)


def _hub_variant(repo: str) -> str | None:
    """A hub id's FLUX variant from its (cached) model_index.json and transformer config, else None."""
    from diffusers import DiffusionPipeline

    from core.families.flux.load import variant_from_folder_configs

    try:
        index = dict(DiffusionPipeline.load_config(repo, local_files_only=offline()))
    except Exception:  # noqa: BLE001 - not a reachable pipeline: the SD loader reports what is wrong with it
        return None
    if not any(word in str(index.get("_class_name", "")) for word in ("Flux", "Chroma")):
        return None
    try:
        transformer = dict(DiffusionPipeline.load_config(repo, subfolder="transformer", local_files_only=offline()))
    except (OSError, ValueError):
        transformer = {}
    return variant_from_folder_configs(index, transformer)


def check(cfg: TrainConfig) -> list[str]:
    """Refuse GPU-only switches on a machine without CUDA and unsupported LoRA kinds; warn on ignored keys."""
    return check_transformer(
        cfg, "FLUX / Chroma", targets="FLUX uses lora_blocks", ignored_for="only apply to SD models; ignored for "
        "FLUX / Chroma.", encoders="FLUX / Chroma always cache the text encoders' outputs (T5-XXL is too large to "
        "keep).")


def load(cfg: TrainConfig) -> Any:
    from core.families.flux.load import load_flux_model

    dtype, quant = load_dtype_and_quantization(cfg)
    model = load_flux_model(cfg.base_model, config_source=cfg.base_model_config, clip_l=cfg.clip_l, t5=cfg.t5,
                            vae=cfg.vae, dtype=dtype, quantization_config=quant)
    if cfg.vae and not model.is_single_file:
        # A diffusers folder brings its own AE; `vae:` replaces it (the single-file loader took it already).
        from core.families.flux.single_file import load_vae_file

        model.vae = load_vae_file(cfg.vae, config_source=cfg.base_model_config or cfg.base_model,
                                  variant=model.variant, dtype=dtype)
        model.notes.append(f"AE from {cfg.vae}")
    return model


def describe(model: Any) -> list[str]:
    layout = "single file" if model.is_single_file else "diffusers"
    return [f"Model: {family_info(model.variant).label} ({layout}), flow matching", *model.notes]


def _encoders(model: Any) -> list[Any]:
    return [e for e in (model.text_encoder, model.text_encoder_2) if e is not None]


# --- prompts ---------------------------------------------------------------------------------------

def _caption(key: Any) -> str:
    """A prompt key's caption: FLUX.1 Kontext's keys are (caption, control path); its text encoders see only text."""
    return key[0] if isinstance(key, tuple) else key


def encode_prompts(model: Any, captions: list[Any], device: torch.device) -> Any:
    from core.families.flux.text import MAX_SEQUENCE_LENGTH, encode_prompts as encode

    captions = [_caption(c) for c in captions]
    return encode(model.text_encoder, model.tokenizer, model.text_encoder_2, model.tokenizer_2, captions,
                  max_sequence_length=MAX_SEQUENCE_LENGTH[model.variant], chroma=model.variant == "chroma")


def cache_prompts(model: Any, captions: list[str], cfg: TrainConfig, device: torch.device,
                  log: Log) -> Callable[[list[str]], Any]:
    """Captions, sample prompts and the negative prompt encoded once (on disk beside the data)."""
    from core.families.flux.text import MAX_SEQUENCE_LENGTH, cache_prompt_embeds, encoder_identity, stack_embeds
    from core.train.latent_cache import cache_root_for

    prompts = list(dict.fromkeys(_caption(c) for c in captions)) + list(cfg.sample_prompts) + (
        [cfg.sample_negative_prompt or ""] if cfg.sample_prompts else [])
    folder = cache_root_for(cfg.train_data_dir, cfg.output_dir, "text") if cfg.cache_latents_to_disk else None
    identity = encoder_identity(model.text_encoder, model.text_encoder_2,
                                max_sequence_length=MAX_SEQUENCE_LENGTH[model.variant], variant=model.variant)
    entries, hits = cache_prompt_embeds(prompts, lambda chunk: encode_prompts(model, chunk, device), folder,
                                        identity)
    if hits:
        log(f"{hits} prompt encoding(s) reused from the disk cache {folder}")

    def lookup(batch: list[Any]) -> Any:
        return stack_embeds([entries[_caption(c)] for c in batch])

    return lookup


def park_text_encoders(model: Any, keep_for_previews: bool) -> None:
    """Free CLIP-L and T5 for good: the previews use the cached sample-prompt encodings."""
    from core.families.flux.text import free_text_encoders

    free_text_encoders(model)


# --- LoRA ------------------------------------------------------------------------------------------

def add_lora(model: Any, cfg: TrainConfig, init_file: Path | None, log: Log) -> Adapted:
    """LoRA on the transformer blocks of `lora_blocks`, or on the modules of `init_file`."""
    from core.families.flux.lora_files import check_modules_match_variant, read_flux_lora
    from core.families.flux.lora import add_flux_lora
    from core.lora import load_peft_state

    transformer = model.transformer
    if init_file is not None:
        try:
            peft, alphas, _ = read_flux_lora(init_file, ignore_text_encoders=True)
        except Exception as exc:
            raise ValueError(f"'{init_file}' is not a readable FLUX / Chroma LoRA file: {exc}") from exc
        check_modules_match_variant(sorted({k.rsplit(".lora_", 1)[0] for k in peft}), model.variant)
        config = config_from_lora_file(peft, alphas)
        transformer.requires_grad_(False)
        transformer.add_adapter(config)
        load_peft_state(transformer, peft, "transformer")
        log(f"Continuing from the LoRA {init_file.name} (rank {config.r}, alpha {config.lora_alpha:g})")
    else:
        add_flux_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_blocks,
                      lora_dropout=cfg.lora_dropout, use_rslora=cfg.lora_variant == "rslora")
    config = transformer.peft_config["default"]
    guidance = train_guidance(cfg, model.variant)
    log(f"LoRA rank {config.r} on {len(config.target_modules)} transformer layers; flow matching with "
        f"{timestep_sampling(cfg, model.variant)} timestep sampling, "
        f"{'guidance ' + format(guidance, 'g') if guidance is not None else 'no guidance input'}")
    # bitsandbytes put an NF4 transformer on the GPU already; block offload keeps it in CPU memory.
    placed = [transformer] if cfg.base_quantization == "nf4" or cfg.blocks_to_swap > 0 else []
    return Adapted([transformer], ["transformer"], [config], placed=placed)


def low_memory(model: Any, adapted: Adapted, cfg: TrainConfig, dtype: torch.dtype, log: Log) -> None:
    """Gradient checkpointing, fp8 storage of the frozen weights (after the LoRA), block offload."""
    from core.families.flux.lora import apply_group_offload, enable_fp8_storage, enable_gradient_checkpointing

    transformer = adapted.modules[0]
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(transformer)
    if cfg.fp8_base:
        # The modulation Linears too (about 3.2B of FLUX.1's 11.9B), as kohya's fp8_base does and
        # as the memory estimate counts; diffusers' default skip pattern would keep them in bf16.
        cast = enable_fp8_storage(transformer, dtype, cast_modulation=True)
        log(f"fp8 storage: {cast} frozen layers stored in float8_e4m3fn, the LoRA in fp32.")
    if cfg.blocks_to_swap > 0:
        if not cfg.fp8_base:
            # The run left it in CPU memory (not moved, not cast): the frozen weights take the compute dtype here.
            for name, param in transformer.named_parameters():
                if "lora_" not in name:
                    param.data = param.data.to(dtype)
        _, message = apply_group_offload(transformer)
        log(message)


def make_loss(model: Any, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """Flow matching with the configured sampling, shift and guidance."""
    from core.families.flux.loss import FluxBatch, flux_loss

    sampling = timestep_sampling(cfg, model.variant)
    guidance = train_guidance(cfg, model.variant)

    def loss(transformer: nn.Module, batch: Batch) -> torch.Tensor:
        return flux_loss(transformer, FluxBatch(batch.latents, batch.cond, batch.control), timestep_sampling=sampling,
                         shift=cfg.discrete_flow_shift, guidance=guidance, dtype=dtype)

    return loss


def write_loras(folder: Path, cfg: TrainConfig, model: Any, adapted: Adapted, facts: RunFacts,
                save_dtype: torch.dtype) -> dict[str, str]:
    """<name>.safetensors in BFL kohya names (flux1 / chroma metadata) and the diffusers file."""
    from core.export.metadata import kohya_metadata
    from core.families.flux.lora_files import write_flux_diffusers_file, write_flux_kohya_file
    from core.lora import peft_state

    config = adapted.configs[0]
    state = peft_state(adapted.modules[0])
    alpha: float | dict[str, float] = float(config.lora_alpha)
    if config.alpha_pattern:
        import re

        paths = {k.rsplit(".lora_", 1)[0] for k in state}
        alpha = {p: float(next((v for pat, v in config.alpha_pattern.items() if re.search(pat, p)),
                               config.lora_alpha)) for p in paths}
    # The run's ss_* keys; the family, network and rank/alpha keys come from the FLUX writer.
    meta = kohya_metadata(cfg, family=model.variant, base_model_name=facts.base_model_name,
                          num_images=facts.num_images, tag_frequency=facts.tag_frequency,
                          bucket_info=facts.bucket_info, steps=facts.steps, epochs=facts.epochs,
                          started_at=facts.started_at, dataset_dir=cfg.train_data_dir, session_id=facts.session_id)
    meta.pop("modelspec.prediction_type", None)  # sd-scripts leaves it out for FLUX
    kohya = write_flux_kohya_file(state, folder / f"{cfg.name}.safetensors", variant=model.variant, alpha=alpha,
                                  metadata=meta, use_rslora=bool(config.use_rslora), dtype=save_dtype)
    diffusers = write_flux_diffusers_file(state, folder, lora_config=config, dtype=save_dtype)
    return {"kohya": str(kohya), "diffusers": str(diffusers)}


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: Any, transformer: Any | None = None) -> Any:
    """FluxPipeline / ChromaPipeline over the model's modules (text encoders may be freed: None)."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    transformer = model.transformer if transformer is None else transformer
    if model.variant == "chroma":
        pipe = ChromaPipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder_2,
                              tokenizer=model.tokenizer_2, transformer=transformer)
    else:
        # FLUX.1 Kontext's pipeline also makes images from text alone (no image given).
        kind = FluxKontextPipeline if model.variant == "flux-kontext" else FluxPipeline
        pipe = kind(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder,
                            tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
                            tokenizer_2=model.tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _decode(pipe: Any, packed: torch.Tensor, width: int, height: int) -> list[Image.Image]:
    from core.families.flux.loss import unpack_latents
    from core.sample import decode_fp32

    # The pipeline rounds the size down to whole 2x2 latent patches (FluxPipeline._unpack_latents).
    step = pipe.vae_scale_factor * 2
    return decode_fp32(pipe.vae, unpack_latents(packed, 2 * (height // step), 2 * (width // step)))


def _is_chroma_pipe(pipe: Any) -> bool:
    return type(pipe).__name__.startswith("Chroma")


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
             negative_prompt: str = "", width: int, height: int,
             embeds: Callable[[list[str]], Any] | None = None, dtype: torch.dtype = torch.float32
             ) -> list[Image.Image]:
    """One image per prompt from the same seed; `embeds`: cached encodings instead of the text encoders.

    The transformer runs under autocast in `dtype` (an fp32 LoRA on bf16 / fp8 base layers), the
    AE decodes in fp32. FLUX.1's `guidance` is its distilled guidance input; Chroma's is real CFG.
    """
    from core.devices import free_memory

    chroma = _is_chroma_pipe(pipe)
    device = pipe.vae.device
    images = []
    for prompt in prompts:
        kwargs: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance, width=width,
                                      height=height, output_type="latent", return_dict=False,
                                      generator=torch.Generator(device="cpu").manual_seed(seed))
        if embeds is None:
            kwargs["prompt"] = prompt
            if chroma:
                kwargs["negative_prompt"] = negative_prompt or ""
        else:
            e = embeds([prompt]).to(device, dtype)
            kwargs["prompt_embeds"] = e.prompt_embeds
            if chroma:
                neg = embeds([negative_prompt or ""]).to(device, dtype)
                # ChromaPipeline's own masks are in the embeddings' dtype (it builds them so).
                kwargs.update(prompt_attention_mask=e.attention_mask.to(dtype),
                              negative_prompt_embeds=neg.prompt_embeds,
                              negative_prompt_attention_mask=neg.attention_mask.to(dtype))
            else:
                kwargs["pooled_prompt_embeds"] = e.pooled
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            packed = pipe(**kwargs)[0]
        images.extend(_decode(pipe, packed, width, height))
        free_memory()
    return images


def preview_size(model: Any, resolution: int) -> tuple[int, int]:
    """The training resolution, not below the family's floor in latent terms (512 px for FLUX's 8x AE)."""
    scale = vae_scale_factor(model)
    floor = family_info(model.variant).sample_size_floor * scale // 8
    step = scale * 2  # 2x2 latent patches
    side = max(step, max(resolution, floor) // step * step)
    return side, side


def previews(model: Any, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    """Previews with the transformer being trained, from the cached prompt encodings (none for Kontext:
    an edit needs an image to edit)."""
    if family_info(model.variant).needs_control:
        return []
    pipe = build_pipeline(model, transformer)
    width, height = preview_size(model, cfg.resolution)
    return generate(pipe, cfg.sample_prompts, seed=cfg.sample_seed, steps=cfg.sample_num_inference_steps,
                    guidance=cfg.sample_guidance_scale, negative_prompt=cfg.sample_negative_prompt, width=width,
                    height=height, embeds=cached, dtype=dtype)


def tryout_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                    device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(FluxPipeline or ChromaPipeline, FluxModel) of `base_model` on `device`, for the Test tab."""
    from core.families.flux.load import load_flux_model
    from core.sample import move

    model = load_flux_model(base_model, config_source=model_config, vae=vae)
    for module in (model.transformer, *_encoders(model)):
        move(module, device, dtype)
    move(model.vae, device, torch.float32)
    return build_pipeline(model), model


def default_size(model: Any) -> int:
    return family_info(model.variant).native_resolution * vae_scale_factor(model) // 8


def _lora_files() -> Any:
    from core.family_api.contract import LoraFileFormat
    from core.families.flux import tools_files as flux_files

    return LoraFileFormat(to_kohya=flux_files.read_flux_kohya_tensors, write_kohya=flux_files.write_flux_kohya,
                          write_diffusers=flux_files.write_flux_diffusers, to_peft=flux_files.read_flux_peft)


FLUX = ImageFamily(
    detect=detect, lora_files=_lora_files(), prompt_cache_optional=False, check=check, load=load, describe=describe,
    name_of=lambda m: m.variant, network=lambda m: m.transformer, text_encoders=_encoders,
    park_text_encoders=park_text_encoders, encode_prompts=encode_prompts, cache_prompts=cache_prompts,
    add_lora=add_lora, low_memory=low_memory, make_loss=make_loss, write_loras=write_loras, previews=previews,
    tryout_pipeline=tryout_pipeline, generate=generate, default_size=default_size,
    variant_from_keys=variant_from_keys,
)

FAMILY = FLUX  # what the registry row's `impl` names
