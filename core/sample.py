"""Image previews: the shared helpers, and the Test tab's images of a base model + a LoRA file.

Everything runs under `torch.no_grad()`; the VAE decodes in fp32 whatever the training
precision (an fp16 SD VAE overflows into NaN and black images). Each model family builds
its own pipeline and default size (`core.families.sd.family`, `core.families.flux.family`); the
previews during training are the family's too. Images are saved atomically. One pipeline
is cached for the Test tab so repeated tries do not reload it; the LoRAs of a try (one or several,
each at its weight) are put on it and taken off again by `core.lora_stack`.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from core.atomic import atomic_path
from core.cpu_memory import keeping_freed_memory
from core.devices import collecting_new_objects_only, free_memory, pick_device

COMPARE_WEIGHTS = (0.0, 0.4, 0.6, 0.8, 1.0)
LoraSpec = tuple[str | Path, float]  # (LoRA file, weight), as core.lora_stack takes them
_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()


def move(module: Any, device: Any, dtype: torch.dtype | None = None) -> Any:
    """module.to(device[, dtype]) without diffusers' warning about casting (we cast on purpose)."""
    if module is None:
        return None
    args = (device,) if dtype is None else (device, dtype)
    return torch.nn.Module.to(module, *args)


@torch.no_grad()
def decode_fp32(vae: Any, latents: torch.Tensor,
                denormalize: Callable[[Any, torch.Tensor], torch.Tensor] | None = None) -> list[Image.Image]:
    """Latents -> PIL images with the VAE in fp32 (restored to its dtype afterwards).

    `denormalize(vae_config, latents)`: the family's inverse of its latent normalization
    (default: AutoencoderKL's scaling / shift factors); a 5-D (video VAE) output keeps its first frame.
    """
    from core.family_api.contract import denormalize_latents

    dtype = vae.dtype
    move(vae, vae.device, torch.float32)
    try:
        latents = latents.to(vae.device, torch.float32)
        latents = (denormalize or denormalize_latents)(vae.config, latents)
        pixels = vae.decode(latents, return_dict=False)[0]
        if pixels.dim() == 5:
            pixels = pixels[:, :, 0]
    finally:
        move(vae, vae.device, dtype)
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


CLIP_FRAMES, CLIP_FPS = "clip_frames", "clip_fps"  # keys of Image.info that make a picture a clip's first frame


def clip_image(frames: Sequence[Image.Image], fps: float) -> Image.Image:
    """A video family's clip as one picture: its first frame, carrying every frame and the fps in `info`
    (what the previews row shows as the thumbnail; `save_image` writes the clip beside it)."""
    first = frames[0].copy()
    first.info[CLIP_FRAMES] = list(frames)
    first.info[CLIP_FPS] = float(fps)
    return first


def clip_path(path: str | Path) -> Path:
    """Where `save_image` writes the clip of a picture saved at `path` (same name, .mp4)."""
    return Path(path).with_suffix(".mp4")


def save_image(image: Image.Image, path: str | Path) -> Path:
    """The picture as PNG; a clip's first frame (`clip_image`) also writes its mp4 beside it (PyAV)."""
    frames = image.info.get(CLIP_FRAMES)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    if frames:
        from core.data.video_io import write_clip

        write_clip(frames, clip_path(path), image.info.get(CLIP_FPS, 16.0))
    return Path(path)


# --- the Test tab ---------------------------------------------------------------------------

def load_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                  device: str | torch.device | None = None, dtype: torch.dtype | None = None
                  ) -> tuple[Any, Any, Any]:
    """(pipeline, model, its ImageFamily) for `base_model`, cached: the same arguments reuse the loaded one.

    The family (SD 1.x/2.x/SDXL, FLUX.1, Chroma) is read from the model's files.
    """
    from core.family_api.lookup import family_for_model

    device = pick_device(device or "auto", mps=False)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    path = Path(base_model)
    stamp = path.stat().st_mtime_ns if path.exists() else 0
    key = repr((str(base_model), stamp, vae, model_config, str(device), str(dtype)))
    with _CACHE_LOCK:
        if _CACHE.get("key") == key:
            return _CACHE["pipe"], _CACHE["model"], _CACHE["family"]
        _CACHE.clear()
        free_memory()
        family = family_for_model(base_model)
        pipe, model = family.tryout_pipeline(base_model, allow_pickle=allow_pickle, vae=vae,
                                             model_config=model_config, device=device, dtype=dtype)
        _CACHE.update(key=key, pipe=pipe, model=model, family=family)
        return pipe, model, family


def clear_pipeline_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
    free_memory()


def lora_list(lora_path: str | Path | None, weight: float, loras: Sequence[LoraSpec] | None
              ) -> list[LoraSpec]:
    """The (file, weight) pairs asked for: `loras`, or the single `lora_path` at `weight` (not both)."""
    if loras is not None:
        if lora_path is not None:
            raise ValueError("Give either lora_path (and weight) or loras, not both.")
        return list(loras)
    return [] if lora_path is None else [(lora_path, weight)]


