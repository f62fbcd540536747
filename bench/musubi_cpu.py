"""Runs one of musubi-tuner's Wan scripts (given by path, its arguments after it) on the bench's small model.

    musubi-venv/bin/python bench/musubi_cpu.py <blocks> <t5 layers> <t5 vocab> <tokenizer dir> <script.py> [args...]

What is changed, and only that, before the script runs (its own source is untouched):
- `torch.cuda.current_device` answers "cpu": musubi's T5EncoderModel has `device=torch.cuda.current_device()` as a
  default argument, so on a machine without an NVIDIA driver the scripts cannot even be imported.
- The t2v-14B config keeps its width (5120, 40 heads, FFN 13824) with `<blocks>` blocks instead of 40; musubi
  builds the DiT from this config, not from the checkpoint.
- umt5_xxl keeps its width (4096, 64 heads, FFN 10240) with `<t5 layers>` layers and the bench's vocabulary; its
  tokenizer is read from `<tokenizer dir>` instead of the hub.
This file imports only musubi-tuner and torch; it runs in musubi's venv (bench/musubi-lock.txt).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch


def main() -> None:
    blocks, t5_layers, vocab, tokenizer, script, *rest = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent.parent))  # <tree>/src, above musubi_tuner/
    torch.cuda.current_device = lambda: "cpu"
    from musubi_tuner.wan.configs import WAN_CONFIGS
    from musubi_tuner.wan.modules import t5

    WAN_CONFIGS["t2v-14B"].num_layers = int(blocks)
    umt5_xxl = t5.umt5_xxl
    t5.umt5_xxl = lambda **kw: umt5_xxl(**{**kw, "encoder_layers": int(t5_layers), "vocab_size": int(vocab)})
    hf_tokenizer = t5.HuggingfaceTokenizer

    class LocalTokenizer(hf_tokenizer):
        def __init__(self, name, seq_len=None, clean=None, **kwargs):
            kwargs.pop("subfolder", None)
            super().__init__(tokenizer, seq_len=seq_len, clean=clean, **kwargs)

    t5.HuggingfaceTokenizer = LocalTokenizer
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
