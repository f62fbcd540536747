"""Image LoRA training (SD 1.x / 2.x / SDXL) on HF Accelerate: the loop the Job and train.py run.

Stages: scan the folder -> load the model -> encode every image and caption once (cached)
-> free the VAE / text encoders from the device -> train the LoRA with checkpoints,
previews and events -> write the diffusers and kohya/WebUI files. `ctx.should_stop()`
is checked every step: a stop finishes the step, saves a checkpoint and the LoRA files.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import torch

from core.config import TrainConfig
from core.events import RunContext
from core.sample import move
from core.devices import free_memory, torch_dtype
from core.train import checkpoints, distributed, image_outputs, optim, runtime
from core.train.loop import LoopResult, run_task
from core.train.image_lora import (add_text_encoder_lora, add_unet_lora, load_peft_state, module_paths, peft_state,
                                   read_lora_file)
from core.train.image_step import diffusion_loss, encode_prompts, sample_latents, sdxl_time_ids
from core.train.latent_cache import CachedImage, TextCache, cache_dir_for, encode_images

def _precision(cfg: TrainConfig, ctx: RunContext) -> str:
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        ctx.warn("fp16 mixed precision needs a CUDA GPU; training in fp32 on this machine.",
                 "Use mixed_precision: no (or bf16) on the CPU.")
        return "no"
    return cfg.mixed_precision


def _skipped_warning(ctx: RunContext, skipped: list[tuple[str, str]]) -> None:
    if skipped:
        listing = "; ".join(f"{name} ({reason})" for name, reason in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        ctx.warn(f"{len(skipped)} image(s) skipped: {listing}{more}.",
                 "Fix or remove these files; training goes on with the others.")


@dataclasses.dataclass
class ImageRun:
    """An image LoRA run: the setup stages, one batch's loss, and the task the training loop drives."""

    cfg: TrainConfig
    ctx: RunContext
    accelerator: Any
    out: Path
    model: Any = None
    items: list = dataclasses.field(default_factory=list)
    buckets: list = dataclasses.field(default_factory=list)
    latents: dict[int, CachedImage] | None = None
    text_cache: TextCache | None = None
    weight_dtype: torch.dtype = torch.float32
    unet_config: Any = None
    te_configs: list = dataclasses.field(default_factory=list)
    trained_encoders: list = dataclasses.field(default_factory=list)
    dataset: Any = None
    started_at: float = dataclasses.field(default_factory=time.time)
    # kohya's ss_session_id, fixed per run (drawn from a private RNG, never the training one).
    session_id: int = dataclasses.field(default_factory=lambda: random.Random().randint(0, 2**31 - 1))

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def log(self, message: str) -> None:
        if self.main:
            self.ctx.log(message)

    # --- setup ------------------------------------------------------------------------------
    def load_data(self) -> None:
        from core.data.buckets import bucket_for
        from core.data.images import scan_image_dataset

        self.log(f"Scanning {self.cfg.train_data_dir}")
        self.dataset = scan_image_dataset(self.cfg)
        if self.main:
            for warning in self.dataset.warnings:
                self.ctx.warn(warning)
            _skipped_warning(self.ctx, self.dataset.skipped)
        self.items = list(self.dataset.items)
        self.buckets = [tuple(bucket_for(i.width, i.height, self.cfg)) for i in self.items]
        self.log(f"{len(self.items)} images, captions from {self.dataset.caption_source}, "
                 f"{len(set(self.buckets))} bucket(s)")

    def load_model(self) -> None:
        from core.models.sd import FAMILY_NAMES, load_sd_model

        cfg = self.cfg
        self.log(f"Loading model {cfg.base_model}")
        self.model = load_sd_model(cfg.base_model, allow_pickle=cfg.allow_pickle, vae=cfg.vae,
                                   prediction_type=cfg.prediction_type, model_config=cfg.base_model_config)
        m = self.model
        self.log(f"Model: {FAMILY_NAMES[m.family]} ({'single file' if m.is_single_file else 'diffusers'}), "
                 f"prediction {m.prediction_type}")
        for note in m.notes:
            self.log(note)
        if self.main and cfg.resolution < 0.7 * m.default_resolution:
            self.ctx.warn(f"resolution {cfg.resolution} is small for {FAMILY_NAMES[m.family]} "
                          f"(made for {m.default_resolution} px); results may be blurry.",
                          f"Use resolution: {m.default_resolution} if memory allows.")
        for module in [m.unet, m.vae, *m.text_encoders]:
            module.requires_grad_(False)

    def cache_latents(self) -> None:
        cfg, m = self.cfg, self.model
        if not cfg.cache_latents:
            return
        if cfg.random_flip or not cfg.center_crop:
            self.log("Latent caching is off: random_flip / random crops change the image every epoch.")
            return
        from core.models.sd import module_identity

        move(m.vae, self.device, torch.float32)  # fp32: an fp16 SD VAE can overflow to NaN
        cache_dir = None
        if cfg.cache_latents_to_disk:
            cache_dir = cache_dir_for(cfg.train_data_dir, cfg.output_dir, module_identity(m.vae))

        def progress(done: int, total: int) -> None:
            self.log(f"Caching latents {done}/{total}")

        # Rank 0 encodes and writes the disk cache first; the others then read it.
        with self.accelerator.main_process_first():
            latents, failed, hits = encode_images(m.vae, [i.path for i in self.items], self.buckets,
                                                  center_crop=cfg.center_crop, cache_dir=cache_dir,
                                                  progress=progress if self.main else None)
        if hits:
            self.log(f"{hits} latent(s) reused from the disk cache {cache_dir}")
        if failed and self.main:
            _skipped_warning(self.ctx, failed)
        keep = [i for i in range(len(self.items)) if i in latents]
        self.latents = {new: latents[old] for new, old in enumerate(keep)}
        self.items = [self.items[i] for i in keep]
        self.buckets = [self.buckets[i] for i in keep]
        if not self.items:
            raise ValueError("No image could be decoded for training; see the warnings above.")

    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.model
        return encode_prompts(m.family, m.text_encoders, m.tokenizers, captions, self.device)

    def cache_text(self) -> None:
        cfg, m = self.cfg, self.model
        for encoder in m.text_encoders:
            move(encoder, self.device, self.weight_dtype)
        if cfg.train_text_encoder or not cfg.cache_text_encoder_outputs:
            return
        captions = [i.caption for i in self.items] + ([""] if cfg.caption_dropout > 0 else [])
        self.log(f"Encoding {len(set(captions))} caption(s) once")
        self.text_cache = TextCache()
        self.text_cache.build(captions, self.encode_prompts)

    def free_encoders(self) -> None:
        """Take the VAE and frozen text encoders off the device while the UNet trains."""
        cfg, m = self.cfg, self.model
        keep = bool(cfg.sample_prompts)  # previews need them back later
        if self.latents is not None:
            move(m.vae, "cpu")
            if not keep:
                m.vae = None
        else:
            move(m.vae, self.device, torch.float32)
        if self.text_cache is not None:
            for encoder in m.text_encoders:
                move(encoder, "cpu")
            if not keep:
                m.text_encoders = [None] * len(m.text_encoders)
        free_memory()

    def add_lora(self, init_file: Path | None) -> None:
        cfg, m = self.cfg, self.model
        loaded = None
        lora_cfg = cfg
        if init_file is not None:
            loaded = read_lora_file(init_file, m.family)
            # A LoRA file already holds its update: it continues as a plain LoRA, whatever the variant.
            variant = "lora" if cfg.lora_variant == "pissa" else cfg.lora_variant
            lora_cfg = dataclasses.replace(cfg, lora_rank=loaded.rank, lora_alpha=loaded.alpha,
                                           target_modules=module_paths(loaded.unet), conv_rank=0,
                                           lora_variant=variant)
            self.log(f"Continuing from the LoRA {init_file.name} (rank {loaded.rank}, alpha {loaded.alpha:g})")
        self.unet_config = add_unet_lora(m.unet, lora_cfg)
        if cfg.train_text_encoder:
            for index, encoder in enumerate(m.text_encoders):
                targets = module_paths(loaded.text_encoders[index]) if loaded and index < len(
                    loaded.text_encoders) and loaded.text_encoders[index] else None
                self.te_configs.append(add_text_encoder_lora(encoder, lora_cfg, targets))
                self.trained_encoders.append(encoder)
        if lora_cfg.lora_variant == "pissa":
            # PiSSA rewrote the base weights; keep its starting point to export a LoRA for the original.
            self.pissa_init = [peft_state(m.unet)] + [peft_state(e) for e in self.trained_encoders]
        if loaded is not None:
            self._load_loaded(loaded)
        move(m.unet, self.device, self.weight_dtype)
        for encoder in self.trained_encoders:
            move(encoder, self.device, self.weight_dtype)
        from diffusers.training_utils import cast_training_params

        # Frozen weights stay in the weight dtype; the trainable LoRA weights are fp32.
        cast_training_params([m.unet, *self.trained_encoders], dtype=torch.float32)
        if cfg.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            for encoder in self.trained_encoders:
                runtime.enable_activation_checkpointing(encoder)
        m.unet.train()
        for encoder in self.trained_encoders:
            encoder.train()

    def _load_loaded(self, loaded: Any) -> None:
        from core.export.kohya import fit_keys_to_model

        load_peft_state(self.model.unet, loaded.unet, "UNet")
        for encoder, state in zip(self.trained_encoders, loaded.text_encoders):
            if state:
                load_peft_state(encoder, fit_keys_to_model(state, encoder), "text encoder")

    # --- one batch --------------------------------------------------------------------------
    def batch_loss(self, indices: list[int]) -> torch.Tensor:
        cfg, m = self.cfg, self.model
        captions = ["" if cfg.caption_dropout > 0 and random.random() < cfg.caption_dropout else self.items[i].caption
                    for i in indices]
        vae_config = self.vae_config
        if self.latents is not None:
            infos = [self.latents[i] for i in indices]
            moments = torch.stack([info.moments for info in infos]).to(self.device)
            latents = sample_latents(moments, vae_config.scaling_factor, getattr(vae_config, "shift_factor", None))
            sizes = [(i.original_size, i.crop_top_left, i.target_size) for i in infos]
        else:
            latents, sizes = self._encode_batch(indices)
        if self.text_cache is not None:
            embeds, pooled = self.text_cache.batch(captions)
        else:
            embeds, pooled = self.encode_prompts(captions)
        added = None
        if m.family == "sdxl":
            time_ids = sdxl_time_ids([s[0] for s in sizes], [s[1] for s in sizes], [s[2] for s in sizes],
                                     self.device, self.weight_dtype)
            added = {"text_embeds": pooled.to(self.weight_dtype), "time_ids": time_ids}
        return diffusion_loss(self.train_unet, self.noise_scheduler,
                              latents, embeds, prediction_type=m.prediction_type, noise_offset=cfg.noise_offset,
                              snr_gamma=cfg.snr_gamma, added_cond=added, weight_dtype=self.weight_dtype)

    def _encode_batch(self, indices: list[int]) -> tuple[torch.Tensor, list]:
        from core.data.buckets import prepare_image
        from core.data.image_io import load_rgb

        prepared = [prepare_image(load_rgb(self.items[i].path), self.buckets[i], center_crop=self.cfg.center_crop,
                                  flip=self.cfg.random_flip and random.random() < 0.5, rng=random)
                    for i in indices]
        vae = self.model.vae
        with torch.no_grad():
            pixels = torch.stack([p.pixels for p in prepared]).to(self.device, torch.float32)
            latents = vae.encode(pixels).latent_dist.sample()
        shift = getattr(vae.config, "shift_factor", None)
        latents = (latents - (shift or 0.0)) * vae.config.scaling_factor
        return latents, [(tuple(p.original_size), tuple(p.crop_top_left), tuple(p.target_size)) for p in prepared]

    # --- the training loop's task (core.train.loop.TrainTask) ---------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        groups = optim.lora_param_groups(self.model.unet.named_parameters(), cfg.learning_rate,
                                           cfg.loraplus_lr_ratio)
        te_lr = cfg.text_encoder_lr or cfg.learning_rate
        for encoder in self.trained_encoders:
            groups += optim.lora_param_groups(encoder.named_parameters(), te_lr, cfg.loraplus_lr_ratio)
        return [g for g in groups if g["params"]]

    def prepare(self, optimizer: Any) -> Any:
        models = self.accelerator.prepare(self.model.unet, *self.trained_encoders, optimizer)
        self.train_unet, self.train_encoders, optimizer = models[0], list(models[1:-1]), models[-1]
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        return optimizer

    def plan(self, total: int) -> str:
        cfg, world = self.cfg, self.accelerator.num_processes
        return (f"Training {total} steps: {len(self.items)} images x {cfg.repeats} repeats, batch {cfg.batch_size}"
                f"{f' x {world} processes' if world > 1 else ''}, accumulation {cfg.gradient_accumulation_steps}")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        acc = self.accelerator
        return self.sampler.batches_for_epoch(epoch)[acc.process_index::acc.num_processes]

    def train_step(self, group: Sequence[list[int]]) -> float:
        """The micro-batches of one optimizer step; gradients sync across processes on the last one."""
        acc = self.accelerator
        total = torch.zeros((), device=self.device)
        for index, indices in enumerate(group):
            with distributed.sync_on_last(acc, (self.train_unet, *self.train_encoders), index, len(group)):
                loss = self.batch_loss(indices) / len(group)
                acc.backward(loss)
            total += loss.detach().float()
        if self.cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        return float(acc.gather(total.reshape(1)).mean()) if acc.num_processes > 1 else float(total)

    def any_process(self, flag: bool) -> bool:
        """A stop pressed on the main process (the one with the console / GUI) reaches every process."""
        return distributed.any_process(self.accelerator, flag)

    def save_checkpoint(self, state: checkpoints.TrainState, optimizer: Any, scheduler: Any) -> Path | None:
        return image_outputs.checkpoint(self, state, optimizer, scheduler)

    def restore(self, checkpoint: Path, optimizer: Any, scheduler: Any) -> checkpoints.TrainState:
        return image_outputs.restore(self, checkpoint, optimizer, scheduler)

    def make_samples(self, step: int) -> None:
        image_outputs.samples(self, step)

    def validate(self, step: int) -> float | None:
        return None  # images have no validation set yet

    def finish(self, state: checkpoints.TrainState, result: LoopResult) -> dict[str, str]:
        return image_outputs.finish(self, state, result)

    vae_config: Any = None
    noise_scheduler: Any = None
    train_unet: Any = None  # the UNet as accelerate prepared it (DDP-wrapped on several GPUs)
    train_encoders: list = dataclasses.field(default_factory=list)  # trained text encoders, prepared
    pissa_init: list | None = None
    sampler: Any = None  # the bucket batch sampler
    params: list = dataclasses.field(default_factory=list)


