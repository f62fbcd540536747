"""The conformance table: one line per image family, naming its tiny model and its real network's shape.

Every test under tests/families/ is parametrized over FAMILIES. A new family adds one line here (after its
registry row and its package with a `tiny.py`): how to build its tiny model, the hub name that names it,
its diffusers pipeline, and its real network built on the meta device (the registry's size must be it).
Kontext and Qwen-Image-Edit (paired data), SD3 without T5, Chroma's mask and SDXL's sgm names keep their
own tests in tests/families/<name>/; the edits of several references (Qwen-Image-Edit-2509 / 2511, FLUX.2 klein)
theirs in tests/families/test_edit_references.py.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.families.references import unet_epsilon


@dataclass(frozen=True)
class Built:
    """A tiny model on disk: the diffusers folder and ComfyUI's single file of its network."""

    folder: Path
    single_file: Path | None    # what a ComfyUI user points at (checkpoint or diffusion_models/ file)
    single_config: Path | None  # base_model_config a run on the single file needs (None: the file says all)


@dataclass(frozen=True)
class TinyFamily:
    name: str                             # the registry row
    build: Callable[[Path], Built]        # writes the tiny model under a folder
    hub_name: str                         # a hub repo (or file) name that alone names the family
    pipeline: str                         # the diffusers pipeline class that loads its LoRA files
    network: str                          # the pipeline component that gets the LoRA
    meta_network: Callable[[], Any]       # the real network, built on the meta device
    gpu_only: dict[str, Any] = field(default_factory=dict)  # settings refused without CUDA
    # diffusers' training objective (tests/families/references.py) and the latent channels it takes
    reference_loss: Callable[..., Any] | None = None
    latent_channels: int = 4
    # diffusers' own loader reads its kohya file (FLUX's converter assumes the real 3072 width, so not at tiny
    # sizes; SD3's reads no kohya file): when not, the suite loads it through core.tools.convert
    kohya_in_pipeline: bool = True
    # the form of its WebUI / ComfyUI file: kohya names, or ComfyUI's `diffusion_model.` names (Krea 2, whose
    # diffusers loader reads only that form)
    main_format: str = "kohya"

    def __str__(self) -> str:  # the test ids
        return self.name


def _sd(variant: str) -> Callable[[Path], Built]:
    def build(root: Path) -> Built:
        from core.families.sd.tiny import build_tiny_sd

        tiny = build_tiny_sd(root, variant)
        return Built(tiny.folder, tiny.single_file, tiny.folder)  # the configs a single file needs offline
    return build


def _flux(variant: str) -> Callable[[Path], Built]:
    def build(root: Path) -> Built:
        from core.families.flux.tiny import build_tiny_flux

        tiny = build_tiny_flux(root, variant)
        return Built(tiny.folder, tiny.comfy_transformer, tiny.folder)
    return build


def _sd3(root: Path) -> Built:
    from core.families.sd3.tiny import build_tiny_sd3

    tiny = build_tiny_sd3(root, "sd3")
    return Built(tiny.folder, tiny.comfy_transformer, tiny.folder)


def _zimage(root: Path) -> Built:
    from core.families.zimage.tiny import build_tiny_zimage

    tiny = build_tiny_zimage(root)
    return Built(tiny.folder, tiny.comfy_transformer, tiny.folder)


def _flux2(root: Path) -> Built:
    from core.families.flux2.tiny import build_tiny_flux2

    tiny = build_tiny_flux2(root)
    return Built(tiny.folder, tiny.comfy_transformer, tiny.folder)


def _flux2_dev(root: Path) -> Built:
    from core.families.flux2.tiny import build_tiny_flux2_dev

    tiny = build_tiny_flux2_dev(root)
    return Built(tiny.folder, tiny.comfy_transformer, tiny.folder)


def _krea2(root: Path) -> Built:
    from core.families.krea2.tiny import build_tiny_krea2

    tiny = build_tiny_krea2(root)
    return Built(tiny.folder, tiny.comfy_transformer, tiny.folder)


