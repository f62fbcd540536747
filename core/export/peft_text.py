"""Text LoRA output: a PEFT adapter folder and, on request, a merged model folder.

The adapter folder (`adapter_config.json` + `adapter_model.safetensors`) loads with
`PeftModel.from_pretrained(base, folder)`. Both folders are written to a temporary
folder and renamed into place, so a crash never leaves half an adapter where a good
one was. PiSSA adapters are converted to plain LoRA on save (PiSSA changes the base
weights during training; the converted adapter works on the original base model).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_dir
from core.devices import torch_dtype

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
PISSA_INIT_DIR = "pissa_init"


def save_adapter(peft_model: Any, folder: str | Path, *, base_model: str = "", save_precision: str = "fp32",
                 pissa_init: str | Path | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write the adapter of `peft_model` to `folder` atomically; returns the folder.

    `base_model` is recorded as `base_model_name_or_path` (the GGUF path for GGUF bases).
    `save_precision` fp16/bf16 halves the file; fp32 keeps it exact.
    """
    target = Path(folder)
    config = peft_model.peft_config["default"]
    original_base = config.base_model_name_or_path
    if base_model:
        config.base_model_name_or_path = base_model
    try:
        with atomic_dir(target) as tmp:
            kwargs: dict[str, Any] = {"safe_serialization": True, "save_embedding_layers": False}
            if pissa_init is not None:
                kwargs["path_initial_model_for_weight_conversion"] = str(pissa_init)
            peft_model.save_pretrained(str(tmp), **kwargs)
            if save_precision in ("fp16", "bf16"):  # fp32: PEFT's own file as written
                _recast_safetensors(tmp / "adapter_model.safetensors", torch_dtype(save_precision))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
    finally:
        config.base_model_name_or_path = original_base
    return target


def _recast_safetensors(path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    metadata = {"format": "pt"}
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(path), metadata)


def save_pissa_init(peft_model: Any, folder: str | Path) -> Path:
    """Keep the PiSSA adapter as initialised, which the conversion on save needs."""
    config = peft_model.peft_config["default"]
    original = config.init_lora_weights
    with atomic_dir(folder) as tmp:
        # Saved as a plain LoRA so loading it later does not run the SVD again.
        config.init_lora_weights = True
        try:
            peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        finally:
            config.init_lora_weights = original
    return Path(folder)


def save_merged(peft_model: Any, tokenizer: Any, folder: str | Path) -> Path:
    """Merge the LoRA into a copy of the weights and save an HF model folder (safetensors).

    The merge happens in place on `peft_model`'s base; call it last (after the adapter is saved).
    """
    target = Path(folder)
    merged = peft_model.merge_and_unload(progressbar=False)
    merged.config.use_cache = True  # training turned the KV cache off; serving wants it
    with atomic_dir(target) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return target
