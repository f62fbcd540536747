"""What the code needs to know about each image model family, in one table.

A family is one architecture a LoRA is trained for and loaded into: SD 1.x, SD 2.x, SDXL,
FLUX.1-dev, FLUX.1-schnell, Chroma, ... This module holds the facts that are plain data (names,
sizes, file labels, defaults, how its files are recognised); the module named by `impl` holds
the behaviour (its `FAMILY`, a `core.families.base.ImageFamily`). Code outside
`core/families/` asks `family_info(name)` instead of testing family names, so a new family is
one row here plus its own modules.

Standard library only: the config check, the form and the memory estimate read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FamilyInfo:
    """The data of one family.

    `kind`: "unet" (SD 1.x/2.x/SDXL), "flux" (FLUX.1 / Chroma) or "dit" (the other flow-matching
    transformers); the memory estimate and the form read the fields below, not the kind.
    """

    name: str
    label: str
    kind: str
    native_resolution: int
    preset_family: str                    # the `family:` of presets/*.yaml that fit it
    ss_base_model_version: str            # WebUI's family label in the kohya file's metadata
    modelspec_architecture: str           # SAI modelspec.architecture (without "/lora")
    kohya_te_prefixes: tuple[str, ...]    # text encoder prefixes in the kohya/WebUI file
    text_encoders: tuple[str, ...]        # the pipeline's text encoder component names
    pipeline_class: str                   # the diffusers pipeline that makes previews
    hub_repo: str                         # where the configs live on the hub (for single files)
    trained_params: int                   # parameters of the network that gets the LoRA
    frozen_params: int                    # text encoders + VAE
    sample_size_floor: int = 0            # previews never smaller than this (SDXL, FLUX)
    has_guidance_embedding: bool = False  # FLUX.1-dev's distilled guidance input
    default_timestep_sampling: str = ""   # flow-matching families: how noise levels are drawn
    sgm_unet_names: bool = False          # kohya/WebUI UNet keys in SAI's sgm names (SDXL), not diffusers'
    v_prediction_suffix: bool = False     # sd-scripts writes `<version>_v` for a v-prediction model
    modelspec_architecture_v: str = ""    # the architecture of its v-prediction variant, when it differs
    modelspec_implementation: str = "diffusers"
    impl: str = "core.families.sd.family"        # the module whose `FAMILY` is this family's behaviour
    # How headers name it (core.model_info reads these without torch): `_class_name`s of a diffusers
    # folder's model_index.json or transformer/config.json; tensor names of a single file (after
    # `model.diffusion_model.` / `diffusion_model.`); words of a hub id or file name.
    diffusers_class_names: tuple[str, ...] = ()
    single_file_markers: tuple[str, ...] = ()
    name_words: tuple[str, ...] = ()
    width: int = 320                      # the real network's width: the activation estimate scales by it
    # The config groups of family-specific keys the form shows for it ("flow": every flow-matching
    # transformer; "flux": FLUX.1 / Chroma's own). Keys of the other groups are reset by presets.
    config_groups: tuple[str, ...] = ()
    resolution_floor: int = 384           # the out-of-memory ladder never goes below this resolution
    memory_parts: str = "core.families.sd.memory:unet_parts"  # "module:function" of its memory parts
    # Regexes of LoRA-file keys only this family's files have; the row matching most of them names a file.
    lora_key_markers: tuple[str, ...] = ()
    # Trains on (control, target, caption) triples (edit models): the run feeds each image's control
    # latents (Batch.control) and prompt keys (caption, control path) to the family.
    needs_control: bool = False
    # Takes up to this many reference images per target (edit models that read several: Qwen-Image-Edit-2509 /
    # 2511, FLUX.2 klein): an item's control, then its control_2, control_3 ... train with it (Batch.references,
    # prompt keys (caption, path, path ...)); an item without a control trains as text-to-image in the same run.
    # 0: none (a `needs_control` family takes exactly one control per target and skips plain images).
    max_references: int = 0
    # How a UNet family is told apart where no marker names it. `context_dims`: the text-context widths its
    # cross-attention reads (a LoRA's attn2.to_k input, a UNet's cross_attention_dim); `text_encoder_width`:
    # the hidden width of its one text encoder (a text-encoder-only LoRA); `checkpoint_prefixes`: tensor-name
    # prefixes of its full single-file checkpoints (the longest match wins); `metadata_markers`: (key, value
    # prefix) of a kohya file's metadata that name it (sd-scripts' and SAI's spellings).
    context_dims: tuple[int, ...] = ()
    text_encoder_width: int = 0
    checkpoint_prefixes: tuple[str, ...] = ()
    metadata_markers: tuple[tuple[str, str], ...] = ()
    unet_config_markers: tuple[tuple[str, str], ...] = ()   # (key, value) of a diffusers UNet config.json
    # (regex of a LoRA-file key, its first dimension): a row listing these names a file only when one of its
    # keys has that shape (FLUX.2 klein 4B, 9B and dev share FLUX.1's block names; the widths tell them apart).
    lora_shape_markers: tuple[tuple[str, int], ...] = ()
    # The first single-file marker's first dimension is this many times the width (FLUX.2's modulation: 3).
    marker_width_ratio: int = 1
    # Distilled models (Z-Image Turbo, FLUX.1 schnell): step-distilled to a few steps without CFG; a LoRA
    # trained on one directly drifts it off its distillation (ai-toolkit, Krea). `training_base`: the hub id
    # of the base / Raw model to train on instead; `training_adapter_repo`: the known de-distilling training
    # adapter; a base row's `sample_base`: its distilled model, to preview with.
    distilled: bool = False
    training_base: str = ""
    training_adapter_repo: str = ""
    sample_base: str = ""
    # The model's own sampling for previews (model cards): steps and guidance; 0 / -1: the config's own.
    preview_steps: int = 0
    preview_guidance: float = -1.0
    # Trains on video: clips of the data set train as [C, F, h, w] latents (images as one frame), the buckets
    # add the frame count, the previews are short clips. False: clips are left out (animated GIFs: first frame).
    video: bool = False
    # Image-to-video: the model starts from an image (the Test tab takes one; a run conditions each clip on its
    # first frame and previews start from the first item's); "optional": it makes clips from text alone too.
    # `image_prompt`: the prompt's encoding includes the item's own first frame too (Wan 2.1 I2V's CLIP vision),
    # so the run keys the prompt cache per item.
    start_image: str = ""  # "needed" (I2V), "optional" (TI2V: text or image to video) or "" (none taken)
    image_prompt: bool = False
    # Two experts split by noise level (Wan 2.2 A14B: `transformer` high noise, `transformer_2` low): a LoRA file
    # is one expert's, and the Test tab puts each on its own.
    two_experts: bool = False

    @property
    def is_flow_matching(self) -> bool:
        return self.kind != "unet"


# Published sizes of the real networks (counted from their configs on the meta device; the
# tests check the UNet and FLUX numbers against diffusers).
SD1_UNET, SD2_UNET, SDXL_UNET = 859_520_964, 865_910_724, 2_567_463_684
CLIP_L, OPENCLIP_H, OPENCLIP_G, SD_VAE = 123_060_480, 340_387_840, 694_659_841, 83_653_863
FLUX_DEV, FLUX_SCHNELL, CHROMA = 11_901_408_320, 11_891_178_560, 8_899_983_424
T5_XXL_ENCODER, FLUX_AE = 4_762_310_656, 83_819_683
# Qwen-Image (and Edit, same transformer): the 60-block MMDiT, Qwen2.5-VL-7B (with its vision tower), the video VAE.
QWEN_IMAGE, QWEN25_VL_7B, QWEN_IMAGE_VAE = 20_430_401_088, 8_292_166_656, 126_892_531
# A FLUX.1 / Chroma transformer in a single file: BFL's names (ComfyUI) or diffusers' (a bare transformer file);
# each one's first dimension is the hidden width. The family's detect names the variant.
_FLUX_MARKERS = ("double_blocks.0.img_attn.proj.weight", "single_transformer_blocks.0.attn.to_q.weight")
# Keys only a FLUX.1 / Chroma LoRA has: BFL block names (kohya, ComfyUI) or diffusers' single blocks (SD3 has
# transformer_blocks only). The LoRA keys rarely tell dev from schnell (flux-dev's row answers); Chroma has no
# modulation layers but an approximator, which its row adds.
_FLUX_LORA_KEYS = (r"^(lora_unet_(double|single)_blocks_\d|diffusion_model\.(double|single)_blocks\.|"
                   r"transformer\.single_transformer_blocks\.)",)
# Keys only a Qwen-Image LoRA has, in any of the forms ComfyUI loads (`.` or `_` separated).
_QWEN_LORA_KEYS = (r"transformer_blocks[._]\d+[._](img|txt)_mlp[._]net[._]", r"transformer_blocks[._]\d+[._](img|txt)_mod[._]1")
# SD3.5 medium / large MMDiT; CLIP-L and CLIP-G with their projections; the 16-channel VAE (FLUX's AE shape).
SD35_MEDIUM, SD35_LARGE, CLIP_L_PROJ, CLIP_G_PROJ = 2_243_171_520, 8_056_627_520, 123_650_304, 694_659_840
SD3_ENCODERS = CLIP_L_PROJ + CLIP_G_PROJ + T5_XXL_ENCODER + FLUX_AE
# Wan 2.1 T2V 1.3B and 14B (WanTransformer3DModel), UMT5-XXL's encoder, the Wan VAE (the one Qwen-Image uses).
WAN21_13B, WAN21_14B, UMT5_XXL, WAN_VAE = 1_418_996_800, 14_288_491_584, 5_680_910_336, QWEN_IMAGE_VAE
# The I2V transformers (counted on the meta device): Wan 2.1's adds the CLIP image projection and k_img / v_img.
WAN21_I2V, WAN22_I2V, CLIP_H_VISION = 16_394_878_784, 14_288_901_184, 630_766_080
WAN22_5B, WAN22_VAE = 4_999_787_712, 704_688_668  # Wan 2.2 TI2V-5B and its 48-channel VAE (meta device)
Z_IMAGE, QWEN3_4B = 6_154_908_736, 4_022_468_096  # ZImageTransformer2DModel; Qwen3Model (no LM head)
# FLUX.2 (Flux2Transformer2DModel on the meta device): klein 4B / 9B and dev; Qwen3-8B (Qwen3Model), Mistral-Small
# 3.1's language model (MistralModel), the 32-channel AutoencoderKLFlux2.
FLUX2_KLEIN_4B, FLUX2_KLEIN_9B, FLUX2_DEV = 3_875_544_576, 9_078_581_248, 32_223_281_152
QWEN3_8B, MISTRAL_SMALL_31, FLUX2_VAE = 7_568_405_504, 22_901_314_560, 84_046_115
# A FLUX.2 LoRA has FLUX.1's BFL block names (or diffusers' single blocks) and the FLUX.2 MLP's up width, 6 x the
# model width (SwiGLU of ratio 3: FLUX.1's is 4 x): img_mlp.0 / ff.linear_in up, in BFL, kohya or diffusers names.
# Krea 2: Krea2Transformer2DModel (28 blocks, width 6144); Qwen3-VL-4B with its vision tower (Qwen3VLModel).
KREA2, QWEN3_VL_4B = 12_820_073_036, 4_437_815_808
# Keys only a Krea 2 LoRA has: native (krea-ai / ComfyUI), kohya or diffusers names of its gated attention and
# text fusion.
_KREA2_LORA_KEYS = (r"^(diffusion_model\.)?(blocks\.\d+\.attn\.(wq|gate)|txtfusion\.)",
                    r"^lora_unet_(blocks_\d+_attn_(wq|gate)|txtfusion_)",
                    r"^transformer\.(text_fusion\.|transformer_blocks\.\d+\.attn\.to_gate)")
_FLUX2_MLP_UP = r"(img_mlp[._]0|\.ff\.linear_in)[._](lora_up|lora_B)"


# klein is one checkpoint for text-to-image and editing with up to 4 references (Flux2KleinPipeline's `image=`):
# nothing in its files says "edit", so the data decides: targets with references train as edits, the others
# as text-to-image, in one run. dev's several references are left to its own row (references=0 for now).
def _flux2(name: str, label: str, version: str, architecture: str, repo: str, params: int, encoder: int,
           width: int, words: tuple[str, ...], pipeline: str = "Flux2KleinPipeline", references: int = 4,
           **preview: Any) -> FamilyInfo:
    return FamilyInfo(name, label, "dit", 1024, name, version, architecture, (), ("text_encoder",), pipeline, repo,
                      params, encoder + FLUX2_VAE, sample_size_floor=512, default_timestep_sampling="logit_normal",
                      modelspec_implementation="https://github.com/black-forest-labs/flux2",
                      impl="core.families.flux2.family", width=width, config_groups=("flow",), resolution_floor=512,
                      memory_parts="core.families.flux2.memory:flux2_parts",
                      diffusers_class_names=(pipeline,),
                      single_file_markers=("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight"),
                      marker_width_ratio=3,
                      name_words=words, lora_key_markers=_FLUX_LORA_KEYS,
                      lora_shape_markers=((_FLUX2_MLP_UP, 6 * width),), has_guidance_embedding=name == "flux2-dev",
                      max_references=references, **preview)

FAMILIES: dict[str, FamilyInfo] = {f.name: f for f in (
    FamilyInfo("sd1", "SD 1.x", "unet", 512, "sd1", "sd_v1", "stable-diffusion-v1", ("lora_te",),
               ("text_encoder",), "StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5",
               SD1_UNET, CLIP_L + SD_VAE, v_prediction_suffix=True, context_dims=(768,), text_encoder_width=768,
               checkpoint_prefixes=("cond_stage_model.transformer", "model.diffusion_model."),
               metadata_markers=(("ss_base_model_version", "sd_v1"), ("modelspec.architecture", "stable-diffusion-v1"))),
    FamilyInfo("sd2", "SD 2.x", "unet", 768, "sd1", "sd_v2", "stable-diffusion-v2-512", ("lora_te",),
               ("text_encoder",), "StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1",
               SD2_UNET, OPENCLIP_H + SD_VAE, v_prediction_suffix=True,
               modelspec_architecture_v="stable-diffusion-v2-768-v", context_dims=(1024,), text_encoder_width=1024,
               checkpoint_prefixes=("cond_stage_model.model.",), name_words=("stable-diffusion-2", "sd2", "sd-2", "v2-"),
               metadata_markers=(("ss_base_model_version", "sd_v2"), ("ss_v2", "True"),
                                 ("modelspec.architecture", "stable-diffusion-v2"))),
    FamilyInfo("sdxl", "SDXL", "unet", 1024, "sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base",
               ("lora_te1", "lora_te2"), ("text_encoder", "text_encoder_2"), "StableDiffusionXLPipeline",
               "stabilityai/stable-diffusion-xl-base-1.0", SDXL_UNET, CLIP_L + OPENCLIP_G + SD_VAE,
               sample_size_floor=1024, sgm_unet_names=True, resolution_floor=768,
               modelspec_implementation="https://github.com/Stability-AI/generative-models",
               # 2048: the base; 1280: the refiner. Text encoder 2 and SAI's sgm UNet names are SDXL's alone.
               context_dims=(2048, 1280), checkpoint_prefixes=("conditioner.embedders.1",),
               unet_config_markers=(("addition_embed_type", "text_time"),),
               diffusers_class_names=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
               name_words=("xl", "pony", "illustrious"),
               lora_key_markers=(r"^(lora_te[12]_|text_encoder_2\.)", r"^lora_unet_(input_blocks|middle_block|output_blocks)_"),
               metadata_markers=(("ss_base_model_version", "sdxl_"), ("modelspec.architecture", "stable-diffusion-xl"))),
    # FLUX.2 before FLUX.1: their single files share FLUX.1's block names (the first matching row names a file).
    _flux2("flux2-klein-4b", "FLUX.2 klein 4B", "flux2_klein_4b", "flux-2-klein-4b",
           "black-forest-labs/FLUX.2-klein-base-4B", FLUX2_KLEIN_4B, QWEN3_4B, 3072,
           ("flux.2-klein", "flux-2-klein", "flux2-klein", "flux2_klein", "flux_2_klein")),
    _flux2("flux2-klein-9b", "FLUX.2 klein 9B", "flux2_klein_9b", "flux-2-klein-9b",
           "black-forest-labs/FLUX.2-klein-base-9B", FLUX2_KLEIN_9B, QWEN3_8B, 4096,
           ("flux.2-klein-9b", "flux-2-klein-9b", "flux2-klein-9b", "flux2_klein_9b", "flux.2-klein-base-9b",
            "flux-2-klein-base-9b", "flux2-klein-base-9b", "flux2_klein_base_9b")),
    _flux2("flux2-dev", "FLUX.2-dev", "flux2_dev", "flux-2-dev", "black-forest-labs/FLUX.2-dev", FLUX2_DEV,
           MISTRAL_SMALL_31, 6144, ("flux.2", "flux-2", "flux2", "flux_2"), pipeline="Flux2Pipeline", references=0,
           # guidance-distilled: embedded guidance, no CFG (diffusers suggests 28 steps at 4; BFL 50)
           preview_steps=28, preview_guidance=4.0),
    FamilyInfo("flux-dev", "FLUX.1-dev", "flux", 1024, "flux", "flux1", "flux-1-dev", ("lora_te1", "lora_te3"),
               ("text_encoder", "text_encoder_2"), "FluxPipeline", "black-forest-labs/FLUX.1-dev",
               FLUX_DEV, CLIP_L + T5_XXL_ENCODER + FLUX_AE, sample_size_floor=512,
               has_guidance_embedding=True, default_timestep_sampling="shift", impl="core.families.flux.family",
               width=3072, config_groups=("flow", "flux"), resolution_floor=512,
               memory_parts="core.families.flux.memory:flux_parts", single_file_markers=_FLUX_MARKERS,
               diffusers_class_names=("FluxPipeline", "FluxTransformer2DModel"), name_words=("flux",),
               lora_key_markers=_FLUX_LORA_KEYS, preview_steps=28, preview_guidance=3.5),
    FamilyInfo("flux-schnell", "FLUX.1-schnell", "flux", 1024, "flux", "flux1", "flux-1-schnell",
               ("lora_te1", "lora_te3"), ("text_encoder", "text_encoder_2"), "FluxPipeline",
               "black-forest-labs/FLUX.1-schnell", FLUX_SCHNELL, CLIP_L + T5_XXL_ENCODER + FLUX_AE,
               sample_size_floor=512, default_timestep_sampling="shift", impl="core.families.flux.family",
               width=3072, config_groups=("flow", "flux"), resolution_floor=512,
               memory_parts="core.families.flux.memory:flux_parts", single_file_markers=_FLUX_MARKERS,
               diffusers_class_names=("FluxPipeline", "FluxTransformer2DModel"), name_words=("schnell",),
               distilled=True, training_adapter_repo="ostris/FLUX.1-schnell-training-adapter", preview_steps=4,
               preview_guidance=0.0),
    FamilyInfo("chroma", "Chroma", "flux", 1024, "flux", "chroma", "chroma", ("lora_te3",),
               ("text_encoder",), "ChromaPipeline", "lodestones/Chroma1-HD", CHROMA, T5_XXL_ENCODER + FLUX_AE,
               sample_size_floor=512, default_timestep_sampling="sigmoid", impl="core.families.flux.family",
               width=3072, config_groups=("flow", "flux"), resolution_floor=512,
               memory_parts="core.families.flux.memory:flux_parts", single_file_markers=_FLUX_MARKERS,
               diffusers_class_names=("ChromaPipeline", "ChromaTransformer2DModel"), name_words=("chroma",),
               lora_key_markers=(*_FLUX_LORA_KEYS, "distilled_guidance_layer")),
    # FLUX.1 Kontext [dev]: FLUX.1-dev's transformer trained on (control, target, caption) pairs; its
    # LoRA files are FLUX LoRAs (flux1, BFL names), the control image's tokens carry position id 1.
    FamilyInfo("flux-kontext", "FLUX.1 Kontext", "flux", 1024, "flux", "flux1", "flux-1-kontext-dev",
               ("lora_te1", "lora_te3"), ("text_encoder", "text_encoder_2"), "FluxKontextPipeline",
               "black-forest-labs/FLUX.1-Kontext-dev", FLUX_DEV, CLIP_L + T5_XXL_ENCODER + FLUX_AE,
               sample_size_floor=512, has_guidance_embedding=True, default_timestep_sampling="shift",
               impl="core.families.flux.family", width=3072, config_groups=("flow", "flux"), resolution_floor=512,
               memory_parts="core.families.flux.memory:flux_parts", single_file_markers=_FLUX_MARKERS,
               diffusers_class_names=("FluxKontextPipeline",),
               name_words=("kontext",), needs_control=True),
    # musubi-tuner's qwen_image / qwen_image_edit architecture names; ComfyUI's model names are diffusers'.
    FamilyInfo("qwen-image", "Qwen-Image", "dit", 1328, "qwen-image", "qwen_image", "Qwen-Image", (),
               ("text_encoder",), "QwenImagePipeline", "Qwen/Qwen-Image", QWEN_IMAGE, QWEN25_VL_7B + QWEN_IMAGE_VAE,
               sample_size_floor=512, default_timestep_sampling="dynamic",
               modelspec_implementation="https://github.com/QwenLM/Qwen-Image", impl="core.families.qwen_image.family",
               diffusers_class_names=("QwenImagePipeline", "QwenImageTransformer2DModel"),
               single_file_markers=("transformer_blocks.0.img_mod.1.weight", "txt_norm.weight"),
               name_words=("qwen-image", "qwen_image"), width=3072, config_groups=("flow",), resolution_floor=512,
               memory_parts="core.families.qwen_image.memory:qwen_parts", lora_key_markers=_QWEN_LORA_KEYS),
    FamilyInfo("qwen-image-edit", "Qwen-Image-Edit", "dit", 1024, "qwen-image", "qwen_image_edit", "Qwen-Image-Edit",
               (), ("text_encoder",), "QwenImageEditPipeline", "Qwen/Qwen-Image-Edit", QWEN_IMAGE,
               QWEN25_VL_7B + QWEN_IMAGE_VAE, sample_size_floor=512, default_timestep_sampling="dynamic",
               modelspec_implementation="https://github.com/QwenLM/Qwen-Image", impl="core.families.qwen_image.family",
               diffusers_class_names=("QwenImageEditPipeline",), name_words=("qwen-image-edit", "qwen_image_edit"),
               width=3072, config_groups=("flow",), resolution_floor=512,
               memory_parts="core.families.qwen_image.memory:qwen_parts", needs_control=True),
    # Qwen-Image-Edit-2509 / 2511 (QwenImageEditPlusPipeline): the same transformer, 1..N reference images per
    # target (the pipeline's card: 1 to 3 work best), plain images trained as text-to-image beside them. Their
    # folders differ by the transformer config's zero_cond_t (2511), their single files by the file name only.
    *(FamilyInfo(name, label, "dit", 1024, "qwen-image", version, label, (), ("text_encoder",),
                 "QwenImageEditPlusPipeline", f"Qwen/{label}", QWEN_IMAGE, QWEN25_VL_7B + QWEN_IMAGE_VAE,
                 sample_size_floor=512, default_timestep_sampling="dynamic",
                 modelspec_implementation="https://github.com/QwenLM/Qwen-Image",
                 impl="core.families.qwen_image.family", diffusers_class_names=("QwenImageEditPlusPipeline",),
                 name_words=words, width=3072, config_groups=("flow",), resolution_floor=512,
                 memory_parts="core.families.qwen_image.memory:qwen_parts", max_references=3)
      for name, label, version, words in (
          ("qwen-image-edit-2509", "Qwen-Image-Edit-2509", "qwen_image_edit_2509",
           ("qwen-image-edit-2509", "qwen_image_edit_2509")),
          ("qwen-image-edit-2511", "Qwen-Image-Edit-2511", "qwen_image_edit_2511",
           ("qwen-image-edit-2511", "qwen_image_edit_2511")))),
    # sd-scripts names SD3 models by library/sd3_utils' model_type ("medium", "5-medium", "5-large"):
    # ss_base_model_version is that, modelspec.architecture "stable-diffusion-3-" + it (sd3_lora_files
    # writes SD3 medium's own type when an SD3 medium is trained under the "sd3" row). Medium and large
    # are told apart by their blocks (sd3_load.model_type_from_keys), so only the "sd3" row lists markers.
    FamilyInfo("sd3", "SD3.5 / SD3 Medium", "dit", 1024, "sd3", "5-medium", "stable-diffusion-3-5-medium",
               ("lora_te1", "lora_te2", "lora_te3"), ("text_encoder", "text_encoder_2", "text_encoder_3"),
               "StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-medium", SD35_MEDIUM, SD3_ENCODERS,
               sample_size_floor=512, default_timestep_sampling="shift", impl="core.families.sd3.family",
               width=1536, config_groups=("flow",), resolution_floor=512,
               memory_parts="core.families.sd3.memory:sd3_parts",
               diffusers_class_names=("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
               single_file_markers=("joint_blocks.0.x_block.attn.proj.weight",),
               name_words=("sd3", "sd3.5", "sd35", "stable-diffusion-3"),
               lora_key_markers=(r"^lora_unet_joint_blocks_\d+_", r"^(diffusion_model\.)?joint_blocks\.\d+\.",
                                 r"^transformer\.transformer_blocks\.\d+\.attn2\.")),
    FamilyInfo("sd35-large", "SD3.5 Large", "dit", 1024, "sd3", "5-large", "stable-diffusion-3-5-large",
               ("lora_te1", "lora_te2", "lora_te3"), ("text_encoder", "text_encoder_2", "text_encoder_3"),
               "StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-large", SD35_LARGE, SD3_ENCODERS,
               sample_size_floor=512, default_timestep_sampling="shift", impl="core.families.sd3.family",
               width=2432, config_groups=("flow",), resolution_floor=512,
               memory_parts="core.families.sd3.memory:sd3_parts", name_words=("sd3.5_large", "sd3.5-large",
                                                                               "stable-diffusion-3.5-large")),
    # Wan 2.1 / 2.2: the 1.3B (width 1536) and the 14B (5120) share every name; the width tells them apart, the
    # input channels (36) an image-to-video one (core.families.wan.load.variant_from_shapes). Video: clips train as
    # [16, F, h, w] latents, previews are clips.
    # native_resolution: the square of the same area as 832x480 (1.3B) and 1280x720 (14B), in 64s.
    *(FamilyInfo(name, label, "dit", native, "wan", version, name, (), ("text_encoder",), pipeline,
                 repo, params, UMT5_XXL + (WAN22_VAE if name == "wan2.2-ti2v-5b" else WAN_VAE)
                 + (CLIP_H_VISION if image_prompt else 0), sample_size_floor=0,
                 default_timestep_sampling="shift",
                 modelspec_implementation="https://github.com/Wan-Video/Wan2.1", impl="core.families.wan.family",
                 width=width, config_groups=("flow",), resolution_floor=256, video=True,
                 start_image="needed" if pipeline == "WanImageToVideoPipeline" else
                 "optional" if name == "wan2.2-ti2v-5b" else "", image_prompt=image_prompt,
                 two_experts="a14b" in name,
                 memory_parts="core.families.wan.memory:wan_parts",
                 diffusers_class_names=(pipeline, "WanTransformer3DModel"),
                 single_file_markers=("blocks.0.cross_attn.q.weight", "blocks.0.attn2.to_q.weight"),
                 name_words=words, lora_key_markers=(
                     r"^(lora_unet_|diffusion_model\.)?blocks[._]\d+[._](self_attn|cross_attn)[._][qkvo]\b",
                     r"^(lora_unet_|diffusion_model\.)?blocks[._]\d+[._]ffn[._][02]\b",
                     r"^transformer\.blocks\.\d+\.(attn1|attn2)\.to_"))
      for name, label, version, repo, params, width, native, words, pipeline, image_prompt in (
          ("wan2.1-t2v-1.3b", "Wan 2.1 T2V 1.3B", "wan2.1_t2v_1.3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", WAN21_13B,
           1536, 640, ("wan2.1", "wan2_1", "wan-2.1", "wan21", "wan-ai/"), "WanPipeline", False),
          ("wan2.1-t2v-14b", "Wan 2.1 T2V 14B", "wan2.1_t2v_14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers", WAN21_14B,
           5120, 960, ("wan2.1-t2v-14b", "wan2.1_t2v_14b", "wan2_1_t2v_14b", "t2v-14b", "t2v_14b"), "WanPipeline",
           False),
          # Wan 2.2 A14B: two 14B experts (one or both train, `wan_expert`); trained_params is one of them.
          ("wan2.2-t2v-a14b", "Wan 2.2 T2V A14B", "wan2.2_t2v_a14b", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", WAN21_14B,
           5120, 960, ("wan2.2-t2v-a14b", "wan2.2_t2v_a14b", "wan2.2", "wan2_2", "high_noise", "low_noise"),
           "WanPipeline", False),
          # Image-to-video (36 input channels: the noisy latents, the first-frame mask and condition latents);
          # Wan 2.1's also attends to the start image's CLIP ViT-H features (`image_dim`).
          ("wan2.1-i2v-14b", "Wan 2.1 I2V 14B", "wan2.1_i2v_14b", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", WAN21_I2V,
           5120, 640, ("wan2.1-i2v-14b", "wan2.1_i2v_14b", "wan2_1_i2v_14b", "i2v-14b", "i2v_14b", "wan2.1_i2v",
                       "wan2.1-i2v", "wan2_1_i2v"),
           "WanImageToVideoPipeline", True),
          ("wan2.2-i2v-a14b", "Wan 2.2 I2V A14B", "wan2.2_i2v_a14b", "Wan-AI/Wan2.2-I2V-A14B-Diffusers", WAN22_I2V,
           5120, 960, ("wan2.2-i2v-a14b", "wan2.2_i2v_a14b", "i2v-a14b", "i2v_a14b", "i2v_high_noise",
                       "i2v_low_noise", "wan2.2_i2v", "wan2.2-i2v", "wan2_2_i2v"), "WanImageToVideoPipeline", False),
          # Wan 2.2 TI2V-5B: text or image to video with its own VAE (48 channels, 16x spatial); a clip's first
          # latent frame stays clean, timesteps per token (the pipelines' expand_timesteps).
          ("wan2.2-ti2v-5b", "Wan 2.2 TI2V 5B", "wan2.2_ti2v_5b", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", WAN22_5B,
           3072, 960, ("wan2.2-ti2v-5b", "wan2.2_ti2v_5b", "ti2v-5b", "ti2v_5b", "wan2_2_ti2v"), "WanPipeline",
           False))),
    # Z-Image: Turbo and base share every shape; the name tells them apart (the longest name word wins).
    *(FamilyInfo(name, label, "dit", 1024, "z-image", version, "Z-Image", (), ("text_encoder",), "ZImagePipeline",
                 repo, Z_IMAGE, QWEN3_4B + FLUX_AE, sample_size_floor=512, default_timestep_sampling="shift",
                 modelspec_implementation="https://github.com/Tongyi-MAI/Z-Image",
                 impl="core.families.zimage.family", width=3840, config_groups=("flow",), resolution_floor=512,
                 memory_parts="core.families.zimage.memory:zimage_parts",
                 diffusers_class_names=("ZImagePipeline", "ZImageTransformer2DModel"),
                 single_file_markers=("noise_refiner.0.attention.out.weight",
                                      "noise_refiner.0.attention.to_out.0.weight"),
                 name_words=words, lora_key_markers=(
                     r"^lora_unet_(layers|noise_refiner|context_refiner)_\d+_(attention_qkv|attention_out|feed_forward_w[123])\.",
                     r"^(transformer\.|diffusion_model\.)?(noise_refiner|context_refiner)\.\d+\.(attention|feed_forward)\."),
                 **distillation)
      for name, label, version, repo, words, distillation in (
          ("z-image-turbo", "Z-Image-Turbo", "z_image_turbo", "Tongyi-MAI/Z-Image-Turbo",
           ("z-image-turbo", "z_image_turbo", "zimage-turbo", "zimage_turbo"),
           dict(distilled=True, training_base="Tongyi-MAI/Z-Image",
                training_adapter_repo="ostris/zimage_turbo_training_adapter", preview_steps=8, preview_guidance=0.0)),
          ("z-image", "Z-Image", "z_image", "Tongyi-MAI/Z-Image", ("z-image", "z_image", "zimage"),
           dict(sample_base="Tongyi-MAI/Z-Image-Turbo", preview_steps=50, preview_guidance=4.0)))),
    # Krea 2: Raw (the base, to train on) and Turbo share every shape; the name or is_distilled tells them apart.
    # Their LoRAs are one kind (ss_base_model_version "krea2", as FLUX.1-dev / schnell share "flux1"): trained on
    # Raw, used on Turbo.
    *(FamilyInfo(name, label, "dit", 1024, "krea2", version, "Krea-2", (), ("text_encoder",), "Krea2Pipeline", repo,
                 KREA2, QWEN3_VL_4B + QWEN_IMAGE_VAE, sample_size_floor=512, default_timestep_sampling="logit_normal",
                 modelspec_implementation="https://github.com/krea-ai/krea-2", impl="core.families.krea2.family",
                 width=6144, config_groups=("flow",), resolution_floor=512,
                 memory_parts="core.families.krea2.memory:krea2_parts",
                 diffusers_class_names=("Krea2Pipeline", "Krea2Transformer2DModel"),
                 single_file_markers=("txtmlp.1.weight", "txt_in.linear_1.weight"), name_words=words,
                 lora_key_markers=_KREA2_LORA_KEYS, **distillation)
      for name, label, version, repo, words, distillation in (
          # Raw: 28 steps at CFG 4.5, previewed on Turbo where it is on the machine (core.sample_base);
          # Turbo: 8 steps without CFG (Krea2Pipeline's model cards).
          ("krea2", "Krea 2 (Raw)", "krea2", "krea/Krea-2-Raw", ("krea-2", "krea2", "krea_2"),
           dict(sample_base="krea/Krea-2-Turbo", preview_steps=28, preview_guidance=4.5)),
          ("krea2-turbo", "Krea 2 Turbo", "krea2", "krea/Krea-2-Turbo",
           ("krea-2-turbo", "krea2-turbo", "krea_2_turbo", "krea2_turbo"),
           dict(distilled=True, training_base="krea/Krea-2-Raw", preview_steps=8, preview_guidance=0.0)))),
)}
IMAGE_FAMILIES = tuple(FAMILIES)
UNET_FAMILIES = tuple(name for name, info in FAMILIES.items() if info.kind == "unet")


def family_info(name: str) -> FamilyInfo:
    """The facts of family `name`; a clear error for an unknown one."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"Unknown model family '{name}'; known: {', '.join(FAMILIES)}.") from None


