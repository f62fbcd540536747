"""Make a LoRA from the difference of two models (a fine-tune minus its base), and resize LoRA files.

SD: both models load with the project's loader (single file / diffusers folder / hub id); the
UNet and text-encoder Linear layers (and, with `conv_rank`, the convolutions) that differ become
a kohya/WebUI LoRA file. LLM: two HF folders (or GGUF files) become a PEFT adapter folder.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.tools.convert import LoraFile, read_lora, write_like
from core.tools.modules import LoraModule, LoraToolError
from core.tools.resize import ExtractReport, ResizeReport, extract_modules, resize_modules


def layer_weights(model: nn.Module, *, convs: bool) -> dict[str, torch.Tensor]:
    """{module path: weight} of the Linear (and Conv2d) layers a LoRA can adapt."""
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d) if convs else (nn.Linear,)
    return {name: module.weight.detach() for name, module in model.named_modules()
            if isinstance(module, kinds) and name}


def _to_kohya_modules(component_modules: dict[str, dict[str, LoraModule]], family: str) -> dict[str, LoraModule]:
    from core.export.kohya import peft_to_kohya
    from core.tools.modules import modules_from_kohya

    states: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for component, modules in component_modules.items():
        state = states.setdefault(component, {})
        for path, module in modules.items():
            state[f"{path}.lora_A.weight"] = module.down
            state[f"{path}.lora_B.weight"] = module.up
            alphas[f"{component}.{path}"] = module.alpha
    tes = [states.get("text_encoder", {})] + ([states["text_encoder_2"]] if states.get("text_encoder_2") else [])
    return modules_from_kohya(peft_to_kohya(states.get("unet", {}), tes, family, alphas=alphas))


def extract_sd(base_model: str, tuned_model: str, output: str | Path, *, rank: int, conv_rank: int = 0,
               energy: float | None = None, dtype: torch.dtype | None = torch.float16, model_config: str = "",
               allow_pickle: bool = False) -> tuple[Path, ExtractReport]:
    """A kohya LoRA of `tuned_model - base_model` (both SD of the same family)."""
    from core.tools.merge import open_base_weights

    base = open_base_weights(base_model, allow_pickle=allow_pickle, model_config=model_config)
    tuned = open_base_weights(tuned_model, allow_pickle=allow_pickle, model_config=model_config)
    if base.family != tuned.family:
        raise LoraToolError(f"'{base_model}' is {base.family} but '{tuned_model}' is {tuned.family}: "
                            "a LoRA can only be extracted between two models of one family.")
    pairs = [(name, module, tuned.components[name]) for name, module in base.components.items()
             if name in tuned.components]
    found: dict[str, dict[str, LoraModule]] = {}
    report = ExtractReport()
    for component, before, after in pairs:
        convs = component == "unet" and conv_rank > 0
        modules, part = extract_modules(layer_weights(before, convs=convs), layer_weights(after, convs=convs),
                                        rank=rank, conv_rank=conv_rank or None, energy=energy)
        found[component] = modules
        report.modules += part.modules
        report.skipped_same += [f"{component}.{n}" for n in part.skipped_same]
    if not any(found.values()):
        raise LoraToolError(f"'{tuned_model}' and '{base_model}' have the same weights: there is nothing to extract.")
    lora = LoraFile("kohya", base.family, _to_kohya_modules(found, base.family), {
        "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
        "ss_sd_model_name": Path(str(base_model)).name, "ss_output_name": Path(str(output)).stem,
        "ss_extracted_from": Path(str(tuned_model)).name})
    return write_like(lora, output, dtype=dtype), report


def extract_llm(base_model: str, tuned_model: str, output: str | Path, *, rank: int, energy: float | None = None,
                dtype: torch.dtype | None = None, allow_pickle: bool = False) -> tuple[Path, ExtractReport]:
    """A PEFT adapter folder of `tuned_model - base_model` (two causal LMs of one architecture)."""
    from core.models.llm import load_llm

    base, _, _ = load_llm(base_model, allow_pickle=allow_pickle, with_tokenizer=False)
    tuned, _, _ = load_llm(tuned_model, allow_pickle=allow_pickle, with_tokenizer=False)
    skip = {name for name, module in base.named_modules() if module is base.get_output_embeddings()}
    before = {k: v for k, v in layer_weights(base, convs=False).items() if k not in skip}
    after = {k: v for k, v in layer_weights(tuned, convs=False).items() if k not in skip}
    modules, report = extract_modules(before, after, rank=rank, energy=energy)
    if not modules:
        raise LoraToolError(f"'{tuned_model}' and '{base_model}' have the same weights: there is nothing to extract.")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False}
    lora = LoraFile("peft", "llm", {f"base_model.model.{k}": m for k, m in modules.items()}, {}, config)
    return write_like(lora, output, dtype=dtype), report


def resize_file(source: str | Path, output: str | Path, *, rank: int | None = None, energy: float | None = None,
                max_rank: int | None = None, dtype: torch.dtype | None = torch.float16,
                allow_pickle: bool = False) -> tuple[Path, ResizeReport]:
    """Resize a LoRA file (any format) and write it in the same format; returns (path, report)."""
    lora = read_lora(source, allow_pickle=allow_pickle)
    lora.modules, report = resize_modules(lora.modules, rank=rank, energy=energy, max_rank=max_rank or rank)
    extra = {"ss_resized_from": Path(str(source)).name}
    if len({m.rank for m in lora.modules.values()}) > 1 and energy is not None:
        extra["ss_network_dim"] = "Dynamic"  # as kohya's resize_lora.py marks per-module ranks
        extra["ss_network_alpha"] = "Dynamic"
    if lora.is_image:
        return write_like(lora, output, dtype=dtype, metadata=extra), report
    return write_like(lora, output, dtype=dtype), report
