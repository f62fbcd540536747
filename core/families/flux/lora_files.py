"""FLUX.1 (dev / schnell) and Chroma LoRA files: diffusers/PEFT module names <-> BFL (kohya) names.

Who reads what:
- WebUI / Forge / ComfyUI read kohya files named after BFL's own module paths
  (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`). A kohya-style rename of the diffusers
  names (`lora_unet_single_transformer_blocks_0_attn_to_k`) loads nowhere: ComfyUI reports
  "lora key not loaded" for every key.
- diffusers reads its own file (`transformer.<module>.lora_A.weight`, the LoraConfig in the
  `lora_adapter_metadata` header) and converts kohya files with `_convert_kohya_flux_lora_to_diffusers`.

BFL fuses what diffusers keeps apart (rows stacked in this order):
  double_blocks.N.img_attn.qkv = attn.to_q | attn.to_k | attn.to_v                    (h, h, h rows)
  double_blocks.N.txt_attn.qkv = attn.add_q_proj | attn.add_k_proj | attn.add_v_proj  (h, h, h)
  single_blocks.N.linear1      = attn.to_q | attn.to_k | attn.to_v | proj_mlp         (h, h, h, 4h)
A fused LoRA is exact: down = [A_1; ...; A_k] (rank k*r), up = blockdiag(B_1, ..., B_k) and
alpha_fused = alpha * k, so alpha / rank (and every row of dW) is unchanged. Parts whose scales
differ (alpha_pattern, rank_pattern) get the ratio folded into their up block.

One row permutation: BFL's `final_layer.adaLN_modulation.1` gives (shift, scale) where diffusers'
`norm_out.linear` gives (scale, shift) (diffusers' single-file converter swaps the halves). The
double blocks' `img_mod.lin` / `txt_mod.lin` and the single blocks' `modulation.lin` have the same
(shift, scale, gate) order on both sides and are copied as they are.
"""
from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor

from core.export.kohya import LoraFormatError
from core.export.metadata import MODELSPEC_VERSION, num_text
from core.families.dit.fused_lora import (NativeModule, fused_kohya_tensors, kohya_key_groups, module_table,
                                          split_kohya_modules)
from core.families.dit.lora_files import (diffusers_writer, group_plain_lora, kohya_file_writer, KohyaLayout,
                                          read_diffusers_modules, strip_prefixes)

Variant = Literal["flux-dev", "flux-schnell", "chroma", "flux-kontext"]
VARIANTS: tuple[str, ...] = ("flux-dev", "flux-schnell", "chroma", "flux-kontext")
UNET_PREFIX = "lora_unet_"

# (BFL module, the diffusers modules it is made of in BFL row order), per scope of the model.
_DOUBLE = module_table("""
    img_attn.qkv  = attn.to_q attn.to_k attn.to_v
    img_attn.proj = attn.to_out.0
    img_mlp.0     = ff.net.0.proj
    img_mlp.2     = ff.net.2
    img_mod.lin   = norm1.linear
    txt_attn.qkv  = attn.add_q_proj attn.add_k_proj attn.add_v_proj
    txt_attn.proj = attn.to_add_out
    txt_mlp.0     = ff_context.net.0.proj
    txt_mlp.2     = ff_context.net.2
    txt_mod.lin   = norm1_context.linear
""")
_SINGLE = module_table("""
    linear1        = attn.to_q attn.to_k attn.to_v proj_mlp
    linear2        = proj_out
    modulation.lin = norm.linear
""")
# Chroma's "approximator" (it replaces FLUX's per-block modulation layers).
_GUIDANCE_LAYER = module_table("""
    in_layer  = linear_1
    out_layer = linear_2
""")
_TOP = module_table("""
    img_in                            = x_embedder
    txt_in                            = context_embedder
    time_in.in_layer                  = time_text_embed.timestep_embedder.linear_1
    time_in.out_layer                 = time_text_embed.timestep_embedder.linear_2
    vector_in.in_layer                = time_text_embed.text_embedder.linear_1
    vector_in.out_layer               = time_text_embed.text_embedder.linear_2
    guidance_in.in_layer              = time_text_embed.guidance_embedder.linear_1
    guidance_in.out_layer             = time_text_embed.guidance_embedder.linear_2
    final_layer.linear                = proj_out
    final_layer.adaLN_modulation.1    = norm_out.linear
    distilled_guidance_layer.in_proj  = distilled_guidance_layer.in_proj
    distilled_guidance_layer.out_proj = distilled_guidance_layer.out_proj
""")
# (diffusers prefix, BFL prefix, table) of the numbered blocks.
_SCOPES: tuple[tuple[str, str, tuple[tuple[str, tuple[str, ...]], ...]], ...] = (
    ("transformer_blocks", "double_blocks", _DOUBLE),
    ("single_transformer_blocks", "single_blocks", _SINGLE),
    ("distilled_guidance_layer.layers", "distilled_guidance_layer.layers", _GUIDANCE_LAYER),
)
_SWAPPED = "final_layer.adaLN_modulation.1"
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


