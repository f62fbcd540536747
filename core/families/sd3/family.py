"""Stable Diffusion 3 / 3.5 (medium, large) behind the `ImageFamily` interface.

Loading: a diffusers folder / hub id or ComfyUI's single files (`sd3_load`). Prompts: CLIP-L + CLIP-G
(penultimate hidden states and pooled projections) and T5-XXL (256 tokens; optional), encoded once as
StableDiffusion3Pipeline.encode_prompt does, cached on disk, and the encoders freed (sample prompts and
the negative prompt included, so previews need no text encoder). Training objective: the reference
default of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py, which sd-scripts'
sd3_train_network.py shares: sigma = shift(sigmoid(N(0, 1))) with the scheduler's shift 3.0
("logit_normal" weighting scheme, mean 0, std 1, through FlowMatchEulerDiscreteScheduler(shift=3.0)),
x_sigma = (1 - sigma) x0 + sigma noise, the output preconditioned to an x0 estimate
(`precondition_outputs=1`: x_sigma - sigma * v) against x0, MSE with weight 1. LoRA on the attention and
MLP Linears of every joint block (both streams, SD3.5 medium's second attention too). Files: sd-scripts'
MMDiT kohya names (`sd3_lora_files`) and diffusers' `pytorch_lora_weights.safetensors`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.config import TrainConfig
from core.family_api.contract import Adapted, Batch, ImageFamily, Log, RunFacts
from core.families.dit.common import check_transformer, config_from_lora_file, load_dtype_and_quantization
from core.family_api.registry import family_info

SD3_SHIFT = 3.0   # FlowMatchEulerDiscreteScheduler shift of SD3 / SD3.5 (their scheduler_config.json)
# Linears inside transformer_blocks.N that get LoRA: attention (both streams, attn2 where present) and MLPs.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def vae_scale_factor(model: Any) -> int:
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def timestep_sampling(cfg: TrainConfig, variant: str) -> str:
    if cfg.timestep_sampling != "auto":
        return cfg.timestep_sampling
    return family_info(variant).default_timestep_sampling or "shift"


def flow_shift(cfg: TrainConfig) -> float:
    """The configured shift; the config's own default (FLUX.1's 3.1582) means SD3's scheduler shift 3.0."""
    default = TrainConfig.__dataclass_fields__["discrete_flow_shift"].default
    return SD3_SHIFT if cfg.discrete_flow_shift == default else float(cfg.discrete_flow_shift)


def lora_targets(transformer: nn.Module) -> list[str]:
    """Full module names of the block Linears that get LoRA (exact names for PEFT's `target_modules`)."""
    names = []
    for name, module in transformer.named_modules():
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "transformer_blocks" and parts[2] in LORA_TARGETS \
                and isinstance(module, nn.Linear):
            names.append(name)
    return names


# --- before loading ------------------------------------------------------------------------------

def check(cfg: TrainConfig) -> list[str]:
    return check_transformer(
        cfg, "SD3", targets="SD3 trains every block's attention and MLP",
        ignored_for="only apply to SD 1.x / SDXL; ignored for SD3.",
        encoders="SD3 always caches the text encoders' outputs (T5-XXL is too large to keep).")


def load(cfg: TrainConfig) -> Any:
    from core.families.sd3.load import load_sd3_model

    dtype, quant = load_dtype_and_quantization(cfg)
    return load_sd3_model(cfg.base_model, config_source=cfg.base_model_config, vae=cfg.vae,
                          text_encoder_files=cfg.text_encoder_files, dtype=dtype, quantization_config=quant)


def describe(model: Any) -> list[str]:
    layout = "single file" if model.is_single_file else "diffusers"
    name = {"medium": "SD3 Medium", "5-medium": "SD3.5 Medium", "5-large": "SD3.5 Large"}[model.model_type]
    return [f"Model: {name} ({layout}), flow matching", *model.notes]


def _encoders(model: Any) -> list[Any]:
    return [e for e in (model.text_encoder, model.text_encoder_2, model.text_encoder_3) if e is not None]


# --- prompts ---------------------------------------------------------------------------------------

def _encode_pipe(model: Any) -> Any:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=model.transformer, scheduler=None, vae=None,
                                    text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                    text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                                    text_encoder_3=model.text_encoder_3, tokenizer_3=model.tokenizer_3)


