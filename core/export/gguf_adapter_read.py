"""A GGUF LoRA adapter (llama.cpp's format: ours, or one from llama.cpp's converter) back onto a
transformers model, so the Test tab can chat with the file users give llama.cpp or Ollama.

The inverse of `core.export.gguf_adapter`: llama.cpp's tensor names are mapped back to the
model's module names (through the `gguf` package's own name table), the q/k rows of Llama-style
models are put back in Hugging Face's order, and every module gets llama.cpp's scale
`alpha / rank` (PEFT's default scaling with that alpha and the module's rank).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from core.export.gguf_arch import BaseArch, GGUFExportError, from_hf_config, gguf_field


def read_gguf_adapter(path: str | Path) -> tuple[str, float, dict[str, np.ndarray]]:
    """(llama.cpp architecture, alpha, {tensor name: float32 array}) of a GGUF LoRA adapter file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    if gguf_field(reader, "general.type") != "adapter" or gguf_field(reader, "adapter.type") != "lora":
        raise GGUFExportError(f"{Path(path).name} is not a GGUF LoRA adapter (general.type is not 'adapter').",
                              "Choose the .lora.gguf file written by Tools > GGUF, or a text adapter folder.")
    tensors = {}
    for tensor in reader.tensors:
        tensors[tensor.name] = np.array(tensor.data, dtype=np.float32)  # already in numpy's axis order
    return str(gguf_field(reader, "general.architecture")), float(gguf_field(reader, "adapter.lora.alpha")), tensors


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's `LlamaModel.permute` on the first axis."""
    shape = rows.shape
    return rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def peft_state(model: Any, path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The LoraConfig arguments and the PEFT state dict (numpy) that give `model` the adapter at `path`."""
    import gguf

    arch, alpha, tensors = read_gguf_adapter(path)
    base: BaseArch = from_hf_config(model.config.to_dict(), "the loaded model")
    if base.arch != arch:
        raise GGUFExportError(f"{Path(path).name} is an adapter for a '{arch}' model; the base model is '{base.arch}'.")
    arch_enum = {name: value for value, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, base.n_layers)
    modules = {}
    for name, module in model.named_modules():
        if hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 2:
            target = names.get_name(name + ".weight", try_suffixes=(".weight",))
            if target is not None:
                modules[target] = name
    state: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for key, value in tensors.items():
        target, _, part = key.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            continue
        module = modules.get(target)
        if module is None:
            raise GGUFExportError(f"{Path(path).name} adapts {target}, which this {arch} model does not have.")
        if part == "lora_b" and base.permute_qk and target.endswith(".attn_q.weight"):
            value = unpermute_rows(value, base.n_head)
        elif part == "lora_b" and base.permute_qk and target.endswith(".attn_k.weight"):
            value = unpermute_rows(value, base.n_head_kv)
        state[f"base_model.model.{module}.lora_{'A' if part == 'lora_a' else 'B'}.weight"] = value
        if part == "lora_a":
            ranks[module] = int(value.shape[0])
    if not ranks:
        raise GGUFExportError(f"{Path(path).name} holds no LoRA tensors.")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
              "rank_pattern": {m: r for m, r in ranks.items() if r != rank}, "lora_dropout": 0.0}
    return config, state


def apply_gguf_adapter(model: Any, path: str | Path) -> Any:
    """`model` (a transformers causal LM) wrapped as a PeftModel with the GGUF adapter's weights."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config, state = peft_state(model, path)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **config))
    dtype = next(model.parameters()).dtype
    result = set_peft_model_state_dict(peft_model, {k: torch.from_numpy(v).to(dtype) for k, v in state.items()})
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise GGUFExportError(f"{Path(path).name} did not fill {len(missing)} LoRA weights, e.g. {missing[0]}.")
    return peft_model