@dataclass(frozen=True)
class BflModule(NativeModule):
    """One BFL module and the diffusers modules it is made of, in BFL row order."""

    @property
    def bfl(self) -> str:
        return self.native   # "double_blocks.0.img_attn.qkv"

    @property
    def swaps_halves(self) -> bool:
        return self.native == _SWAPPED

    def part_rows(self, in_features: int) -> list[int]:
        """Output rows of each part: q/k/v project width h to h, proj_mlp to 4h (FLUX's mlp_ratio)."""
        return [4 * in_features if p.endswith("proj_mlp") else in_features for p in self.parts]


def _build_tables() -> tuple[dict[str, tuple[BflModule, int]], dict[str, BflModule]]:
    top_forward: dict[str, tuple[BflModule, int]] = {}
    top_reverse: dict[str, BflModule] = {}
    for bfl, parts in _TOP:
        module = BflModule(bfl, parts)
        top_forward[parts[0]] = (module, 0)
        top_reverse[bfl.replace(".", "_")] = module
    return top_forward, top_reverse


_TOP_FORWARD, _TOP_REVERSE = _build_tables()


def bfl_module_for(path: str) -> tuple[BflModule, int]:
    """The BFL module a diffusers module path belongs to, and its index among the fused parts."""
    path = strip_prefixes(path)
    for d_prefix, b_prefix, table in _SCOPES:
        m = re.match(rf"^{re.escape(d_prefix)}\.(\d+)\.(.+)$", path)
        if not m:
            continue
        block, rest = m.group(1), m.group(2)
        for bfl, parts in table:
            if rest in parts:
                module = BflModule(f"{b_prefix}.{block}.{bfl}", tuple(f"{d_prefix}.{block}.{p}" for p in parts))
                return module, parts.index(rest)
        break
    if path in _TOP_FORWARD:
        return _TOP_FORWARD[path]
    raise LoraFormatError(f"'{path}' is not a FLUX.1 / Chroma transformer module with a BFL name "
                          "(norms, rotary embeddings and biases have none).")


def bfl_module_from_kohya(name: str) -> BflModule:
    """The BFL module of a kohya name (`lora_unet_single_blocks_3_linear1`)."""
    if not name.startswith(UNET_PREFIX):
        raise LoraFormatError(f"'{name}' is not a kohya transformer name (lora_unet_...).")
    rest = name[len(UNET_PREFIX):]
    for d_prefix, b_prefix, table in _SCOPES:
        m = re.match(rf"^{re.escape(b_prefix.replace('.', '_'))}_(\d+)_(.+)$", rest)
        if not m:
            continue
        block, tail = m.group(1), m.group(2)
        for bfl, parts in table:
            if bfl.replace(".", "_") == tail:
                return BflModule(f"{b_prefix}.{block}.{bfl}", tuple(f"{d_prefix}.{block}.{p}" for p in parts))
    if rest in _TOP_REVERSE:
        return _TOP_REVERSE[rest]
    hint = ""
    if rest.startswith(("transformer_blocks_", "single_transformer_blocks_")):
        hint = (" It is a diffusers name renamed kohya-style, which no FLUX loader reads; "
                "convert it from the diffusers file instead.")
    raise LoraFormatError(f"'{name}' is not a FLUX.1 / Chroma BFL module name.{hint}")