def _qwen(root: Path) -> Built:
    from core.families.qwen_image.tiny import build_tiny_qwen

    tiny = build_tiny_qwen(root, "qwen-image")
    return Built(tiny.folder, tiny.comfy_transformer, tiny.folder)


def _wan(root: Path) -> Built:
    from core.families.wan.tiny import build_tiny_wan

    tiny = build_tiny_wan(root)
    return Built(tiny.folder, tiny.comfy_transformer, tiny.folder)


# --- the real networks (configs from the model cards' config.json files) -----------------------------

def _unet(**config):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def _sd1_unet():
    return _unet(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)


def _sdxl_unet():
    return _unet(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def _flux_dev():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(guidance_embeds=True)  # the other defaults are FLUX.1's


def _chroma():
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel()


def _sd35_medium():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                 dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def _zimage_net():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel()  # diffusers' defaults are Z-Image's config


def _flux2_klein_4b():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                   joint_attention_dim=7680, guidance_embeds=False)


def _flux2_dev_net():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel()  # diffusers' defaults are FLUX.2-dev's config


def _krea2_net():
    from diffusers import Krea2Transformer2DModel

    return Krea2Transformer2DModel()  # diffusers' defaults are Krea 2's config


def _qwen_net():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(num_layers=60, attention_head_dim=128, num_attention_heads=24,
                                       joint_attention_dim=3584, in_channels=64, out_channels=16)


def _wan_13b():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(num_attention_heads=12, ffn_dim=8960, num_layers=30)  # Wan2.1-T2V-1.3B's config


_TRANSFORMER_GPU_ONLY = {"blocks_to_swap": 4, "base_quantization": "nf4"}
_BFL = dict(gpu_only=_TRANSFORMER_GPU_ONLY, kohya_in_pipeline=False)

FAMILIES: list[TinyFamily] = [
    TinyFamily("sd1", _sd("sd1"), "runwayml/stable-diffusion-v1-5", "StableDiffusionPipeline", "unet", _sd1_unet,
               reference_loss=unet_epsilon),
    TinyFamily("sdxl", _sd("sdxl"), "stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", "unet",
               _sdxl_unet, reference_loss=unet_epsilon),
    TinyFamily("flux-dev", _flux("flux-dev"), "black-forest-labs/FLUX.1-dev", "FluxPipeline", "transformer",
               _flux_dev, **_BFL),
    TinyFamily("chroma", _flux("chroma"), "lodestones/Chroma1-HD", "ChromaPipeline", "transformer", _chroma,
               **_BFL),
    TinyFamily("sd3", _sd3, "stabilityai/stable-diffusion-3.5-medium", "StableDiffusion3Pipeline", "transformer",
               _sd35_medium, _TRANSFORMER_GPU_ONLY, kohya_in_pipeline=False),
    TinyFamily("z-image-turbo", _zimage, "Tongyi-MAI/Z-Image-Turbo", "ZImagePipeline", "transformer", _zimage_net,
               _TRANSFORMER_GPU_ONLY),
    TinyFamily("flux2-klein-4b", _flux2, "black-forest-labs/FLUX.2-klein-base-4B", "Flux2KleinPipeline", "transformer",
               _flux2_klein_4b, _TRANSFORMER_GPU_ONLY),
    TinyFamily("flux2-dev", _flux2_dev, "black-forest-labs/FLUX.2-dev", "Flux2Pipeline", "transformer", _flux2_dev_net,
               _TRANSFORMER_GPU_ONLY),
    # diffusers' Krea 2 loader reads no kohya names: its WebUI / ComfyUI file is the native `diffusion_model.` form.
    TinyFamily("krea2", _krea2, "krea/Krea-2-Raw", "Krea2Pipeline", "transformer", _krea2_net, _TRANSFORMER_GPU_ONLY,
               main_format="comfyui"),
    TinyFamily("wan2.1-t2v-1.3b", _wan, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "WanPipeline", "transformer", _wan_13b,
               _TRANSFORMER_GPU_ONLY, main_format="comfyui"),
    TinyFamily("qwen-image", _qwen, "Qwen/Qwen-Image", "QwenImagePipeline", "transformer", _qwen_net,
               _TRANSFORMER_GPU_ONLY),
]
