"""The low-memory switches of the transformer families: fp8 weight storage, gradient checkpointing, block
offload (CUDA only) and NF4 loading (CUDA + bitsandbytes only).

fp8 storage is diffusers' layerwise casting, applied after the LoRA so the adapter stays in full
precision; each layer is upcast to the compute dtype for its forward.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

# What stays in the compute dtype when the modulation Linears are cast too (what sd-scripts' and
# musubi-tuner's fp8_base do): the embedders, the final projection, the norms and their weights, the LoRA.
MODULATION_CAST_KEEPS = ("pos_embed", "^proj_out$", "norm_out", "norm_q", "norm_k", "norm_added", "x_embedder",
                         "context_embedder", "time_text_embed", "distilled_guidance_layer", "lora_")


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters (what the optimizer gets)."""
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def enable_fp8_storage(transformer: Any, compute_dtype: torch.dtype, *, cast_modulation: bool = False,
                       storage_dtype: torch.dtype = torch.float8_e4m3fn) -> int:
    """Store the frozen base weights in fp8 and upcast each layer for its forward; returns layers cast.

    Call AFTER the LoRA is added: the `lora_` pattern keeps the adapter out of the cast, so it trains
    in full precision. diffusers keeps `norm*` layers out by default, and with them adaLN modulation
    Linears named `norm1.linear`; with `cast_modulation` those go to fp8 too (`MODULATION_CAST_KEEPS`
    says what stays), the norm weights and the embedders still stay in the compute dtype.
    """
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    if not any("lora_" in name for name, _ in transformer.named_parameters()):
        raise ValueError("Add the LoRA before enabling fp8 storage: a LoRA added later would be stored in fp8 too.")
    # What is not cast (norms, modulation, embedders) must already be in the compute dtype, or a
    # model loaded in fp32 meets bf16 activations; the LoRA itself stays as it is (fp32).
    for name, param in transformer.named_parameters():
        if "lora_" not in name and param.dtype != compute_dtype:
            param.data = param.data.to(compute_dtype)
    if cast_modulation:
        apply_layerwise_casting(transformer, storage_dtype, compute_dtype, skip_modules_pattern=MODULATION_CAST_KEEPS)
    else:
        transformer.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=compute_dtype,
                                             skip_modules_pattern=tuple(DEFAULT_SKIP_MODULES_PATTERN) + ("lora_",))
    return sum(1 for m in transformer.modules()
               if isinstance(m, torch.nn.Linear) and m.weight.dtype == storage_dtype)


def enable_gradient_checkpointing(transformer: Any) -> None:
    """Recompute each block's activations in backward (a large transformer at 1024 px does not fit without it)."""
    transformer.enable_gradient_checkpointing()


def apply_group_offload(transformer: Any, *, blocks_per_group: int = 1, use_stream: bool = True
                        ) -> tuple[bool, str]:
    """Keep the blocks in CPU memory and move each to the GPU for its turn (sd-scripts' blocks_to_swap).

    Returns (applied, a sentence for the log). Without CUDA nothing is changed.
    """
    if not torch.cuda.is_available():
        return False, "Block offloading (group offload) needs a CUDA GPU, so it is off on this machine."
    transformer.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                     offload_type="block_level", num_blocks_per_group=blocks_per_group,
                                     use_stream=use_stream)
    return True, f"Group offload on: {blocks_per_group} block(s) at a time on the GPU, the rest in CPU memory."


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """A BitsAndBytesConfig for NF4 (QLoRA) loading of the transformer; CUDA + bitsandbytes only."""
    if not torch.cuda.is_available():
        raise ValueError("NF4 quantization needs a CUDA GPU; use fp8 storage on this machine instead.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("NF4 quantization needs the bitsandbytes package; install it or use fp8 storage.")
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
