"""Text previews: answers from the model with the LoRA on, beside the base model's answers.

Used by the training loop (every `sample_steps`) and by the GUI's Test tab:

- `chat(base_model, adapter_dir, messages, weight=1.0, max_new_tokens=256)` -> the reply;
- `compare_answers(base_model, adapter_dir, prompts, weight=1.0, ...)` -> one dict per prompt
  with "prompt", "lora" and "base".

The base model and the last adapter stay loaded (one of each), so repeated calls from the
Test tab answer without loading again. Generation is greedy, so answers compare.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import torch

from core.devices import pick_device
_CACHE_LOCK = threading.Lock()
_CACHE: dict[str, Any] = {"base_key": None, "model": None, "tokenizer": None, "adapter_key": None}


def as_messages(prompt: str | list[dict[str, str]], system: str = "") -> list[dict[str, str]]:
    if isinstance(prompt, list):
        return prompt
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, prompts: list[str | list[dict[str, str]]],
                     max_new_tokens: int = 96, batch_size: int = 16) -> list[str]:
    """Greedy answers to `prompts` (questions or chats), batched with left padding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True)
                     for p in chunk]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            # use_cache: a training run switches the config's cache off (for the backward pass); answers need it.
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=_stop_ids(tokenizer))
            for row in output[:, encoded["input_ids"].shape[1]:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return answers


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return [i for i in ids if i is not None]


def compare_with_model(peft_model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                       base_answers: list[str] | None = None) -> list[dict[str, str]]:
    """Answers with the adapter on, and off (unless `base_answers` are given, e.g. cached)."""
    lora = generate_answers(peft_model, tokenizer, prompts, max_new_tokens)
    if base_answers is None:
        with peft_model.disable_adapter():
            base_answers = generate_answers(peft_model, tokenizer, prompts, max_new_tokens)
    return [{"prompt": p, "lora": a, "base": b} for p, a, b in zip(prompts, lora, base_answers)]


# --- the Test tab: cached loading --------------------------------------------------------------

def _adapter_key(adapter_dir: str | Path) -> str:
    folder = Path(adapter_dir)
    weights = folder if folder.is_file() else folder / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns if weights.is_file() else 0
    return f"{folder.resolve()}@{stamp}"


def _load(base_model: str, adapter_dir: str | Path | None, gguf_file: str, chat_template: str) -> tuple[Any, Any]:
    """The (model, tokenizer) for these settings, loading only what changed since last time."""
    from peft import PeftModel

    from core.data.chat_templates import apply_template
    from core.models.llm import load_llm

    base_key = f"{base_model}|{gguf_file}"
    if _CACHE["base_key"] != base_key:
        _CACHE.update(base_key=None, model=None, tokenizer=None, adapter_key=None)
        model, tokenizer, _ = load_llm(base_model, gguf_file=gguf_file)
        _CACHE.update(base_key=base_key, model=model.to(pick_device(mps=False)), tokenizer=tokenizer)
    apply_template(_CACHE["tokenizer"], chat_template)
    if adapter_dir:
        key = _adapter_key(adapter_dir)
        model = _CACHE["model"]
        if _CACHE["adapter_key"] != key:
            if isinstance(model, PeftModel):
                model = model.unload()  # back to the untouched base (LoRA layers removed)
            if Path(adapter_dir).suffix.lower() == ".gguf":  # the file llama.cpp / Ollama are given
                from core.export.gguf_adapter_read import apply_gguf_adapter

                model = apply_gguf_adapter(model, adapter_dir)
            else:
                model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="default")
            model.eval()
            _CACHE.update(model=model, adapter_key=key)
    return _CACHE["model"], _CACHE["tokenizer"]


@contextlib.contextmanager
def _adapter_weight(model: Any, weight: float, enabled: bool) -> Iterator[None]:
    """Run with the LoRA scaled by `weight` (1.0: as trained), or switched off."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        yield
        return
    if not enabled:
        with model.disable_adapter():
            yield
        return
    layers = [m for m in model.modules() if hasattr(m, "scale_layer") and hasattr(m, "unscale_layer")]
    if weight != 1.0:
        for layer in layers:
            layer.scale_layer(weight)
    try:
        yield
    finally:
        if weight != 1.0:
            for layer in layers:
                layer.unscale_layer(None)  # back to alpha/r exactly (also after a weight of 0)


def chat(base_model: str, adapter_dir: str | Path | None, messages: list[dict[str, str]] | str, *,
         weight: float = 1.0, max_new_tokens: int = 256, gguf_file: str = "", chat_template: str = "") -> str:
    """One reply to a conversation, from the base model with the adapter at `weight`."""
    with _CACHE_LOCK:
        model, tokenizer = _load(base_model, adapter_dir, gguf_file, chat_template)
        with _adapter_weight(model, weight, enabled=bool(adapter_dir) and weight != 0):
            return generate_answers(model, tokenizer, [as_messages(messages)], max_new_tokens)[0]


def compare_answers(base_model: str, adapter_dir: str | Path, prompts: list[str], *, weight: float = 1.0,
                    max_new_tokens: int = 96, gguf_file: str = "", chat_template: str = "") -> list[dict[str, str]]:
    """For each prompt: {"prompt", "lora" (adapter at `weight`), "base" (adapter off)}."""
    with _CACHE_LOCK:
        model, tokenizer = _load(base_model, adapter_dir, gguf_file, chat_template)
        with _adapter_weight(model, weight, enabled=True):
            lora = generate_answers(model, tokenizer, list(prompts), max_new_tokens)
        with _adapter_weight(model, weight, enabled=False):
            base = generate_answers(model, tokenizer, list(prompts), max_new_tokens)
    return [{"prompt": p, "lora": a, "base": b} for p, a, b in zip(prompts, lora, base)]


def clear_cache() -> None:
    """Free the cached Test-tab model (e.g. before training starts)."""
    with _CACHE_LOCK:
        _CACHE.update(base_key=None, model=None, tokenizer=None, adapter_key=None)
