"""Wan 2.2 A14B with both experts in one run (`wan_expert: both`, as musubi-tuner and ai-toolkit train them).

The high-noise expert (`transformer`) and the low-noise one (`transformer_2`) each get their own LoRA: the run's
adapted modules are the two experts (`transformer`, `transformer_2`: each checkpoints its own exact PEFT weights,
so a resume is exact); the loss (core.families.wan.loss) runs the expert whose side of boundary_ratio the step's
drawn noise level falls on; the files are a pair, `<name>_high_noise` / `<name>_low_noise` (the diffusers file
`pytorch_lora_weights_high_noise` / `_low_noise`). With `wan_offload_inactive_expert` only the expert that runs
keeps its frozen weights in GPU memory: a forward pre-hook on each expert swaps the other's to CPU memory (its
LoRA and optimizer state stay on the GPU), for the training steps and the previews alike.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import TrainConfig
from core.family_api.contract import Adapted, Log, RunFacts

EXPERT_NAMES = ("transformer", "transformer_2")  # the adapted modules' names: high, low


def trains_both(model: Any) -> bool:
    return getattr(model, "expert", "") == "both"


def check_both(cfg: TrainConfig) -> None:
    """Refuse what the pair cannot do (one sentence each)."""
    if cfg.wan_expert != "both":
        return
    if cfg.text_encoder_lr:
        raise ValueError("text_encoder_lr would set the low-noise expert's learning rate with wan_expert: both "
                         "(Wan trains no text encoder); set it to 0.")
    if cfg.distributed == "fsdp" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("wan_expert: both trains on one GPU; run it as one process, or train the experts one at "
                         "a time (wan_expert: high, then low).")


def pair_files(init_file: Path) -> tuple[Path, Path]:
    """The (high, low) LoRA files a both-experts run continues from: the file given and its sibling."""
    from core.families.wan.load import expert_of_name

    named = expert_of_name(init_file.name)
    if not named:
        raise ValueError(f"'{init_file.name}' names no expert: continuing both Wan 2.2 A14B experts needs the pair "
                         "<name>_high_noise.safetensors / <name>_low_noise.safetensors side by side.")
    other = init_file.with_name(init_file.name.replace(f"{named}_noise", f"{'low' if named == 'high' else 'high'}"
                                                                          "_noise"))
    if not other.is_file():
        raise ValueError(f"{other.name} is not beside {init_file.name}: continuing both experts needs the pair.")
    return (init_file, other) if named == "high" else (other, init_file)


def add_lora(default: Callable[..., Adapted], model: Any, cfg: TrainConfig, init_file: Path | None,
             log: Log) -> Adapted:
    """A LoRA on each expert (`default`: the transformer families' add_lora, once per expert)."""
    if not trains_both(model):
        return default(model, cfg, init_file, log)
    if model.other_expert is None:
        raise ValueError("wan_expert: both needs the low-noise expert: a Wan 2.2 A14B diffusers folder, or "
                         "ComfyUI's high_noise and low_noise files side by side.")
    files = pair_files(init_file) if init_file is not None else (None, None)
    high = default(model, cfg, files[0], lambda m: log(f"High-noise expert: {m}"))
    low = default(dataclasses.replace(model, transformer=model.other_expert), cfg, files[1],
                  lambda m: log(f"Low-noise expert: {m}"))
    placed = [*high.placed, *low.placed]
    if offloading(cfg) and not low.placed:
        placed.append(low.modules[0])  # its frozen weights stay in CPU memory until it runs (low_memory)
    return Adapted([high.modules[0], low.modules[0]], list(EXPERT_NAMES), [high.configs[0], low.configs[0]],
                   placed=placed)


def offloading(cfg: TrainConfig) -> bool:
    """Swapping the experts: asked for, on a GPU, and not already left to block offload (which streams both)."""
    return cfg.wan_offload_inactive_expert and cfg.blocks_to_swap == 0 and torch.cuda.is_available()


def low_memory(default: Callable[..., None], model: Any, adapted: Adapted, cfg: TrainConfig, dtype: torch.dtype,
               log: Log) -> None:
    """The low-memory switches on each expert; with `wan_offload_inactive_expert`, the swap hooks."""
    if not trains_both(model):
        return default(model, adapted, cfg, dtype, log)
    high, low = adapted.modules
    if offloading(cfg):
        # The run left the low expert in CPU memory as loaded: its frozen weights take the compute dtype there,
        # its LoRA goes where the high one's is (the optimizer's state lives beside it).
        device = next(p.device for n, p in high.named_parameters() if "lora_" in n)
        for name, param in low.named_parameters():
            param.data = param.data.to(device) if "lora_" in name else param.data.to(dtype)
    for module in (high, low):
        default(model, dataclasses.replace(adapted, modules=[module]), cfg, dtype, log)
    if offloading(cfg):
        swap_on_call([high, low], device)
        log("The inactive expert's frozen weights wait in CPU memory (wan_offload_inactive_expert).")


def move_frozen(module: nn.Module, device: torch.device | str) -> None:
    """The frozen weights and buffers of `module` to `device`; its LoRA stays where the optimizer has it."""
    for name, param in module.named_parameters():
        if "lora_" not in name:
            param.data = param.data.to(device, non_blocking=True)
    for buffer in module.buffers():
        buffer.data = buffer.data.to(device, non_blocking=True)


def swap_on_call(experts: list[nn.Module], device: torch.device) -> None:
    """A forward pre-hook on each expert: the one called gets its frozen weights on `device`, the other's go to CPU
    memory (the pipeline calls them in turn over the denoising steps, the loss per step)."""
    resident = {"module": experts[0]}
    for other in experts[1:]:
        move_frozen(other, "cpu")

    def hook_for(module: nn.Module) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if resident["module"] is not module:
                move_frozen(resident["module"], "cpu")
                move_frozen(module, device)
                resident["module"] = module

        return hook

    for expert in experts:
        expert.register_forward_pre_hook(hook_for(expert))


def write_loras(default: Callable[..., dict[str, str]], folder: Path, cfg: TrainConfig, model: Any,
                adapted: Adapted, facts: RunFacts, save_dtype: torch.dtype) -> dict[str, str]:
    """One expert's files as the default writes them; both: the pair, each file named for its expert (`kohya`
    and `diffusers` are the high-noise expert's, `lora_low_noise` / `diffusers_low_noise` the other's, the run's
    outputs under those keys)."""
    if not trains_both(model):
        return default(folder, cfg, model, adapted, facts, save_dtype)
    out: dict[str, str] = {}
    for index, expert in enumerate(("high", "low")):
        one = dataclasses.replace(adapted, modules=[adapted.modules[index]], names=[EXPERT_NAMES[index]],
                                  configs=[adapted.configs[index]])
        paths = default(folder, cfg, dataclasses.replace(model, expert=expert), one, facts, save_dtype)
        for kind, path in paths.items():
            named = _named_for(Path(path), expert)
            out[kind if expert == "high" else f"{'lora' if kind == 'kohya' else kind}_low_noise"] = str(named)
    return out


def _named_for(path: Path, expert: str) -> Path:
    """`path` renamed to say its expert (the kohya writer names it already; diffusers' file is renamed)."""
    suffix = f"_{expert}_noise"
    if path.stem.endswith(suffix):
        return path
    target = path.with_name(f"{path.stem}{suffix}{path.suffix}")
    os.replace(path, target)
    return target
