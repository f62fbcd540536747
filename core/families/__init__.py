"""Image model families: how each is detected, loaded, trained, saved and previewed.

`registry` holds each family's data; `base.ImageFamily` is the one interface the training
path and the previews ask (`family_for_model`, `family_impl`), served by `sd` (SD 1.x /
2.x / SDXL) and `flux_family` (FLUX.1 dev/schnell, Chroma). FLUX's pure functions live in
`flux_load`, `flux_single_file`, `flux_convert`, `flux_text`, `flux_train` and
`flux_memory` (with `flux` as the one import), and `flux_lora_keys` for the LoRA files
(diffusers/PEFT names <-> the BFL names WebUI, Forge and ComfyUI load).
"""
