"""FLUX.1 (dev / schnell) and Chroma: the one import for the training loop and the app.

Re-exports the public functions of the family's modules:
`flux_load` (detect + load), `flux_convert` (BFL <-> diffusers names), `flux_text`
(prompt encoding + cache), `flux_train` (latents, sigma sampling, loss) and
`flux_memory` (LoRA targets, low-memory switches, parameter counts).
"""
from core.families.flux_convert import bfl_to_diffusers, diffusers_to_bfl, strip_prefix
from core.families.flux_load import (VARIANTS, FluxModel, comfy_models_root, detect_variant, file_has_fp8,
                                     find_part, load_flux_folder, load_flux_model, load_flux_single_file,
                                     load_text_encoder_file, load_transformer_file, load_vae_file, read_upcast,
                                     safetensors_keys, variant_from_folder_configs, variant_from_keys)
from core.families.flux_memory import (LORA_PRESETS, add_flux_lora, apply_group_offload, enable_fp8_storage,
                                       enable_gradient_checkpointing, flux_lora_targets, flux_param_counts,
                                       lora_param_count, lora_parameters, lora_target_suffixes, nf4_config)
from core.families.flux_text import (MAX_SEQUENCE_LENGTH, PromptEmbeds, cache_prompt_embeds, chroma_mask,
                                     encode_prompts, encoder_identity, free_text_encoders, stack_embeds, text_ids)
from core.families.flux_train import (DEFAULT_SHIFT, TIMESTEP_SAMPLING, VARIANT_DEFAULTS, FluxBatch, encode_latents,
                                      flow_target, flux_loss, image_seq_len, latent_image_ids, latents_for_decode,
                                      latents_from_moments, noisy_latents, pack_latents, sample_sigmas, shift_sigmas,
                                      transformer_inputs, unpack_latents, vae_scale)

__all__ = [name for name in dir() if not name.startswith("_")]
