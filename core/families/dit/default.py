"""The default behaviour of a flow-matching transformer family, built from a small spec.

What the transformer families do the same way is written once here: LoRA on the transformer
(fresh, or continued from a LoRA file), gradient checkpointing / fp8 storage / block offload, the
two LoRA files with the run's metadata and alphas, prompts encoded once into the disk cache and
the text encoders freed. A family states what is its own in a `TransformerSpec` (its LoRA targets,
loss, file reader and writers, prompt encoder, fp8 cast rule) and `transformer_family` makes its
`ImageFamily`; anything else it passes as an override (as musubi-tuner's trainer_base.py lets a
model's trainer override only its own methods).
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from core.config import TrainConfig
from core.families.dit.common import config_from_lora_file, load_dtype_and_quantization
from core.family_api.contract import Adapted, Batch, ImageFamily, Log, RunFacts
from core.family_api.registry import family_info

Peft = dict[str, torch.Tensor]


class TransformerModel(Protocol):
    """What the default asks of a family's loaded model (each family's own dataclass)."""

    variant: str                      # the registry family name
    transformer: nn.Module
    vae: Any
    scheduler_config: dict[str, Any]
    is_single_file: bool
    notes: list[str]


@dataclass(kw_only=True)
class LoadedModel:
    """What every family's loaded model carries beside its modules (its own dataclass adds those, positional
    first): the scheduler settings for previews, where it came from, the notes shown after loading."""

    scheduler_config: dict[str, Any]
    source: str
    is_single_file: bool = False
    notes: list[str] = field(default_factory=list)
    # An edit family's previews edit the first target's reference images (the engine's prompt keys
    # (caption, path, path ...) name them; `cache_prompts` keeps them here).
    preview_references: list[str] = field(default_factory=list)
    # Set when the transformer's load was put off (`transformer` None until `load_network`): training loads
    # it once the latents and captions are cached and the encoders freed, so they are never in memory at once.
    network_loader: Callable[[], Any] | None = None

    def load_network(self) -> None:
        if self.network_loader is not None:
            self.transformer = self.network_loader()
            self.network_loader = None


@dataclass(frozen=True)
class TransformerSpec:
    """What one transformer family states; the default supplies the rest."""

    label: str                # the family's name in messages
    trains: str               # what it trains instead of `target_modules`, a phrase for the warning
    encoders_note: str        # the note when a config asks not to cache the text encoders' outputs
    load: Callable[..., Any]                                         # (model source, cfg-derived kwargs) -> model
    # (transformer, cfg) -> exact module names that get a fresh LoRA.
    lora_targets: Callable[[nn.Module, TrainConfig], list[str]]
    # (model, cfg, weight dtype) -> loss(network, batch).
    make_loss: Callable[[Any, TrainConfig, torch.dtype], Callable[[nn.Module, Batch], torch.Tensor]]
    # path -> (PEFT state, {module: alpha}, metadata) of any form of the family's LoRA file.
    read_lora: Callable[[Path], tuple[Peft, dict[str, float], dict[str, str]]]
    # (model, state, path, *, alpha, metadata, use_rslora, dtype) -> the WebUI / ComfyUI file.
    write_kohya: Callable[..., Path]
    # (state, folder, *, lora_config, dtype) -> folder/pytorch_lora_weights.safetensors.
    write_diffusers: Callable[..., Path]
    # (model, prompt keys, device) -> one cache entry (named tensors) per key.
    encode_entries: Callable[[Any, list[Any], torch.device], Sequence[Mapping[str, torch.Tensor]]]
    stack: Callable[[list[dict[str, torch.Tensor]]], Any]            # cache entries -> batched conditioning
    prompt_identity: Callable[[Any], str]                            # what the cached encodings depend on
    lora_init: str | bool = "gaussian"                               # PEFT's init_lora_weights of a fresh LoRA
    # What follows "flow matching with" in the log line after the LoRA is added (default: the sampling).
    training_note: Callable[[Any, TrainConfig], str] = field(
        default=lambda model, cfg: f"{timestep_sampling(cfg, model.variant)} timestep sampling")
    fp8_cast_modulation: bool = True                                 # fp8 also for the modulation Linears
    # Keys the file's metadata adds for this family (weighting scheme, shift), from the config.
    extra_metadata: Callable[[TrainConfig], dict[str, str]] | None = None
    # (model, module paths of a LoRA file) -> refuse one that does not fit the loaded variant.
    check_continued: Callable[[Any, list[str]], None] | None = None
    # What a caption key is in the prompt cache (an edit model's keys are (caption, control image)).
    prompt_key: Callable[[Any], Hashable] = field(default=lambda key: key)
    key_text: Callable[[Any], str] = str                             # the text a key is stored under
    # (model, caption keys, cfg) -> every prompt to encode (captions, samples, negative).
    prompts: Callable[[Any, list[Any], TrainConfig], list[Any]] | None = None


def lazy(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, imported at its first call: a family's spec names its file and loading functions
    without importing diffusers when the registry is read."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def kohya_writer(module: str, name: str, model_arg: str = "variant") -> Callable[..., Path]:
    """The spec's `write_kohya` from a file writer `name(state, path, *, <model_arg>=..., **kwargs)`: the
    loaded model's attribute of that name says which variant the file is for."""
    write = lazy(module, name)

    def write_kohya(model: Any, state: Peft, path: Path, **kwargs: Any) -> Path:
        return write(state, path, **{model_arg: getattr(model, model_arg)}, **kwargs)

    return write_kohya


