"""Which FLUX layers get LoRA, the low-memory switches, and the parameter counts estimates need.

LoRA presets: `all` (every attention and MLP Linear of both block kinds), `attention`
(q/k/v/out only), `single_blocks` (FluxGym's 12 GB mode: only the 38 single-stream
blocks). Low memory: fp8 weight storage (diffusers' layerwise casting, applied after the
LoRA so the adapter stays in full precision), gradient checkpointing, block-level group
offload (CUDA only) and NF4 loading (CUDA + bitsandbytes only).
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

LORA_PRESETS = ("all", "attention", "single_blocks")

_DOUBLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_DOUBLE_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_DOUBLE_NORMS = ("norm1.linear", "norm1_context.linear")
_SINGLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v")
# proj_out takes [attention output, MLP hidden] concatenated: it is both the attention out and the MLP out.
_SINGLE_MLP = ("proj_mlp", "proj_out")
_SINGLE_NORMS = ("norm.linear",)


def lora_target_suffixes(preset: str = "all", *, include_norms: bool = False) -> dict[str, tuple[str, ...]]:
    """Module names inside each block kind: {"transformer_blocks": (...), "single_transformer_blocks": (...)}."""
    if preset not in LORA_PRESETS:
        raise ValueError(f"Unknown FLUX LoRA preset '{preset}'; choose one of {', '.join(LORA_PRESETS)}.")
    double: tuple[str, ...] = ()
    single: tuple[str, ...] = _SINGLE_ATTENTION
    if preset != "single_blocks":
        double = _DOUBLE_ATTENTION + (_DOUBLE_MLP if preset == "all" else ())
    if preset != "attention":
        single = _SINGLE_ATTENTION + _SINGLE_MLP
    if include_norms:
        # The adaLN modulation Linears (large: 6 x width x width each); off by default like sd-scripts.
        double += _DOUBLE_NORMS if double else ()
        single += _SINGLE_NORMS
    return {"transformer_blocks": double, "single_transformer_blocks": single}


def flux_lora_targets(transformer: torch.nn.Module, preset: str = "all", *, include_norms: bool = False) -> list[str]:
    """Full module names that get LoRA (exact names for PEFT's `target_modules`).

    Full names rather than suffixes, because `attn.to_q` exists in both block kinds and
    the `single_blocks` preset must not touch the double blocks. Only nn.Linear modules
    are returned: Chroma's pruned norms have no Linear and are skipped.
    """
    wanted = lora_target_suffixes(preset, include_norms=include_norms)
    names = []
    for name, module in transformer.named_modules():
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] in wanted and parts[2] in wanted[parts[0]] \
                and isinstance(module, torch.nn.Linear):
            names.append(name)
    return names


def add_flux_lora(transformer: Any, rank: int, alpha: float | None = None, preset: str = "all", *,
                  include_norms: bool = False, adapter_name: str = "default", **lora_kwargs: Any) -> list[str]:
    """Add a fresh LoRA to the transformer (diffusers' PEFT integration); returns its target names.

    The base weights are frozen; only the LoRA parameters require gradients.
    """
    from peft import LoraConfig

    targets = flux_lora_targets(transformer, preset, include_norms=include_norms)
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets,
                        init_lora_weights=lora_kwargs.pop("init_lora_weights", "gaussian"), **lora_kwargs)
    transformer.add_adapter(config, adapter_name=adapter_name)
    return targets


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters (what the optimizer gets)."""
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


# --- low memory -------------------------------------------------------------------------------------


def enable_fp8_storage(transformer: Any, compute_dtype: torch.dtype, *, cast_modulation: bool = False,
                       storage_dtype: torch.dtype = torch.float8_e4m3fn) -> int:
    """Store the frozen base weights in fp8 and upcast each layer for its forward; returns layers cast.

    Call AFTER the LoRA is added: the `lora_` pattern keeps the adapter out of the cast,
    so it trains in full precision. diffusers keeps FLUX's `norm*` layers out by default,
    and with them the adaLN modulation Linears (about 3.2 B of FLUX.1's 11.9 B); with
    `cast_modulation` those go to fp8 too (what sd-scripts' fp8_base does), the RMSNorm
    weights and the embedders still stay in the compute dtype.
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
        patterns = ("pos_embed", "^proj_out$", "norm_out", "norm_q", "norm_k", "norm_added", "x_embedder",
                    "context_embedder", "time_text_embed", "distilled_guidance_layer", "lora_")
        apply_layerwise_casting(transformer, storage_dtype, compute_dtype, skip_modules_pattern=patterns)
    else:
        transformer.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=compute_dtype,
                                             skip_modules_pattern=tuple(DEFAULT_SKIP_MODULES_PATTERN) + ("lora_",))
    return sum(1 for m in transformer.modules()
               if isinstance(m, torch.nn.Linear) and m.weight.dtype == storage_dtype)


def enable_gradient_checkpointing(transformer: Any) -> None:
    """Recompute each block's activations in backward (FLUX at 1024 px does not fit without it)."""
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


# --- memory shapes --------------------------------------------------------------------------------------


def _meta_transformer(variant: str) -> torch.nn.Module:
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    with torch.device("meta"):
        if variant == "chroma":
            return ChromaTransformer2DModel()  # the class defaults are Chroma1's real config
        # The class defaults are FLUX.1's real config (19 double, 38 single blocks, width 3072).
        return FluxTransformer2DModel(guidance_embeds=variant in ("flux-dev", "flux-kontext"))


def lora_param_count(transformer: torch.nn.Module, rank: int, preset: str = "all", *,
                     include_norms: bool = False) -> int:
    """Parameters of a rank-`rank` LoRA on the preset's targets: rank * (in + out) per Linear."""
    modules = dict(transformer.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features)
               for n in flux_lora_targets(transformer, preset, include_norms=include_norms))


def flux_param_counts(variant: str = "flux-dev", rank: int = 16, preset: str = "all", *,
                      include_norms: bool = False) -> dict[str, int]:
    """Real-size parameter counts from the model built on the meta device (no memory, no weights).

    Keys: total, per_double_block, per_single_block, double_blocks, single_blocks, other, lora.
    """
    model = _meta_transformer(variant)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    doubles, singles = model.transformer_blocks, model.single_transformer_blocks
    total = count(model)
    return {"total": total, "per_double_block": count(doubles[0]), "per_single_block": count(singles[0]),
            "double_blocks": len(doubles), "single_blocks": len(singles),
            "other": total - count(doubles) - count(singles),
            "lora": lora_param_count(model, rank, preset, include_norms=include_norms)}
