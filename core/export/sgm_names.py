"""Module-name translation for kohya LoRA keys: diffusers <-> SAI/sgm UNet names, dots <-> underscores.

sd-scripts trains SD 1.x/2.x on a UNet with diffusers module names but SDXL on the SAI
("sgm", LDM) UNet, and WebUI maps SDXL LoRA keys straight onto its sgm modules. So an
SDXL file must say `input_blocks.4.1.transformer_blocks.0.attn1.to_q` where diffusers says
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.

SDXL base layout (layers_per_block = 2, so 3 sgm blocks per level):
  input_blocks.0.0                 conv_in
  input_blocks.(1+3i+j).0 / .1     down_blocks.i.resnets.j / .attentions.j
  input_blocks.(3+3i).0.op         down_blocks.i.downsamplers.0.conv
  middle_block.0 / .1 / .2         mid_block.resnets.0 / .attentions.0 / .resnets.1
  output_blocks.(3i+j).0 / .1      up_blocks.i.resnets.j / .attentions.j
  output_blocks.(3i+2).2.conv      up_blocks.i.upsamplers.0.conv (.1.conv when the level has no attention)
  time_embed.0 / .2                time_embedding.linear_1 / linear_2
  label_emb.0.0 / .0.2             add_embedding.linear_1 / linear_2
  out.0 / out.2                    conv_norm_out / conv_out
Inside a resnet: in_layers.0/2 = norm1/conv1, emb_layers.1 = time_emb_proj,
out_layers.0/3 = norm2/conv2, skip_connection = conv_shortcut. Transformer blocks keep
their names (proj_in, transformer_blocks.k.attn1.to_q, ff.net.0.proj, ...).
"""
from __future__ import annotations

import re

SDXL_LAYERS_PER_BLOCK = 2
# Up levels of SDXL base that carry attentions (their upsampler sits at index 2).
SDXL_UP_LEVELS_WITH_ATTENTION = frozenset({0, 1})
SDXL_DOWN_LEVELS = 3

_RESNET_TO_SGM = {
    "conv1": "in_layers.2", "norm1": "in_layers.0", "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3", "norm2": "out_layers.0", "conv_shortcut": "skip_connection",
}
_RESNET_FROM_SGM = {v: k for k, v in _RESNET_TO_SGM.items()}
_TOP_TO_SGM = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_TOP_FROM_SGM = {v: k for k, v in _TOP_TO_SGM.items()}


class ModuleNameError(ValueError):
    """A module path that has no counterpart in the other naming scheme."""


def _resnet_part(rest: str, *, to_sgm: bool) -> str:
    table = _RESNET_TO_SGM if to_sgm else _RESNET_FROM_SGM
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    raise ModuleNameError(f"unknown resnet layer '{rest}'")


def diffusers_to_sgm(path: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` (SDXL layout)."""
    per_level = layers_per_block + 1
    for src, dst in _TOP_TO_SGM.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + per_level * i + j
        if kind == "attentions":
            return f"input_blocks.{n}.1.{rest}"
        return f"input_blocks.{n}.0.{_resnet_part(rest, to_sgm=True)}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)", path)
    if m:
        return f"input_blocks.{per_level * (int(m[1]) + 1)}.0.op{m[2]}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{_resnet_part(rest, to_sgm=True)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = per_level * i + j
        if kind == "attentions":
            return f"output_blocks.{n}.1.{rest}"
        return f"output_blocks.{n}.0.{_resnet_part(rest, to_sgm=True)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)", path)
    if m:
        i = int(m[1])
        inner = 2 if i in SDXL_UP_LEVELS_WITH_ATTENTION else 1
        return f"output_blocks.{per_level * i + layers_per_block}.{inner}.conv{m[2]}"
    raise ModuleNameError(f"'{path}' is not a module of the SDXL UNet")


def sgm_to_diffusers(path: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """`input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in` (SDXL layout)."""
    per_level = layers_per_block + 1
    for src, dst in _TOP_FROM_SGM.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", path)
    if m:
        n, inner, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n - 1, per_level)
        if j == layers_per_block:  # the downsampler slot of level i
            if inner == 0 and (rest == "op" or rest.startswith("op.")):
                return f"down_blocks.{i}.downsamplers.0.conv{rest[2:]}"
        elif inner == 1:
            return f"down_blocks.{i}.attentions.{j}.{rest}"
        elif inner == 0:
            return f"down_blocks.{i}.resnets.{j}.{_resnet_part(rest, to_sgm=False)}"
    m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", path)
    if m:
        n, rest = int(m[1]), m[2]
        if n == 1:
            return f"mid_block.attentions.0.{rest}"
        if n in (0, 2):
            return f"mid_block.resnets.{n // 2}.{_resnet_part(rest, to_sgm=False)}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", path)
    if m:
        n, inner, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n, per_level)
        has_attention = i in SDXL_UP_LEVELS_WITH_ATTENTION
        if inner == 0:
            return f"up_blocks.{i}.resnets.{j}.{_resnet_part(rest, to_sgm=False)}"
        if inner == 1 and has_attention:
            return f"up_blocks.{i}.attentions.{j}.{rest}"
        if (rest == "conv" or rest.startswith("conv.")) and inner == (2 if has_attention else 1):
            return f"up_blocks.{i}.upsamplers.0.{rest}"
    raise ModuleNameError(f"'{path}' is not a module of the SDXL (sgm) UNet")


# Names that contain underscores themselves: kohya joins every part with "_", so the way
# back has to know which underscores belong to a name. Longest first.
_COMPOUND_NAMES = sorted({
    # diffusers UNet
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut", "time_emb_proj",
    "time_embedding", "add_embedding", "linear_1", "linear_2", "add_k_proj", "add_v_proj",
    # sgm UNet
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
    # CLIP text encoders (transformers names)
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "token_embedding", "position_embedding", "text_projection",
    # Llama-style LMs (for completeness of the decoder)
    "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head",
}, key=lambda s: -s.count("_"))


def underscored_to_path(name: str) -> str:
    """`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` -> dotted module path."""
    parts = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for compound in _COMPOUND_NAMES:
            width = compound.count("_") + 1
            if "_".join(parts[i:i + width]) == compound:
                out.append(compound)
                i += width
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def path_to_underscored(path: str) -> str:
    return path.replace(".", "_")
