"""Image model families: one package each, reached by the engine only through `core.family_api`.

Each package (`sd`, `flux`, `sd3`, `zimage`, `qwen_image`) holds one family's behaviour in the same
file roles (family.py with its `FAMILY`, load.py, single_file.py, text.py, loss.py, lora_files.py,
memory.py, tiny.py); its registry row in `core/family_api/registry.py` names it (`impl`). `dit` is the
neutral toolbox of the flow-matching transformers and the default family they are built from
(`dit.default.transformer_family`); no family package imports another. docs/adding-a-family.md
walks a new family through.
"""