@torch.no_grad()
def encode_prompts(model: Any, captions: list[str], device: torch.device) -> Any:
    """StableDiffusion3Pipeline.encode_prompt's [B, 77 + 256, 4096] sequence and [B, 2048] pooled vector."""
    from core.families.flux.text import PromptEmbeds
    from core.families.sd3.load import T5_MAX_LENGTH

    pipe = _encode_pipe(model)
    encoder_device = next(model.text_encoder.parameters()).device
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(captions), prompt_2=None, prompt_3=None,
                                              device=encoder_device, do_classifier_free_guidance=False,
                                              max_sequence_length=T5_MAX_LENGTH)
    return PromptEmbeds(embeds, pooled, torch.zeros(0, 3, device=embeds.device), None)


def cache_prompts(model: Any, captions: list[str], cfg: TrainConfig, device: torch.device,
                  log: Log) -> Callable[[list[str]], Any]:
    """Captions, sample prompts and the negative prompt encoded once (on disk beside the data)."""
    from core.families.flux.text import cache_prompt_embeds, encoder_identity, stack_embeds
    from core.families.sd3.load import T5_MAX_LENGTH
    from core.train.latent_cache import cache_root_for

    prompts = list(captions) + list(cfg.sample_prompts) + ([cfg.sample_negative_prompt or ""]
                                                           if cfg.sample_prompts else [])
    folder = cache_root_for(cfg.train_data_dir, cfg.output_dir, "text") if cfg.cache_latents_to_disk else None
    identity = encoder_identity(model.text_encoder, model.text_encoder_2, model.text_encoder_3,
                                max_sequence_length=T5_MAX_LENGTH, variant=f"sd3-{model.model_type}")
    entries, hits = cache_prompt_embeds(prompts, lambda chunk: encode_prompts(model, chunk, device), folder,
                                        identity)
    if hits:
        log(f"{hits} prompt encoding(s) reused from the disk cache {folder}")

    def lookup(batch: list[str]) -> Any:
        return stack_embeds([entries[c] for c in batch])

    return lookup


def park_text_encoders(model: Any, keep_for_previews: bool) -> None:
    """Free CLIP-L, CLIP-G and T5 for good: the previews use the cached sample-prompt encodings."""
    import gc

    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(model, name, None)
        if module is not None:
            module.to("meta")
            setattr(model, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- LoRA ------------------------------------------------------------------------------------------

def add_lora(model: Any, cfg: TrainConfig, init_file: Path | None, log: Log) -> Adapted:
    """LoRA on every joint block's attention and MLP Linears, or on the modules of `init_file`."""
    from peft import LoraConfig

    from core.families.sd3.lora_files import read_lora
    from core.lora import load_peft_state

    transformer = model.transformer
    transformer.requires_grad_(False)
    if init_file is not None:
        try:
            peft, alphas, _ = read_lora(init_file)
        except Exception as exc:
            raise ValueError(f"'{init_file}' is not a readable SD3 LoRA file: {exc}") from exc
        known = {n for n, _ in transformer.named_modules()}
        foreign = sorted({k.rsplit(".lora_", 1)[0] for k in peft} - known)
        if foreign:
            raise ValueError(f"{', '.join(foreign[:3])} is not part of this SD3 transformer "
                             "(a LoRA of another SD3 model: medium and large differ).")
        config = config_from_lora_file(peft, alphas)
        transformer.add_adapter(config)
        load_peft_state(transformer, peft, "transformer")
        log(f"Continuing from the LoRA {init_file.name} (rank {config.r}, alpha {config.lora_alpha:g})")
    else:
        config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                            target_modules=lora_targets(transformer), init_lora_weights="gaussian",
                            lora_dropout=cfg.lora_dropout, use_rslora=cfg.lora_variant == "rslora")
        transformer.add_adapter(config)
    config = transformer.peft_config["default"]
    layers = sum(1 for n, _ in transformer.named_modules() if n.endswith(".lora_A.default"))
    log(f"LoRA rank {config.r} on {layers} transformer layers; flow matching with "
        f"{timestep_sampling(cfg, model.variant)} timestep sampling (shift {flow_shift(cfg):g}), x0-preconditioned "
        "loss as diffusers' and sd-scripts' SD3 trainers")
    placed = [transformer] if cfg.base_quantization == "nf4" or cfg.blocks_to_swap > 0 else []
    return Adapted([transformer], ["transformer"], [config], placed=placed)


