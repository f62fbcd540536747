"""A PEFT text LoRA as a GGUF LoRA adapter (llama.cpp `--lora`, Ollama `ADAPTER`, LM Studio).

The file matches what llama.cpp's own `convert_lora_to_gguf.py` writes for the same adapter
(tests/text/test_gguf_export.py compares them tensor for tensor): `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, the base's `general.architecture`, and per
module `blk.N.<name>.weight.lora_a` (rank x in) and `.lora_b` (out x rank), in llama.cpp's
tensor names and layout (see core/export/gguf_arch.py for the q/k permutation).

llama.cpp scales every module by `alpha / rank`. Where PEFT scales differently (rsLoRA's
`alpha / sqrt(rank)`, per-module `alpha_pattern`), the difference is folded into `lora_b`
so the adapter does in llama.cpp what it did in training; llama.cpp's converter ignores
those settings. Adapters llama.cpp cannot apply are refused with what to do instead:
LoRA on the embeddings or the output head, DoRA, LoRA biases.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_path
from core.export.gguf_arch import BaseArch, GGUFExportError, permute_rows, resolve_base_arch

OUT_TYPES = ("f32", "f16")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_MERGE_ADVICE = ("Bake the adapter into the model instead, which llama.cpp runs unchanged: "
                 "`python tools/export.py merge --base BASE --lora ADAPTER --output model.gguf`.")


@dataclass
class AdapterExport:
    """What was written, for the CLI and the Tools tab."""

    path: Path
    arch: str
    alpha: float
    modules: int
    rescaled: list[str] = field(default_factory=list)  # modules whose PEFT scale is folded into lora_b
    seconds: float = 0.0

    def summary(self) -> str:
        note = f"; PEFT scaling folded into {len(self.rescaled)} modules" if self.rescaled else ""
        return (f"{self.modules} modules, architecture {self.arch}, alpha {self.alpha:g}{note}, "
                f"{self.path.stat().st_size / 1e6:.2f} MB in {self.seconds:.1f} s")


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The adapter's config and its tensors as float32 numpy arrays."""
    from safetensors.numpy import load_file

    root = Path(folder)
    config_path = root / "adapter_config.json"
    weights = root / "adapter_model.safetensors"
    if not config_path.is_file():
        raise GGUFExportError(f"'{folder}' is not a PEFT adapter folder (no adapter_config.json).")
    if not weights.is_file():
        raise GGUFExportError(f"'{folder}' has no adapter_model.safetensors.",
                              "Pickled adapter_model.bin files are not read; save the adapter as safetensors.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    try:
        tensors = load_file(str(weights))
    except TypeError:  # bf16 has no numpy dtype: go through torch
        from safetensors.torch import load_file as load_torch

        tensors = {k: v.float().numpy() for k, v in load_torch(str(weights)).items()}
    return config, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def _refuse_unsupported(config: dict[str, Any], keys: list[str]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise GGUFExportError(f"This is a {config.get('peft_type')} adapter; GGUF adapters hold plain LoRA only.",
                              _MERGE_ADVICE)
    if config.get("use_dora") or any("lora_magnitude_vector" in k for k in keys):
        raise GGUFExportError("This is a DoRA adapter: llama.cpp applies only the low-rank part and would ignore "
                              "the learned magnitudes, so the model would not behave as trained.", _MERGE_ADVICE)
    if config.get("lora_bias") or any(k.endswith("lora_B.bias") for k in keys):
        raise GGUFExportError("This adapter trains LoRA biases, which llama.cpp adapters cannot hold.", _MERGE_ADVICE)
    touched = sorted({part for k in keys for part in ("embed_tokens", "lm_head") if f".{part}" in k})
    if touched:
        raise GGUFExportError(
            f"The adapter changes {' and '.join(touched)} (token embeddings / output head), which llama.cpp "
            "refuses in a LoRA adapter (llama.cpp PR #9948).",
            "Train without those modules in target_modules / modules_to_save, or " + _MERGE_ADVICE[0].lower()
            + _MERGE_ADVICE[1:])
    strays = [k for k in keys if not _KEY.match(k)]
    if strays:
        raise GGUFExportError(f"Unexpected tensors in the adapter (not lora_A/lora_B weights): {', '.join(strays[:5])}",
                              _MERGE_ADVICE)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches pattern keys against the end of the module name (peft.utils.get_pattern_key).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def peft_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """The factor PEFT multiplies B @ A by for `module`."""
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def adapter_tensors(config: dict[str, Any], tensors: dict[str, np.ndarray],
                    base: BaseArch) -> tuple[dict[str, np.ndarray], float, list[str]]:
    """llama.cpp's tensors for the adapter: {gguf name: array}, the alpha to record, rescaled modules."""
    import gguf

    _refuse_unsupported(config, list(tensors))
    arch_enum = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[base.arch]
    names = gguf.get_tensor_name_map(arch_enum, base.n_layers)
    alpha = float(config.get("lora_alpha", 8))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        assert match is not None  # _refuse_unsupported checked every key
        pairs.setdefault(match["module"], {})[match["ab"]] = value
    out: dict[str, np.ndarray] = {}
    rescaled: list[str] = []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise GGUFExportError(f"The adapter has lora_{'B' if 'A' in pair else 'A'} missing for {module}.")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise GGUFExportError(f"llama.cpp has no '{base.arch}' tensor for the adapted module {module}.",
                                  _MERGE_ADVICE)
        lora_a, lora_b = pair["A"], pair["B"]
        rank = lora_a.shape[0]
        factor = peft_scale(config, module, rank) / (alpha / rank)
        if not math.isclose(factor, 1.0, rel_tol=1e-6):
            lora_b = lora_b * np.float32(factor)
            rescaled.append(module)
        if base.permute_qk and target.endswith(".attn_q.weight"):
            lora_b = permute_rows(lora_b, base.n_head)
        elif base.permute_qk and target.endswith(".attn_k.weight"):
            lora_b = permute_rows(lora_b, base.n_head_kv)
        out[target + ".lora_a"] = np.ascontiguousarray(lora_a)
        out[target + ".lora_b"] = np.ascontiguousarray(lora_b)
    if not out:
        raise GGUFExportError("The adapter holds no LoRA tensors.")
    return out, alpha, rescaled


def write_gguf_adapter(adapter_dir: str | Path, output: str | Path, *, base: str = "",
                       out_type: str = "f32") -> AdapterExport:
    """Write the PEFT adapter in `adapter_dir` as a GGUF LoRA adapter at `output`.

    `base` (an HF folder, a .gguf file or a hub id) defaults to the adapter's
    `base_model_name_or_path`; it supplies the architecture and head counts.
    """
    import gguf

    started = time.perf_counter()
    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"out_type must be one of {', '.join(OUT_TYPES)}, not {out_type!r}.")
    config, tensors = read_adapter(adapter_dir)
    base_name = base or str(config.get("base_model_name_or_path") or "")
    if not base_name:
        raise GGUFExportError("The adapter does not name its base model.", "Pass the base model with --base.")
    arch = resolve_base_arch(base_name)
    out, alpha, rescaled = adapter_tensors(config, tensors, arch)
    target = Path(output)
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_name(Path(adapter_dir).resolve().name)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, value in out.items():
            if out_type == "f16":
                writer.add_tensor(name, value.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
            else:
                writer.add_tensor(name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return AdapterExport(path=target, arch=arch.arch, alpha=alpha, modules=len(out) // 2, rescaled=rescaled,
                         seconds=time.perf_counter() - started)
