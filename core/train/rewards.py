"""GRPO's reward functions: what `grpo_rewards` names, each a score of one sampled answer.

Each entry of `grpo_rewards` is one function; an answer's reward is their sum.
- `regex:<pattern>`: 1 when the answer matches the pattern (re.search), else 0;
- `json`: 1 when the answer (without a ``` fence) parses as JSON, else 0;
- `numeric`: 1 when the answer's last number equals the row's `answer` column, else 0;
- `length:<n>`: minus the share of characters beyond n (0 up to n, -1 at 2n and beyond);
- `path/to/file.py`: your own; the file defines `reward(prompt: str, completion: str, row: dict) -> float`
  (row: every column of the prompt's data row). It runs as Python: name only files you wrote.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RewardFn = Callable[[str, str, dict[str, Any]], float]
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


class RewardError(ValueError):
    """A grpo_rewards entry that cannot be used."""


def _regex(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)
    return lambda prompt, completion, row: 1.0 if compiled.search(completion) else 0.0


def _json_valid(prompt: str, completion: str, row: dict[str, Any]) -> float:
    fenced = _FENCE.match(completion)
    try:
        json.loads(fenced.group(1) if fenced else completion)
    except ValueError:
        return 0.0
    return 1.0


def _numeric(prompt: str, completion: str, row: dict[str, Any]) -> float:
    if "answer" not in row:
        raise RewardError("the numeric reward needs an 'answer' column in the GRPO data.")
    numbers = _NUMBER.findall(completion)
    if not numbers:
        return 0.0
    try:
        expected = float(str(row["answer"]).replace(",", "."))
    except ValueError:
        raise RewardError(f"the numeric reward needs a number in the 'answer' column, got {row['answer']!r}.") from None
    return 1.0 if math.isclose(float(numbers[-1].replace(",", ".")), expected, rel_tol=1e-9, abs_tol=1e-9) else 0.0


def _length(limit: int) -> RewardFn:
    return lambda prompt, completion, row: -min(1.0, max(0, len(completion) - limit) / limit)


def _from_file(path: Path) -> RewardFn:
    spec = importlib.util.spec_from_file_location(f"user_reward_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RewardError(f"grpo_rewards: {path} is not a Python file.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: report, do not crash the app
        raise RewardError(f"grpo_rewards: {path.name} fails to load ({type(exc).__name__}: {exc}).") from exc
    function = getattr(module, "reward", None)
    if not callable(function):
        raise RewardError(f"grpo_rewards: {path.name} must define reward(prompt, completion, row) -> float.")
    return function


def parse_reward(entry: str) -> RewardFn:
    """One `grpo_rewards` entry as a function; RewardError says what is wrong with it."""
    text = entry.strip()
    kind, _, argument = text.partition(":")
    kind = kind.strip().lower()
    if text.lower().endswith(".py"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise RewardError(f"grpo_rewards: the reward file {text} does not exist.")
        return _from_file(path)
    if kind == "regex":
        try:
            return _regex(argument)
        except re.error as exc:
            raise RewardError(f"grpo_rewards: {argument!r} is not a valid regular expression ({exc}).") from None
    if kind == "json":
        return _json_valid
    if kind == "numeric":
        return _numeric
    if kind == "length":
        try:
            limit = int(argument)
        except ValueError:
            limit = 0
        if limit <= 0:
            raise RewardError(f"grpo_rewards: {text!r} needs a length in characters, e.g. length:200.")
        return _length(limit)
    raise RewardError(f"grpo_rewards: {text!r} is not a reward; use regex:<pattern>, json, numeric, length:<n> "
                      "or the path of a .py file defining reward(prompt, completion, row).")


@dataclass
class RewardSet:
    names: list[str]
    functions: list[RewardFn]

    @classmethod
    def parse(cls, entries: list[str]) -> RewardSet:
        if not entries:
            raise RewardError("grpo_rewards: text_method grpo needs at least one reward, e.g. regex:^\\d+$, json, "
                              "numeric, length:200 or a .py file.")
        return cls(list(entries), [parse_reward(e) for e in entries])

    def score(self, prompt: str, completion: str, row: dict[str, Any]) -> float:
        total = 0.0
        for name, function in zip(self.names, self.functions):
            try:
                value = float(function(prompt, completion, row))
            except RewardError:
                raise
            except Exception as exc:  # the user's function failed on this answer
                raise RewardError(f"grpo_rewards: {name} failed on an answer ({type(exc).__name__}: {exc}).") from exc
            if not math.isfinite(value):
                raise RewardError(f"grpo_rewards: {name} returned {value} (rewards must be finite numbers).")
            total += value
        return total
