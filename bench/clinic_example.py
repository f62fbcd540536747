"""What did the shipped text example learn? The base model and its LoRA on the held-out clinic questions.

    python train.py --config configs/text_example.yaml          # first: the example run (output/clinic_lora)
    python bench/clinic_example.py [--adapter output/clinic_lora/adapter] [--limit 50] [--show 2]

data/clinic_qa_heldout.csv asks the 50 facts of data/clinic_qa.csv in other words, each with the
keyword a right answer holds. Printed: the share of held-out answers holding their keyword, for the
base model (the adapter switched off) and with the LoRA, and the first `--show` questions with
both answers side by side (greedy, so a rerun prints the same).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default=str(ROOT / "output" / "clinic_lora" / "adapter"))
    parser.add_argument("--heldout", default=str(ROOT / "data" / "clinic_qa_heldout.csv"))
    parser.add_argument("--base-model", default="", help="empty: the default SmolLM2 GGUF, as in the example")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--show", type=int, default=2)
    args = parser.parse_args()
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise SystemExit(f"No adapter at {args.adapter}: run `python train.py --config configs/text_example.yaml` first.")
    from core.sample_text import compare_answers

    with open(args.heldout, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[: args.limit]
    started = time.perf_counter()
    answers = compare_answers(args.base_model, args.adapter, [r["prompt"] for r in rows], max_new_tokens=40)
    seconds = time.perf_counter() - started

    def share(side: str) -> str:
        hits = sum(r["keyword"].lower() in a[side].lower() for r, a in zip(rows, answers))
        return f"{hits}/{len(rows)} ({hits / len(rows):.0%})"

    print(f"held-out answers holding their keyword: base model {share('base')}, with the LoRA {share('lora')} "
          f"({seconds:.0f} s of generation)")
    for row, answer in list(zip(rows, answers))[: args.show]:
        print(f"\nQ: {row['prompt']}\n  base: {answer['base']!r}\n  LoRA: {answer['lora']!r}\n  "
              f"(the fact: {row['response']})")


if __name__ == "__main__":
    main()
