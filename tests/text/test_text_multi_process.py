"""A text LoRA in two processes on one machine (what `accelerate launch` / `torchrun` start on two
GPUs), here on the CPU with gloo: one run, one adapter; each step's loss is the token-weighted mean
over the whole global batch, the same as one process training on all of it; and a resume from a
mid-run checkpoint continues exactly like the uninterrupted run, every process's dropout included.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from core.events import RunContext
from core.presets import resolve_config
from core.train import run_training
from tests.fixtures.tiny_llm import KESTREL_QA, write_qa_jsonl
from tests.helpers import read_loss_csv
from tests.train.test_multi_process import launch_two

pytestmark = pytest.mark.slow  # four train.py processes, two runs, and one run in this process


def text_config(model: Path, data: Path, validation: Path, out: Path, **extra) -> dict:
    raw = dict(task_type="text-generation", base_model=str(model), train_data_dir=str(data),
               validation_file=str(validation), output_dir=str(out), batch_size=1, gradient_accumulation_steps=2,
               max_seq_length=64, mixed_precision="no", optimizer="adamw", gradient_checkpointing=False,
               max_train_steps=4, save_steps=2, learning_rate=5e-3, lora_rank=4, lora_alpha=8, seed=7,
               sample_prompts=["How heavy is it?"], sample_max_new_tokens=4)
    raw.update(extra)
    return raw


@pytest.fixture
def qa_data(tmp_path) -> tuple[Path, Path]:
    # Four training examples: one optimizer step of batch 1 x 2 accumulation x 2 processes is an epoch.
    return (write_qa_jsonl(tmp_path / "train.jsonl", KESTREL_QA[:4]),
            write_qa_jsonl(tmp_path / "val.jsonl", KESTREL_QA[4:]))


def test_two_processes_train_one_text_lora_and_resume_exactly(tiny_llm_dir, qa_data, tmp_path):
    train, validation = qa_data
    straight = tmp_path / "straight"
    raw = text_config(tiny_llm_dir, train, validation, straight, lora_dropout=0.2)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    done = launch_two(config, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert "x 2 processes" in said  # one run in two processes, not two runs
    assert said.count("Done: 4 steps") == 1
    assert (straight / "adapter" / "adapter_model.safetensors").is_file()
    assert [r.step for r in read_loss_csv(straight)] == [1, 2, 3, 4]
    summary = json.loads((straight / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["validation_loss"] is not None and summary["steps"] == 4
    assert sorted(p.name for p in (straight / "samples").iterdir()) == ["step-000004.json", "step-000004.txt"]

    # The same run as if it had ended after step 2: only the step-2 checkpoint and log remain.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    rows = (straight / "loss.csv").read_text(encoding="utf-8").splitlines()
    (resumed / "loss.csv").write_text("\n".join(rows[:3]) + "\n", encoding="utf-8")
    config.write_text(yaml.safe_dump(dict(raw, output_dir=str(resumed), resume_from="latest")), encoding="utf-8")
    again = launch_two(config, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    for a, b in zip(read_loss_csv(straight), read_loss_csv(resumed), strict=True):
        assert a.step == b.step and a.loss == pytest.approx(b.loss, rel=1e-4), f"step {a.step}"
    resumed_summary = json.loads((resumed / "train_summary.json").read_text(encoding="utf-8"))
    assert resumed_summary["tokens_trained"] == summary["tokens_trained"]  # counted over both processes

    # Without dropout, two processes of batch 1 x 2 accumulation train like one process of 1 x 4:
    # every step sees the same four examples, and the loss and gradient are their token-weighted mean.
    one = tmp_path / "one"
    run_training(resolve_config(dict(raw, output_dir=str(one), gradient_accumulation_steps=4, lora_dropout=0.0,
                                     sample_prompts=[])), RunContext())
    two = tmp_path / "two"
    config.write_text(yaml.safe_dump(dict(raw, output_dir=str(two), lora_dropout=0.0, sample_prompts=[])),
                      encoding="utf-8")
    assert launch_two(config, tmp_path).returncode == 0
    for a, b in zip(read_loss_csv(one), read_loss_csv(two), strict=True):
        assert a.step == b.step and a.loss == pytest.approx(b.loss, rel=1e-4), f"step {a.step}"
    assert (json.loads((two / "train_summary.json").read_text(encoding="utf-8"))["tokens_trained"]
            == json.loads((one / "train_summary.json").read_text(encoding="utf-8"))["tokens_trained"])


def test_dpo_in_two_processes_trains_like_one_process_on_the_whole_batch(tiny_llm_dir, tmp_path):
    from tests.text.test_preference import HELD_THINGS, TRAIN_THINGS, comparison, write_csv

    train = write_csv(tmp_path / "prefs.csv", [comparison(t) for t in TRAIN_THINGS[:8]])
    held = write_csv(tmp_path / "held.csv", [comparison(t) for t in HELD_THINGS[:2]])
    raw = dict(task_type="text-generation", base_model=str(tiny_llm_dir), train_data_dir=str(train),
               validation_file=str(held), text_method="dpo", preference_beta=0.1, batch_size=2,
               gradient_accumulation_steps=1, max_train_steps=3, learning_rate=5e-3, lora_rank=4, lora_alpha=8,
               save_steps=0, seed=7, max_seq_length=64, mixed_precision="no", optimizer="adamw",
               gradient_checkpointing=False)
    # Two processes x batch 2 and one process x batch 2 x 2 accumulated see the same four comparisons a step.
    one = tmp_path / "one"
    run_training(resolve_config(dict(raw, output_dir=str(one), gradient_accumulation_steps=2)), RunContext())
    two = tmp_path / "two"
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(dict(raw, output_dir=str(two))), encoding="utf-8")
    done = launch_two(config, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stdout + done.stderr
    for a, b in zip(read_loss_csv(one), read_loss_csv(two), strict=True):
        assert a.step == b.step and a.loss == pytest.approx(b.loss, rel=1e-4), f"step {a.step}"
    summaries = [json.loads((out / "train_summary.json").read_text(encoding="utf-8")) for out in (one, two)]
    assert summaries[1]["validation_loss"] == pytest.approx(summaries[0]["validation_loss"], rel=1e-4)
    assert summaries[1]["validation_accuracy"] == summaries[0]["validation_accuracy"]


def test_kto_in_two_processes_trains_like_one_process_and_grpo_runs_in_two(tiny_llm_dir, tmp_path):
    from tests.text.test_kto_grpo import GRPO_EXTRA, PROMPTS, TRAIN_THINGS, kto_rows, write_csv

    train = write_csv(tmp_path / "labelled.csv", kto_rows(TRAIN_THINGS[:4]))
    raw = dict(task_type="text-generation", base_model=str(tiny_llm_dir), train_data_dir=str(train), text_method="kto",
               preference_beta=0.1, batch_size=2, gradient_accumulation_steps=1, max_train_steps=2,
               learning_rate=5e-3, lora_rank=4, lora_alpha=8, save_steps=0, seed=7, max_seq_length=64,
               mixed_precision="no", optimizer="adamw", gradient_checkpointing=False)
    # The same micro-batches in both (so the same batch KL estimates): the losses agree step by step.
    one = tmp_path / "one"
    run_training(resolve_config(dict(raw, output_dir=str(one), gradient_accumulation_steps=2)), RunContext())
    config = tmp_path / "kto.yaml"
    config.write_text(yaml.safe_dump(dict(raw, output_dir=str(tmp_path / "two"))), encoding="utf-8")
    done = launch_two(config, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(read_loss_csv(one), read_loss_csv(tmp_path / "two"), strict=True):
        assert a.step == b.step and a.loss == pytest.approx(b.loss, rel=1e-4), f"step {a.step}"

    prompts = write_csv(tmp_path / "prompts.csv", [{"prompt": p} for p in PROMPTS])
    grpo = dict(raw, text_method="grpo", train_data_dir=str(prompts), output_dir=str(tmp_path / "grpo"),
                **{**GRPO_EXTRA, "batch_size": 1, "max_train_steps": 2})
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump(grpo), encoding="utf-8")
    done = launch_two(config, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stdout + done.stderr
    assert (tmp_path / "grpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert [r.step for r in read_loss_csv(tmp_path / "grpo")] == [1, 2]