def config_groups_of(name: str) -> tuple[str, ...]:
    """The family-specific config groups shown for family `name` (none for an LLM or unknown model)."""
    info = FAMILIES.get(name)
    if info is None:
        return ()
    # "guidance": the guidance value a guidance-distilled model (FLUX.1-dev, Kontext, FLUX.2 dev) trains with.
    return info.config_groups + (("guidance",) if info.has_guidance_embedding else ())


# Every config group a family shows only for itself (the form hides them for the others).
FAMILY_CONFIG_GROUPS = frozenset(g for name in FAMILIES for g in config_groups_of(name))


def family_label(name: str) -> str:
    """A person's name for a family ("SDXL", "FLUX.1-dev"); the raw name for anything else."""
    info = FAMILIES.get(name)
    return info.label if info else {"llm": "LLM", "unknown": "unknown model"}.get(name, name)


# --- naming a model or a file from the rows' markers (the first row, SD 1.x, is the fallback) -------------

FALLBACK_FAMILY = IMAGE_FAMILIES[0]


def family_of_context_dim(width: int) -> str | None:
    """The UNet family whose cross-attention reads a text context `width` wide."""
    return next((info.name for info in FAMILIES.values() if width in info.context_dims), None)


def family_of_text_encoder_width(width: int) -> str | None:
    """The family whose one text encoder is `width` wide (a LoRA of only its text encoder)."""
    return next((info.name for info in FAMILIES.values() if info.text_encoder_width == width), None)


