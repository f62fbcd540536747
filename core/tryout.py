"""The Test tab's image work as Job targets: generate images, or a compare grid, one image at a time.

`Job.run(generate_target(...), kind="generate")` renders the images in the Job's thread, so a
slow CPU or a big grid never holds a request: after each image a ProgressEvent (and, for
generating, a SampleEvent with the file) goes out, and a Stop ends the image being drawn after
its current denoising step (`core.sample.interruptible`; the unfinished image is not saved). The
pictures themselves come from `core.sample.generate_images`, the same code the
training previews use; the target returns a `TryoutResult` the page reads when the job ends.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.events import DoneEvent, ProgressEvent, RunContext, SampleEvent

LoraSpec = tuple[str | Path, float]  # (LoRA file, weight)


@dataclass
class TryoutResult:
    """What the page shows once the job has ended: the files written and one sentence."""

    paths: list[str] = field(default_factory=list)
    message: str = ""
    stopped: bool = False


def _progress(ctx: RunContext, done: int, total: int, started: float, message: str) -> None:
    per_image = (time.perf_counter() - started) / done
    ctx.emit(ProgressEvent(step=done, total=total, seconds_per_step=per_image,
                           eta_seconds=per_image * (total - done), message=message))


def loras_said(loras: Sequence[LoraSpec]) -> str:
    """How a message names the LoRAs used: 'at LoRA weight 0.8', or 'with LoRAs a at 0.8 and b at 0.5'."""
    if not loras:
        return "with the base model alone (no LoRA chosen)"
    if len(loras) == 1:
        return f"at LoRA weight {float(loras[0][1]):g}"
    named = [f"{lora_label(path)} at {float(weight):g}" for path, weight in loras]
    return f"with LoRAs {', '.join(named[:-1])} and {named[-1]}"


def generate_target(base_model: str, loras: Sequence[LoraSpec], prompt: str, out_paths: Sequence[Path], *,
                    seed: int, **options: Any) -> Callable[[RunContext], TryoutResult]:
    """A job target writing one image per path in `out_paths`, seeds seed, seed+1, ...

    `loras`: (file, weight) pairs applied together (none: the base model alone), loaded once for all the
    images. `options` are `core.sample.generate_images`'s (steps, guidance, negative_prompt, width, height;
    fuse, model_config, ...).
    """
    loras = [(str(path), float(weight)) for path, weight in loras]

    def target(ctx: RunContext) -> TryoutResult:
        from core.sample import LOAD_OPTIONS, drawing, save_image

        total = len(out_paths)
        ctx.emit(ProgressEvent(step=0, total=total, message="loading the model (the first time takes a while)"))
        started = time.perf_counter()
        written: list[str] = []
        load = {key: value for key, value in options.items() if key in LOAD_OPTIONS}
        each = {key: value for key, value in options.items() if key not in LOAD_OPTIONS}
        # The LoRAs go on the pipeline once for the whole job, not once per image.
        with drawing(base_model, loras, **load) as draw:
            for index, path in enumerate(out_paths):
                if ctx.should_stop():
                    break
                image = draw([prompt], seed=seed + index, interrupted=ctx.should_stop, **each)[0]
                if ctx.should_stop():
                    break  # stopped mid-image: the picture is unfinished
                written.append(str(save_image(image, path)))
                _progress(ctx, index + 1, total, started, f"image {index + 1} of {total}")
                ctx.emit(SampleEvent(step=index + 1, images=[written[-1]]))
        seconds = time.perf_counter() - started
        stopped = ctx.should_stop() and len(written) < total
        message = f"Generated {len(written)} of {total} image(s) {loras_said(loras)} in {seconds:.1f} s."
        if stopped:
            message = f"Stopped: {message}"
        ctx.emit(DoneEvent(outputs={"image": written[-1]} if written else {}, stopped=stopped, message=message))
        return TryoutResult(written, message, stopped)

    return target


def grid_image(rows: Sequence[Sequence[Any]]) -> Any:
    """Cells (PIL images) pasted row by row into one image, in equal columns (core.sample.grid_image)."""
    from core.sample import grid_image as paste

    return paste(rows)


def lora_label(path: str | Path) -> str:
    """A row's name: the run folder for a diffusers-named file, else the file's stem."""
    path = Path(path)
    return path.parent.name if path.name == "pytorch_lora_weights.safetensors" else path.stem


def compare_target(base_model: str, lora_paths: Sequence[str | Path], prompt: str, out_path: Path, *,
                   weights: Sequence[float], others: Sequence[LoraSpec] = (), **options: Any
                   ) -> Callable[[RunContext], TryoutResult]:
    """A job target writing one PNG: a row per LoRA file, a column per weight, each cell labelled.

    Each row's file is swept over `weights`; the LoRAs in `others` stay at their weights in every cell.
    The cells are rendered one by one (a progress event and a stop check between them); a
    stopped grid is not saved, since a grid with holes compares nothing.
    """

    def target(ctx: RunContext) -> TryoutResult:
        # core.sample's own cell caption, so the grid looks like compare_grid's.
        from core.sample import generate_images, label_cell, save_image

        total = len(lora_paths) * len(weights)
        ctx.emit(ProgressEvent(step=0, total=total, message="loading the model (the first time takes a while)"))
        started = time.perf_counter()
        rows: list[list[Any]] = []
        done = 0
        for file in lora_paths:
            row = []
            for weight in weights:
                if ctx.should_stop():
                    message = f"Stopped after {done} of {total} images; no grid saved."
                    ctx.emit(DoneEvent(stopped=True, message=message))
                    return TryoutResult([], message, True)
                image = generate_images(base_model, None, [prompt], loras=[(str(file), weight), *others],
                                        interrupted=ctx.should_stop, **options)[0]
                if ctx.should_stop():
                    message = f"Stopped after {done} of {total} images; no grid saved."
                    ctx.emit(DoneEvent(stopped=True, message=message))
                    return TryoutResult([], message, True)
                row.append(label_cell(image, f"{lora_label(file)} w={weight:g}"))
                done += 1
                _progress(ctx, done, total, started, f"{lora_label(file)} at weight {weight:g}")
            rows.append(row)
        path = save_image(grid_image(rows), out_path)
        message = f"Grid of {total} images in {time.perf_counter() - started:.1f} s."
        ctx.emit(DoneEvent(outputs={"grid": str(path)}, message=message))
        return TryoutResult([str(path)], message)

    return target
