"""Evaluation around a text LoRA run: the base before training, the LoRA every `eval_steps` and after.

`EvalSuite.from_config` reads the held-out questions and loads the lm-eval tasks before any
model loads, so a missing file or task data fails at once. `before` scores the model with the
adapter switched off (the base, as DPO's reference is here); a resumed run keeps the base's
score from the run folder instead of measuring it again. `measure_lora` scores the adapter
as trained so far. Each measurement rewrites eval/ (results.json, table.md, before_after.png)
and sends an EvalEvent for the Train tab. Greedy answers and lm-eval's own seeding draw no
training randomness: callers run this inside core.train.loop.keep_rng.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_write_text
from core.config import TrainConfig
from core.events import EvalEvent, RunContext
from core.text_eval import heldout, report

HELDOUT_NAME = "your questions"


@dataclass
class EvalSuite:
    cfg: TrainConfig
    ctx: RunContext
    out: Path
    questions: list[heldout.Question] = field(default_factory=list)
    tasks: dict[str, Any] = field(default_factory=dict)  # lm-eval Task objects by name
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: RunContext) -> EvalSuite | None:
        """None when the run asks for no evaluation; raises TextDataError / EvalTaskError on bad input."""
        if not cfg.eval_file and not cfg.eval_tasks:
            return None
        suite = cls(cfg, ctx, Path(cfg.output_dir))
        if cfg.eval_file:
            suite.questions = heldout.load_questions(cfg.eval_file)
        if cfg.eval_tasks:
            from core.text_eval import harness

            suite.tasks = harness.load_tasks(list(cfg.eval_tasks))
        return suite

    def describe(self) -> str:
        parts = []
        if self.questions:
            parts.append(f"{len(self.questions)} held-out question(s) ({self.cfg.eval_match} match)")
        if self.tasks:
            names = [name for loaded in self.tasks.values() for name in loaded["tasks"]]
            parts.append(f"lm-eval {', '.join(names)} ({self.cfg.eval_limit} examples each)")
        return " and ".join(parts)

    # --- measuring ---------------------------------------------------------------------------
    def _measure(self, peft_model: Any, tokenizer: Any, label: str) -> list[dict[str, Any]]:
        """[{"name", "metric", "value"}] of the model as it is now; answers to the questions saved under eval/."""
        measured: list[dict[str, Any]] = []
        with torch.no_grad():
            if self.questions:
                result = heldout.answer_and_score(peft_model, tokenizer, self.questions, self.cfg.eval_match,
                                                  self.cfg.sample_max_new_tokens)
                measured.append({"name": HELDOUT_NAME, "metric": f"{self.cfg.eval_match}-match",
                                 "value": result.accuracy})
                atomic_write_text(self.out / report.EVAL_DIR / f"answers-{label}.json",
                                  json.dumps(result.rows, indent=1, ensure_ascii=False))
            if self.tasks:
                from core.text_eval import harness

                for score in harness.run_tasks(peft_model, tokenizer, self.tasks, self.cfg.eval_limit,
                                               max_length=self.cfg.max_seq_length):
                    measured.append({"name": score.task, "metric": score.metric.split(",")[0],
                                     "value": score.value})
        return measured

    def before(self, peft_model: Any, tokenizer: Any) -> None:
        """The base's scores: kept from the run folder on resume (same settings), else measured now."""
        kept = report.read_results(self.out)
        if kept and kept.get("settings") == self.settings() and kept.get("rows"):
            self.rows = kept["rows"]
            self.ctx.log("Evaluation: the base model's scores are kept from before the resume")
            return
        self.ctx.log(f"Evaluating the base model (adapter off) on {self.describe()}")
        with peft_model.disable_adapter():
            measured = self._measure(peft_model, tokenizer, "base")
        self.rows = [{"name": m["name"], "metric": m["metric"], "before": m["value"], "after": None,
                      "history": []} for m in measured]
        self._publish(0)

    def measure_lora(self, peft_model: Any, tokenizer: Any, step: int) -> None:
        self.ctx.log(f"Evaluating the LoRA at step {step}")
        measured = {m["name"]: m for m in self._measure(peft_model, tokenizer, f"step-{step:06d}")}
        for row in self.rows:
            found = measured.get(row["name"])
            if found is None:
                continue
            row["after"] = found["value"]
            row["history"] = [h for h in row["history"] if h[0] < step] + [[step, found["value"]]]
        self._publish(step)

    def settings(self) -> dict[str, Any]:
        """What makes two runs' base scores comparable."""
        return {"eval_file": self.cfg.eval_file, "eval_match": self.cfg.eval_match,
                "eval_tasks": list(self.cfg.eval_tasks), "eval_limit": self.cfg.eval_limit,
                "base_model": self.cfg.base_model, "max_new_tokens": self.cfg.sample_max_new_tokens}

    def _publish(self, step: int) -> None:
        results = {"step": step, "settings": self.settings(), "rows": self.rows}
        paths = report.write_report(self.out, results)
        for row in self.rows:
            after = "" if row["after"] is None else f" -> LoRA {100 * row['after']:.1f}%"
            self.ctx.log(f"  {row['name']} ({row['metric']}): base {100 * row['before']:.1f}%{after}")
        self.ctx.emit(EvalEvent(step=step, rows=[dict(r) for r in self.rows], chart=str(paths["chart"])))

    def summary(self) -> dict[str, Any]:
        return {"evaluation": {r["name"]: {"metric": r["metric"], "before": r["before"], "after": r["after"]}
                               for r in self.rows}}
