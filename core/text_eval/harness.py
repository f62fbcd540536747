"""General tasks through lm-eval-harness (the `lm-eval` library), to see what a LoRA forgot.

`eval_tasks` names lm-eval tasks (`arc_easy`, `hellaswag`, `gsm8k` ...) or paths to task YAML
files of one's own (lm-eval reads local JSON/CSV data through `dataset_path: json` and
`dataset_kwargs: {data_files: ...}`). Each is run on at most `eval_limit` examples, so a slice
of a benchmark runs on a CPU in minutes.

Nothing is downloaded: the Hub is switched to offline mode while tasks load, and a task whose
data is not on this machine is refused before the model loads, with one sentence naming the
data set to download. The model is the run's own PEFT model, handed to lm-eval's `HFLM` as an
instance (the adapter on, or switched off for the base's score).
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The metric a task is reported by, in order of preference (the first the task has).
HEADLINE_METRICS = ("acc", "exact_match", "acc_norm", "f1", "mcc", "bleu")


class EvalTaskError(ValueError):
    """An eval task that cannot run here (unknown, or its data is not on this machine)."""


@dataclass
class TaskScore:
    task: str
    metric: str  # e.g. "acc,none"
    value: float
    samples: int


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """The Hugging Face Hub switched off for `datasets` and `huggingface_hub` (restored after)."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _quiet_lm_eval() -> None:
    # lm-eval logs every request batch at INFO; the run's log should keep its own lines.
    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)


def task_manager(tasks: list[str]) -> Any:
    """lm-eval's TaskManager over the folders of the YAML files among `tasks`, and its own task
    folders only when a task is named (indexing its thousands of YAML files takes a while)."""
    folders = tuple(sorted({str(Path(t).expanduser().resolve().parent) for t in tasks if _is_yaml(t)}))
    return _manager(folders, any(not _is_yaml(t) for t in tasks))


@functools.lru_cache(maxsize=4)
def _manager(folders: tuple[str, ...], defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    return TaskManager(include_path=list(folders) or None, include_defaults=defaults)


def _is_yaml(task: str) -> bool:
    return task.lower().endswith((".yaml", ".yml"))


def _spec(task: str) -> str:
    return str(Path(task).expanduser().resolve()) if _is_yaml(task) else task


def _dataset_of(manager: Any, task: str) -> str:
    """'allenai/ai2_arc (ARC-Easy)': the data set a registered task reads, for the refusal."""
    entry = manager.task_index.get(task)
    cfg = getattr(entry, "cfg", None) or {}
    path, name = cfg.get("dataset_path"), cfg.get("dataset_name")
    if not path:
        return ""
    return f"{path} ({name})" if name else str(path)


def _download_hint(dataset: str) -> str:
    path, _, name = dataset.partition(" (")
    name = name.rstrip(")")
    args = f"'{path}'" + (f", '{name}'" if name else "")
    return f"python -c \"import datasets; datasets.load_dataset({args})\""


def load_tasks(tasks: list[str], manager: Any = None) -> dict[str, Any]:
    """{each of `tasks`: lm-eval's TaskDict of it (its tasks, groups and group map)}, with the data
    loaded from this machine only.

    EvalTaskError names the first task that cannot run and what to do about it.
    """
    manager = manager or task_manager(tasks)
    loaded: dict[str, Any] = {}
    for task in tasks:
        if not _is_yaml(task) and manager.task_index.get(task) is None:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            raise EvalTaskError(f"eval_tasks: '{task}' is not an lm-eval task"
                                + (f" (did you mean {', '.join(close)}?)." if close else
                                   "; give a task name such as arc_easy or the path of a task YAML file."))
        if _is_yaml(task) and not Path(task).expanduser().is_file():
            raise EvalTaskError(f"eval_tasks: the task file {task} does not exist.")
        try:
            with offline_hub():
                loaded[task] = manager.load([_spec(task)])
        except EvalTaskError:
            raise
        except Exception as exc:  # datasets raises many kinds when data is missing
            dataset = _dataset_of(manager, task)
            if dataset:
                raise EvalTaskError(
                    f"eval_tasks: '{task}' needs the data set {dataset}, which is not on this machine; download "
                    f"it once while online ({_download_hint(dataset)}) or remove '{task}' from eval_tasks."
                ) from exc
            raise EvalTaskError(f"eval_tasks: '{task}' cannot load its data on this machine ({exc}); fix the task "
                                f"or remove it from eval_tasks.") from exc
    return loaded


def headline(task: str, metrics: dict[str, Any], samples: int) -> TaskScore | None:
    """The task's main number (acc, else exact_match, ...), as lm-eval reported it."""
    numeric = {k: float(v) for k, v in metrics.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    for wanted in HEADLINE_METRICS:
        for key, value in numeric.items():
            if key.split(",", 1)[0] == wanted:
                return TaskScore(task, key, value, samples)
    if numeric:
        key = next(iter(numeric))
        return TaskScore(task, key, numeric[key], samples)
    return None


def _report_names(spec: str, task_dict: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """The rows a spec is shown by: itself when lm-eval scored it as a whole (a task, or a group with
    an aggregate), else each of its tasks."""
    names = [spec] if spec in results else []
    names += [g for g in task_dict.get("groups", {}) if g in results and g not in names]
    return names or sorted(n for n in task_dict["tasks"] if n in results)


def run_tasks(model: Any, tokenizer: Any, loaded: dict[str, Any], limit: int, batch_size: int = 8,
              max_length: int | None = None) -> list[TaskScore]:
    """Score `model` as it is now (adapter on or off) on the `loaded` tasks, `limit` examples each.

    lm-eval's `evaluate` itself, without `simple_evaluate`'s extras (it collects the machine's
    environment with subprocesses on every call, which costs more than a small task).
    """
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    tasks = {name: task for task_dict in loaded.values() for name, task in task_dict["tasks"].items()}
    groups = {name: group for task_dict in loaded.values() for name, group in task_dict.get("groups", {}).items()}
    group_map = {name: children for task_dict in loaded.values()
                 for name, children in task_dict.get("group_map", {}).items()}
    for task in tasks.values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)  # as simple_evaluate does
        task.set_fewshot_seed(seed=1234)  # the same few-shot examples before and after training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    was_training = model.training
    model.eval()
    try:
        with offline_hub():
            results = evaluate(lm=lm, task_dict={"tasks": tasks, "groups": groups, "group_map": group_map},
                               limit=limit, log_samples=False, bootstrap_iters=0, verbosity="WARNING")
    finally:
        if was_training:
            model.train()
    by_name = (results or {}).get("results", {})
    counts = (results or {}).get("n-samples", {})
    scores = []
    for spec, task_dict in loaded.items():
        for name in _report_names(Path(spec).stem if _is_yaml(spec) else spec, task_dict, by_name):
            samples = counts.get(name, {})
            found = headline(name, by_name[name], int(samples.get("effective", samples.get("original", 0)) or 0))
            if found is not None:
                scores.append(found)
    return scores
