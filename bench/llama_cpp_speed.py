"""llama.cpp's generation speed with our GGUF LoRA adapter, against the base model alone, in one run.

    python bench/llama_cpp_speed.py                 # SmolLM2-135M (models/llm/, put there by launch.py), rank 8 on every linear
    python bench/llama_cpp_speed.py --adapter my.lora.gguf --base model.gguf

Without --adapter, a LoRA is made on the base (PEFT, random B, so it changes the answers) and
written with `core.export.gguf_adapter`. Both runs generate the same number of tokens greedily
from the same prompt in llama.cpp (llama-cpp-python, built by `python launch.py --test`), and it
prints tokens/s for each and the ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def smollm2() -> Path:
    from core.models.llm import ModelLoadError, default_text_model

    try:
        return Path(default_text_model())
    except ModelLoadError as exc:
        raise SystemExit(f"{exc} {exc.advice}") from exc


def make_adapter(base: Path, folder: Path, rank: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from core.export.gguf_adapter import write_gguf_adapter
    from core.models.llm import load_llm

    model, _, _ = load_llm(str(base))
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft_model.save_pretrained(str(folder / "adapter"))
    return write_gguf_adapter(folder / "adapter", folder / "bench.lora.gguf", base=str(base)).path


def tokens_per_second(base: Path, adapter: Path | None, prompt: str, tokens: int, threads: int) -> tuple[float, str]:
    import llama_cpp

    kwargs = {"lora_path": str(adapter)} if adapter else {}
    llm = llama_cpp.Llama(model_path=str(base), n_ctx=512, n_threads=threads, verbose=False, **kwargs)
    try:
        ids = llm.tokenize(prompt.encode("utf-8"))
        for count, _ in enumerate(llm.generate(ids, temp=0.0)):  # warm-up: the first tokens pay for loading
            if count >= 8:
                break
        llm.reset()
        made: list[int] = []
        started = time.perf_counter()
        # The low-level generator: exactly `tokens` greedy tokens, whatever the model would stop on.
        for token in llm.generate(ids, temp=0.0):
            made.append(token)
            if len(made) >= tokens:
                break
        seconds = time.perf_counter() - started
        return len(made) / seconds, llm.detokenize(made).decode("utf-8", "replace")
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="a GGUF model (default: SmolLM2-135M in models/llm/)")
    parser.add_argument("--adapter", type=Path, help="a GGUF LoRA adapter (default: one made here)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    base = args.base or smollm2()
    adapter = args.adapter or make_adapter(base, Path(tempfile.mkdtemp(prefix="llama-bench-")), args.rank)
    prompt = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
    plain, plain_text = tokens_per_second(base, None, prompt, args.tokens, args.threads)
    lora, lora_text = tokens_per_second(base, adapter, prompt, args.tokens, args.threads)
    print(f"llama.cpp, {base.name}: {plain:.1f} tokens/s alone, {lora:.1f} tokens/s with {adapter.name} "
          f"({lora / plain:.2f}x; the adapter {'changes' if lora_text != plain_text else 'does not change'} the answer)")
    return {"base_tokens_per_s": plain, "lora_tokens_per_s": lora, "changed": lora_text != plain_text}


if __name__ == "__main__":
    main()
