"""Several LoRA files on a cached pipeline for one generate, each at its own weight, and gone after.

`applied(pipe, loras, fuse=...)` loads each file as its own adapter ("tryout_0", "tryout_1", ...) and
sets their weights together with `set_adapters`: the layers compute W + 0.8 ΔA + 0.5 ΔB, what WebUI
does for `<lora:a:0.8> <lora:b:0.5>`. A LoRA at weight 0 is not loaded at all, so all weights at 0
give the base model exactly.

With `fuse=True` the weighted deltas are added into the base weights (`fuse_lora`), so the steps run
at the base model's speed instead of through PEFT's extra layers (bench/lora_overhead.py measures
both). That is done only on a pipeline holding no other adapter (the Test tab's own), whose layers
are all plain float (`fusable`: adding into NF4 / int8 / fp8 weights is not exact); else the LoRAs
stay unfused. Leaving, the base weights that fusing touched are copied back from a snapshot taken
before and the PEFT layers are unloaded, so the base runs exactly as loaded. `unfuse_lora` is not
used: it subtracts what fusing added, which in floating point leaves weights an ulp or so off
(bench/lora_overhead.py counts them), and the cached pipeline would drift a little more with every
generate (an ulp of fp16 is 1e-3); the copy is also no slower than recomputing the deltas.
Unfused, leaving deletes our adapters, and unloads the wrappers too when no other adapter is left.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

LoraSpec = tuple[str | Path, float]
FUSABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fuse_pays(device: torch.device) -> bool:
    """Whether fusing is faster than PEFT layers for one generate on `device`.

    Measured (bench/lora_overhead.py, docs/benchmarks.md): on the CPU an SD 1.5-sized UNet spends
    ~1% more per step on a rank-16 LoRA's layers (its big matmuls dominate) while snapshot + fuse
    cost ~3 s, so 20 unfused steps are cheaper. On a GPU the big matmuls are fast, PEFT's extra
    small kernels are not, and fusing is a pass over the weights at memory speed.
    """
    return device.type != "cpu"


def active(loras: Sequence[LoraSpec]) -> list[tuple[str, float]]:
    """The (file, weight) pairs that change anything: weight 0 is the same as no LoRA."""
    return [(str(path), float(weight)) for path, weight in loras if path and float(weight) != 0.0]


def expert_target(pipe: Any, path: str) -> dict[str, bool]:
    """Where a file goes on a pipeline of two experts (Wan 2.2 A14B: `transformer` high noise, `transformer_2`
    low noise): a low-noise expert's file, by its name (`_low_noise`) or metadata (`ss_wan_expert`), onto
    `transformer_2` (diffusers' `load_into_transformer_2`); any other file onto `transformer`."""
    if getattr(pipe, "transformer_2", None) is None:
        return {}
    low = "low_noise" in Path(path).name.lower()
    if not low and str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            low = (handle.metadata() or {}).get("ss_wan_expert") == "low_noise"
    return {"load_into_transformer_2": True} if low else {}


def components(pipe: Any) -> list[str]:
    """The pipeline's parts a LoRA can change that are loaded ("unet", "text_encoder", ...)."""
    return [name for name in getattr(pipe, "_lora_loadable_modules", []) if getattr(pipe, name, None) is not None]


def lora_layers(pipe: Any, adapters: Sequence[str]) -> list[nn.Module]:
    """The PEFT LoRA layers holding any of `adapters` in the pipeline's LoRA-loadable parts.

    (Layers of adapters deleted before stay wrapped, without adapters: they are left out.)
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for name in components(pipe) for module in getattr(pipe, name).modules()
            if isinstance(module, BaseTunerLayer)
            and any(a in getattr(module, "lora_A", {}) or a in getattr(module, "lora_embedding_A", {})
                    for a in adapters)]


def fusable(layers: Sequence[nn.Module]) -> bool:
    """True when adding the deltas into every base layer is plain float arithmetic (no NF4 / int8 / fp8)."""
    for layer in layers:
        for param in layer.get_base_layer().parameters(recurse=False):
            if type(param) is not nn.Parameter or param.dtype not in FUSABLE_DTYPES:
                return False
    return True


def snapshot(layers: Sequence[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, its copy on the CPU) for the base weights of `layers`; the CPU so the GPU holds no second copy."""
    return [(param, param.detach().to("cpu", copy=True))
            for layer in layers for param in layer.get_base_layer().parameters(recurse=False)]


@torch.no_grad()
def restore(saved: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for param, copy in saved:
        param.data.copy_(copy)


@contextmanager
def applied(pipe: Any, loras: Sequence[LoraSpec], *, fuse: bool = True) -> Iterator[bool]:
    """The LoRAs on `pipe` inside the block, removed after; yields whether they were fused.

    LoKr / LoHa files (which diffusers does not load into SD pipelines) are baked into the base
    weights at their weight and copied back after, like fused LoRAs (`lycoris_baked`).
    """
    with lycoris_baked(pipe, loras) as others, _applied(pipe, others, fuse=fuse) as fused:
        yield fused


def _sd_family_of(pipe: Any) -> str:
    """The kohya naming a pipeline's LyCORIS files use: SDXL's (sgm blocks, two CLIPs) or SD 1.x / 2.x's."""
    if not hasattr(pipe, "unet"):
        raise ValueError("LoKr / LoHa files are applied to Stable Diffusion 1.x / 2.x / SDXL models only.")
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1"


@contextmanager
def lycoris_baked(pipe: Any, loras: Sequence[LoraSpec]) -> Iterator[list[tuple[str, float]]]:
    """Bake the LoKr / LoHa files of `loras` into `pipe`'s weights (SD's UNet / text encoders or a transformer
    family's transformer); yields the other LoRAs; restores exactly."""
    from core.tools.merge import MergeReport, bake_lycoris_into_modules, read_lycoris_file

    specs = active(loras)
    found = [(path, weight, read_lycoris_file(path)) for path, weight in specs]
    lycoris = [(path, weight, tensors) for path, weight, tensors in found if tensors is not None]
    if not lycoris:
        yield specs
        return
    others = [(path, weight) for path, weight, tensors in found if tensors is None]
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        # A transformer family's file (LyCORIS keys under diffusers' names: core.export.lycoris_transformer).
        from core.export.lycoris_transformer import baked

        with baked(pipe.transformer, [(tensors, weight, Path(path).name) for path, weight, tensors in lycoris]):
            yield others
        return
    family = _sd_family_of(pipe)
    parts = {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2")
             if getattr(pipe, name, None) is not None}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # each changed weight's copy, taken before its first change
    try:
        for path, weight, tensors in lycoris:
            bake_lycoris_into_modules(parts, tensors, family, weight, MergeReport(), Path(path).name, saved=saved)
        yield [(path, weight) for path, weight, tensors in found if tensors is None]
    finally:
        restore(saved)


@contextmanager
def _applied(pipe: Any, loras: Sequence[LoraSpec], *, fuse: bool = True) -> Iterator[bool]:
    specs = active(loras)
    names = [f"tryout_{index}" for index in range(len(specs))]
    # On a pipeline holding no adapter of anyone else, leaving unloads the PEFT wrappers too, so the
    # base runs as loaded again (deleting an adapter leaves its layers wrapped, and a little slower).
    alone = not any(pipe.get_list_adapters().values()) if specs else False
    loaded: list[str] = []
    saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    try:
        for name, (path, _) in zip(names, specs):
            pipe.load_lora_weights(path, adapter_name=name, **expert_target(pipe, path))
            loaded.append(name)
        if loaded:
            pipe.set_adapters(names, adapter_weights=[weight for _, weight in specs])
            layers = lora_layers(pipe, names)
            if fuse and alone and fusable(layers):
                saved = snapshot(layers)
                # lora_scale stays 1: the weights are already the adapters' own scales (set_adapters);
                # another scale would be multiplied into the layers' scaling and stay there.
                pipe.fuse_lora(components=components(pipe), adapter_names=names)
        yield saved is not None
    finally:
        if saved is not None:
            restore(saved)  # instead of unfusing: exact (see above); the wrappers go just below
        if loaded and alone:
            pipe.unload_lora_weights()
        elif loaded:
            pipe.delete_adapters(loaded)
