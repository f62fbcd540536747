"""Model families beyond Stable Diffusion: how each is detected, loaded and trained.

Each family keeps its pure functions in its own modules (FLUX.1 dev/schnell and Chroma
in `flux_load`, `flux_single_file`, `flux_convert`, `flux_text`, `flux_train` and
`flux_memory`, with `flux` as the one import), so the
image training loop can call them once it dispatches on the family.
"""