# Options that choose the pipeline and how the LoRAs go on it, as against how one image is drawn.
LOAD_OPTIONS = ("allow_pickle", "model_config", "device", "fuse")


@contextmanager
def drawing(base_model: str, loras: Sequence[LoraSpec] = (), *, fuse: bool | None = None, allow_pickle: bool = False,
            model_config: str = "", device: str | torch.device | None = None
            ) -> Iterator[Callable[..., list[Image.Image]]]:
    """`draw(prompts, seed=, steps=, guidance=, negative_prompt=, width=, height=)` for the block, on the cached
    pipeline with `loras` loaded once for every image drawn in it, and removed when the block ends.

    `fuse`: add the LoRAs into the base weights (the base restored bit for bit after; see
    core.lora_stack), else run them as PEFT layers; None: whichever is faster on the pipeline's
    device (`fuse_pays`).
    """
    from core.lora_stack import applied, fuse_pays

    pipe, model, family = load_pipeline(base_model, allow_pickle=allow_pickle, model_config=model_config,
                                        device=device)
    side = family.default_size(model)
    # After loading: a new pipeline's load collects the old one in full (it was made before this block).

    def draw(prompts: Sequence[str], *, seed: int = 1234, steps: int = 20, guidance: float = 7.0,
             negative_prompt: str = "", width: int | None = None, height: int | None = None,
             interrupted: Callable[[], bool] | None = None,
             references: Sequence[str | Path] = (),
             start_image: str | Path | Image.Image | None = None) -> list[Image.Image]:
        extra = {"control": reference_images(family, model, references)} if references else {}
        extra.update(start_image_argument(family.name_of(model), start_image))
        try:
            with interruptible(pipe, interrupted):
                return family.generate(pipe, prompts, seed=seed, steps=steps, guidance=guidance,
                                       negative_prompt=negative_prompt, width=width or side, height=height or side,
                                       **extra)
        finally:
            free_memory()

    # On the CPU each denoising step reuses the memory the last one freed (core.cpu_memory).
    with collecting_new_objects_only(), keeping_freed_memory(torch.device(pipe.device).type == "cpu"):
        try:
            with applied(pipe, loras, fuse=fuse_pays(pipe.device) if fuse is None else fuse):
                yield draw
        finally:
            free_memory()


def reference_images(family: Any, model: Any, references: Sequence[str | Path]) -> list[Image.Image]:
    """The Test tab's uploaded reference images for an edit model (at most as many as it reads); one sentence
    for a model that edits nothing."""
    from core.data.image_io import load_rgb
    from core.family_api.registry import family_info

    info = family_info(family.name_of(model))
    most = info.max_references or (1 if info.needs_control else 0)
    if not most:
        raise ValueError(f"{info.label} makes images from text alone; remove the reference images, or pick an edit "
                         "model (Qwen-Image-Edit-2509 / 2511, FLUX.2 klein, FLUX.1 Kontext).")
    return [load_rgb(Path(p)) for p in list(references)[:most]]


def start_image_argument(family_name: str, start_image: str | Path | Image.Image | None) -> dict[str, Any]:
    """An image-to-video model's `start_image` for its `generate` (a picture): needed by an I2V model, optional
    for a text-or-image one (TI2V), refused by the others."""
    from core.family_api.registry import family_info

    takes = family_info(family_name).start_image
    if start_image is None or start_image == "":
        if takes == "needed":
            raise ValueError(f"{family_info(family_name).label} makes a clip from a start image: choose one "
                             "(Start image).")
        return {}
    if not takes:
        raise ValueError(f"{family_info(family_name).label} takes no start image (only image-to-video models "
                         "do): clear the Start image.")
    if isinstance(start_image, Image.Image):
        return {"start_image": start_image}
    from core.data.image_io import load_rgb

    return {"start_image": load_rgb(Path(start_image))}


@contextmanager
def interruptible(pipe: Any, interrupted: Callable[[], bool] | None) -> Iterator[None]:
    """While the block runs, a Stop (`interrupted()` true) ends the pipeline's denoising loop after the step
    in progress.

    diffusers' pipelines skip their remaining steps once `pipe._interrupt` is set (their `interrupt`
    property, reset at the start of each call); every pipeline calls `scheduler.step` once per step,
    so that is where the stop is looked at. The image that comes out is unfinished: the caller checks
    the stop and drops it.
    """
    scheduler = getattr(pipe, "scheduler", None)
    if interrupted is None or scheduler is None:
        yield
        return
    original = scheduler.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if interrupted():
            pipe._interrupt = True  # noqa: SLF001 - what diffusers' `interrupt` property reads
        return original(*args, **kwargs)

    scheduler.step = step
    try:
        yield
    finally:
        del scheduler.step  # the class's own method again
        pipe._interrupt = False  # noqa: SLF001


