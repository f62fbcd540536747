"""4-bit (QLoRA) loading of a text run's frozen LLM (`base_quantization: nf4`).

The base loads through transformers' bitsandbytes integration as NF4 with the compute
dtype of the run's precision; `peft.prepare_model_for_kbit_training` then readies it for
a LoRA (the few unquantized weights in fp32). This needs CUDA and bitsandbytes, checked
before anything loads. GGUF / GGML files are refused: they are already quantized and are
dequantized on load, so NF4 would be a second, lossy quantization of a model whose
original weights the user should point at instead.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

NF4_NEEDS_GPU = ("4-bit (QLoRA) needs an NVIDIA GPU with bitsandbytes; use base_quantization: none on "
                 "this machine.")
NF4_NOT_GGUF = ("4-bit (QLoRA) loads an HF model folder or hub id; a GGUF / GGML file is already quantized "
                "(it is dequantized on load). Point base_model at the original model, or use "
                "base_quantization: none.")


def nf4_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def check_nf4(quantized_file: bool) -> None:
    """Raise ValueError with one plain sentence when a 4-bit load cannot work here."""
    if not nf4_available():
        raise ValueError(NF4_NEEDS_GPU)
    if quantized_file:
        raise ValueError(NF4_NOT_GGUF)


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype NF4 weights are dequantized to for each matmul: the run's precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def nf4_load_kwargs(mixed_precision: str, device: torch.device) -> dict[str, Any]:
    """from_pretrained's arguments for an NF4 base placed whole on `device` (this process's GPU)."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=compute_dtype(mixed_precision))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"quantization_config": config, "device_map": {"": index}}


def prepare_nf4_model(model: Any) -> Any:
    """PEFT's preparation of a 4-bit model for LoRA training.

    Activation checkpointing stays the run's own switch (enabled after this, non-reentrant),
    so PEFT is not asked to turn it on.
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