def fixed_targets(module: str, name: str) -> Callable[[nn.Module, TrainConfig], list[str]]:
    """The spec's `lora_targets` from `name(transformer)`, for a family whose targets no setting changes."""
    targets = lazy(module, name)
    return lambda transformer, cfg: targets(transformer)


def package_parts(package: str, kohya_file: str = "write_kohya_file") -> dict[str, Any]:
    """The spec's pieces a family package keeps in the usual modules (docs/adding-a-family.md): `load` and
    `lora_targets` from its `load` (load_model, lora_targets), the LoRA files' reader and writers from its
    `lora_files` (read_lora, `kohya_file`, write_diffusers_file; imported at their first call), the loss from
    its `loss` (make_loss) and the prompts from its `text` (encode_entries, stack, prompt_identity)."""
    files, text = f"{package}.lora_files", importlib.import_module(f"{package}.text")
    return dict(load=model_loader(f"{package}.load"), lora_targets=fixed_targets(f"{package}.load", "lora_targets"),
                read_lora=lazy(files, "read_lora"), write_kohya=kohya_writer(files, kohya_file),
                write_diffusers=lazy(files, "write_diffusers_file"),
                make_loss=importlib.import_module(f"{package}.loss").make_loss, encode_entries=text.encode_entries,
                stack=text.stack, prompt_identity=text.prompt_identity)


def model_loader(module: str, name: str = "load_model") -> Callable[..., Any]:
    """The spec's `load` from `name(base_model, *, config_source, text_encoder, vae, dtype, quantization_config)`
    of a family with one text encoder: the first (only) file of `text_encoder_files`."""
    from core.families.dit.common import first_text_encoder_file

    load_model = lazy(module, name)

    def load(cfg: TrainConfig, *, dtype: torch.dtype, quantization_config: Any) -> Any:
        return load_model(cfg.base_model, config_source=cfg.base_model_config,
                          text_encoder=first_text_encoder_file(cfg), vae=cfg.vae, dtype=dtype,
                          quantization_config=quantization_config)

    return load


# --- loading and prompts -------------------------------------------------------------------------

def check(spec: TransformerSpec, cfg: TrainConfig) -> list[str]:
    """Refuse GPU-only switches on a machine without CUDA and unsupported LoRA kinds; warn on ignored keys."""
    from core.families.dit.common import check_transformer

    return check_transformer(cfg, spec.label, targets=spec.trains,
                             ignored_for=f"only apply to SD models; ignored for {spec.label}.",
                             encoders=spec.encoders_note)


