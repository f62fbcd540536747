"""The LoRA tools' file layout (`core.family_api.contract.LoraFileFormat`) of a transformer family whose
WebUI / ComfyUI file is kohya-named native modules: built from the family's own readers and writers,
so each family states only what is its own.

The tools hold a LoRA as kohya-named modules; a fused module (qkv) stays one module, so a resize
finds the best rank of the fused delta, and the files are written with the modules as they are.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.export.kohya import LoraFormatError, save_kohya_lora
from core.families.dit.lora_files import IDENTITY_KEYS
from core.tools.modules import LoraToolError, modules_to_kohya

UNET_PREFIX = "lora_unet_"
Peft = tuple[dict[str, Tensor], dict[str, float]]


def rank_and_alpha(peft: dict[str, Tensor], alphas: dict[str, float]) -> tuple[int, float]:
    """The most common rank and alpha of the unfused modules (what ss_network_dim / _alpha say)."""
    ranks = Counter(int(v.shape[0]) for k, v in peft.items() if k.endswith(".lora_A.weight"))
    return ranks.most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]


def lora_config_of(peft: dict[str, Tensor], alphas: dict[str, float]) -> dict[str, Any]:
    """The LoraConfig dict diffusers reads from `lora_adapter_metadata` (patterns where modules differ)."""
    rank, alpha = rank_and_alpha(peft, alphas)
    ranks = {k[: -len(".lora_A.weight")]: int(v.shape[0]) for k, v in peft.items() if k.endswith(".lora_A.weight")}
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != rank},
            "alpha_pattern": {re.escape(p): alphas[p] for p in ranks if alphas[p] != alpha}}


def tool_metadata(base: Mapping[str, str], metadata: Mapping[str, str], identity_keys: tuple[str, ...]
                  ) -> dict[str, str]:
    """A rewritten file's metadata: the file's own descriptive keys (merged from, title) kept, the
    identity keys from `base`; a resize to an energy ratio keeps kohya's "Dynamic" rank and alpha."""
    kept = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec.")) and not k.startswith("sshs_")}
    merged = {**base, **kept, **{k: base[k] for k in identity_keys}}
    for key in ("ss_network_dim", "ss_network_alpha"):
        if kept.get(key) == "Dynamic":
            merged[key] = "Dynamic"
    return merged


def modules_to_peft(modules: Mapping[str, Any], family: str,
                    kohya_to_peft: Callable[[dict[str, Tensor]], Peft]) -> Peft:
    """The tools' modules -> the diffusers-named PEFT state and alpha per module; DoRA is refused."""
    if any(getattr(m, "dora_scale", None) is not None for m in modules.values()):
        raise LoraToolError(f"A {family} DoRA LoRA cannot be converted here; only plain LoRA modules are.")
    try:
        return kohya_to_peft(modules_to_kohya(modules))
    except LoraFormatError as exc:
        raise LoraToolError(str(exc)) from exc


def variant_identity(kohya_metadata: Callable[..., dict[str, str]], variants: Mapping[str, Any], default: str
                     ) -> Callable[[str, Mapping[str, str], int, float], dict[str, str]]:
    """`identity` of `kohya_tools_format` from the family's `kohya_metadata(variant, *, rank, alpha)`: a variant
    it does not know (`variants`) is written as `default`."""

    def identity(variant: str, metadata: Mapping[str, str], rank: int, alpha: float) -> dict[str, str]:
        return kohya_metadata(variant if variant in variants else default, rank=rank, alpha=alpha)

    return identity


def kohya_tools_format(*, family: str, read_lora: Callable[[Path], tuple[dict, dict, dict]],
                       peft_to_kohya: Callable[..., dict[str, Tensor]],
                       kohya_to_peft: Callable[[dict[str, Tensor]], Peft],
                       identity: Callable[[str, Mapping[str, str], int, float], dict[str, str]],
                       write_diffusers_file: Callable[..., Path],
                       identity_keys: tuple[str, ...] = IDENTITY_KEYS) -> Any:
    """A LoraFileFormat from the family's pieces.

    `identity(variant, metadata, rank, alpha)`: the family's identity keys (family, network, rank / alpha,
    modelspec); of these, `identity_keys` always win over what the file said, the descriptive ones stay.
    """
    from core.family_api.contract import LoraFileFormat

    def to_kohya(path: Path, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        if tensors and all(k.startswith(UNET_PREFIX) for k in tensors):
            return tensors  # a kohya file is kept as it is
        try:
            peft, alphas, _ = read_lora(path)
            return peft_to_kohya(peft, alpha=alphas)
        except LoraFormatError as exc:
            raise LoraToolError(f"'{Path(path).name}': {exc}") from exc

    def write_kohya(modules: dict[str, Any], path: str | Path, *, variant: str, metadata: dict[str, str],
                    dtype: torch.dtype | None) -> Path:
        """The WebUI / ComfyUI file of the modules as they are (a resized fused qkv keeps its one rank)."""
        peft, alphas = modules_to_peft(modules, family, kohya_to_peft)
        rank, alpha = rank_and_alpha(peft, alphas)
        merged = tool_metadata(identity(variant, metadata, rank, alpha), metadata, identity_keys)
        return save_kohya_lora(path, modules_to_kohya(modules), merged, dtype=dtype)

    def write_diffusers(modules: dict[str, Any], folder: str | Path, *, dtype: torch.dtype | None) -> Path:
        peft, alphas = modules_to_peft(modules, family, kohya_to_peft)
        return write_diffusers_file(peft, folder, lora_config=lora_config_of(peft, alphas), dtype=dtype)

    def to_peft(path: Path) -> Peft:
        peft, alphas, _ = read_lora(path)
        return peft, alphas

    return LoraFileFormat(to_kohya=to_kohya, write_kohya=write_kohya, write_diffusers=write_diffusers,
                          to_peft=to_peft)