def train_image(cfg: TrainConfig, ctx: RunContext) -> dict[str, str]:
    """Train an image LoRA as `cfg` says; returns the output paths (also sent in DoneEvent)."""
    precision = _precision(cfg, ctx)
    accelerator = distributed.make_accelerator(precision)
    run = ImageRun(cfg=cfg, ctx=ctx, accelerator=accelerator, out=Path(cfg.output_dir))
    run.weight_dtype = torch_dtype(precision)
    try:
        return _train(run)
    finally:
        run.model = None
        accelerator.free_memory()
        free_memory()


def _train(run: ImageRun) -> dict[str, str]:
    """The setup stages in order, then the training loop."""
    from core.data.buckets import BucketBatchSampler

    cfg, acc = run.cfg, run.accelerator
    if run.main:
        checkpoints.prepare_output_dir(cfg)
    acc.wait_for_everyone()
    # Each process draws its own noise (seed + rank); one process: exactly `seed`.
    checkpoints.seed_everything(cfg.seed + acc.process_index)
    checkpoint, init_file = checkpoints.resolve_resume(cfg)
    if cfg.resume_from == "latest" and checkpoint is None:
        run.log("No checkpoint in the output folder yet: starting from the beginning.")
    run.load_data()
    run.load_model()
    run.vae_config = run.model.vae.config
    run.noise_scheduler = run.model.noise_scheduler()
    run.cache_latents()
    run.cache_text()
    run.free_encoders()
    run.add_lora(Path(init_file) if init_file else None)
    run.sampler = BucketBatchSampler(run.buckets, cfg.batch_size, cfg.seed, cfg.repeats)
    batches_per_epoch = math.ceil(len(run.sampler.batches_for_epoch(0)) / acc.num_processes)
    return run_task(run, checkpoint, batches_per_epoch)
