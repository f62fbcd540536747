"""Does preference tuning move the model towards the chosen answers? DPO and ORPO on SmolLM2-135M.

    python bench/preference_margins.py [--base GGUF-or-folder] [--steps 8] [--lr 2e-3] [dpo] [orpo]

16 training comparisons, 6 held-out ones about things never seen in training. Every chosen
answer is "No, the X is fine. Goodbye.", the rejected one "Yes, the X is fine. Thank you!"
(the pattern the base model prefers). Printed per method: the held-out margin
logp(chosen) - logp(rejected) (summed answer log-probs) of the base model and of the
trained LoRA, the share of held-out comparisons where chosen is the more likely answer,
and the training time.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TRAIN_THINGS = ["battery", "camera", "warranty", "weight", "speed", "charger", "propeller", "case",
                "remote", "screen", "motor", "antenna", "gimbal", "sensor", "light", "strap"]
HELD_THINGS = ["cable", "manual", "lens", "wheel", "button", "filter"]


def write_comparisons(path: Path, things: list[str]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected"])
        for thing in things:
            writer.writerow([f"What about the {thing}?", f"No, the {thing} is fine. Goodbye.",
                             f"Yes, the {thing} is fine. Thank you!"])
    return path


def held_out_margins(base: str, adapter: str | None, held: Path):
    import torch

    from core.data.preference import load_preference_examples, tokenize_pairs
    from core.models.llm import load_llm
    from core.train.preference_step import answer_margins, make_pair_batch

    model, tokenizer, _ = load_llm(base)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    pairs = tokenize_pairs(tokenizer, load_preference_examples(held), 128).pairs
    batches = [make_pair_batch(pairs[i:i + 3], tokenizer.pad_token_id or 0) for i in range(0, len(pairs), 3)]
    return answer_margins(model, batches, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", default=["dpo", "orpo"])
    parser.add_argument("--base", default="", help="base model (empty: the bundled SmolLM2-135M GGUF)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()

    from core.config import config_from_dict
    from core.events import RunContext
    from core.train import run_training

    base = args.base  # empty: the default text model, for the run and for scoring alike
    work = Path(tempfile.mkdtemp(prefix="preference-bench-"))
    train = write_comparisons(work / "train.csv", TRAIN_THINGS)
    held = write_comparisons(work / "held.csv", HELD_THINGS)
    before = held_out_margins(base, None, held)
    print(f"base: held-out margin {before.mean():.2f}, chosen more likely in {(before > 0).float().mean():.0%}")
    for method in args.methods:
        cfg = config_from_dict(dict(task_type="text-generation", base_model=base, train_data_dir=str(train),
                                    output_dir=str(work / method), text_method=method, preference_beta=0.1,
                                    batch_size=4, max_train_steps=args.steps, learning_rate=args.lr, lora_rank=8,
                                    lora_alpha=16, save_steps=0, seed=7, max_seq_length=128,
                                    lr_scheduler="constant", validation_file=str(held)))
        started = time.perf_counter()
        outputs = run_training(cfg, RunContext(listeners=[]))
        seconds = time.perf_counter() - started
        after = held_out_margins(base, outputs["adapter"], held)
        summary = json.loads(Path(outputs["summary"]).read_text())
        print(f"{method}: held-out margin {before.mean():.2f} -> {after.mean():.2f}, chosen more likely in "
              f"{(before > 0).float().mean():.0%} -> {(after > 0).float().mean():.0%}; {args.steps} steps in "
              f"{summary['train_seconds']:.0f} s of training ({seconds:.0f} s whole run)")


if __name__ == "__main__":
    main()
