"""VLM LoRA: a small vision-language model (SmolVLM, Qwen2-VL, LLaVA class) learns to caption or answer.

The base loads as the Caption tab loads a chat captioner (core.caption: a short name such as
smolvlm-256m, a folder or a hub id; AutoModelForImageTextToText + AutoProcessor). LoRA goes on
the language model's attention and MLP projections only (the vision tower and projector stay
as they are unless target_modules says otherwise). Each example is rendered as the captioner
asks (core.caption.models.chat_prompt) with the answer and end-of-turn token after it; the
loss covers the answer tokens only.

The run is a `TextRun` with its own data, batches, loss and previews, so it goes through the
one training loop with text SFT's checkpoints, resume, stop, events and outputs (the adapter
folder, plus captioner.json naming the base and the question; on request a merged model). The
images are read again for every batch (their pixel tensors can be tens of MB each), so memory
holds only token counts.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.caption.models import ModelCaptioner, chat_prompt, load_parts
from core.caption.registry import CAPTIONERS, resolve_captioner
from core.config import TrainConfig
from core.data.text import IGNORE_INDEX, TextDataError, describe_sources, split_validation
from core.data.vlm import VlmExample, load_vlm_examples, vlm_prompt
from core.devices import pick_device
from core.events import RunContext
from core.lora import LLM_MODULES, make_lora_config
from core.model_info import format_count
from core.models.llm import weight_dtype
from core.train.text import TextRun, _precision, load_adapter_weights
from core.train.text_batches import epoch_batches
from core.train.text_step import autocast_for

DEFAULT_BASE = "smolvlm-256m"
CAPTIONER_FILE = "captioner.json"  # beside the adapter: the base and the question, for the Caption tab


@dataclass
class VlmItem:
    """One example rendered and counted once: the images are read again per batch."""

    example: VlmExample
    text: str  # prompt + answer + end-of-turn token
    prompt_length: int  # tokens before the answer (image tokens included)
    keep: int  # tokens trained on: the answer cut where max_seq_length text tokens end

    def __len__(self) -> int:
        return self.keep

    @property
    def trained_tokens(self) -> int:
        return self.keep - self.prompt_length

    @property
    def source(self) -> str:
        return self.example.source


@dataclass
class VlmData:
    train: list[VlmItem]
    validation: list[VlmItem] = field(default_factory=list)

    def describe(self) -> str:
        trained = sum(i.trained_tokens for i in self.train)
        return (f"{len(self.train)} image examples ({sum(len(i) for i in self.train)} tokens, {trained} with loss)"
                + (f", {len(self.validation)} for validation" if self.validation else ""))


@dataclass
class VlmBatch:
    items: list[VlmItem]

    @property
    def tokens(self) -> int:
        return sum(len(i) for i in self.items)

    @property
    def trained_tokens(self) -> int:
        return sum(i.trained_tokens for i in self.items)


# --- the model ---------------------------------------------------------------------------------

def load_vlm(base_model: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """(model, processor, the name recorded in the adapter) of a chat VLM the Caption tab could load."""
    from core.caption.models import CaptionerLoadError

    name = base_model.strip() or DEFAULT_BASE
    resolved = resolve_captioner(name)
    if resolved.family != "vlm" or resolved.remote_code:
        raise ValueError(f"{name} is a {resolved.family} captioner; text_method vlm tunes chat vision-language "
                         "models that transformers runs natively: smolvlm-256m, smolvlm-500m, qwen2-vl-2b, or "
                         "a folder or hub id of one.")
    try:
        model, processor = load_parts(resolved, dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise CaptionerLoadError(f"Could not load {name} ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
                                 "Put the model's files in a folder and set base_model to it.") from exc
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    display = resolved.name if name.lower() in CAPTIONERS else (
        str(Path(resolved.source).resolve()) if resolved.local else resolved.source)
    return model, processor, display


def language_model_targets(model: Any) -> str:
    """A PEFT target regex: the attention / MLP projections inside the language model, never the vision tower."""
    decoder = model.get_decoder()
    prefix = next((name for name, module in model.named_modules() if module is decoder), "")
    leaves = {name.rsplit(".", 1)[-1] for name, module in decoder.named_modules()
              if isinstance(module, torch.nn.Linear)}
    chosen = [m for m in LLM_MODULES if m in leaves] or sorted(leaves)
    return rf"{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, chosen))})" if prefix else \
        rf".*\.({'|'.join(map(re.escape, chosen))})"


def add_vlm_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import get_peft_model

    lora_config = make_lora_config(cfg, [])
    if not cfg.target_modules:
        lora_config.target_modules = language_model_targets(model)
    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial adapter (also on resume)
    return get_peft_model(model, lora_config)


# --- the data ----------------------------------------------------------------------------------

def _image_token_id(processor: Any) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None):
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token_id


def _load_image(path: Path) -> Any:
    from core.data.image_io import load_rgb

    return load_rgb(path)


def render(processor: Any, example: VlmExample) -> tuple[str, str]:
    """(prompt text, prompt + answer + end-of-turn text) as the captioner renders its question."""
    prompt = chat_prompt(processor, example.messages)
    joint = "" if not prompt or prompt[-1].isspace() else " "
    # Idefics3 / SmolVLM end a turn with <end_of_utterance>, which their processor names; others with EOS.
    eos = getattr(processor, "end_of_utterance_token", None) or processor.tokenizer.eos_token or ""
    return prompt, f"{prompt}{joint}{example.answer}{eos}"


def tokenize_vlm(processor: Any, examples: list[VlmExample], max_seq_length: int
                 ) -> tuple[list[VlmItem], list[str], list[str]]:
    """(items, sources cut at max_seq_length, sources dropped for having no answer left).

    max_seq_length counts the text tokens: an image's own tokens (hundreds in SmolVLM) come on top.
    """
    image_id = _image_token_id(processor)
    processor.tokenizer.padding_side = "right"
    items, cut, dropped = [], [], []
    for example in examples:
        prompt, text = render(processor, example)
        image = _load_image(example.image)
        encoded = processor(text=[prompt, text], images=[[image], [image]], padding=True, return_tensors="pt")
        prompt_length, length = (int(n) for n in encoded["attention_mask"].sum(dim=1))
        ids = encoded["input_ids"][1, :length]
        images = int((ids == image_id).sum()) if image_id is not None else 0
        keep = min(length, max_seq_length + images)
        if keep <= prompt_length:
            dropped.append(example.source)
            continue
        if keep < length:
            cut.append(example.source)
        items.append(VlmItem(example, text, prompt_length, keep))
    return items, cut, dropped


def encode_batch(processor: Any, items: list[VlmItem], device: torch.device, dtype: torch.dtype
                 ) -> tuple[dict[str, Any], torch.Tensor]:
    """The model's inputs for `items` (right-padded, cut at their `keep`) and labels on the answers only."""
    processor.tokenizer.padding_side = "right"  # previews switch it to left for generation
    images = [[_load_image(i.example.image)] for i in items]
    encoded = processor(text=[i.text for i in items], images=images, padding=True, return_tensors="pt")
    rows, length = encoded["input_ids"].shape
    width = max(i.keep for i in items)
    inputs: dict[str, Any] = {}
    for key, value in encoded.items():
        if torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[:2]) == (rows, length) \
                and not key.startswith(("pixel", "image")):
            value = value[:, :width]  # per-token tensors: cut with the ids
        if torch.is_tensor(value) and value.is_floating_point():
            value = value.to(dtype)
        inputs[key] = value.to(device) if torch.is_tensor(value) else value
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        labels[row, item.prompt_length:item.keep] = encoded["input_ids"][row, item.prompt_length:item.keep]
    return inputs, labels.to(device)


