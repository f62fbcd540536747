"""LoRA on modules a native checkpoint fuses and diffusers keeps apart (qkv), both ways, exactly.

A native module (what ComfyUI / WebUI / kohya-style trainers name) may be made of several diffusers
modules, rows stacked in a fixed order (qkv = to_q | to_k | to_v). A fused LoRA is exact:
down = [A_1; ...; A_k] (rank k*r), up = blockdiag(B_1, ..., B_k) and alpha_fused = alpha * k, so
alpha / rank (and every row of dW) is unchanged. Parts whose scales differ (alpha_pattern,
rank_pattern) get the ratio folded into their up block. The family says which native module a
diffusers path belongs to (`module_for`) and what a kohya name is (`module_from`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from core.export.kohya import LoraFormatError
from core.families.dit.lora_files import alpha_of

UNET_PREFIX = "lora_unet_"
Member = tuple[Tensor, Tensor, float]  # (A, B, scale = alpha / rank, or / sqrt(rank) for rsLoRA)


class FusedModule(Protocol):
    """One native module and the diffusers modules it is made of, in native row order."""

    native: str
    parts: tuple[str, ...]

    @property
    def kohya_name(self) -> str: ...
    @property
    def is_fused(self) -> bool: ...
    @property
    def swaps_halves(self) -> bool: ...
    def part_rows(self, in_features: int) -> list[int]: ...


@dataclass(frozen=True)
class NativeModule:
    """A native module whose parts each map the input width to itself (q, k, v)."""

    native: str              # "joint_blocks.0.x_block.attn.qkv"
    parts: tuple[str, ...]   # ("transformer_blocks.0.attn.to_q", ...)

    @property
    def kohya_name(self) -> str:
        return UNET_PREFIX + self.native.replace(".", "_")

    @property
    def is_fused(self) -> bool:
        return len(self.parts) > 1

    @property
    def swaps_halves(self) -> bool:
        return False

    def part_rows(self, in_features: int) -> list[int]:
        return [in_features] * len(self.parts)


def swap_halves(weight: Tensor) -> Tensor:
    """(a, b) -> (b, a) along the rows (a modulation Linear's (shift, scale) <-> (scale, shift)). Its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def fuse(module: FusedModule, members: dict[int, Member]) -> tuple[Tensor, Tensor, float]:
    """(down, up, alpha) of one native module from its diffusers parts {index among the parts: member}."""
    if not module.is_fused:
        down, up, scale = members[0]
        rank = down.shape[0]
        if module.swaps_halves:
            up = swap_halves(up)
        # An unfused module keeps its alpha as it is (folding it into up would make the file differ
        # from what was trained).
        return down, up, scale * rank
    in_features = {a.shape[1] for a, _, _ in members.values()}
    if len(in_features) != 1:
        raise LoraFormatError(f"{module.native}: its parts read inputs of different widths {sorted(in_features)}.")
    rows = module.part_rows(in_features.pop())
    for index, (_, b, _) in members.items():
        if b.shape[0] != rows[index]:
            raise LoraFormatError(f"{module.parts[index]}: {b.shape[0]} output rows, but {module.native} needs "
                                  f"{rows[index]} there (the transformer's own shape).")
    present = sorted(members)
    ref_scale = members[present[0]][2]
    total_rank = sum(members[i][0].shape[0] for i in present)
    dtype = torch.result_type(members[present[0]][1], members[present[-1]][1])
    up = torch.zeros(sum(rows), total_rank, dtype=dtype, device=members[present[0]][1].device)
    col = 0
    for index in present:
        down_i, up_i, scale_i = members[index]
        row = sum(rows[:index])
        rank_i = down_i.shape[0]
        # A part that was not trained keeps zero rows: its dW is zero, as in the diffusers model.
        up[row:row + rows[index], col:col + rank_i] = up_i if scale_i == ref_scale else up_i * (scale_i / ref_scale)
        col += rank_i
    down = torch.cat([members[i][0] for i in present], dim=0)
    return down, up, ref_scale * total_rank


def split(module: FusedModule, down: Tensor, up: Tensor, alpha: float) -> list[tuple[str, Tensor, Tensor, float]]:
    """(diffusers path, A, B, alpha) of each part of one native module; the sum of their dW is the module's."""
    if not module.is_fused:
        return [(module.parts[0], down.clone(), swap_halves(up) if module.swaps_halves else up.clone(), alpha)]
    rank = down.shape[0]
    rows = module.part_rows(down.shape[1])
    if up.shape[0] != sum(rows):
        raise LoraFormatError(f"{module.kohya_name}: lora_up has {up.shape[0]} rows, expected {sum(rows)} "
                              f"({' + '.join(map(str, rows))}) for input width {down.shape[1]}.")
    starts = [sum(rows[:i]) for i in range(len(rows))]
    blocks = [up[s:s + n] for s, n in zip(starts, rows)]
    k = len(module.parts)
    # 1. Equal ranks, block diagonal: what `fuse` and sd-scripts' converters write. Exact.
    if rank % k == 0:
        r = rank // k
        mask = torch.ones(k, rank, dtype=torch.bool)
        for i in range(k):
            mask[i, i * r:(i + 1) * r] = False
        if all(not blocks[i][:, mask[i]].any() for i in range(k)):
            return [(module.parts[i], down[i * r:(i + 1) * r].clone(), blocks[i][:, i * r:(i + 1) * r].clone(),
                     alpha / k) for i in range(k)]
    # 2. Parts use disjoint rank columns (ranks differ, or a part was not trained). Exact;
    #    a part without any column had dW = 0 and is left out.
    support = [(b != 0).any(dim=0) for b in blocks]
    stacked = torch.stack(support)
    if stacked.any() and bool((stacked.sum(dim=0) <= 1).all()):
        scale = alpha / rank
        out = []
        for i, cols in enumerate(support):
            idx = cols.nonzero().flatten()
            if idx.numel():
                out.append((module.parts[i], down[idx].clone(), blocks[i][:, idx].clone(), scale * idx.numel()))
        return out
    # 3. Trained fused (any other trainer): every part keeps the whole down and its own rows of up.
    return [(module.parts[i], down.clone(), blocks[i].clone(), alpha) for i in range(k)]


def fused_kohya_tensors(modules: Mapping[str, Mapping[str, Tensor]],
                        module_for: Callable[[str], tuple[FusedModule, int]], *,
                        alpha: float | Mapping[str, float], use_rslora: bool = False) -> dict[str, Tensor]:
    """kohya tensors (lora_down / lora_up / alpha per native module) of {diffusers path: {"A", "B"}}."""
    groups: dict[str, tuple[FusedModule, dict[int, Member]]] = {}
    for path, parts in modules.items():
        module, index = module_for(path)
        scale = lora_scale(alpha_of(alpha, path), parts["A"].shape[0], use_rslora)
        groups.setdefault(module.native, (module, {}))[1][index] = (parts["A"], parts["B"], scale)
    out: dict[str, Tensor] = {}
    for module, members in groups.values():
        down, up, file_alpha = fuse(module, members)
        out[f"{module.kohya_name}.lora_down.weight"] = down
        out[f"{module.kohya_name}.lora_up.weight"] = up
        out[f"{module.kohya_name}.alpha"] = torch.tensor(file_alpha, dtype=torch.float32)
    return out


def split_kohya_modules(groups: Mapping[str, Mapping[str, Tensor]], module_from: Callable[[str], FusedModule]
                        ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """{kohya or native name: {lora_down.weight, lora_up.weight, alpha}} -> (PEFT state, {path: alpha}).

    Fused modules are split exactly for files `fuse` wrote, with the same dW for any other file.
    A module without `.alpha` has alpha = rank.
    """
    peft: dict[str, Tensor] = {}
    alphas: dict[str, float] = {}
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraFormatError(f"'{name}' lacks lora_down or lora_up.")
        module = module_from(name)
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise LoraFormatError(f"'{name}': lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} "
                                  "are not a linear LoRA pair.")
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
        for path, a, b, part_alpha in split(module, down, up, alpha):
            if f"{path}.lora_A.weight" in peft:
                raise LoraFormatError(f"Two kohya modules map to '{path}'.")
            peft[f"{path}.lora_A.weight"] = a
            peft[f"{path}.lora_B.weight"] = b
            alphas[path] = part_alpha
    return peft, alphas


_KOHYA_KEY = re.compile(r"^(?P<name>[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_COMFY_KEY = re.compile(r"^diffusion_model\.(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|lora_A\.weight"
                        r"|lora_B\.weight|alpha)$")


def kohya_key_groups(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{kohya name: {lora_down.weight, lora_up.weight, alpha}} of a kohya file or ComfyUI's own form
    (`diffusion_model.<native path>.lora_A/lora_B`, or lora_down/lora_up)."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        comfy = _COMFY_KEY.match(key)
        if comfy:
            part = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}.get(comfy["part"],
                                                                                               comfy["part"])
            name = UNET_PREFIX + comfy["module"].replace(".", "_")
        else:
            m = _KOHYA_KEY.match(key)
            if not m:
                raise LoraFormatError(f"'{key}' is not a kohya LoRA key (lora_down / lora_up / alpha); LoHa, LoKr "
                                      "and DoRA files are not converted here.")
            name, part = m["name"], m["part"]
        grouped.setdefault(name, {})[part] = value
    return grouped


ModuleTable = tuple[tuple[str, tuple[str, ...]], ...]


def module_table(text: str) -> ModuleTable:
    """A family's native-to-diffusers module table from its text form, one module a line:
    `native_module = diffusers_module [diffusers_module ...]` (several: fused in that row order)."""
    rows = []
    for line in text.strip().splitlines():
        native, _, parts = line.partition("=")
        rows.append((native.strip(), tuple(parts.split())))
    return tuple(rows)



@dataclass(frozen=True)
class NativeNames:
    """A family's LoRA between diffusers' module names and its native (kohya) ones: `module_for` gives a
    diffusers path's native module and its index among the parts, `from_kohya` a kohya name's native module;
    `family` names the files in messages."""

    family: str
    module_for: Callable[[str], tuple[NativeModule, int]]
    from_kohya: Callable[[str], FusedModule]

    def group(self, peft_state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """{module path: {"A", "B"}} of the PEFT state (plain LoRA only)."""
        from core.families.dit.lora_files import group_plain_lora

        return group_plain_lora(peft_state, self.family)

    def to_kohya(self, peft_state: Mapping[str, Tensor], *, alpha: float | Mapping[str, float],
                 use_rslora: bool = False) -> dict[str, Tensor]:
        """A PEFT state -> kohya tensors of the native modules (fused ones fused exactly)."""
        return fused_kohya_tensors(self.group(peft_state), self.module_for, alpha=alpha, use_rslora=use_rslora)

    def to_peft(self, tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        """kohya / ComfyUI tensors -> (PEFT state without prefix, {module path: alpha}); fused ones split exactly."""
        return split_kohya_modules(kohya_key_groups(tensors), self.from_kohya)
