"""Load a captioner and caption batches of images with it.

One small class, `ModelCaptioner`, covers the four model families; what differs between
them is how the inputs are built and how the answer is cut out of the generated tokens:

- BLIP and GIT: the image alone; the decoder writes a short caption.
- Florence-2 (native in transformers 5): the image plus a task token such as
  `<DETAILED_CAPTION>`. Microsoft's original repos ship their own Python code; that runs
  only when the user passes `trust_remote_code=True` (CLI: `--trust-remote-code`).
- Vision-language chat models (SmolVLM, Qwen2-VL, Qwen2.5-VL, ...): a chat prompt
  "Describe this image in detail." through the processor's chat template, left-padded so a
  batch of prompts of different lengths generates exactly as one prompt at a time.

Weights come from a local folder, the Hugging Face cache, or the hub (in that order); when
none works, `CaptionerLoadError` says where to put the files.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from collections.abc import Callable

from PIL import Image

from core.hub import offline
from core.caption.filename import FilenameCaptioner
from core.caption.registry import NEEDED_FILES, ResolvedCaptioner, resolve_captioner
from core.devices import free_memory, pick_device
from core.events import StopRequested

# Default caption lengths in new tokens: short captioners write a line, the others a paragraph.
DEFAULT_MAX_NEW_TOKENS = {"blip": 40, "git": 40, "florence2": 256, "vlm": 256}

# BLIP's known artefacts of its training captions ("arafed man ...").
_ARTEFACTS = re.compile(r"\b(arafed|araffe|arafe|arafeed|araffed)\b\s*", re.IGNORECASE)


class CaptionerLoadError(RuntimeError):
    """The captioner's files could not be loaded; the message says where to put them."""


class Captioner(Protocol):
    """What the batch job needs from a captioner."""

    name: str
    family: str
    needs_images: bool

    def caption_batch(self, paths: list[Path], images: list[Image.Image] | None = None,
                      max_new_tokens: int | None = None,
                      should_stop: Callable[[], bool] | None = None) -> list[str]:
        """One caption per path/image; raises StopRequested when `should_stop()` turns true meanwhile."""
        ...

    def close(self) -> None: ...


def pick_dtype(device: Any, family: str) -> Any:
    """fp16 on CUDA (bf16 for chat VLMs where supported: fp16 overflows in some); fp32 elsewhere."""
    import torch

    if device.type != "cuda":
        return torch.float32
    if family == "vlm" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def clean_caption(text: str) -> str:
    """One line, single spaces, without BLIP's 'arafed' artefacts."""
    text = _ARTEFACTS.sub("", text)
    return " ".join(text.split()).strip(" ,")


def _from_pretrained(loader: Any, resolved: ResolvedCaptioner, **kwargs: Any) -> Any:
    """Load from the folder, else the cache (no network), else the hub when online."""
    if resolved.local:
        return loader(resolved.source, **kwargs)
    try:
        return loader(resolved.source, local_files_only=True, **kwargs)
    except OSError:
        if offline():
            raise
    return loader(resolved.source, **kwargs)


def _where_to_put(resolved: ResolvedCaptioner) -> str:
    if resolved.offline_dir is not None:
        return (f"Download the files of https://huggingface.co/{resolved.model_id} ({NEEDED_FILES}) into "
                f"{resolved.offline_dir}{os.sep}, or connect to the internet once so they are cached.")
    if resolved.local:
        return f"Check that {resolved.source} holds a complete model ({NEEDED_FILES})."
    return (f"Connect to the internet once so {resolved.source} is cached, or download it and pass its "
            "folder with --model <folder>.")


def load_parts(resolved: ResolvedCaptioner, dtype: Any, trust_remote_code: bool) -> tuple[Any, Any]:
    import transformers

    if resolved.remote_code:
        if not trust_remote_code:
            raise CaptionerLoadError(
                f"{resolved.source} ships its own Python code, which this app does not run unless you say "
                "so. Use a model that transformers runs natively (for Florence-2: florence-2-base or "
                "florence-2-large), or allow it with --trust-remote-code (CaptionOptions.trust_remote_code) "
                "if you trust its author.")
        if resolved.family != "florence2":
            raise CaptionerLoadError(f"{resolved.source}: only Florence-2 is supported with remote code; "
                                     "choose a model transformers supports natively.")
        model_class = transformers.AutoModelForCausalLM
    else:
        model_class = {"blip": transformers.BlipForConditionalGeneration,
                       "git": transformers.GitForCausalLM,
                       "florence2": getattr(transformers, "Florence2ForConditionalGeneration", None),
                       "vlm": transformers.AutoModelForImageTextToText}[resolved.family]
        if model_class is None:
            raise CaptionerLoadError("This transformers version has no native Florence-2; update "
                                     "transformers (>= 4.56) or choose another captioner.")
    extra = {"trust_remote_code": True} if resolved.remote_code else {}
    processor = _from_pretrained(transformers.AutoProcessor.from_pretrained, resolved, **extra)
    model = _from_pretrained(model_class.from_pretrained, resolved, dtype=dtype, **extra)
    return model, processor