def load(spec: TransformerSpec, cfg: TrainConfig) -> Any:
    dtype, quant = load_dtype_and_quantization(cfg)
    return spec.load(cfg, dtype=dtype, quantization_config=quant)


def describe(model: TransformerModel) -> list[str]:
    layout = "single file" if model.is_single_file else "diffusers"
    return [f"Model: {family_info(model.variant).label} ({layout}), flow matching", *model.notes]


def text_encoders(model: Any, *, streamed: bool = False) -> list[Any]:
    """The text encoders the trainer and the Test tab place on the device; `streamed`: instead the ones that run a
    layer at a time and place themselves (core.families.dit.streamed_encoder)."""
    from core.families.dit.prompt_cache import TEXT_ENCODER_NAMES
    from core.families.dit.streamed_encoder import streams_layers

    return [e for e in (getattr(model, n, None) for n in TEXT_ENCODER_NAMES)
            if e is not None and streams_layers(e) == streamed]


def park_text_encoders(model: Any, keep_for_previews: bool) -> None:
    """Free the text encoders for good: the previews use the cached sample-prompt encodings."""
    from core.families.dit.prompt_cache import free_text_encoders

    free_text_encoders(model)


def encode_prompts(spec: TransformerSpec, model: Any, keys: list[Any], device: torch.device) -> Any:
    return spec.stack([dict(e) for e in spec.encode_entries(model, [spec.prompt_key(k) for k in keys], device)])


def cache_prompts(spec: TransformerSpec, model: Any, keys: list[Any], cfg: TrainConfig, device: torch.device,
                  log: Log) -> Callable[[list[Any]], Any]:
    """Captions, sample prompts and the negative prompt encoded once (on disk beside the data)."""
    from core.families.dit.prompt_cache import cache_encodings, prompts_to_encode
    from core.train.latent_cache import cache_root_for

    model.preview_references = next((list(k[1:]) for k in keys if isinstance(k, tuple)), [])
    own = [spec.prompt_key(k) for k in keys]
    prompts = spec.prompts(model, own, cfg) if spec.prompts is not None else prompts_to_encode(own, cfg)
    folder = cache_root_for(cfg.train_data_dir, cfg.output_dir, "text") if cfg.cache_latents_to_disk else None
    entries, hits = cache_encodings(prompts, lambda chunk: spec.encode_entries(model, chunk, device), folder,
                                    spec.prompt_identity(model), key_text=spec.key_text)
    if hits:
        log(f"{hits} prompt encoding(s) reused from the disk cache {folder}")

    def lookup(batch: list[Any]) -> Any:
        return spec.stack([entries[spec.prompt_key(k)] for k in batch])

    return lookup


# --- LoRA ------------------------------------------------------------------------------------------

def continue_from_file(spec: TransformerSpec, model: Any, transformer: nn.Module, init_file: Path, log: Log) -> Any:
    """The LoRA of `init_file` on the transformer, with exactly its modules, ranks and alphas."""
    from diffusers.training_utils import cast_training_params

    from core.lora import load_peft_state

    try:
        peft, alphas, _ = spec.read_lora(init_file)
    except Exception as exc:
        raise ValueError(f"'{init_file}' is not a readable {spec.label} LoRA file: {exc}") from exc
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in peft})
    if spec.check_continued is not None:
        spec.check_continued(model, paths)
    foreign = sorted(set(paths) - {n for n, _ in transformer.named_modules()})
    if not peft or foreign:
        raise ValueError(f"'{init_file.name}' does not fit this {spec.label} transformer "
                         f"({', '.join(foreign[:3]) or 'no LoRA modules'}): a LoRA of another model or variant.")
    config = config_from_lora_file(peft, alphas)
    transformer.add_adapter(config)
    # PEFT makes the adapter in the base's dtype: on a bf16 base the file's values would be rounded to bf16
    # on the way in. The run trains the LoRA in fp32, so it is made fp32 before it takes the file's values.
    cast_training_params([transformer], dtype=torch.float32)
    load_peft_state(transformer, peft, "transformer")
    log(f"Continuing from the LoRA {init_file.name} (rank {config.r}, alpha {config.lora_alpha:g})")
    return config


