"""Tests of text LoRA: SFT, DPO/ORPO, KTO, GRPO, VLM, evaluation, GGUF and llama.cpp."""
