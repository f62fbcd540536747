"""Image LoRA training (SD 1.x / 2.x / SDXL, FLUX.1, Chroma) on HF Accelerate: the loop the Job and train.py run.

Stages: name the model's family from its files and refuse what cannot run -> scan the
folder -> load the model -> encode every image and caption once (cached) -> free the VAE /
text encoders from the device -> train the LoRA with checkpoints, previews and events ->
write the diffusers and kohya/WebUI files. `ctx.should_stop()` is checked every step: a
stop finishes the step, saves a checkpoint and the LoRA files. What differs between model
families is asked of `run.family` (core.families.base.ImageFamily); nothing here names one.
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
from core.devices import free_memory, run_precision, torch_dtype
from core.family_api.contract import Adapted, Batch, ImageFamily
from core.family_api.registry import family_info
from core.sample import move
from core.train import checkpoints, distributed, image_outputs, optim, sharding
from core.train.latent_cache import sample_latents
from core.train.latent_cache import CachedImage, cache_dir_for, encode_images
from core.train.loop import LoopResult, run_task

def _precision(cfg: TrainConfig, ctx: RunContext) -> str:
    precision = run_precision(cfg.mixed_precision)
    if precision != cfg.mixed_precision:
        ctx.warn("fp16 mixed precision needs a CUDA GPU; training in fp32 on this machine.",
                 "Use mixed_precision: no (or bf16) on the CPU.")
    return precision


def _skipped_warning(ctx: RunContext, skipped: list[tuple[str, str]]) -> None:
    if skipped:
        listing = "; ".join(f"{name} ({reason})" for name, reason in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        ctx.warn(f"{len(skipped)} image(s) skipped: {listing}{more}.",
                 "Fix or remove these files; training goes on with the others.")


VALIDATION_IMAGES, VALIDATION_DRAWS = 4, 2


@dataclasses.dataclass
class ImageRun:
    """An image LoRA run: the setup stages, one batch's loss, and the task the training loop drives."""

    cfg: TrainConfig
    ctx: RunContext
    accelerator: Any
    out: Path
    family: ImageFamily | None = None
    family_name: str = ""
    model: Any = None
    items: list = dataclasses.field(default_factory=list)
    buckets: list = dataclasses.field(default_factory=list)
    latents: dict[int, CachedImage] | None = None
    # Paired data: each target's reference images (its control, then control_2 ...), cached alike.
    reference_latents: dict[int, list[CachedImage]] | None = None
    needs_control: bool = False  # the family trains on (control, target, caption) triples
    max_references: int = 0  # the family takes up to this many references per target, plain images too
    image_prompt: bool = False  # the prompt encoding includes the item's start image (Wan 2.1 I2V: CLIP vision)
    video: bool = False  # the family trains on video: latents [C, F, h, w], buckets (width, height, frames)
    text_cache: Any = None  # captions -> their batched conditioning, when the prompts were encoded once
    weight_dtype: torch.dtype = torch.float32
    adapted: Adapted | None = None
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
    def choose_family(self) -> None:
        """Name the family from the model's files and let it refuse what cannot run, before any loading."""
        from core.family_api.lookup import family_for_model

        self.family = family_for_model(self.cfg.base_model)
        for warning in self.family.check(self.cfg):
            if self.main:
                self.ctx.warn(warning)
        if self.cfg.sample_base and family_for_model(self.cfg.sample_base) is not self.family:
            raise ValueError(f"sample_base '{self.cfg.sample_base}' is a model of another family than base_model; "
                             "use the distilled model of the same family (e.g. Z-Image-Turbo for Z-Image).")
        if self.cfg.training_adapter and self.family.lora_files is None:
            raise ValueError("training_adapter is for the transformer families' distilled models (Z-Image Turbo, "
                             "FLUX.1 schnell); leave it empty for a Stable Diffusion model.")
        self._warn_distilled()
        self._choose_sample_base()

    def _warn_distilled(self) -> None:
        """A distilled model trained directly without a training adapter: say so, once (it still runs)."""
        from core.family_api.lookup import transformer_family_of
        from core.family_api.registry import distilled_warning

        try:
            name = transformer_family_of(self.cfg.base_model)  # only transformer families are distilled
        except Exception:  # noqa: BLE001 - the load below names any unreadable model clearly
            return
        warning = distilled_warning(name or "", self.cfg.training_adapter)
        if warning and self.main:
            self.ctx.warn(warning)

    def _choose_sample_base(self) -> None:
        """No sample_base given: the base row's distilled model when it is on this machine (the model its LoRAs
        are used on), else the base model itself, said in one sentence (core.sample_base)."""
        from core.family_api.lookup import transformer_family_of
        from core.sample_base import default_sample_base

        cfg = self.cfg
        if cfg.sample_base or not cfg.sample_prompts or cfg.distributed == "fsdp":
            return
        try:
            name = transformer_family_of(cfg.base_model)
        except Exception:  # noqa: BLE001 - the load below names any unreadable model clearly
            return
        choice = default_sample_base(cfg.base_model, name or "")
        cfg.sample_base = choice.model
        if choice.sentence:
            self.log(choice.sentence)

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
        cfg, family = self.cfg, self.family
        self.log(f"Loading model {cfg.base_model}")
        self.model = family.load(cfg)
        self.family_name = family.name_of(self.model)
        for line in family.describe(self.model):
            self.log(line)
        info = family_info(self.family_name)
        if self.main and cfg.resolution < 0.7 * info.native_resolution:
            self.ctx.warn(f"resolution {cfg.resolution} is small for {info.label} "
                          f"(made for {info.native_resolution} px); results may be blurry.",
                          f"Use resolution: {info.native_resolution} if memory allows.")
        for module in [family.network(self.model), self.model.vae, *family.text_encoders(self.model)]:
            if module is not None:  # None: the network's load is deferred (load_network)
                module.requires_grad_(False)
        self.needs_control = info.needs_control
        self.max_references = info.max_references
        self.image_prompt = info.image_prompt
        if self.needs_control:
            self._keep_pairs(info.label)
        elif self.max_references:
            self._count_references(info.label)
        self.video = info.video
        self._fit_clips(info.label)

    def _fit_clips(self, label: str) -> None:
        """A video family's buckets add the frame count (an image is one frame); another family trains no clips."""
        from core.data.images import still_images_only

        if self.video:
            self.buckets = [(*b[:2], len(i.frames) or 1) for b, i in zip(self.buckets, self.items)]
            clips = sum(1 for i in self.items if i.is_clip)
            if clips:
                self.log(f"{clips} clip window(s) and {len(self.items) - clips} image(s); frame buckets: "
                         + ", ".join(str(f) for f in sorted({b[2] for b in self.buckets})))
            return
        if not any(i.is_clip for i in self.items):
            return
        from core.data.buckets import bucket_for

        self.items, dropped = still_images_only(self.items)
        self.buckets = [tuple(bucket_for(i.width, i.height, self.cfg)) for i in self.items]
        if dropped and self.main:
            _skipped_warning(self.ctx, [(name, f"a video clip; {label} trains on images") for name in dropped])
        if not self.items:
            raise ValueError(f"{label} trains on images and the folder holds only video clips: add images, or "
                             "pick a video model (Wan).")

    def frames_of(self, index: int) -> tuple[int, ...] | None:
        """A video run's frame window of item `index` (() for an image), None in an image run."""
        return self.items[index].frames if self.video else None

    def _keep_pairs(self, label: str) -> None:
        """A paired family trains only the images that have a control image (core.data.pairs)."""
        unpaired = [i for i in self.items if i.control is None]
        if len(unpaired) == len(self.items):
            raise ValueError(f"{label} trains on pairs: put each image's control image in a control/ folder "
                             f"beside it (same file name) or name it in a control column of metadata.csv; "
                             f"none of the {len(self.items)} image(s) has one.")
        if unpaired and self.main:
            _skipped_warning(self.ctx, [(i.relpath or i.path.name, "no control image") for i in unpaired])
        keep = [n for n, i in enumerate(self.items) if i.control is not None]
        self.items = [self.items[n] for n in keep]
        self.buckets = [self.buckets[n] for n in keep]

    @property
    def takes_references(self) -> bool:
        return self.needs_control or self.max_references > 0

    def references_of(self, index: int) -> list[Path]:
        """Item `index`'s reference images as its family reads them: the control alone (`needs_control`), or
        the control and its control_2 ... up to `max_references`; [] for a plain image."""
        item = self.items[index]
        if item.control is None or not self.takes_references:
            return []
        if self.needs_control:
            return [item.control]
        return [item.control, *item.references][:self.max_references]

    def batch_keys(self) -> list[tuple]:
        """What the sampler batches by: the bucket, and the number of references where a family takes several
        (a batch never mixes plain images with pairs, nor pairs of other reference counts)."""
        if not self.max_references:
            return list(self.buckets)
        return [(*bucket, len(self.references_of(n))) for n, bucket in enumerate(self.buckets)]

    def _count_references(self, label: str) -> None:
        """A family of several references: say how many items train with references and how many as plain
        text-to-image images, and which references beyond the family's limit are left out."""
        from collections import Counter

        counts = Counter(len(self.references_of(n)) for n in range(len(self.items)))
        over = [i for i in self.items if i.control is not None and 1 + len(i.references) > self.max_references]
        if over and self.main:
            self.ctx.warn(f"{len(over)} target(s) have more than {self.max_references} reference images, which "
                          f"{label} reads at most; the first {self.max_references} train.",
                          "Remove the extra control_N images, or merge references into one image.")
        plain = counts.pop(0, 0)
        shown = ", ".join(f"{c} with {n}" for n, c in sorted(counts.items()))
        self.log(f"Edit data: {sum(counts.values())} target(s) with reference images ({shown or 'none'}); "
                 f"{plain} plain image(s) train as text-to-image")

    def cache_latents(self) -> None:
        cfg, m = self.cfg, self.model
        if not cfg.cache_latents:
            return
        if cfg.random_flip or not cfg.center_crop:
            self.log("Latent caching is off: random_flip / random crops change the image every epoch.")
            return
        from core.train.latent_cache import module_identity

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
                                                  progress=progress if self.main else None,
                                                  moments_of=self.family.encode_moments,
                                                  frames=[self.frames_of(n) for n in range(len(self.items))]
                                                  if self.video else None)
            references: dict[int, list[CachedImage]] = {}
            broken: set[int] = set()
            if self.takes_references:
                # The reference images, each at its target's bucket, in the same cache.
                flat = [(n, path) for n in range(len(self.items)) for path in self.references_of(n)]
                cached, failed_refs, ref_hits = encode_images(
                    m.vae, [path for _, path in flat], [self.buckets[n] for n, _ in flat],
                    center_crop=cfg.center_crop, cache_dir=cache_dir, progress=None,
                    moments_of=self.family.encode_moments)
                failed += [(f"control image {name}", reason) for name, reason in failed_refs]
                hits += ref_hits
                for k, (n, _) in enumerate(flat):
                    if k in cached:
                        references.setdefault(n, []).append(cached[k])
                    else:
                        broken.add(n)  # a target trains with all its references or not at all
        if hits:
            self.log(f"{hits} latent(s) reused from the disk cache {cache_dir}")
        if failed and self.main:
            _skipped_warning(self.ctx, failed)
        keep = [i for i in range(len(self.items)) if i in latents and i not in broken]
        self.latents = {new: latents[old] for new, old in enumerate(keep)}
        if self.takes_references:
            self.reference_latents = {new: references.get(old, []) for new, old in enumerate(keep)}
        self.items = [self.items[i] for i in keep]
        self.buckets = [self.buckets[i] for i in keep]
        if not self.items:
            raise ValueError("No image could be decoded for training; see the warnings above.")

    def prompt_key(self, caption: str, index: int) -> Any:
        """What the family's prompt encoding is keyed by: the caption, or (caption, reference paths ...) for a
        target with references ((caption, control path) for a one-control family), or (caption, path, first frame:
        -1 for an image) where the encoding includes the item's own start image (`image_prompt`)."""
        if self.image_prompt:
            item = self.items[index]
            return caption, str(item.path), item.frames[0] if item.frames else -1
        refs = self.references_of(index)
        return (caption, *(str(p) for p in refs)) if refs else caption

    def encode_prompts(self, captions: list[Any]) -> Any:
        return self.family.encode_prompts(self.model, captions, self.device)

    def cache_text(self) -> None:
        cfg, m, family = self.cfg, self.model, self.family
        for encoder in family.text_encoders(m):
            move(encoder, self.device, self.weight_dtype)
        if family.prompt_cache_optional and (cfg.train_text_encoder or not cfg.cache_text_encoder_outputs):
            return
        captions = [self.prompt_key(i.caption, n) for n, i in enumerate(self.items)]
        if cfg.caption_dropout > 0:
            per_item = self.takes_references or self.image_prompt
            captions += [self.prompt_key("", n) for n in range(len(self.items))] if per_item else [""]
        self.log(f"Encoding {len(set(captions))} caption(s) once")
        # Rank 0 writes any disk cache first; the others then read it.
        with self.accelerator.main_process_first():
            self.text_cache = family.cache_prompts(m, captions, cfg, self.device, self.log)

    def free_encoders(self) -> None:
        """Take the VAE and frozen text encoders off the device while the network trains."""
        cfg, m = self.cfg, self.model
        keep = bool(cfg.sample_prompts)  # previews need them back later
        if self.latents is not None:
            move(m.vae, "cpu")
            if not keep:
                m.vae = None
        else:
            move(m.vae, self.device, torch.float32)
        if self.text_cache is not None:
            self.family.park_text_encoders(m, keep)
        free_memory()

    def load_network(self) -> None:
        """The network, when the family put its load off until the encoders' outputs were cached."""
        if self.family.load_network is None or self.family.network(self.model) is not None:
            return
        self.log("Loading the denoising network now that the encoders' outputs are cached")
        self.family.load_network(self.model)
        self.family.network(self.model).requires_grad_(False)

    def merge_training_adapter(self) -> None:
        """The training adapter (cfg.training_adapter) merged into the frozen network, before the LoRA goes on."""
        from core.train.training_adapter import merge_training_adapter

        network = self.family.network(self.model)
        self.training_adapter = merge_training_adapter(network, Path(self.cfg.training_adapter),
                                                       self.family.lora_files.to_peft,
                                                       family_info(self.family_name).label)
        self.log(f"Training adapter {self.training_adapter.name} merged into {len(self.training_adapter.layers)} "
                 "layers for training; it is left out of the saved LoRA and the previews.")

    def add_lora(self, init_file: Path | None) -> None:
        cfg, family = self.cfg, self.family
        if cfg.training_adapter:
            self.merge_training_adapter()
        self.adapted = adapted = family.add_lora(self.model, cfg, init_file, self.log)
        # A sharded run leaves the network in CPU memory: FSDP moves each process's share of it to its GPU
        # (the whole model never has to fit one).
        where = "cpu" if sharding.is_sharded(self.accelerator) else self.device
        for module in adapted.modules:
            if not any(module is p for p in adapted.placed):
                move(module, where, self.weight_dtype)
        from diffusers.training_utils import cast_training_params

        # Frozen weights stay in the weight dtype; the trainable LoRA weights are fp32.
        cast_training_params(adapted.modules, dtype=torch.float32)
        family.low_memory(self.model, adapted, cfg, self.weight_dtype, self.log)
        for module in adapted.modules:
            module.train()
        self.loss_fn = family.make_loss(self.model, cfg, self.weight_dtype)

    # --- one batch --------------------------------------------------------------------------
    def batch_loss(self, indices: list[int], *, caption_dropout: bool = True) -> torch.Tensor:
        cfg = self.cfg
        drop = cfg.caption_dropout if caption_dropout else 0.0
        captions = [self.prompt_key("" if drop > 0 and random.random() < drop else self.items[i].caption, i)
                    for i in indices]
        vae_config = self.vae_config
        references: list[torch.Tensor] = []
        if self.latents is not None:
            infos = [self.latents[i] for i in indices]
            moments = torch.stack([info.moments for info in infos]).to(self.device)
            latents = self.family.normalize_latents(vae_config, sample_latents(moments, 1.0))
            sizes = [(i.original_size, i.crop_top_left, i.target_size) for i in infos]
            if self.reference_latents is not None:
                # Each reference's latent mean, as edit pipelines encode them (argmax, no noise).
                for j in range(len(self.reference_latents[indices[0]])):
                    means = torch.stack([self.reference_latents[i][j].moments for i in indices]).to(self.device)
                    references.append(self.family.normalize_latents(vae_config, means.chunk(2, dim=1)[0]))
        else:
            latents, sizes, references = self._encode_batch(indices)
        cond = self.text_cache(captions) if self.text_cache is not None else self.encode_prompts(captions)
        control = references[0] if references else None
        return self.loss_fn(self.train_network, Batch(latents, cond, sizes, control, references))

    def _encode_batch(self, indices: list[int]) -> tuple[torch.Tensor, list, list[torch.Tensor]]:
        from core.data.buckets import prepare_image
        from core.data.image_io import load_rgb
        from core.train.latent_cache import prepare_pixels

        flips = [self.cfg.random_flip and random.random() < 0.5 for _ in indices]
        drawn = [prepare_pixels(self.items[i].path, self.buckets[i], frames=self.frames_of(i),
                                center_crop=self.cfg.center_crop, flip=flip, rng=random)
                 for i, flip in zip(indices, flips)]
        prepared = [p for _, p in drawn]
        vae = self.model.vae
        references = []
        with torch.no_grad():
            pixels = torch.stack([px for px, _ in drawn]).to(self.device, torch.float32)
            latents = sample_latents(self.family.encode_moments(vae, pixels), 1.0)
            for j in range(len(self.references_of(indices[0]))):
                # Each reference flipped with its target, center-cropped to the same bucket.
                refs = [prepare_image(load_rgb(self.references_of(i)[j]), self.buckets[i], center_crop=True,
                                      flip=flip, rng=random).pixels for i, flip in zip(indices, flips)]
                moments = self.family.encode_moments(vae, torch.stack(refs).to(self.device, torch.float32))
                references.append(self.family.normalize_latents(vae.config, moments.chunk(2, dim=1)[0]))
        latents = self.family.normalize_latents(vae.config, latents)
        sizes = [(tuple(p.original_size), tuple(p.crop_top_left), tuple(p.target_size)) for p in prepared]
        return latents, sizes, references

    # --- the training loop's task (core.train.loop.TrainTask) ---------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        network, *encoders = self.adapted.modules
        groups = optim.lora_param_groups(network.named_parameters(), cfg.learning_rate, cfg.loraplus_lr_ratio)
        te_lr = cfg.text_encoder_lr or cfg.learning_rate
        for encoder in encoders:
            groups += optim.lora_param_groups(encoder.named_parameters(), te_lr, cfg.loraplus_lr_ratio)
        return [g for g in groups if g["params"]]

    def prepare(self, optimizer: Any) -> Any:
        modules, placed = self.adapted.modules, self.adapted.placed
        if sharding.is_sharded(self.accelerator):  # distributed: fsdp (the network alone: config refuses more)
            self.train_network, optimizer = sharding.prepare(self.accelerator, modules[0], optimizer)
            self.train_encoders = []
            self.params = [p for group in optimizer.param_groups for p in group["params"]]
            return optimizer
        if placed:  # NF4 / block offload: accelerate must not move them to the device as a whole
            flags = [not any(m is p for p in placed) for m in modules] + [True]
            models = self.accelerator.prepare(*modules, optimizer, device_placement=flags)
        else:
            models = self.accelerator.prepare(*modules, optimizer)
        self.train_network, self.train_encoders, optimizer = models[0], list(models[1:-1]), models[-1]
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        return optimizer

    def plan(self, total: int) -> str:
        cfg, world = self.cfg, self.accelerator.num_processes
        return (f"Training {total} steps: {len(self.items)} images x {cfg.repeats} repeats, batch {cfg.batch_size}"
                f"{f' x {world} processes' if world > 1 else ''}"
                f"{' (base sharded: fsdp)' if sharding.is_sharded(self.accelerator) else ''}, "
                f"accumulation {cfg.gradient_accumulation_steps}")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        # Filled up to a multiple of the processes, so no rank waits at a gradient sync the others skip.
        return distributed.shard(self.accelerator, self.sampler.batches_for_epoch(epoch))

    def train_step(self, group: Sequence[list[int]]) -> float:
        """The micro-batches of one optimizer step; gradients sync across processes on the last one."""
        acc = self.accelerator
        total = torch.zeros((), device=self.device)
        for index, indices in enumerate(group):
            with distributed.sync_on_last(acc, (self.train_network, *self.train_encoders), index, len(group)):
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
        """The loss on up to 4 training images, each at 2 draws of noise and noise level that are the
        same at every validation (seeded), without caption dropout: unlike the training loss, which is
        mostly the luck of the drawn noise level, successive values compare."""
        if self.cfg.validation_steps <= 0:
            return None
        count = min(VALIDATION_IMAGES, len(self.items))
        losses = []
        for index in range(count):
            for draw in range(VALIDATION_DRAWS):
                # Seeding inside the loop's saved RNG state: the training RNG is untouched.
                random.seed(self.cfg.seed * 1000 + index * VALIDATION_DRAWS + draw)
                torch.manual_seed(self.cfg.seed * 1000 + index * VALIDATION_DRAWS + draw)
                losses.append(float(self.batch_loss([index], caption_dropout=False)))
        return sum(losses) / len(losses)

    def finish(self, state: checkpoints.TrainState, result: LoopResult) -> dict[str, str]:
        return image_outputs.finish(self, state, result)

    def write_weights_to(self, folder: Path, state: checkpoints.TrainState) -> None:
        """The LoRA files as the weights are now (ema_save_raw: the raw ones, beside the EMA files)."""
        if self.main:
            folder.mkdir(parents=True, exist_ok=True)
            image_outputs.write_loras(self, folder, state.global_step, state.epoch + 1)
        self.accelerator.wait_for_everyone()

    vae_config: Any = None
    training_adapter: Any = None  # core.train.training_adapter.MergedAdapter, when cfg.training_adapter is set
    loss_fn: Any = None  # the family's loss of one Batch
    train_network: Any = None  # the UNet / transformer as accelerate prepared it (DDP-wrapped on several GPUs)
    train_encoders: list = dataclasses.field(default_factory=list)  # trained text encoders, prepared
    sampler: Any = None  # the bucket batch sampler
    params: list = dataclasses.field(default_factory=list)


def train_image(cfg: TrainConfig, ctx: RunContext) -> dict[str, str]:
    """Train an image LoRA as `cfg` says; returns the output paths (also sent in DoneEvent)."""
    precision = _precision(cfg, ctx)
    accelerator = distributed.make_accelerator(precision, shard=cfg.distributed == "fsdp")
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
    run.choose_family()  # GPU-only settings on a machine without CUDA stop here, before anything loads
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
    run.cache_latents()
    run.cache_text()
    run.free_encoders()
    run.load_network()
    run.add_lora(Path(init_file) if init_file else None)
    run.sampler = BucketBatchSampler(run.batch_keys(), cfg.batch_size, cfg.seed, cfg.repeats)
    batches_per_epoch = math.ceil(len(run.sampler.batches_for_epoch(0)) / acc.num_processes)
    return run_task(run, checkpoint, batches_per_epoch)