def add_lora(spec: TransformerSpec, model: Any, cfg: TrainConfig, init_file: Path | None, log: Log) -> Adapted:
    """A fresh LoRA on the family's targets, or the modules of `init_file`; the base weights frozen."""
    from peft import LoraConfig

    from core.lora import is_lycoris

    transformer = model.transformer
    transformer.requires_grad_(False)
    if is_lycoris(cfg):
        if init_file is not None:
            raise ValueError(f"lora_variant: {cfg.lora_variant} starts fresh on {spec.label}: continuing from a LoRA "
                             "file needs lora_variant: lora (resume_from: latest continues a LoKr / LoHa run).")
        return add_lycoris(spec, model, cfg, log)
    if init_file is not None:
        continue_from_file(spec, model, transformer, init_file, log)
    else:
        transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                           target_modules=spec.lora_targets(transformer, cfg),
                                           init_lora_weights=spec.lora_init, lora_dropout=cfg.lora_dropout,
                                           use_rslora=cfg.lora_variant == "rslora"))
    config = transformer.peft_config["default"]
    # Counted on the model: PEFT may shorten a long target_modules list to the suffixes it needs.
    layers = sum(1 for name, _ in transformer.named_modules() if name.endswith(".lora_A"))
    log(f"LoRA rank {config.r} on {layers} transformer layers; flow matching with "
        f"{spec.training_note(model, cfg)}")
    # bitsandbytes put an NF4 transformer on the GPU already; block offload keeps it in CPU memory.
    placed = [transformer] if cfg.base_quantization == "nf4" or cfg.blocks_to_swap > 0 else []
    return Adapted([transformer], ["transformer"], [config], placed=placed)


def add_lycoris(spec: TransformerSpec, model: Any, cfg: TrainConfig, log: Log) -> Adapted:
    """PEFT's LoKr / LoHa (core.lora.lycoris_config: LyCORIS' factor, decompose both, full matrix) on the
    family's LoRA targets."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from core.lora import lycoris_config

    transformer = model.transformer
    transformer.add_adapter(lycoris_config(cfg, spec.lora_targets(transformer, cfg)))
    config = transformer.peft_config["default"]
    layers = sum(1 for _, m in transformer.named_modules() if isinstance(m, BaseTunerLayer))
    kind = "LoKr" if cfg.lora_variant == "lokr" else "LoHa"
    log(f"{kind} (rank {cfg.lora_rank}{f', factor {cfg.lokr_factor}' if kind == 'LoKr' else ''}) on {layers} "
        f"transformer layers; flow matching with {spec.training_note(model, cfg)}")
    placed = [transformer] if cfg.base_quantization == "nf4" or cfg.blocks_to_swap > 0 else []
    return Adapted([transformer], ["transformer"], [config], placed=placed)


def low_memory(spec: TransformerSpec, model: Any, adapted: Adapted, cfg: TrainConfig, dtype: torch.dtype,
               log: Log) -> None:
    """Gradient checkpointing, fp8 storage of the frozen weights (after the LoRA), block offload."""
    from core.families.dit import low_memory as switches

    transformer = adapted.modules[0]
    if cfg.gradient_checkpointing:
        switches.enable_gradient_checkpointing(transformer)
    if cfg.fp8_base:
        cast = switches.enable_fp8_storage(transformer, dtype, cast_modulation=spec.fp8_cast_modulation)
        log(f"fp8 storage: {cast} frozen layers stored in float8_e4m3fn, the LoRA in fp32.")
    if cfg.blocks_to_swap > 0:
        if not cfg.fp8_base:
            # The run left it in CPU memory (not moved, not cast): the frozen weights take the compute dtype here.
            for name, param in transformer.named_parameters():
                if "lora_" not in name:
                    param.data = param.data.to(dtype)
        _, message = switches.apply_group_offload(transformer)
        log(message)


def alpha_per_module(config: Any, state: Mapping[str, torch.Tensor]) -> float | dict[str, float]:
    """The LoraConfig's alpha, or {module path: alpha} where its alpha_pattern gives some modules their own."""
    if not config.alpha_pattern:
        return float(config.lora_alpha)
    paths = {k.rsplit(".lora_", 1)[0] for k in state}
    return {p: float(next((v for pat, v in config.alpha_pattern.items() if re.search(pat, p)), config.lora_alpha))
            for p in paths}