def generate_images(base_model: str, lora_path: str | Path | None, prompts: Sequence[str], *, weight: float = 0.8,
                    loras: Sequence[LoraSpec] | None = None, fuse: bool | None = None, seed: int = 1234,
                    steps: int = 20, guidance: float = 7.0, negative_prompt: str = "", width: int | None = None,
                    height: int | None = None, allow_pickle: bool = False, model_config: str = "",
                    device: str | torch.device | None = None, interrupted: Callable[[], bool] | None = None,
                    references: Sequence[str | Path] = (),
                    start_image: str | Path | Image.Image | None = None) -> list[Image.Image]:
    """Images for `prompts` from `base_model` with LoRAs applied together, each at its weight.

    `loras=[(file, weight), ...]` (WebUI's `<lora:a:0.8> <lora:b:0.5>`), or the single `lora_path` at
    `weight`; none, or all at weight 0: the base alone. `start_image`: an image-to-video model's first frame
    (a file or picture; needed there, refused elsewhere). `fuse`: see `drawing`, which draws many images
    with the LoRAs loaded once. `interrupted`: polled while drawing; true ends the denoising early
    (`interruptible`), so the caller must drop the unfinished image. `references`: image files an edit model
    edits (several for Qwen-Image-Edit-2509 / 2511 and FLUX.2 klein; `reference_images`).
    """
    specs = lora_list(lora_path, weight, loras)
    with drawing(base_model, specs, fuse=fuse, allow_pickle=allow_pickle, model_config=model_config,
                 device=device) as draw:
        return draw(prompts, seed=seed, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                    width=width, height=height, interrupted=interrupted, references=references,
                    start_image=start_image)


def clip_strip(image: Image.Image) -> Image.Image:
    """A clip's first, middle and last frames side by side (what a compare grid shows of a clip); a picture
    that is no clip comes back as it is."""
    frames = image.info.get(CLIP_FRAMES) or []
    if len(frames) < 2:
        return image
    chosen = [frames[0], frames[len(frames) // 2], frames[-1]]
    gap = 2
    strip = Image.new("RGB", (sum(f.width for f in chosen) + gap * 2, max(f.height for f in chosen)), "white")
    x = 0
    for frame in chosen:
        strip.paste(frame.convert("RGB"), (x, 0))
        x += frame.width + gap
    return strip


def label_cell(image: Image.Image, text: str) -> Image.Image:
    """The image under a caption band. A cell is at least as wide as its caption (the image centred),
    so the captions of neighbouring columns never run into each other, whatever the image size.
    A clip (a video model's result) shows its first, middle and last frames (`clip_strip`)."""
    image = clip_strip(image)
    band = 18
    width = max(image.width, int(ImageDraw.Draw(image).textlength(text)) + 8)
    canvas = Image.new("RGB", (width, image.height + band), "white")
    canvas.paste(image, ((width - image.width) // 2, band))
    ImageDraw.Draw(canvas).text((4, 3), text, fill="black")
    return canvas


def grid_image(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Cells pasted row by row into one image, in equal columns as wide as the widest cell, each centred.

    Cells differ in width when a caption is wider than a small image ('w=0' vs 'w=0.25' at 64 px);
    columns the width of the first cell would let the wider cells overlap their neighbours.
    """
    cell_w = max(cell.width for row in rows for cell in row)
    cell_h = max(cell.height for row in rows for cell in row)
    grid = Image.new("RGB", (cell_w * max(len(r) for r in rows), cell_h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            grid.paste(cell, (c * cell_w + (cell_w - cell.width) // 2, r * cell_h))
    return grid


def compare_grid(base_model: str, lora_paths: str | Path | Sequence[str | Path], prompts: Sequence[str], out_path:
                 str | Path, *, weights: Sequence[float] = COMPARE_WEIGHTS, others: Sequence[LoraSpec] = (),
                 **kwargs: Any) -> Path:
    """One PNG: a row per (LoRA file, prompt), a column per LoRA weight, each cell labelled.

    The row's LoRA is swept over `weights` while the LoRAs in `others` stay at their own weights.
    """
    files = [lora_paths] if isinstance(lora_paths, (str, Path)) else list(lora_paths)
    rows: list[list[Image.Image]] = []
    for file in files:
        per_weight = [generate_images(base_model, None, prompts, loras=[(file, w), *others], **kwargs)
                      for w in weights]
        for p in range(len(prompts)):
            label = Path(file).parent.name if Path(file).name == "pytorch_lora_weights.safetensors" else Path(file).stem
            rows.append([label_cell(per_weight[i][p], f"{label} w={w:g}") for i, w in enumerate(weights)])
    return save_image(grid_image(rows), out_path)
