"""A still image goes through the video VAEs (Qwen-Image / Krea 2's, Wan's) as cheaply as through an image VAE:
the causal 3D convolutions run as 2D ones on a lone frame, with the same latents and pixels as before, and a
clip's later frames still go through the 3D path."""
from __future__ import annotations

import copy

import pytest
import torch

from core.families.dit.video_vae import one_frame_convs


def _vaes():
    from core.families.qwen_image.tiny import tiny_qwen_vae
    from core.families.wan.tiny import tiny_wan22_vae, tiny_wan_vae

    return {"qwen-image": tiny_qwen_vae(), "wan": tiny_wan_vae(), "wan22": tiny_wan22_vae()}


@pytest.mark.parametrize("frames", [1, 5])
def test_latents_and_pixels_are_the_same_through_the_one_frame_convolutions(frames):
    torch.manual_seed(0)
    for name, vae in _vaes().items():
        plain = copy.deepcopy(vae)
        fast = one_frame_convs(vae)
        side = 32 if name != "wan22" else 64
        pixels = torch.rand(2, 3, frames, side, side) * 2 - 1
        with torch.no_grad():
            want = plain.encode(pixels).latent_dist.parameters
            got = fast.encode(pixels).latent_dist.parameters
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), name
            latents = want.chunk(2, dim=1)[0]
            assert torch.allclose(fast.decode(latents).sample, plain.decode(latents).sample, atol=1e-5, rtol=1e-4), name


def test_a_still_image_takes_the_2d_path_and_a_clip_after_its_first_frame_the_3d_one(monkeypatch):
    from core.families.qwen_image.tiny import tiny_qwen_vae

    vae = one_frame_convs(tiny_qwen_vae())
    assert one_frame_convs(vae) is vae  # once per VAE
    calls = {"2d": 0, "3d": 0}
    conv2d, conv3d = torch.nn.functional.conv2d, torch.nn.Conv3d._conv_forward
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.__setitem__("2d", calls["2d"] + 1)
                        or conv2d(*a, **k))
    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", lambda self, *a: calls.__setitem__("3d", calls["3d"] + 1)
                        or conv3d(self, *a))
    with torch.no_grad():
        vae.encode(torch.zeros(1, 3, 1, 32, 32))
    assert calls["2d"] > 0 and calls["3d"] == 0
    calls.update({"2d": 0, "3d": 0})
    with torch.no_grad():
        vae.encode(torch.zeros(1, 3, 5, 32, 32))
    assert calls["2d"] > 0 and calls["3d"] > 0