def load_captioner(name: str, *, device: str = "auto", trust_remote_code: bool = False,
                   prompt: str | None = None, root: Path | None = None) -> Captioner:
    """Load a captioner by short name, folder or hub id, ready on `device` (fp16 on CUDA).

    A run folder or adapter folder of a VLM LoRA ("my captioner") loads its base captioner with the
    adapter merged in, asking the question it was trained on.
    """
    from core.caption.adapter import adapter_captioner, find_adapter

    adapter = find_adapter(name)
    if adapter is not None:
        base, trained_prompt = adapter_captioner(adapter)
        captioner = load_captioner(base, device=device, trust_remote_code=trust_remote_code,
                                   prompt=prompt or trained_prompt or None, root=root)
        return _with_adapter(captioner, adapter, name)
    resolved = resolve_captioner(name, root)
    if resolved.family == "filename":
        return FilenameCaptioner()
    try:
        torch_device = pick_device(device)
    except ValueError as exc:
        raise CaptionerLoadError(str(exc)) from exc
    dtype = pick_dtype(torch_device, resolved.family)
    try:
        model, processor = load_parts(resolved, dtype, trust_remote_code)
    except CaptionerLoadError:
        raise
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise CaptionerLoadError(f"Could not load the captioner {name!r} from {resolved.source} "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                                 f"{_where_to_put(resolved)}") from exc
    model = model.to(torch_device).eval()
    return ModelCaptioner(name=resolved.name, family=resolved.family, model=model, processor=processor,
                          device=torch_device, dtype=dtype, prompt=prompt or resolved.prompt)


def _with_adapter(captioner: Captioner, adapter: Path, name: str) -> Captioner:
    """`captioner` with the LoRA of `adapter` merged into its weights (generation then runs at full speed)."""
    if not isinstance(captioner, ModelCaptioner) or captioner.family != "vlm":
        raise CaptionerLoadError(f"{adapter}: its base is a {captioner.family} captioner; only chat "
                                 "vision-language LoRAs (text_method: vlm) caption here.")
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(captioner.model, str(adapter))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CaptionerLoadError(f"{adapter}: the adapter does not fit its base model ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}). Was it trained on another "
                                 "base?") from exc
    captioner.model = model.merge_and_unload(progressbar=False).eval()
    captioner.name = str(name)
    return captioner


def _stopping_criteria(should_stop: Callable[[], bool]) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


def chat_prompt(processor: Any, messages: list[dict[str, str]]) -> str:
    """A chat VLM's prompt text for `messages` (role + text), the image first in the first user turn, ending
    where the answer starts. VLM training (core.train.vlm) renders its examples with this too, so a tuned
    captioner is asked exactly what it learned to answer."""
    rendered: list[dict[str, Any]] = []
    image_placed = False
    for message in messages:
        content: list[dict[str, str]] = [{"type": "text", "text": message["content"]}]
        if message["role"] == "user" and not image_placed:
            content.insert(0, {"type": "image"})
            image_placed = True
        rendered.append({"role": message["role"], "content": content})
    return processor.apply_chat_template(rendered, add_generation_prompt=True)


@dataclass
class ModelCaptioner:
    """A loaded transformers captioner; `caption_batch` runs one batched, greedy `generate`."""

    name: str
    family: str
    model: Any
    processor: Any
    device: Any
    dtype: Any
    prompt: str = ""
    num_beams: int = 1
    needs_images: bool = True

    def caption_batch(self, paths: list[Path], images: list[Image.Image] | None = None,
                      max_new_tokens: int | None = None,
                      should_stop: Callable[[], bool] | None = None) -> list[str]:
        """Captions for `images` (RGB, same order); `paths` only name them.

        `should_stop` is polled after every generated token, so a stop does not wait for a
        long batch (a VLM paragraph on the CPU can take minutes); the batch is then dropped.
        """
        import torch

        if not images:
            return []
        new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[self.family]
        inputs, prompt_length = self._inputs(images)
        generate_kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, num_beams=self.num_beams,
                                               do_sample=False)
        if should_stop is not None:
            generate_kwargs["stopping_criteria"] = _stopping_criteria(should_stop)
        with torch.inference_mode():
            if self.family == "git":
                output = self.model.generate(pixel_values=inputs["pixel_values"], **generate_kwargs)
            else:
                output = self.model.generate(**inputs, **generate_kwargs)
        if should_stop is not None and should_stop():
            raise StopRequested("stopped while captioning a batch")
        if prompt_length:  # decoder-only chat models echo the prompt
            output = output[:, prompt_length:]
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        return [clean_caption(text) for text in texts]

    def _inputs(self, images: list[Image.Image]) -> tuple[Any, int]:
        if self.family in ("blip", "git"):
            inputs = self.processor(images=images, return_tensors="pt")
            return inputs.to(self.device, dtype=self.dtype), 0
        if self.family == "florence2":
            inputs = self.processor(text=[self.prompt] * len(images), images=images, return_tensors="pt")
            return inputs.to(self.device, dtype=self.dtype), 0
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # so every prompt ends where generation starts
        text = chat_prompt(self.processor, [{"role": "user", "content": self.prompt}])
        inputs = self.processor(text=[text] * len(images), images=[[image] for image in images],
                                padding=True, return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.dtype)
        return inputs, int(inputs["input_ids"].shape[1])

    def close(self) -> None:
        """Free the model's memory (GPU memory too)."""
        self.model = None
        free_memory()
