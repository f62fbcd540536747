"""What llama.cpp calls a base model, and how its weights are laid out there.

A text LoRA trained here is in Hugging Face orientation. llama.cpp stores some models
differently, and an adapter for them must be stored the same way:

- Llama and Mistral (llama.cpp architecture `llama`; SmolLM2 is a Llama) keep the rows of
  q_proj/k_proj permuted for its rotary layout (`LlamaModel.permute` in llama.cpp's
  converter). A LoRA's B matrix holds those rows, so it gets the same permutation.
- Qwen2, Qwen3, Gemma, Gemma 2 and Gemma 3 store the attention and MLP projections as HF
  does. Gemma's converter quirks (+1 on the RMSNorm weights, dropping lm_head, trimming
  the vocabulary rows of the embedding) touch only tensors a LoRA adapter may not hold here.

The facts come from the base model: an HF `config.json` (folder or cached hub id) or, for a
GGUF base, the file's own `general.architecture` and head counts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# HF model_type -> llama.cpp architecture name, and whether q/k rows are permuted there.
_ARCHES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "gemma": ("gemma", False),
    "gemma2": ("gemma2", False),
    "gemma3_text": ("gemma3", False),
}
# llama.cpp architecture name -> HF class, for configs that only carry model_type.
HF_CLASSES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_GGUF_ARCHES = {name: permute for name, permute in _ARCHES.values()}


class GGUFExportError(ValueError):
    """The model or adapter cannot be written as GGUF; the message says why, `advice` what to do."""

    def __init__(self, message: str, advice: str = ""):
        super().__init__(message)
        self.advice = advice


@dataclass(frozen=True)
class BaseArch:
    """The base model as llama.cpp sees it."""

    arch: str              # llama.cpp's general.architecture
    n_head: int
    n_head_kv: int
    n_layers: int
    permute_qk: bool       # Llama-style rotary row order for q/k
    source: str            # where the facts came from (for messages)


def supported_architectures() -> list[str]:
    return sorted(_ARCHES)


def _unsupported(what: str, source: str) -> GGUFExportError:
    return GGUFExportError(
        f"GGUF export does not know the architecture '{what}' of {source}.",
        f"Supported: {', '.join(supported_architectures())}. Other models: export the PEFT adapter folder "
        "and convert it with llama.cpp's convert_lora_to_gguf.py.")


def from_hf_config(config: dict[str, Any], source: str = "config.json") -> BaseArch:
    """The architecture facts of an HF `config.json` (as a dict)."""
    model_type = str(config.get("model_type", ""))
    if model_type == "gemma3" and "text_config" in config:  # the multimodal wrapper
        config = {**config, **config["text_config"]}
        model_type = "gemma3_text"
    if model_type not in _ARCHES:
        raise _unsupported(model_type or "(no model_type)", source)
    arch, permute = _ARCHES[model_type]
    heads = int(config["num_attention_heads"])
    return BaseArch(arch=arch, n_head=heads, n_head_kv=int(config.get("num_key_value_heads") or heads),
                    n_layers=int(config["num_hidden_layers"]), permute_qk=permute, source=source)


def gguf_field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def from_gguf(path: str | Path) -> BaseArch:
    """The architecture facts of a GGUF model file (its header; the weights are not read)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHES:
        raise _unsupported(str(arch), str(path))
    heads = int(gguf_field(reader, f"{arch}.attention.head_count"))
    kv = gguf_field(reader, f"{arch}.attention.head_count_kv")
    return BaseArch(arch=arch, n_head=heads, n_head_kv=int(kv) if kv is not None else heads,
                    n_layers=int(gguf_field(reader, f"{arch}.block_count")), permute_qk=_GGUF_ARCHES[arch],
                    source=str(path))


def resolve_base_arch(base: str) -> BaseArch:
    """`base` is a GGUF file, an HF folder (or a folder holding one GGUF), or a cached hub id."""
    from core.models.llm import resolve_source

    path = Path(base).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return from_hf_config(json.loads((path / "config.json").read_text(encoding="utf-8")), str(path))
    source = resolve_source(base)
    if source.is_gguf and Path(source.display).is_file():
        return from_gguf(source.display)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise GGUFExportError(f"Cannot read the base model's config from '{base}': {exc}",
                              "Pass the base model with --base: an HF folder, a .gguf file or a downloaded "
                              "hub id.") from exc
    return from_hf_config(config.to_dict(), base)


def hf_config_for_llama_cpp(base: str) -> dict[str, Any]:
    """The base's HF config as a dict that llama.cpp's converters accept.

    A config derived from a GGUF file has `model_type` but no `architectures`, and
    llama.cpp's converter then fails with "Failed to detect model architecture".
    """
    from transformers import AutoConfig

    from core.models.llm import resolve_source

    source = resolve_source(base)
    kwargs = {"gguf_file": source.gguf_file} if source.is_gguf else {}
    config = AutoConfig.from_pretrained(source.location, **kwargs).to_dict()
    if not config.get("architectures"):
        model_type = str(config.get("model_type", ""))
        if model_type not in HF_CLASSES:
            raise _unsupported(model_type, base)
        config["architectures"] = [HF_CLASSES[model_type]]
    return config


def permute_rows(rows: Any, n_head: int) -> Any:
    """llama.cpp's `LlamaModel.permute` on the first axis (works on numpy arrays and torch tensors)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
