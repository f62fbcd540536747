"""Does a text LoRA really learn, and how fast? SmolLM2-135M on the Kestrel questions.

    python bench/text_learning.py [--config configs/text_example.yaml] [--skip-baseline]
                                  [--baseline-epochs 8] [--limit-val 30]

The training file (150 question/answer pairs about an invented drone) teaches facts the
base model cannot know; the validation file asks 30 of them in other words, each with
the keyword a correct answer contains. Printed: validation accuracy (keyword in the greedy
answer) of the base model, of a plain transformers `Trainer` + PEFT run (8 epochs at
1e-3, the reference), and of this project's engine with the example config; the training
wall times of both runs, their ratio, and the engine's training tokens/s. Both runs happen
in this process one after the other, so the machine's load affects both alike.
"""
from __future__ import annotations

import argparse
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


def keyword_accuracy(model, tokenizer, rows: list[dict]) -> tuple[float, list[str]]:
    from core.sample_text import generate_answers

    answers = generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=40)
    hits = [r["keyword"].lower() in a.lower() for r, a in zip(rows, answers)]
    return sum(hits) / len(rows), answers


def run_baseline(model_dir: Path, train_file: Path, epochs: int, out: Path, max_steps: int = -1
                 ) -> tuple[float, object, object, int]:
    """The reference: transformers Trainer + PEFT LoRA, padded batches, loss on the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
    rows = [json.loads(line) for line in train_file.read_text().splitlines() if line.strip()]
    features = []
    for row in rows:
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [-100] * len(prompt_ids) + ids[len(prompt_ids):]})
    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, learning_rate=1e-3,
                             per_device_train_batch_size=8, logging_steps=10, save_strategy="no",
                             report_to=[], use_cpu=True, seed=42, disable_tqdm=True, max_steps=max_steps)
    trainer = Trainer(model=model, args=args, train_dataset=features,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    started = time.perf_counter()
    result = trainer.train()
    return time.perf_counter() - started, model, tokenizer, result.global_step


def run_engine(config: Path, train_file: Path, out: Path, overrides: dict) -> tuple[float, float, dict]:
    from core.config import load_config
    from core.events import LogEvent, RunContext, WarningEvent
    from core.train import run_training

    cfg = load_config(config, {"train_data_dir": str(train_file), "output_dir": str(out), "sample_prompts": [],
                               **overrides})
    ctx = RunContext(listeners=[lambda e: print("   ", e.message) if isinstance(e, (LogEvent, WarningEvent)) else None])
    started = time.perf_counter()
    outputs = run_training(cfg, ctx)
    wall = time.perf_counter() - started
    summary = json.loads(Path(outputs["summary"]).read_text())
    return wall, summary["train_seconds"], {**outputs, **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "text_example.yaml"))
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--baseline-epochs", type=int, default=8)
    parser.add_argument("--limit-val", type=int, default=30)
    parser.add_argument("--baseline-steps", type=int, default=-1,
                        help="time only this many baseline steps and extrapolate to the full run (no accuracy)")
    parser.add_argument("--throughput-steps", type=int, default=0,
                        help="short version: time N engine steps and N baseline steps, extrapolate both full "
                             "runs; no accuracy (for a machine too busy for the whole bench)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value for the engine run")
    args = parser.parse_args()
    import torch
    from peft import PeftModel

    from core.data.chat_templates import apply_template
    from core.models.llm import load_llm

    train_file = DATA / "kestrel_train.jsonl"
    val_rows = [json.loads(line) for line in (DATA / "kestrel_val.jsonl").read_text().splitlines() if line.strip()]
    val_rows = val_rows[: args.limit_val]
    overrides = dict(item.split("=", 1) for item in args.set)
    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    work = Path(tempfile.mkdtemp(prefix="text_bench_"))

    started = time.perf_counter()
    base, tokenizer, source = load_llm("")
    apply_template(tokenizer, "")
    print(f"SmolLM2 GGUF loaded in {time.perf_counter() - started:.1f} s")
    if args.throughput_steps:
        return throughput(args, base, tokenizer, train_file, work, overrides)
    base_acc, base_answers = keyword_accuracy(base, tokenizer, val_rows)
    print(f"base model accuracy: {base_acc:.1%}  (e.g. {base_answers[0]!r})")

    print("\n== this engine (configs/text_example.yaml) ==")
    wall, train_s, info = run_engine(Path(args.config), train_file, work / "engine", overrides)
    lora = PeftModel.from_pretrained(base, info["adapter"])
    engine_acc, engine_answers = keyword_accuracy(lora, tokenizer, val_rows)
    base = lora.unload()
    print(f"engine: accuracy {engine_acc:.1%}, training loop {train_s:.1f} s, whole run (load + data + "
          f"train + save) {wall:.1f} s, {info['tokens_per_second']:.0f} training tokens/s, {info['steps']} steps")
    print(f"   e.g. {val_rows[0]['prompt']!r} -> {engine_answers[0]!r}")

    if args.skip_baseline:
        return
    print(f"\n== baseline: transformers Trainer + PEFT, {args.baseline_epochs} epochs at 1e-3 ==")
    hf_dir = work / "smollm2-hf"
    base.save_pretrained(hf_dir)  # Trainer refuses GGUF-loaded models: give it an HF folder
    tokenizer.save_pretrained(hf_dir)
    del base
    baseline_s, baseline_model, baseline_tok, steps = run_baseline(hf_dir, train_file, args.baseline_epochs,
                                                                    work / "baseline", args.baseline_steps)
    if args.baseline_steps > 0:
        full_steps = args.baseline_epochs * -(-150 // 8)
        print(f"baseline: {steps} steps in {baseline_s:.1f} s -> {full_steps} steps (the full run) take about "
              f"{baseline_s / steps * full_steps:.0f} s (extrapolated; accuracy not measured)")
        baseline_s = baseline_s / steps * full_steps
        baseline_acc = float("nan")
    else:
        apply_template(baseline_tok, "")
        baseline_acc, _ = keyword_accuracy(baseline_model, baseline_tok, val_rows)
        print(f"baseline: accuracy {baseline_acc:.1%}, trainer.train() {baseline_s:.1f} s")
    print("\n== summary ==")
    print(f"base {base_acc:.1%} | baseline {baseline_acc:.1%} in {baseline_s:.0f} s | engine {engine_acc:.1%} "
          f"in {train_s:.0f} s loop / {wall:.0f} s whole run")
    print(f"speed-up (baseline train / engine loop): {baseline_s / train_s:.2f}x; "
          f"(baseline train / engine whole run): {baseline_s / wall:.2f}x")


def throughput(args, base, tokenizer, train_file: Path, work: Path, overrides: dict) -> None:
    """Time N steps of each and extrapolate the full runs (engine: its config's epochs; baseline: 8)."""
    from core.config import load_config

    cfg = load_config(args.config, {"train_data_dir": str(train_file), "output_dir": str(work / "engine")})
    steps = args.throughput_steps
    _, train_s, info = run_engine(Path(args.config), train_file, work / "engine",
                                  {**overrides, "max_train_steps": steps, "save_steps": 0})
    examples = 150
    engine_full = train_s / (steps * cfg.batch_size) * examples * cfg.epochs
    print(f"engine: {steps} steps x batch {cfg.batch_size} in {train_s:.1f} s, {info['tokens_per_second']:.0f} "
          f"tokens/s -> {cfg.epochs} epochs take about {engine_full:.0f} s")
    hf_dir = work / "smollm2-hf"
    base.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    baseline_s, _, _, done = run_baseline(hf_dir, train_file, args.baseline_epochs, work / "baseline", steps)
    baseline_full = baseline_s / (done * 8) * examples * args.baseline_epochs
    print(f"baseline: {done} steps x batch 8 in {baseline_s:.1f} s -> {args.baseline_epochs} epochs take about "
          f"{baseline_full:.0f} s")
    per_example = (baseline_s / (done * 8)) / (train_s / (steps * cfg.batch_size))
    print(f"per-example speed-up {per_example:.2f}x; whole-run estimate {baseline_full / engine_full:.2f}x "
          f"(accuracy not measured in this short version)")


if __name__ == "__main__":
    main()
