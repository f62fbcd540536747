"""The kohya / WebUI / ComfyUI LoRA file: PEFT state dicts <-> `lora_unet_...` keys, and saving it.

What a module looks like in the file (as sd-scripts' networks/lora.py writes it):
  <prefix>_<module path, dots as underscores>.lora_down.weight   [rank, in] (conv: [rank, in, kh, kw])
  <prefix>_<...>.lora_up.weight                                   [out, rank] (conv: [out, rank, 1, 1])
  <prefix>_<...>.alpha                                            0-dim; scale = alpha / rank
  <prefix>_<...>.dora_scale                                       DoRA magnitude (see below)
Prefixes: `lora_unet`, `lora_te` (SD 1.x/2.x), `lora_te1` / `lora_te2` (SDXL). SD 1.x/2.x UNet
paths are diffusers names, SDXL UNet paths are sgm names (core.export.sgm_names).

PEFT's `lora_A` is `lora_down`, `lora_B` is `lora_up`; the tensors themselves are identical
(also for conv layers). PEFT scales by alpha / rank (rsLoRA: alpha / sqrt(rank)); the file
stores the alpha that gives the same scale under alpha / rank.

DoRA: PEFT keeps one magnitude per OUTPUT channel (the norm of each row of W + dW). The
file gets it as `dora_scale` of shape [out, 1] (conv: [out, 1, 1, 1]): the LyCORIS
`wd_on_output=True` layout, which LyCORIS applies exactly this way and which ComfyUI
recognises by its shape. AUTOMATIC1111 WebUI (network.py `apply_weight_decompose`) only
implements the per-INPUT layout [1, in]; no reshaping turns one into the other, and
diffusers drops `dora_scale` on load (it then applies the plain LoRA part).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from core.atomic import save_file_atomic
from core.family_api.registry import UNET_FAMILIES, family_info
from core.export.sgm_names import (
    ModuleNameError,
    diffusers_to_sgm,
    path_to_underscored,
    sgm_to_diffusers,
    underscored_to_path,
)

# The UNet families this converter serves (FLUX/Chroma files: core.families.flux.lora_files).
FAMILIES: tuple[str, ...] = UNET_FAMILIES
UNET_PREFIX = "lora_unet"
KOHYA_KEY_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# PEFT component names as diffusers' pipelines call them (also used as alpha-key prefixes).
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")

_PEFT_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)"
                       r"(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?(?:\.weight)?$")
_KOHYA_KEY = re.compile(r"^(?P<name>[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")
_CLIP_ROOTS = ("encoder", "embeddings", "final_layer_norm")


class LoraFormatError(ValueError):
    """A LoRA state dict or file that cannot be converted; the message says which key and why."""


def text_encoder_prefixes(family: str) -> tuple[str, ...]:
    """kohya prefixes of the text encoders, in pipeline order."""
    _check_family(family)
    return family_info(family).kohya_te_prefixes


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise LoraFormatError(f"Unknown model family '{family}'; expected one of {', '.join(FAMILIES)}.")


def group_peft_state_dict(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{module path: {"A": lora_A, "B": lora_B, "magnitude": ...}} from a PEFT LoRA state dict."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        # A PeftModel's own state dict is prefixed; diffusers' add_adapter models are not.
        key = key.removeprefix("base_model.model.")
        m = _PEFT_KEY.match(key)
        if not m:
            raise LoraFormatError(
                f"'{key}' is not a LoRA weight PEFT writes (lora_A / lora_B / lora_magnitude_vector); "
                "LoRA biases and modules_to_save cannot go into a kohya file.")
        part = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "magnitude"}[m["part"]]
        modules.setdefault(m["module"], {})[part] = value
    for module, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise LoraFormatError(f"LoRA module '{module}' has only {sorted(parts)}; both lora_A and lora_B are needed.")
        down, up = parts["A"], parts["B"]
        if down.shape[0] != up.shape[1]:
            raise LoraFormatError(f"LoRA module '{module}': lora_A rank {down.shape[0]} != lora_B rank {up.shape[1]}.")
    return modules


def canonical_text_encoder_path(path: str) -> str:
    """CLIP module path as sd-scripts names it (`text_model.encoder...`).

    transformers 5 builds CLIPTextModel without the `text_model` wrapper (CLIPTextModelWithProjection
    keeps it), so the same layer can be `encoder.layers.0...` or `text_model.encoder.layers.0...`.
    """
    if path.split(".", 1)[0] in _CLIP_ROOTS:
        return "text_model." + path
    return path


def magnitude_to_dora_scale(magnitude: Tensor, up: Tensor) -> Tensor:
    """PEFT magnitude ([out] linear, [1, out, 1, 1] conv) -> dora_scale [out, 1(, 1, 1)]."""
    out = up.shape[0]
    if magnitude.numel() != out:
        raise LoraFormatError(f"DoRA magnitude has {magnitude.numel()} values for a layer with {out} outputs.")
    return magnitude.reshape((out,) + (1,) * (up.dim() - 1))


def dora_scale_to_magnitude(scale: Tensor, up: Tensor, name: str) -> Tensor:
    """dora_scale [out, 1(, 1, 1)] -> PEFT magnitude; the per-input layout has no PEFT equivalent."""
    out = up.shape[0]
    if scale.numel() != out or scale.shape[0] != out:
        raise LoraFormatError(
            f"'{name}.dora_scale' has shape {tuple(scale.shape)}: that is the per-input DoRA layout "
            f"(LyCORIS wd_on_output=False); PEFT's DoRA keeps one magnitude per output ({out}), so this "
            "file cannot be continued or converted exactly. Train it on as plain LoRA or re-train with DoRA here.")
    if up.dim() == 2:
        return scale.reshape(out)
    return scale.reshape((1, out) + (1,) * (up.dim() - 2))


def _alpha_for(component: str, path: str, alphas: dict[str, float], default_alpha: float | None) -> float:
    for key in (f"{component}.{path}", path):
        if key in alphas:
            return float(alphas[key])
    if default_alpha is not None:
        return float(default_alpha)
    raise LoraFormatError(f"No alpha given for LoRA module '{component}.{path}' (pass it in `alphas`).")


def peft_to_kohya(unet_lora: dict[str, Tensor], text_encoder_loras: list[dict[str, Tensor]], family: str,
                  *, alphas: dict[str, float], default_alpha: float | None = None,
                  use_rslora: bool = False) -> dict[str, Tensor]:
    """PEFT state dicts of the UNet and text encoder(s) -> one kohya state dict.

    `alphas` maps a module path (as in the PEFT keys, without `.lora_A.weight`) to its alpha; a key
    may be prefixed with `unet.` / `text_encoder.` / `text_encoder_2.` where paths repeat across
    components (SDXL's two CLIPs). `kohya_alphas_from_model` reads them off a live PEFT model.
    With `use_rslora` the PEFT scale is alpha / sqrt(rank) and the stored alpha is alpha * sqrt(rank).
    """
    _check_family(family)
    te_prefixes = text_encoder_prefixes(family)
    if len(text_encoder_loras) > len(te_prefixes):
        raise LoraFormatError(f"{family} has {len(te_prefixes)} text encoder(s); got {len(text_encoder_loras)} LoRA dicts.")
    jobs = [("unet", UNET_PREFIX, unet_lora or {})]
    jobs += [(TEXT_ENCODER_NAMES[i], te_prefixes[i], sd or {}) for i, sd in enumerate(text_encoder_loras)]
    out: dict[str, Tensor] = {}
    for component, prefix, state in jobs:
        for path, parts in group_peft_state_dict(state).items():
            if component == "unet":
                name_path = diffusers_to_sgm(path) if family_info(family).sgm_unet_names else path
            else:
                name_path = canonical_text_encoder_path(path)
            name = f"{prefix}_{path_to_underscored(name_path)}"
            if f"{name}.lora_down.weight" in out:
                raise LoraFormatError(f"Two LoRA modules map to the same kohya name '{name}'.")
            down, up = parts["A"], parts["B"]
            rank = down.shape[0]
            alpha = _alpha_for(component, path, alphas, default_alpha)
            if use_rslora:
                alpha *= math.sqrt(rank)
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            if "magnitude" in parts:
                out[f"{name}.dora_scale"] = magnitude_to_dora_scale(parts["magnitude"], up)
    return out


def _kohya_name_to_path(prefix: str, rest: str, family: str) -> str:
    path = underscored_to_path(rest)
    if prefix != UNET_PREFIX:
        return canonical_text_encoder_path(path)
    is_sgm = path.split(".", 1)[0] in {"input_blocks", "middle_block", "output_blocks", "time_embed",
                                        "label_emb", "out"}
    if family_info(family).sgm_unet_names and is_sgm:
        return sgm_to_diffusers(path)
    if is_sgm:
        raise LoraFormatError(f"'lora_unet_{rest}' uses SDXL/sgm block names, but the model family is {family}.")
    return path


def kohya_to_peft(tensors: dict[str, Tensor], family: str
                  ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]], dict[str, float]]:
    """A kohya state dict -> (UNet PEFT dict, [text encoder PEFT dicts], alphas).

    Alphas are keyed `unet.<path>` / `text_encoder.<path>` / `text_encoder_2.<path>` (a module without
    an `.alpha` gets alpha = rank, as kohya defines). Text encoder paths come as `text_model.encoder...`;
    `fit_keys_to_model` adapts them to a model built without the `text_model` wrapper.
    """
    _check_family(family)
    te_prefixes = text_encoder_prefixes(family)
    prefixes = (UNET_PREFIX,) + te_prefixes
    components = ("unet",) + TEXT_ENCODER_NAMES[:len(te_prefixes)]
    grouped: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in tensors.items():
        m = _KOHYA_KEY.match(key)
        if not m:
            raise LoraFormatError(
                f"'{key}' is not a kohya LoRA key (lora_down/lora_up/alpha/dora_scale); LoHa, LoKr, "
                "Tucker (lora_mid) and other LyCORIS types cannot be converted to PEFT LoRA.")
        name = m["name"]
        for index, prefix in sorted(enumerate(prefixes), key=lambda p: -len(p[1])):
            if name.startswith(prefix + "_"):
                grouped.setdefault((index, name[len(prefix) + 1:]), {})[m["part"]] = value
                break
        else:
            raise LoraFormatError(f"'{key}' does not start with any of {', '.join(prefixes)} (family {family}).")
    unet: dict[str, Tensor] = {}
    tes: list[dict[str, Tensor]] = [{} for _ in te_prefixes]
    alphas: dict[str, float] = {}
    for (index, rest), parts in grouped.items():
        prefix = prefixes[index]
        name = f"{prefix}_{rest}"
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraFormatError(f"'{name}' lacks lora_down or lora_up.")
        try:
            path = _kohya_name_to_path(prefix, rest, family)
        except ModuleNameError as exc:
            raise LoraFormatError(f"'{name}': {exc}") from exc
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        target = unet if index == 0 else tes[index - 1]
        target[f"{path}.lora_A.weight"] = down
        target[f"{path}.lora_B.weight"] = up
        if "dora_scale" in parts:
            target[f"{path}.lora_magnitude_vector"] = dora_scale_to_magnitude(parts["dora_scale"], up, name)
        alpha = parts.get("alpha")
        alphas[f"{components[index]}.{path}"] = float(alpha.item()) if alpha is not None else float(down.shape[0])
    return unet, tes, alphas


def fit_keys_to_model(peft_state: dict[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """Add or drop the `text_model.` wrapper in PEFT keys so they match `model`'s module names."""
    has_wrapper = any(name == "text_model" for name, _ in model.named_children())
    fitted: dict[str, Tensor] = {}
    for key, value in peft_state.items():
        if has_wrapper and key.split(".", 1)[0] in _CLIP_ROOTS:
            key = "text_model." + key
        elif not has_wrapper and key.startswith("text_model."):
            key = key[len("text_model."):]
        fitted[key] = value
    return fitted


def kohya_alphas_from_model(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """{module path: alpha} of a PEFT-wrapped model, as alpha / rank would need it (rsLoRA included).

    Read from each LoRA layer's own `scaling` and rank, so rank_pattern / alpha_pattern and rsLoRA
    come out right without re-implementing PEFT's pattern matching.
    """
    alphas: dict[str, float] = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        ranks = getattr(module, "r", None)
        if not isinstance(scaling, dict) or not isinstance(ranks, dict) or adapter_name not in scaling:
            continue
        for strip in ("base_model.model.", "base_model."):
            if name.startswith(strip):
                name = name[len(strip):]
                break
        alphas[name] = float(scaling[adapter_name]) * float(ranks[adapter_name])
    return alphas


# ---------------------------------------------------------------------------------------------
# Writing the file
# ---------------------------------------------------------------------------------------------

def addnet_hash_safetensors(data: bytes | io.BufferedIOBase) -> str:
    """SHA-256 of everything after the safetensors header: WebUI's / sd-scripts' `sshs_model_hash`."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    stream.seek(0)
    header_len = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_len)
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def addnet_hash_legacy(data: bytes) -> str:
    """sd-webui-additional-networks' old hash: 64 KiB at offset 1 MiB, first 8 hex digits."""
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def file_model_hash(path: str | Path) -> str:
    """`sshs_model_hash` as WebUI computes it from a file on disk."""
    with open(path, "rb") as handle:
        return addnet_hash_safetensors(handle)


def _prepare_tensors(tensors: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    prepared: dict[str, Tensor] = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu")
        # alpha stays fp32: it is a scale, and an rsLoRA alpha such as 16*sqrt(8) does not fit fp16.
        if dtype is not None and not key.endswith(".alpha") and value.is_floating_point():
            value = value.to(dtype)
        prepared[key] = value.contiguous()
    return prepared


def _stringify_metadata(metadata: dict[str, object]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, (dict, list, tuple)):
            out[key] = json.dumps(value, ensure_ascii=False)
        else:
            out[key] = str(value)
    return out


def save_kohya_lora(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str],
                    dtype: torch.dtype | None = torch.float16) -> Path:
    """Write a kohya LoRA .safetensors atomically, with `sshs_model_hash` / `sshs_legacy_hash`.

    The hashes are computed as sd-scripts' `precalculate_safetensors_hashes` does (tensors serialised
    with the `ss_*` metadata only); the model hash covers only the tensor bytes, so it equals what
    WebUI computes from the written file. `dtype=None` keeps each tensor's dtype.
    """
    from safetensors.torch import save as safetensors_save

    if not tensors:
        raise LoraFormatError(f"Nothing to save to {path}: the LoRA has no tensors.")
    prepared = _prepare_tensors(tensors, dtype)
    meta = _stringify_metadata(dict(metadata))
    training_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    data = safetensors_save(prepared, metadata=training_only or None)
    meta["sshs_model_hash"] = addnet_hash_safetensors(data)
    meta["sshs_legacy_hash"] = addnet_hash_legacy(data)
    target = save_file_atomic(prepared, path, metadata=meta)
    written = file_model_hash(target)
    if written != meta["sshs_model_hash"]:  # the tensor bytes must not depend on the header
        raise OSError(f"{target}: the written file hashes to {written}, expected {meta['sshs_model_hash']}.")
    return target


def load_kohya_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors LoRA (never unpickles anything)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path}: only .safetensors LoRA files are read (pickled .ckpt/.pt/.bin are refused).")
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    return tensors, metadata
