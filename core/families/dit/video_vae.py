"""The latents of the Qwen-Image video VAE (AutoencoderKLQwenImage), used on still images by Qwen-Image and
Krea 2: a frame axis added for the encoder and dropped again, per-channel normalization by the VAE config's
`latents_mean` / `latents_std` (as their pipelines and diffusers' training examples do).

`one_frame_convs` makes these video VAEs (and Wan's) as cheap on a still image as an image VAE: their causal
3D convolutions pad time with zeros in front of a lone frame, so only the kernel's last temporal slice ever
meets data, yet the 3D convolution does the work of all three slices.
"""
from __future__ import annotations

import re
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def _channel_stats(vae_config: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = len(vae_config.latents_mean)
    shape = (1, c) + (1,) * (like.ndim - 2)
    mean = torch.tensor(vae_config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae_config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


def _one_frame_forward(conv: torch.nn.Conv3d, forward: Any) -> Any:
    def one_frame(x: Tensor, cache_x: Tensor | None = None) -> Tensor:
        # (w, w, h, h, frames in front, 0): the zeros diffusers' causal conv pads with, kept in its `_padding`
        pad = conv._padding  # noqa: SLF001
        if (cache_x is None and x.shape[2] == 1 and pad[4] == conv.kernel_size[0] - 1 and conv.stride[0] == 1
                and conv.dilation[0] == 1):
            x2d = torch.nn.functional.pad(x[:, :, 0], pad[:4])
            return torch.nn.functional.conv2d(x2d, conv.weight[:, :, -1], conv.bias, conv.stride[1:], 0,
                                              conv.dilation[1:], conv.groups).unsqueeze(2)
        return forward(x, cache_x)
    return one_frame


def one_frame_convs(vae: Any) -> Any:
    """`vae` (AutoencoderKLQwenImage / AutoencoderKLWan) with each causal 3D convolution run as a 2D one of its
    last temporal slice on a lone frame with no cached frames before it (a still image, a clip's first frame):
    the same result (the other slices only ever meet the zero padding), a third of the work for a 3-frame kernel.
    Every other call goes to the module's own forward. Done once per VAE; returns it."""
    if vae in _ONE_FRAME_VAES:
        return vae
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d) and len(getattr(module, "_padding", ())) == 6:
            module.forward = _one_frame_forward(module, module.forward)
    _ONE_FRAME_VAES.add(vae)
    return vae


_ONE_FRAME_VAES: weakref.WeakSet = weakref.WeakSet()


def encode_moments(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> moments [B, 2C, h, w] (the video VAE's frame axis added and dropped)."""
    one_frame_convs(vae)
    param = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(pixels.to(param.device, param.dtype).unsqueeze(2)).latent_dist
    return dist.parameters.squeeze(2).float()


def normalize_latents(vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
    """Raw sampled latents [B, C, h, w] -> what the transformer trains on: (x - mean) / std per channel."""
    mean, std = _channel_stats(vae_config, latents)
    return (latents - mean) / std


def denormalize_latents(vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _channel_stats(vae_config, latents)
    return latents * std + mean


def decode_latents(vae: Any, latents: torch.Tensor) -> list[Any]:
    """Normalized latents [B, C, h, w] -> PIL images (fp32 decode)."""
    from PIL import Image

    raw = denormalize_latents(vae.config, latents.float()).unsqueeze(2)
    one_frame_convs(vae)
    param = next(vae.parameters())
    with torch.no_grad():
        pixels = vae.decode(raw.to(param.device, param.dtype), return_dict=False)[0][:, :, 0]
    arrays = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


# --- ComfyUI's qwen_image_vae.safetensors: the Wan 2.1 VAE's names ---------------------------------------------

_RESNET = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
           ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))


def _resnet_to_wan(sub: str) -> str:
    for ours, theirs in _RESNET:
        if sub.startswith(ours):
            return theirs + sub[len(ours):]
    return sub


def vae_key_to_wan(key: str, num_res_blocks: int) -> str:
    """One AutoencoderKLQwenImage key -> the Wan 2.1 VAE's (ComfyUI's qwen_image_vae.safetensors)."""
    fixed = {"encoder.conv_in.": "encoder.conv1.", "decoder.conv_in.": "decoder.conv1.",
             "quant_conv.": "conv1.", "post_quant_conv.": "conv2.",
             "encoder.norm_out.": "encoder.head.0.", "encoder.conv_out.": "encoder.head.2.",
             "decoder.norm_out.": "decoder.head.0.", "decoder.conv_out.": "decoder.head.2."}
    for ours, theirs in fixed.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        side, kind, index, sub = m.groups()
        if kind == "attentions":
            return f"{side}.middle.1.{sub}"
        return f"{side}.middle.{2 * int(index)}.{_resnet_to_wan(sub)}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{_resnet_to_wan(m.group(2))}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key)
    if m:
        stage, _, resnet, sub = m.groups()
        per = num_res_blocks + 2
        if resnet is not None:
            return f"decoder.upsamples.{int(stage) * per + int(resnet)}.{_resnet_to_wan(sub)}"
        return f"decoder.upsamples.{int(stage) * per + num_res_blocks + 1}.{sub}"
    return key


def vae_to_comfy(state: Mapping[str, Tensor], num_res_blocks: int = 1) -> dict[str, Tensor]:
    return {vae_key_to_wan(k, num_res_blocks): v for k, v in state.items()}