def group_flux_peft(peft_state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{module path: {"A", "B"}} of a FLUX PEFT state dict, `transformer.` / `base_model.model.` prefixes removed."""
    return group_plain_lora(peft_state, "FLUX")


def flux_peft_to_kohya(peft_state: Mapping[str, Tensor], *, alpha: float | Mapping[str, float],
                       use_rslora: bool = False) -> dict[str, Tensor]:
    """A FLUX/Chroma transformer PEFT state dict -> kohya tensors under BFL names.

    `alpha` is the LoraConfig's lora_alpha, or {module path: alpha} (e.g. `kohya_alphas_from_model`,
    which already includes rsLoRA and alpha/rank patterns; then leave `use_rslora` False).
    """
    return fused_kohya_tensors(group_flux_peft(peft_state), bfl_module_for, alpha=alpha, use_rslora=use_rslora)


def _kohya_groups(tensors: Mapping[str, Tensor], ignore_text_encoders: bool) -> dict[str, dict[str, Tensor]]:
    if not ignore_text_encoders:
        key = next((k for k in tensors if k.startswith(_TEXT_ENCODER_PREFIXES)), None)
        if key is not None:
            raise LoraFormatError(f"'{key}' is a text encoder LoRA; FLUX text encoder LoRAs are not converted here "
                                  "(pass ignore_text_encoders=True to keep only the transformer).")
    return kohya_key_groups({k: v for k, v in tensors.items() if not k.startswith(_TEXT_ENCODER_PREFIXES)})


def flux_kohya_to_peft(tensors: Mapping[str, Tensor], *, ignore_text_encoders: bool = False
                       ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """kohya / ComfyUI FLUX tensors -> (PEFT state dict without prefix, {module path: alpha}).

    Fused qkv / linear1 modules are split into q, k, v (, proj_mlp): exactly into the original
    modules for files written by `flux_peft_to_kohya`, and with the same dW for any other file
    (each part then keeps the whole down matrix). A module without `.alpha` has alpha = rank.
    """
    return split_kohya_modules(_kohya_groups(tensors, ignore_text_encoders), bfl_module_from_kohya)


# ---------------------------------------------------------------------------------------------
# Metadata and files
# ---------------------------------------------------------------------------------------------

_BASE_MODEL_VERSION = {"flux-dev": "flux1", "flux-schnell": "flux1", "chroma": "chroma", "flux-kontext": "flux1"}
_ARCHITECTURE = {"flux-dev": "flux-1-dev", "flux-schnell": "flux-1-schnell", "chroma": "chroma",
                 "flux-kontext": "flux-1-kontext-dev"}
# sd-scripts' library/sai_model_spec.py IMPL_FLUX / IMPL_CHROMA.
_IMPLEMENTATION = {"flux-dev": "https://github.com/black-forest-labs/flux",
                   "flux-schnell": "https://github.com/black-forest-labs/flux",
                   "chroma": "https://huggingface.co/lodestones/Chroma",
                   "flux-kontext": "https://github.com/black-forest-labs/flux"}
# The keys that say what the file is; a caller's metadata cannot override them.
IDENTITY_KEYS = ("ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                  "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise LoraFormatError(f"Unknown FLUX variant '{variant}'; expected one of {', '.join(VARIANTS)}.")


def _foreign_module(path: str, variant: str) -> bool:
    """True for a module the variant's transformer does not have (a LoRA labelled with the wrong variant)."""
    if variant == "chroma":
        # Chroma replaced FLUX's modulation layers and time/text/guidance embedders by one approximator.
        return path.endswith(("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear")) or \
            path.startswith("time_text_embed.")
    if path.startswith("distilled_guidance_layer."):
        return True
    return variant == "flux-schnell" and path.startswith("time_text_embed.guidance_embedder.")


