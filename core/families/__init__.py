"""Image model families: how each is detected, loaded, trained, saved and previewed.

`registry` holds each family's data (one row per family, naming the module of its behaviour);
`base.ImageFamily` is the one interface the training path, the previews and the LoRA tools ask
(`family_for_model`, `family_impl`), served by `sd` (SD 1.x / 2.x / SDXL), `flux_family`
(FLUX.1 dev/schnell, Chroma) and the other families' modules. A new family is its row plus its
own modules: model_info, the memory estimate, the form, presets, inspect and convert read the
row's fields and the module's hooks (`detect`, `memory_parts`, `lora_files`, latent hooks).
FLUX's pure functions live in `flux_load`, `flux_single_file`, `flux_convert`, `flux_text`,
`flux_train` and `flux_memory` (with `flux` as the one import), and `flux_lora_keys` for the
LoRA files (diffusers/PEFT names <-> the BFL names WebUI, Forge and ComfyUI load).
"""
