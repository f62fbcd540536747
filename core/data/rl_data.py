"""Data for KTO and GRPO: rows of a CSV or JSONL file (or a folder of them).

- KTO (`text_method: kto`): `prompt, completion, label`: one answer and whether it is desirable
  (true / false, 1 / 0, yes / no, up / down, good / bad). `response` or `answer` also name the
  completion, `question` or `instruction` the prompt; the prompt may be a chat as for DPO.
- GRPO (`text_method: grpo`): `prompt` (or `question` / `instruction`) and any other columns,
  which the reward functions see (e.g. `answer` for the numeric check).

Bad rows are all listed with their file and line, as for the other text data.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.data import preference as pref_data
from core.data import text as text_data
from core.data.text import TextDataError, TextExample, TokenizedExample

COMPLETION_KEYS = ("completion", "response", "answer", "output")
LABEL_WORDS = {"true": True, "1": True, "yes": True, "up": True, "good": True, "desirable": True, "👍": True,
               "false": False, "0": False, "no": False, "down": False, "bad": False, "undesirable": False,
               "👎": False}


def read_records(path: str | Path, method: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, record with lower-case keys) of every row of the CSV / JSONL files at `path`."""
    records: list[tuple[str, dict[str, Any]]] = []
    for file in text_data.data_files(path):
        suffix = file.suffix.lower()
        if suffix == ".csv":
            text = text_data.read_text_file(file)
            try:
                dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            reader = csv.DictReader(io.StringIO(text), dialect=dialect)
            for row in reader:
                if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    records.append((f"{file.name}:{reader.line_num}", pref_data.lower_keys(row)))
        elif suffix in (".jsonl", ".json"):
            for where, record in pref_data.json_records(file):
                if not isinstance(record, dict):
                    raise TextDataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
                records.append((where, pref_data.lower_keys(record)))
        else:
            raise TextDataError(f"{file.name}: plain text has no prompts; text_method {method} needs a CSV or "
                                "JSONL file.")
    if not records:
        raise TextDataError(f"{path}: no rows found (the files are empty).")
    return records


def _refuse(problems: list[tuple[str, str]]) -> None:
    if problems:
        shown = "; ".join(f"{where}: {problem}" for where, problem in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise TextDataError(f"{len(problems)} row(s) cannot be used: {shown}{more}.")


def _prompt(record: dict[str, Any], where: str, method: str, expected: str) -> list[dict[str, str]]:
    if not any(k in record for k in pref_data.PROMPT_KEYS):
        raise TextDataError(f"{where}: text_method {method} needs the columns {expected}; found "
                            f"{', '.join(record) or 'no columns'}.")
    prompt = pref_data.prompt_messages(record, where)
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise TextDataError(f"{where}: the prompt is empty.")
    return prompt


# --- KTO ---------------------------------------------------------------------------------------
KTO_EXPECTED = "prompt,completion,label (label true or false)"


@dataclass
class LabelledCompletion:
    source: str
    prompt: list[dict[str, str]]
    completion: str
    desirable: bool

    def chat(self) -> TextExample:
        return TextExample(self.source, messages=[*self.prompt, {"role": "assistant", "content": self.completion}])


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in LABEL_WORDS:
        raise TextDataError(f"{where}: label {value!r} is neither true nor false (also 1/0, yes/no, good/bad).")
    return LABEL_WORDS[word]


def load_labelled(path: str | Path) -> list[LabelledCompletion]:
    """KTO's rows; TextDataError listing every bad row (file:line)."""
    examples, problems = [], []
    for where, record in read_records(path, "kto"):
        try:
            examples.append(labelled_row(record, where))
        except TextDataError as exc:
            problems.append((where, str(exc).removeprefix(f"{where}: ")))
    _refuse(problems)
    return examples


def labelled_row(record: dict[str, Any], where: str) -> LabelledCompletion:
    """One KTO row (keys lower-case); TextDataError naming the row and what is wrong with it."""
    prompt = _prompt(record, where, "kto", KTO_EXPECTED)
    key = next((k for k in COMPLETION_KEYS if k in record), None)
    if key is None or "label" not in record:
        raise TextDataError(f"{where}: text_method kto needs the columns {KTO_EXPECTED}; found "
                            f"{', '.join(record)}.")
    completion = text_data.as_text(record[key], where, key)
    if not completion.strip():
        raise TextDataError(f"{where}: the '{key}' value is empty.")
    return LabelledCompletion(where, prompt, completion, _label(record["label"], where))


@dataclass
class TokenizedLabelled:
    example: TokenizedExample
    desirable: bool

    def __len__(self) -> int:
        return len(self.example)


@dataclass
class TokenizedLabelledSet:
    items: list[TokenizedLabelled] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def tokenize_labelled(tokenizer: Any, examples: list[LabelledCompletion], max_seq_length: int) -> TokenizedLabelledSet:
    result = TokenizedLabelledSet()
    for example in examples:
        tokens = text_data.tokenize_chat(tokenizer, example.chat(), last_turn_only=True)
        if len(tokens) > max_seq_length:
            result.truncated.append(example.source)
            tokens = TokenizedExample(tokens.input_ids[:max_seq_length], tokens.labels[:max_seq_length],
                                      tokens.source)
        if tokens.trained_tokens == 0:
            result.dropped.append(example.source)
            continue
        result.items.append(TokenizedLabelled(tokens, example.desirable))
    return result


# --- GRPO --------------------------------------------------------------------------------------
GRPO_EXPECTED = "prompt (and any columns your reward functions read, e.g. answer)"


@dataclass
class RewardPrompt:
    source: str
    prompt: list[dict[str, str]]
    row: dict[str, Any]  # every column, for the reward functions

    @property
    def text(self) -> str:
        return "\n".join(m["content"] for m in self.prompt if m["role"] != "system")


def load_prompts(path: str | Path) -> list[RewardPrompt]:
    """GRPO's prompts; TextDataError listing every bad row (file:line)."""
    prompts, problems = [], []
    for where, record in read_records(path, "grpo"):
        try:
            prompts.append(prompt_row(record, where))
        except TextDataError as exc:
            problems.append((where, str(exc).removeprefix(f"{where}: ")))
    _refuse(problems)
    return prompts


def prompt_row(record: dict[str, Any], where: str) -> RewardPrompt:
    """One GRPO row (keys lower-case); TextDataError naming the row and what is wrong with it."""
    return RewardPrompt(where, _prompt(record, where, "grpo", GRPO_EXPECTED), record)