def check_modules_match_variant(paths: list[str], variant: Variant) -> None:
    """Refuse a LoRA whose modules do not exist in `variant`, so no file is labelled for the wrong model."""
    _check_variant(variant)
    foreign = sorted(p for p in (strip_prefixes(p) for p in paths) if _foreign_module(p, variant))
    if foreign:
        raise LoraFormatError(f"{', '.join(foreign[:3])} is not part of a {variant} transformer; "
                              "choose the variant the LoRA was trained on.")


def flux_kohya_metadata(variant: Variant, *, rank: int, alpha: float, title: str | None = None,
                        started_at: float | None = None, resolution: int = 1024) -> dict[str, str]:
    """`ss_*` and `modelspec.*` keys of a FLUX / Chroma kohya LoRA, as sd-scripts' flux trainer writes them.

    `alpha` is the alpha of an unfused module (fused qkv / linear1 modules store it times the number
    of parts). No `modelspec.prediction_type`: sd-scripts leaves it out for FLUX.
    """
    _check_variant(variant)
    started = datetime.datetime.now().timestamp() if started_at is None else started_at
    meta = {
        "ss_base_model_version": _BASE_MODEL_VERSION[variant],
        "ss_v2": "False",
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": num_text(alpha),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": _ARCHITECTURE[variant] + "/lora",
        "modelspec.implementation": _IMPLEMENTATION[variant],
        "modelspec.title": title or f"LoRA@{int(started)}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(started)).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.implementation_version": "lora-scripts",
    }
    return meta


# The WebUI / Forge / ComfyUI file of a FLUX or Chroma LoRA (BFL names), refused for modules the variant lacks.
write_flux_kohya_file = kohya_file_writer(KohyaLayout(group_flux_peft, flux_peft_to_kohya, flux_kohya_metadata,
                                                      IDENTITY_KEYS, check=check_modules_match_variant))


# Keys are `transformer.<module>.lora_A/B.weight`, the LoraConfig in `lora_adapter_metadata` (diffusers then
# loads the real alpha instead of assuming alpha = rank); ChromaPipeline reads the same file.
write_flux_diffusers_file = diffusers_writer("FluxPipeline", group_flux_peft)


def read_flux_lora(path: str | Path, *, ignore_text_encoders: bool = False
                   ) -> tuple[dict[str, Tensor], dict[str, float], dict[str, str]]:
    """A FLUX / Chroma LoRA file (kohya, ComfyUI or diffusers) -> (PEFT state dict, {module: alpha}, metadata).

    Alphas are as alpha / rank needs them (rsLoRA included). A diffusers file without adapter
    metadata gets alpha = rank, as diffusers assumes.
    """
    from core.export.kohya import load_kohya_lora

    tensors, metadata = load_kohya_lora(path)
    if any(k.startswith((UNET_PREFIX, "diffusion_model.")) for k in tensors):
        peft, alphas = flux_kohya_to_peft(tensors, ignore_text_encoders=ignore_text_encoders)
        return peft, alphas, metadata
    transformer = {k: v for k, v in tensors.items() if k.startswith("transformer.")}
    if len(transformer) != len(tensors) and not ignore_text_encoders:
        other = sorted(set(tensors) - set(transformer))[:3]
        raise LoraFormatError(f"{path}: keys outside the transformer ({', '.join(other)}, ...); "
                              "pass ignore_text_encoders=True to keep only the transformer.")
    peft, alphas = read_diffusers_modules(transformer, metadata, group_flux_peft)
    return peft, alphas, metadata