class CaptionLoss(torch.nn.Module):
    """The PEFT model as DDP wraps it: forward(inputs, labels) -> the summed loss of the answer tokens."""

    def __init__(self, peft_model: Any, device: torch.device, precision: str):
        super().__init__()
        self.peft_model = peft_model
        self.device, self.precision = device, precision

    def forward(self, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device, self.precision):
            logits = self.peft_model(**inputs, use_cache=False).logits
        targets = labels[:, 1:]
        selected = targets != IGNORE_INDEX  # position t predicts token t + 1
        return F.cross_entropy(logits[:, :-1][selected].float(), targets[selected], reduction="sum")


# --- the run -----------------------------------------------------------------------------------

class VlmRun(TextRun):
    """A TextRun whose examples carry an image: its batches, loss, validation and previews are its own."""

    @property
    def processor(self) -> Any:
        return self.tokenizer  # the processor stands where a text run keeps its tokenizer (merged export saves it)

    @property
    def weight_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def batches(self, epoch: int) -> list[VlmBatch]:  # type: ignore[override]
        order = self.shard(epoch_batches(len(self.data.train), self.cfg.batch_size, self.cfg.seed, epoch))
        return [VlmBatch([self.data.train[i] for i in indices]) for indices in order]

    epoch_batches = batches

    def validation_batches(self) -> list[VlmBatch]:  # type: ignore[override]
        items, size = self.data.validation, self.cfg.batch_size
        return [VlmBatch(items[i:i + size]) for i in range(0, len(items), size)]

    def loss_module(self) -> torch.nn.Module:
        return CaptionLoss(self.model, self.device, self.precision)

    def batch_loss(self, batch: VlmBatch) -> torch.Tensor:  # type: ignore[override]
        inputs, labels = encode_batch(self.processor, batch.items, self.device, self.weight_dtype)
        return self.trained(inputs, labels)

    def validate(self, step: int) -> float | None:
        if not self.data.validation or not self.main:
            return None
        module = CaptionLoss(self.model, self.device, self.precision)
        self.model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for batch in self.validation_batches():
                    inputs, labels = encode_batch(self.processor, batch.items, self.device, self.weight_dtype)
                    total += float(module(inputs, labels))
                    count += batch.trained_tokens
        finally:
            self.model.train()
        return total / max(1, count)

    def sample_images(self) -> list[Path]:
        """sample_prompts are image files (absolute, or inside train_data_dir); others are skipped."""
        folder = Path(self.cfg.train_data_dir)
        folder = folder if folder.is_dir() else folder.parent
        found = []
        for entry in self.cfg.sample_prompts:
            path = Path(entry).expanduser()
            path = path if path.is_file() else folder / entry
            if path.is_file():
                found.append(path)
        return found

    def answers(self) -> list[dict]:
        """Captions of the sample images with the LoRA, and (once) with the adapter switched off."""
        images = self.sample_images()
        if not images:
            self.ctx.log("No sample image found: sample_prompts of a vlm run are image files to caption.")
            return []
        pictures = [_load_image(p) for p in images]
        captioner = ModelCaptioner(name="lora", family="vlm", model=self.model, processor=self.processor,
                                   device=self.device, dtype=self.weight_dtype, prompt=vlm_prompt(self.cfg))
        self.model.eval()
        try:
            lora = captioner.caption_batch(images, pictures, self.cfg.sample_max_new_tokens)
            if self.base_answers is None:
                with self.model.disable_adapter():
                    self.base_answers = captioner.caption_batch(images, pictures, self.cfg.sample_max_new_tokens)
        finally:
            self.model.train()
        return [{"prompt": p.name, "lora": text, "base": base}
                for p, text, base in zip(images, lora, self.base_answers)]

    def adapter_files(self) -> dict[str, str]:
        return {CAPTIONER_FILE: json.dumps({"base_model": self.base_model_display, "prompt": vlm_prompt(self.cfg)},
                                           indent=1)}