def write_loras(spec: TransformerSpec, folder: Path, cfg: TrainConfig, model: Any, adapted: Adapted,
                facts: RunFacts, save_dtype: torch.dtype) -> dict[str, str]:
    """<name>.safetensors (the family's WebUI / ComfyUI names and metadata) and diffusers' file."""
    from core.export.lycoris import is_lycoris_state
    from core.export.metadata import kohya_metadata
    from core.lora import peft_state

    config = adapted.configs[0]
    state = peft_state(adapted.modules[0])
    # The run's ss_* keys; the family, network and rank/alpha keys come from the family's writer.
    meta = kohya_metadata(cfg, family=model.variant, base_model_name=facts.base_model_name,
                          num_images=facts.num_images, tag_frequency=facts.tag_frequency,
                          bucket_info=facts.bucket_info, steps=facts.steps, epochs=facts.epochs,
                          started_at=facts.started_at, dataset_dir=cfg.train_data_dir, session_id=facts.session_id)
    meta.pop("modelspec.prediction_type", None)  # sd-scripts and musubi-tuner leave it out for these models
    if spec.extra_metadata is not None:
        meta.update(spec.extra_metadata(cfg))
    if is_lycoris_state(state):
        # One file: LyCORIS keys under diffusers' names (core.export.lycoris_transformer says why); diffusers'
        # own loader reads no transformer LoHa and no LoKr of most of these families, so no second file.
        from core.export.lycoris import scales_from_model
        from core.export.lycoris_transformer import write_file

        path = write_file(folder / f"{cfg.name}.safetensors", state, scales_from_model(adapted.modules[0]), meta,
                          save_dtype)
        return {"kohya": str(path)}
    kohya = spec.write_kohya(model, state, folder / f"{cfg.name}.safetensors", alpha=alpha_per_module(config, state),
                             metadata=meta, use_rslora=bool(config.use_rslora), dtype=save_dtype)
    diffusers = spec.write_diffusers(state, folder, lora_config=config, dtype=save_dtype)
    return {"kohya": str(kohya), "diffusers": str(diffusers)}


# --- previews ----------------------------------------------------------------------------------------

def vae_scale_factor(model: Any) -> int:
    """The AE's downscale: one 2x per block after the first, or per stage of a video VAE (8 for the real ones;
    the tiny ones' are smaller)."""
    config = model.vae.config
    if "temperal_downsample" in config:
        return 2 ** len(config.temperal_downsample)
    return 2 ** (len(config.block_out_channels) - 1)


