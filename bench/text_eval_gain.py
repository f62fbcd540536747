"""What a text LoRA gained on its own questions and what it lost elsewhere: SmolLM2-135M on the Kestrel data.

    python bench/text_eval_gain.py [--epochs 4] [--out /tmp/text_eval_gain]

Trains the example config's LoRA (rank 16, lr 2e-3, cosine) on the 150 Kestrel questions with
`eval_file` = the 30 held-out ones asked in other words (right when the greedy answer contains
the fact's keyword: `eval_match: contains`) and `eval_tasks` = a small local lm-eval task of 20
general-knowledge multiple-choice questions (accuracy by log-likelihood), both scored on the base
before training and on the LoRA after. Prints the run's eval/table.md and the minutes per epoch.
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

DATA = ROOT.parent / "shared" / "data" / "text"
GENERAL = [  # (question, choices, index of the right one): things a small instruct model mostly knows
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("How many days are in a week?", ["Five", "Seven", "Ten", "Twelve"], 1),
    ("What color is the sky on a clear day?", ["Green", "Red", "Blue", "Black"], 2),
    ("Which animal says moo?", ["Dog", "Cat", "Cow", "Duck"], 2),
    ("What is 2 + 2?", ["3", "4", "5", "22"], 1),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
    ("What do bees make?", ["Milk", "Honey", "Silk", "Wool"], 1),
    ("How many legs does a spider have?", ["Six", "Eight", "Four", "Ten"], 1),
    ("What is frozen water called?", ["Steam", "Ice", "Sand", "Glass"], 1),
    ("Which is the largest ocean?", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
    ("What is the opposite of hot?", ["Cold", "Warm", "Loud", "Fast"], 0),
    ("Which language is spoken in Spain?", ["German", "Spanish", "Japanese", "Russian"], 1),
    ("How many hours are in a day?", ["12", "24", "36", "48"], 1),
    ("What do you use to write on paper?", ["A spoon", "A pen", "A shoe", "A cup"], 1),
    ("Which fruit is yellow and long?", ["Apple", "Banana", "Grape", "Cherry"], 1),
    ("What is the boiling point of water in Celsius?", ["50", "100", "150", "200"], 1),
    ("Which season comes after winter?", ["Autumn", "Summer", "Spring", "Winter"], 2),
    ("What gas do plants take in?", ["Oxygen", "Helium", "Carbon dioxide", "Neon"], 2),
    ("How many continents are there?", ["Three", "Five", "Seven", "Nine"], 2),
    ("What is the main language of the United States?", ["English", "French", "Italian", "Dutch"], 0),
]


def write_inputs(folder: Path) -> tuple[Path, Path]:
    questions = folder / "kestrel_keywords.csv"
    with questions.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "response"])
        for line in (DATA / "kestrel_val.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            writer.writerow([row["prompt"], row["keyword"]])
    data = folder / "general_mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "label": i}) for q, c, i in GENERAL) + "\n")
    task = folder / "general_mc.yaml"
    task.write_text(f"""task: general_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data.as_posix()}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return questions, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    from core.config import config_from_dict
    from core.events import RunContext
    from core.train import run_training

    work = Path(args.out or tempfile.mkdtemp(prefix="text_eval_gain-"))
    work.mkdir(parents=True, exist_ok=True)
    questions, task = write_inputs(work)
    cfg = config_from_dict(dict(
        task_type="text-generation", train_data_dir=str(DATA / "kestrel_train.jsonl"), output_dir=str(work / "run"),
        lora_rank=16, lora_alpha=32, batch_size=4, epochs=args.epochs, learning_rate=2e-3, lr_scheduler="cosine",
        lr_warmup_steps=10, weight_decay=0.0, seed=42, save_steps=0, eval_file=str(questions),
        eval_tasks=[str(task)], sample_max_new_tokens=48))
    started = time.perf_counter()
    lines: list[str] = []
    run_training(cfg, RunContext(listeners=[lambda e: lines.append(getattr(e, "message", "")) if e.kind == "log" else None]))
    whole = time.perf_counter() - started
    summary = json.loads((work / "run" / "train_summary.json").read_text())
    print((work / "run" / "eval" / "table.md").read_text())
    print(f"training {summary['train_seconds']:.0f} s for {args.epochs} epochs "
          f"({summary['train_seconds'] / 60 / args.epochs:.1f} min per epoch), whole run with both evaluations "
          f"{whole:.0f} s; output in {work}")


if __name__ == "__main__":
    main()
