"""Tests of the LoRA tools: CLI, merge, resize, convert, the Tools tab."""