def preview_size(model: TransformerModel, resolution: int, patch: int = 2) -> tuple[int, int]:
    """The training resolution in whole latent patches, not below the family's floor (in 8x-AE pixels)."""
    scale = vae_scale_factor(model)
    floor = family_info(model.variant).sample_size_floor * scale // 8
    step = scale * patch
    side = max(step, max(resolution, floor) // step * step)
    return side, side


def default_size(model: TransformerModel) -> int:
    return family_info(model.variant).native_resolution * vae_scale_factor(model) // 8


def sample_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The previews' settings of the config, as the families' `generate` takes them."""
    return dict(seed=cfg.sample_seed, steps=cfg.sample_num_inference_steps, guidance=cfg.sample_guidance_scale,
                negative_prompt=cfg.sample_negative_prompt)


def flow_scheduler(model: TransformerModel) -> Any:
    """The model's FlowMatchEulerDiscreteScheduler, for its pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})


def latent_call(*, steps: int, width: int, height: int, seed: int, **guidance: float) -> dict[str, Any]:
    """A pipeline call's keyword arguments for one image's latents from `seed` (`guidance`: the pipeline's
    own name for it, guidance_scale or true_cfg_scale)."""
    return dict(num_inference_steps=steps, **guidance, width=width, height=height, output_type="latent",
                return_dict=False, generator=torch.Generator(device="cpu").manual_seed(seed))


def draw_each(pipe: Any, prompts: Sequence[str], call_for: Callable[[str], dict[str, Any]],
              decode: Callable[[torch.Tensor], list[Any]], *, dtype: torch.dtype) -> list[Any]:
    """One image per prompt: the pipeline's call for it (`call_for`, the family's arguments) gives latents,
    the transformer under autocast in `dtype` (an fp32 LoRA on bf16 / fp8 base layers), which the family
    decodes (its AE in fp32); memory is freed between images."""
    from core.devices import free_memory

    device = pipe.vae.device
    images = []
    for prompt in prompts:
        kwargs = call_for(prompt)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = pipe(**kwargs)[0]
        images.extend(decode(latents))
        free_memory()
    return images


@dataclass(frozen=True)
class Draw:
    """What the contract's `generate` was asked for, as a family's pipeline call reads it."""

    seed: int
    steps: int
    guidance: float
    negative_prompt: str
    width: int
    height: int
    embeds: Callable[[list[Any]], Any] | None   # cached encodings instead of the text encoders
    dtype: torch.dtype
    device: torch.device

    def latents(self, **guidance: float) -> dict[str, Any]:
        """The call's arguments for one image's latents (`guidance` under the pipeline's own name)."""
        return latent_call(steps=self.steps, width=self.width, height=self.height, seed=self.seed, **guidance)

    def encoded(self, prompt: Any) -> Any:
        """The cached encoding of one prompt on the pipeline's device, in the compute dtype."""
        assert self.embeds is not None
        return self.embeds([prompt]).to(self.device, self.dtype)


def decode_with_vae(pipe: Any, latents: torch.Tensor, draw: Draw) -> list[Any]:
    """The pipeline's latents as images, its AE in fp32."""
    from core.sample import decode_fp32

    return decode_fp32(pipe.vae, latents)


def pipeline_generate(call_for: Callable[..., dict[str, Any]],
                      decode: Callable[[Any, torch.Tensor, Draw], list[Any]] = decode_with_vae,
                      fit_size: Callable[[Any, int, int], tuple[int, int]] | None = None) -> Callable[..., list[Any]]:
    """A family's `generate` (one image per prompt from the same seed) from what is its own: the pipeline's
    arguments for a prompt, `call_for(pipe, draw, prompt, **extra)`; how latents become images; the sizes
    its pipeline accepts. Extra keyword arguments of a call (an edit's `control`) go to `call_for`."""

    @torch.no_grad()
    def generate(pipe: Any, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
                 negative_prompt: str = "", width: int, height: int,
                 embeds: Callable[[list[Any]], Any] | None = None, dtype: torch.dtype = torch.float32,
                 **extra: Any) -> list[Any]:
        if fit_size is not None:
            width, height = fit_size(pipe, width, height)
        draw = Draw(seed=seed, steps=steps, guidance=guidance, negative_prompt=negative_prompt, width=width,
                    height=height, embeds=embeds, dtype=dtype, device=pipe.vae.device)
        return draw_each(pipe, prompts, lambda prompt: call_for(pipe, draw, prompt, **extra),
                         lambda latents: decode(pipe, latents, draw), dtype=dtype)

    return generate


def place_for_tryout(model: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """The Test tab's model on `device`: the transformer and text encoders in `dtype`, the AE in fp32."""
    from core.sample import move

    for module in (model.transformer, *text_encoders(model)):
        move(module, device, dtype)
    for encoder in text_encoders(model, streamed=True):  # stays in CPU memory, streams to `device`
        move(encoder, "cpu", dtype)
    move(model.vae, device, torch.float32)
    return model


def unless_set(cfg: TrainConfig, name: str, value: Any) -> Any:
    """`value` where the config leaves the setting `name` at its default (a distilled model's own regime);
    the config's value where the user changed it."""
    import dataclasses

    default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)
    return value if getattr(cfg, name) == default else getattr(cfg, name)


def tryout_loader(module: str, build_pipeline: Callable[[Any], Any], name: str = "load_model"
                  ) -> Callable[..., tuple[Any, Any]]:
    """The family's `tryout_pipeline`: its model from `module.name(base_model, *, config_source, vae)` placed for
    the Test tab, and `build_pipeline(model)`."""
    load_model = lazy(module, name)

    def tryout_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                        device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        # Loaded straight in the Test tab's dtype: fp32 first would need twice the model's size in CPU memory.
        model = place_for_tryout(load_model(base_model, config_source=model_config, vae=vae, dtype=dtype), device,
                                 dtype)
        return build_pipeline(model), model

    return tryout_pipeline


def pipeline_previews(build_pipeline: Callable[[Any, Any], Any], generate: Callable[..., list[Any]],
                      settings: Callable[[Any, TrainConfig], dict[str, Any]] = lambda model, cfg: {},
                      size: Callable[[Any, int], tuple[int, int]] = preview_size) -> Callable[..., list[Any]]:
    """The family's `previews`: the sample prompts drawn with its pipeline on the training transformer at the
    preview size, the config's sample settings (`settings(model, cfg)`: the model's own regime over them); an
    edit family's with the first target's reference images (`control`, a list of PIL images)."""

    def previews(model: Any, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
                 cached: Any) -> list[Any]:
        pipe = build_pipeline(model, transformer)
        width, height = size(model, cfg.resolution)
        extra = {}
        if getattr(model, "preview_references", None):
            from core.data.image_io import load_rgb

            extra["control"] = [load_rgb(Path(p)) for p in model.preview_references]
        return generate(pipe, cfg.sample_prompts, **{**sample_settings(cfg), **settings(model, cfg)}, width=width,
                        height=height, embeds=cached, dtype=dtype, **extra)

    return previews


def timestep_sampling(cfg: TrainConfig, variant: str) -> str:
    """The configured sampling, or the family's own (`auto`; shift where the row names none)."""
    if cfg.timestep_sampling != "auto":
        return cfg.timestep_sampling
    return family_info(variant).default_timestep_sampling or "shift"


# --- the family ----------------------------------------------------------------------------------------

def transformer_family(spec: TransformerSpec, **overrides: Any) -> ImageFamily:
    """The family's `ImageFamily`: the default behaviour from `spec`, `overrides` where the family differs
    (previews, tryout_pipeline, generate, detect and lora_files are always its own)."""
    parts: dict[str, Any] = dict(
        check=partial(check, spec), load=partial(load, spec), describe=describe, name_of=lambda m: m.variant,
        network=lambda m: m.transformer, load_network=lambda m: m.load_network(), text_encoders=text_encoders,
        park_text_encoders=park_text_encoders,
        encode_prompts=partial(encode_prompts, spec), cache_prompts=partial(cache_prompts, spec),
        add_lora=partial(add_lora, spec), low_memory=partial(low_memory, spec), make_loss=spec.make_loss,
        write_loras=partial(write_loras, spec), default_size=default_size, prompt_cache_optional=False)
    parts.update(overrides)
    return ImageFamily(**parts)


def package_family(spec: TransformerSpec, package: str, *, build_pipeline: Callable[..., Any],
                   generate: Callable[..., list[Any]],
                   settings: Callable[[Any, TrainConfig], dict[str, Any]] = lambda model, cfg: {},
                   **overrides: Any) -> ImageFamily:
    """`transformer_family` of a package in the usual layout: `detect` from its `load`, the LoRA tools' format
    from its `lora_files` (`lora_file_format()`), previews (`settings`: the model's own regime over the config's
    sample settings) and the Test tab drawn with `build_pipeline` and `generate`; `overrides` as there."""
    return transformer_family(spec, detect=lazy(f"{package}.load", "detect"),
                              lora_files=lazy(f"{package}.lora_files", "lora_file_format")(),
                              previews=pipeline_previews(build_pipeline, generate, settings),
                              tryout_pipeline=tryout_loader(f"{package}.load", build_pipeline), generate=generate,
                              **overrides)