def prepare_vlm_data(cfg: TrainConfig, processor: Any, ctx: RunContext) -> VlmData:
    from core.train.text import warn_cut

    examples = load_vlm_examples(cfg)
    if cfg.validation_file:
        train, held = examples, load_vlm_examples(cfg, cfg.validation_file)
    else:
        train, held = split_validation(examples, cfg.validation_split, cfg.seed)
    train_items, cut, dropped = tokenize_vlm(processor, train, cfg.max_seq_length)
    held_items, held_cut, held_dropped = tokenize_vlm(processor, held, cfg.max_seq_length)
    warn_cut(cfg, ctx, cut + held_cut, dropped + held_dropped)
    if not train_items:
        raise TextDataError(f"{cfg.train_data_dir}: no usable training examples remain "
                            f"({describe_sources(dropped)} have no answer left within max_seq_length).")
    return VlmData(train_items, held_items)


def build_vlm_run(cfg: TrainConfig, ctx: RunContext, init_file: Path | None, accelerator: Any) -> VlmRun:
    """Load the VLM, read its data, add the LoRA: the run the training loop drives."""
    device = accelerator.device if accelerator.num_processes > 1 else pick_device(mps=False)
    precision = _precision(cfg, device, ctx)
    ctx.log(f"Loading the vision-language model {cfg.base_model or DEFAULT_BASE}")
    started = time.perf_counter()
    model, processor, display = load_vlm(cfg.base_model, weight_dtype(precision))
    ctx.log(f"Model loaded in {time.perf_counter() - started:.1f} s ({display})")
    data = prepare_vlm_data(cfg, processor, ctx)
    ctx.log(f"Data: {data.describe()}")
    if cfg.gradient_checkpointing:
        from core.train import runtime

        runtime.enable_activation_checkpointing(model, use_reentrant=False)
    model.config.use_cache = False
    peft_model = add_vlm_lora(model, cfg)
    if accelerator.process_index > 0:
        torch.manual_seed(cfg.seed + accelerator.process_index)  # each other process its own dropout
    peft_model = peft_model.to(device)
    if init_file is not None:
        load_adapter_weights(peft_model, init_file)
        ctx.log(f"Starting from the LoRA weights in {init_file}")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    ctx.log(f"LoRA ({cfg.lora_variant}) rank {cfg.lora_rank} on the language model: {format_count(trainable)} "
            "trainable parameters")
    return VlmRun(cfg, ctx, Path(cfg.output_dir), device, precision, peft_model, processor, data, display,
                  None, accelerator)