def low_memory(model: Any, adapted: Adapted, cfg: TrainConfig, dtype: torch.dtype, log: Log) -> None:
    """Gradient checkpointing, fp8 storage of the frozen weights (after the LoRA), block offload."""
    from core.families.flux.lora import apply_group_offload, enable_fp8_storage, enable_gradient_checkpointing

    transformer = adapted.modules[0]
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(transformer)
    if cfg.fp8_base:
        cast = enable_fp8_storage(transformer, dtype, cast_modulation=True)
        log(f"fp8 storage: {cast} frozen layers stored in float8_e4m3fn, the LoRA in fp32.")
    if cfg.blocks_to_swap > 0:
        if not cfg.fp8_base:
            for name, param in transformer.named_parameters():
                if "lora_" not in name:
                    param.data = param.data.to(dtype)
        _, message = apply_group_offload(transformer)
        log(message)


def sd3_loss(transformer: nn.Module, latents: torch.Tensor, cond: Any, generator: torch.Generator | None = None, *,
             timestep_sampling: str = "shift", shift: float = SD3_SHIFT, dtype: torch.dtype = torch.float32,
             sigmas: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The preconditioned flow-matching MSE of one batch in fp32 (see the module docstring)."""
    from core.families.flux.loss import noisy_latents, sample_sigmas

    x0 = latents.float()
    b = x0.shape[0]
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(x0.device)
    if sigmas is None:
        sigmas = sample_sigmas(b, timestep_sampling, shift=shift, generator=generator, device=x0.device)
    noise = noise.float().to(x0.device)
    noisy = noisy_latents(x0, noise, sigmas)
    with torch.autocast(device_type=x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = transformer(hidden_states=noisy.to(dtype), timestep=(sigmas * 1000).to(x0.device, dtype),
                           encoder_hidden_states=cond.prompt_embeds.to(x0.device, dtype),
                           pooled_projections=cond.pooled.to(x0.device, dtype), return_dict=False)[0]
    s = sigmas.view(-1, 1, 1, 1)
    return F.mse_loss(noisy - s * pred.float(), x0, reduction="mean")


def make_loss(model: Any, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    sampling = timestep_sampling(cfg, model.variant)
    shift = flow_shift(cfg)

    def loss(transformer: nn.Module, batch: Batch) -> torch.Tensor:
        return sd3_loss(transformer, batch.latents, batch.cond, timestep_sampling=sampling, shift=shift, dtype=dtype)

    return loss


def write_loras(folder: Path, cfg: TrainConfig, model: Any, adapted: Adapted, facts: RunFacts,
                save_dtype: torch.dtype) -> dict[str, str]:
    """<name>.safetensors in sd-scripts' SD3 names and metadata, and the diffusers file."""
    import re

    from core.export.metadata import kohya_metadata
    from core.families.sd3.lora_files import write_diffusers_file, write_kohya_file
    from core.lora import peft_state

    config = adapted.configs[0]
    state = peft_state(adapted.modules[0])
    alpha: float | dict[str, float] = float(config.lora_alpha)
    if config.alpha_pattern:
        paths = {k.rsplit(".lora_", 1)[0] for k in state}
        alpha = {p: float(next((v for pat, v in config.alpha_pattern.items() if re.search(pat, p)),
                               config.lora_alpha)) for p in paths}
    meta = kohya_metadata(cfg, family=model.variant, base_model_name=facts.base_model_name,
                          num_images=facts.num_images, tag_frequency=facts.tag_frequency,
                          bucket_info=facts.bucket_info, steps=facts.steps, epochs=facts.epochs,
                          started_at=facts.started_at, dataset_dir=cfg.train_data_dir, session_id=facts.session_id)
    meta.pop("modelspec.prediction_type", None)
    meta.update(ss_weighting_scheme="logit_normal", ss_logit_mean="0.0", ss_logit_std="1.0",
                ss_discrete_flow_shift=format(flow_shift(cfg), "g"))
    kohya = write_kohya_file(state, folder / f"{cfg.name}.safetensors", model_type=model.model_type, alpha=alpha,
                             metadata=meta, use_rslora=bool(config.use_rslora), dtype=save_dtype)
    diffusers = write_diffusers_file(state, folder, lora_config=config, dtype=save_dtype)
    return {"kohya": str(kohya), "diffusers": str(diffusers)}


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: Any, transformer: Any | None = None) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    pipe = StableDiffusion3Pipeline(
        scheduler=scheduler, vae=model.vae, transformer=model.transformer if transformer is None else transformer,
        text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
        tokenizer_2=model.tokenizer_2, text_encoder_3=model.text_encoder_3, tokenizer_3=model.tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
             negative_prompt: str = "", width: int, height: int,
             embeds: Callable[[list[str]], Any] | None = None, dtype: torch.dtype = torch.float32
             ) -> list[Image.Image]:
    """One image per prompt from the same seed (real CFG); `embeds`: cached encodings instead of the encoders."""
    from core.devices import free_memory
    from core.sample import decode_fp32

    device = pipe.vae.device
    images = []
    for prompt in prompts:
        kwargs: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance, width=width,
                                      height=height, output_type="latent", return_dict=False,
                                      generator=torch.Generator(device="cpu").manual_seed(seed))
        if embeds is None:
            kwargs.update(prompt=prompt, negative_prompt=negative_prompt or "")
        else:
            e = embeds([prompt]).to(device, dtype)
            n = embeds([negative_prompt or ""]).to(device, dtype)
            kwargs.update(prompt_embeds=e.prompt_embeds, pooled_prompt_embeds=e.pooled,
                          negative_prompt_embeds=n.prompt_embeds, negative_pooled_prompt_embeds=n.pooled)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = pipe(**kwargs)[0]
        images.extend(decode_fp32(pipe.vae, latents))
        free_memory()
    return images


