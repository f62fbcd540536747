"""Model families beyond Stable Diffusion: how each is detected, loaded, trained and saved.

FLUX.1 dev/schnell and Chroma keep their pure functions in their own modules:
`flux_load`, `flux_single_file`, `flux_convert`, `flux_text`, `flux_train` and
`flux_memory` (with `flux` as the one import), and `flux_lora_keys` for the LoRA files
(diffusers/PEFT names <-> the BFL names WebUI, Forge and ComfyUI load).
"""
