"""Evaluation of a text LoRA: the user's own questions and lm-eval tasks, on the base before training
and on the LoRA after (and every eval_steps), with the table and chart in the run folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.config import ConfigError, config_from_dict
from core.data.text import TextDataError
from core.events import DoneEvent, EvalEvent, LogEvent, ProgressEvent, RunContext
from core.text_eval import heldout
from core.train import run_training
from tests.fixtures.eval_tasks import write_local_task
from tests.fixtures.tiny_llm import KESTREL_QA, write_qa_jsonl

TAUGHT = KESTREL_QA[:2]  # short exact answers the tiny Llama learns in a few steps


def eval_config(base: Path, data: Path, out: Path, **extra):
    raw = dict(task_type="text-generation", base_model=str(base), train_data_dir=str(data), output_dir=str(out),
               batch_size=2, max_train_steps=8, learning_rate=1e-2, lora_rank=8, lora_alpha=16, save_steps=0,
               seed=7, max_seq_length=64, eval_file=str(data), sample_max_new_tokens=16)
    raw.update(extra)
    return config_from_dict(raw)


def collect() -> tuple[RunContext, list]:
    events: list = []
    return RunContext(listeners=[events.append]), events


@pytest.fixture
def lm_eval_cache(tmp_path, monkeypatch):
    """datasets' cache in a temporary folder: a task's data is only what the test wrote."""
    pytest.importorskip("lm_eval")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return tmp_path / "datasets-cache"


# -- scoring ----------------------------------------------------------------------------------
def test_answers_count_as_right_by_whole_words_ignoring_case_and_punctuation():
    assert heldout.matches("It flies for 47 minutes!", "it flies for 47 minutes", "exact")
    assert not heldout.matches("It flies for 47 minutes, roughly.", "It flies for 47 minutes.", "exact")
    assert heldout.matches("Sure: about 72 minutes on the charger.", "About 72 minutes", "contains")
    assert not heldout.matches("It weighs 612 grams.", "12 grams", "contains")  # whole words only
    assert not heldout.matches("anything", "", "contains")


def test_an_eval_file_of_plain_text_is_refused_with_what_it_needs(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("Some text without questions.\n", encoding="utf-8")
    with pytest.raises(TextDataError, match="prompt,response"):
        heldout.load_questions(notes)


def test_a_missing_eval_file_is_refused_with_the_key(tiny_llm_dir, qa_file, tmp_path):
    with pytest.raises(ConfigError) as error:
        eval_config(tiny_llm_dir, qa_file, tmp_path / "run", eval_file=str(tmp_path / "nope.csv"))
    assert "eval_file" in error.value.errors


# -- end to end -------------------------------------------------------------------------------
def test_a_text_lora_shows_what_it_gained_on_your_questions_and_an_lm_eval_task(
        tiny_llm_dir, tmp_path, lm_eval_cache):
    data = write_qa_jsonl(tmp_path / "taught.jsonl", TAUGHT)
    task = write_local_task(tmp_path / "tasks")
    ctx, events = collect()
    out = tmp_path / "run"
    outputs = run_training(eval_config(tiny_llm_dir, data, out, eval_steps=4, eval_tasks=[str(task)]), ctx)

    evals = [e for e in events if isinstance(e, EvalEvent)]
    assert [e.step for e in evals] == [0, 4, 8]  # the base before training, every eval_steps, the end
    base, *_, final = evals
    rows = {r["name"]: r for r in final.rows}
    assert set(rows) == {"your questions", "kestrel_choices"}
    mine = rows["your questions"]
    assert mine["metric"] == "contains-match" and mine["before"] == 0.0 and mine["after"] == 1.0
    assert [h[0] for h in mine["history"]] == [4, 8]
    assert rows["kestrel_choices"]["metric"] == "acc" and 0.0 <= rows["kestrel_choices"]["before"] <= 1.0
    assert base.rows[0]["after"] is None

    folder = out / "eval"
    assert Path(outputs["eval"]) == folder / "results.json"
    results = json.loads((folder / "results.json").read_text())
    assert results["step"] == 8 and results["rows"] == final.rows
    table = (folder / "table.md").read_text()
    assert "| your questions | contains-match | 0.0% | 100.0% | +100.0 pts |" in table
    assert (folder / "before_after.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = json.loads((folder / "answers-step-000008.json").read_text())
    assert [a["correct"] for a in answers] == [True, True]
    assert not any(a["correct"] for a in json.loads((folder / "answers-base.json").read_text()))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["evaluation"]["your questions"] == {"metric": "contains-match", "before": 0.0, "after": 1.0}
    assert [e for e in events if isinstance(e, DoneEvent)][-1].outputs["eval"] == str(folder / "results.json")


@pytest.mark.slow  # three short runs
def test_evaluating_during_a_run_leaves_its_training_unchanged_and_a_resume_keeps_the_base_score(
        tiny_llm_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_qa_jsonl(tmp_path / "taught.jsonl", TAUGHT)
    plain_ctx, _ = collect()
    run_training(eval_config(tiny_llm_dir, data, tmp_path / "plain", max_train_steps=6, eval_file=""), plain_ctx)

    ctx, _ = collect()
    ctx.listeners.append(lambda e: ctx.stop_flag.set() if isinstance(e, ProgressEvent) and e.step == 3 else None)
    run_training(eval_config(tiny_llm_dir, data, tmp_path / "judged", max_train_steps=6, eval_steps=2), ctx)
    resumed_ctx, resumed = collect()
    run_training(eval_config(tiny_llm_dir, data, tmp_path / "judged", max_train_steps=6, eval_steps=2,
                             resume_from="latest"), resumed_ctx)

    logs = [e.message for e in resumed if isinstance(e, LogEvent)]
    assert any("base model's scores are kept" in line for line in logs)
    assert [e.step for e in resumed if isinstance(e, EvalEvent)] == [4, 6]
    plain = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    judged = load_file(str(tmp_path / "judged" / "adapter" / "adapter_model.safetensors"))
    for key in plain:
        assert torch.allclose(plain[key], judged[key], atol=1e-6), key


@pytest.mark.slow  # indexes lm-eval's thousands of task files (~30 s)
def test_a_task_whose_data_is_not_on_this_machine_is_refused_before_the_model_loads(
        tiny_llm_dir, qa_file, tmp_path, lm_eval_cache):
    from core.text_eval.harness import EvalTaskError

    ctx, events = collect()
    with pytest.raises(EvalTaskError) as error:
        run_training(eval_config(tiny_llm_dir, qa_file, tmp_path / "run", eval_tasks=["arc_easy"]), ctx)
    message = str(error.value)
    assert "allenai/ai2_arc" in message and "download it once" in message and "remove 'arc_easy'" in message
    assert not any(isinstance(e, LogEvent) and e.message.startswith("Model loaded") for e in events)
    with pytest.raises(EvalTaskError, match="did you mean arc_easy"):
        run_training(eval_config(tiny_llm_dir, qa_file, tmp_path / "run2", eval_tasks=["arc_eazy"]), ctx)


def test_the_train_tab_shows_the_latest_evaluation_as_a_table_and_a_before_after_chart():
    from core.job import Job
    from ui import train_tab

    rows = [{"name": "your questions", "metric": "contains-match", "before": 0.25, "after": 0.75,
             "history": [[8, 0.75]]},
            {"name": "arc_easy", "metric": "acc", "before": 0.5, "after": 0.4, "history": [[8, 0.4]]}]
    job = Job()
    job.run(lambda ctx: ctx.emit(EvalEvent(step=8, rows=rows)), kind="train", name="eval")
    snap = job.wait(timeout=30)
    seen: dict = {}
    table, chart = train_tab.evaluation_outputs(snap, seen)
    assert table["visible"] and chart["visible"]
    assert "| your questions | contains-match | 25.0% | 75.0% | +50.0 pts |" in table["value"]
    assert "| arc_easy | acc | 50.0% | 40.0% | -10.0 pts |" in table["value"]  # what it forgot
    bars = [round(p.get_height()) for p in chart["value"].axes[0].patches]
    assert bars == [25, 50, 75, 40]  # base bars, then the LoRA's
    assert train_tab.evaluation_outputs(snap, seen) == (train_tab.gr.skip(), train_tab.gr.skip())
    hidden, _ = train_tab.evaluation_outputs(None, seen)
    assert hidden["visible"] is False