def preview_size(model: Any, resolution: int) -> tuple[int, int]:
    scale = vae_scale_factor(model)
    floor = family_info(model.variant).sample_size_floor * scale // 8
    step = scale * model.transformer.config.patch_size
    side = max(step, max(resolution, floor) // step * step)
    return side, side


def previews(model: Any, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    pipe = build_pipeline(model, transformer)
    width, height = preview_size(model, cfg.resolution)
    return generate(pipe, cfg.sample_prompts, seed=cfg.sample_seed, steps=cfg.sample_num_inference_steps,
                    guidance=cfg.sample_guidance_scale, negative_prompt=cfg.sample_negative_prompt, width=width,
                    height=height, embeds=cached, dtype=dtype)


def tryout_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                    device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from core.families.sd3.load import load_sd3_model
    from core.sample import move

    model = load_sd3_model(base_model, config_source=model_config, vae=vae)
    for module in (model.transformer, *_encoders(model)):
        move(module, device, dtype)
    move(model.vae, device, torch.float32)
    pipe = build_pipeline(model)
    pipe.load_lora_weights = _reading_every_form(pipe.load_lora_weights)
    return pipe, model


def _reading_every_form(load: Callable[..., Any]) -> Callable[..., Any]:
    """`load_lora_weights` that also takes our WebUI / ComfyUI file (sd-scripts' MMDiT names), which
    diffusers' SD3 loader has no converter for: it gets the diffusers-named state, alpha / rank folded
    into lora_B (diffusers then assumes alpha = rank, so the delta is the file's)."""

    def load_any(source: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(source, (str, Path)) and Path(source).is_file():
            from safetensors import safe_open

            with safe_open(str(source), "pt") as handle:
                native = any(k.startswith(("lora_unet_", "diffusion_model.")) for k in handle.keys())
            if native:
                from core.families.sd3.lora_files import read_lora

                peft, alphas, _ = read_lora(source)
                state = {}
                for key, value in peft.items():
                    module = key.rsplit(".lora_", 1)[0]
                    if key.endswith("lora_B.weight"):
                        value = value * (alphas[module] / peft[f"{module}.lora_A.weight"].shape[0])
                    state[f"transformer.{key}"] = value
                source = state
        return load(source, *args, **kwargs)

    return load_any


def default_size(model: Any) -> int:
    return family_info(model.variant).native_resolution * vae_scale_factor(model) // 8


def detect(base_model: str) -> str | None:
    from core.families.sd3.load import detect as detect_sd3

    return detect_sd3(base_model)


def _lora_files() -> Any:
    from core.families.sd3.lora_files import lora_file_format

    return lora_file_format()


FAMILY = ImageFamily(
    detect=detect, lora_files=_lora_files(), prompt_cache_optional=False, check=check, load=load, describe=describe,
    name_of=lambda m: m.variant, network=lambda m: m.transformer, text_encoders=_encoders,
    park_text_encoders=park_text_encoders, encode_prompts=encode_prompts, cache_prompts=cache_prompts,
    add_lora=add_lora, low_memory=low_memory, make_loss=make_loss, write_loras=write_loras, previews=previews,
    tryout_pipeline=tryout_pipeline, generate=generate, default_size=default_size,
)