def family_of_checkpoint(keys: list[str] | set[str]) -> str | None:
    """The family of a full single-file checkpoint: the row with the longest tensor-name prefix it has."""
    hits = [(len(prefix), info.name) for info in FAMILIES.values() for prefix in info.checkpoint_prefixes
            if any(k.startswith(prefix) for k in keys)]
    return max(hits)[1] if hits else None


def family_of_metadata(metadata: dict[str, str]) -> str | None:
    """The family a kohya file's metadata names through a row's `metadata_markers` (each key in turn, in
    the order sd-scripts' own keys come first)."""
    for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture"):
        value = metadata.get(key, "")
        for info in FAMILIES.values():
            if value and any(k == key and value.startswith(prefix) for k, prefix in info.metadata_markers):
                return info.name
    return None


def distilled_warning(family: str, training_adapter: str, sample_base: str = "") -> str:
    """One sentence when a distilled model is trained directly without a training adapter, else ""."""
    info = FAMILIES.get(family)
    if info is None or not info.distilled or training_adapter:
        return ""
    if not info.training_adapter_repo and info.training_base:  # no known adapter (Krea 2 Turbo): train the base
        return (f"{info.label} is a distilled model: a LoRA trained on it directly drifts it off its "
                f"{info.preview_steps}-step distillation, so train on its base model {info.training_base} instead "
                "(its previews are drawn on this one when it is on the machine).")
    instead = f" (e.g. {info.training_adapter_repo})" if info.training_adapter_repo else ""
    base = (f", or train on its base model {info.training_base} with sample_base set to this one"
            if info.training_base else "")
    return (f"{info.label} is a distilled model: a LoRA trained on it directly drifts it off its "
            f"{info.preview_steps}-step distillation, so set training_adapter to its training adapter{instead}{base}.")
