"""Model loading for text: causal LMs from an HF folder, a hub id or a GGUF file (`llm`, `llm_quant`).

Image models load through their family (core.family_api.lookup).
"""
