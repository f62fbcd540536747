"""Preference data for DPO / ORPO: a prompt with a chosen and a rejected answer.

Accepted (a file, or a folder of such files):
- CSV with the columns `prompt,chosen,rejected` (`question` or `instruction` for the
  prompt too) and an optional `system` column;
- JSONL (or a JSON list) of records with those keys. The prompt may also be a chat (a
  list of role/content messages) and chosen/rejected lists of messages ending with the
  assistant's answer (TRL's conversational form; without a prompt key, the turns before
  the answer are the prompt and must be the same in both).

The prompt is rendered with the chat template as for SFT and each answer is the last
assistant turn: only its tokens carry loss. A file without the three columns is refused
naming the columns it has; bad rows (a missing or empty value, chosen == rejected) are
collected with their file and line, so the Dataset tab can list them all and training
refuses them all at once.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.data import text as text_data
from core.data.text import TextDataError, TextExample, TokenizedExample

PROMPT_KEYS = ("prompt", "question", "instruction")
ANSWER_KEYS = ("chosen", "rejected")
EXPECTED = "prompt,chosen,rejected (question or instruction also name the prompt)"


@dataclass
class PreferenceExample:
    """One comparison: the conversation up to the answer, and the better and the worse answer."""

    source: str  # "file.csv:12"
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str

    def chat(self, answer: str) -> TextExample:
        return TextExample(self.source, messages=[*self.prompt, {"role": "assistant", "content": answer}])

    @property
    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.prompt if m["role"] != "system")

    @property
    def system_text(self) -> str:
        return "\n".join(m["content"] for m in self.prompt if m["role"] == "system")


@dataclass
class PreferenceRows:
    """What a read found: the usable examples and each bad row's (source, problem)."""

    examples: list[PreferenceExample] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def _lower_keys(record: dict[Any, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in record.items() if k is not None}


def has_preference_columns(columns: list[str]) -> bool:
    return all(key in columns for key in ANSWER_KEYS)


def _answer(value: Any, where: str, key: str) -> tuple[list[dict[str, str]], str]:
    """(the turns before the answer, the answer) of a chosen/rejected value: text or a chat."""
    if isinstance(value, list):
        messages = text_data.chat_messages(value, f"{where} ({key})")
        if messages[-1]["role"] != "assistant":
            raise TextDataError(f"{where}: '{key}' must end with the assistant's answer.")
        return messages[:-1], messages[-1]["content"]
    return [], text_data.as_text(value, where, key)


def _prompt(keys: dict[str, Any], where: str) -> list[dict[str, str]]:
    name = next((k for k in PROMPT_KEYS if k in keys), None)
    messages: list[dict[str, str]] = []
    if name is not None:
        value = keys[name]
        if isinstance(value, list):
            messages = text_data.chat_messages(value, f"{where} ({name})", need_answer=False)
        else:
            question = text_data.as_text(value, where, name)
            if name == "instruction" and keys.get("input"):
                question = f"{question}\n\n{text_data.as_text(keys['input'], where, 'input')}"
            messages = [{"role": "user", "content": question}] if question.strip() else []
    system = keys.get("system")
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": text_data.as_text(system, where, "system")})
    return messages


def record_to_example(record: dict[Any, Any], where: str) -> PreferenceExample:
    """One record (a CSV row or a JSON object) as a comparison; TextDataError says what is wrong."""
    keys = _lower_keys(record)
    missing = [k for k in ANSWER_KEYS if keys.get(k) is None]
    if missing:
        raise TextDataError(f"{where}: no '{missing[0]}' value.")
    prompt = _prompt(keys, where)
    before_chosen, chosen = _answer(keys["chosen"], where, "chosen")
    before_rejected, rejected = _answer(keys["rejected"], where, "rejected")
    if before_chosen != before_rejected:
        raise TextDataError(f"{where}: chosen and rejected continue different conversations; only the last "
                            "assistant turn may differ.")
    prompt = prompt + before_chosen
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise TextDataError(f"{where}: the prompt is empty.")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer.strip():
            raise TextDataError(f"{where}: the '{key}' answer is empty.")
    if chosen.strip() == rejected.strip():
        raise TextDataError(f"{where}: chosen and rejected are the same answer, so there is nothing to prefer.")
    return PreferenceExample(where, prompt, chosen, rejected)


def _refuse_columns(name: str, found: list[str]) -> TextDataError:
    return TextDataError(f"{name}: preference tuning (text_method dpo or orpo) needs the columns {EXPECTED}; "
                         f"found {', '.join(found) or 'no columns'}.")


def _read_csv(path: Path, rows: PreferenceRows) -> None:
    text = text_data.read_text_file(path)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if not (has_preference_columns(header) and any(k in header for k in PROMPT_KEYS)):
        raise _refuse_columns(path.name, header)
    for record in reader:
        where = f"{path.name}:{reader.line_num}"
        if None in record:  # more fields than the header
            rows.problems.append((where, f"more fields than the header's {len(header)}; quote values that "
                                         'contain commas ("like, this")'))
            continue
        if all(not (v or "").strip() for v in record.values()):
            continue  # a row of empty fields
        try:
            rows.examples.append(record_to_example(record, where))
        except TextDataError as exc:
            rows.problems.append((where, str(exc).removeprefix(f"{where}: ")))


def _json_records(path: Path) -> list[tuple[str, Any]]:
    text = text_data.read_text_file(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            return [(f"{path.name}[{i}]", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as exc:
            raise TextDataError(f"{path.name}:{exc.lineno}: broken JSON ({exc.msg}).") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path.name}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise TextDataError(f"{path.name}:{number}: broken JSON line ({exc.msg} at column {exc.colno}). "
                                "Each line must be one complete JSON object.") from None
    return records


def _read_json(path: Path, rows: PreferenceRows) -> None:
    records = _json_records(path)
    objects = [r for _, r in records if isinstance(r, dict)]
    if objects and not any(has_preference_columns(list(_lower_keys(r))) for r in objects):
        # No record is a comparison: the whole file is of another kind.
        raise _refuse_columns(path.name, list(_lower_keys(objects[0])))
    for where, record in records:
        if not isinstance(record, dict):
            rows.problems.append((where, f"expected a JSON object, got {type(record).__name__}"))
            continue
        try:
            rows.examples.append(record_to_example(record, where))
        except TextDataError as exc:
            rows.problems.append((where, str(exc).removeprefix(f"{where}: ")))


def read_preference_rows(path: str | Path) -> PreferenceRows:
    """Every comparison of a file or folder, and the rows that cannot be used (for the preview)."""
    rows = PreferenceRows()
    for file in text_data.data_files(path):
        suffix = file.suffix.lower()
        if suffix == ".csv":
            _read_csv(file, rows)
        elif suffix in (".jsonl", ".json"):
            _read_json(file, rows)
        else:
            raise TextDataError(f"{file.name}: plain text has no chosen and rejected answers; preference tuning "
                                f"needs a CSV or JSONL file with {EXPECTED}.")
    return rows


def load_preference_examples(path: str | Path) -> list[PreferenceExample]:
    """The comparisons at `path`; TextDataError listing every bad row (file:line) if there are any."""
    rows = read_preference_rows(path)
    if rows.problems:
        shown = "; ".join(f"{where}: {problem}" for where, problem in rows.problems[:10])
        more = f" (and {len(rows.problems) - 10} more)" if len(rows.problems) > 10 else ""
        raise TextDataError(f"{len(rows.problems)} row(s) cannot be used: {shown}{more}.")
    if not rows.examples:
        raise TextDataError(f"{path}: no comparisons found (the files are empty).")
    return rows.examples


def looks_like_preference(path: str | Path) -> bool:
    """True when the first data file's header (CSV) or first record (JSONL) has chosen and rejected."""
    try:
        file = text_data.data_files(path)[0]
    except TextDataError:
        return False
    text = text_data.read_text_file(file)
    first = next((line for line in text.splitlines() if line.strip()), "")
    if file.suffix.lower() == ".csv":
        columns = [c.strip().strip('"').lower() for c in first.replace(";", ",").replace("\t", ",").split(",")]
        return has_preference_columns(columns)
    if file.suffix.lower() in (".jsonl", ".json"):
        try:
            records = _json_records(file)
        except TextDataError:
            return False
        return any(isinstance(r, dict) and has_preference_columns(list(_lower_keys(r))) for _, r in records[:5])
    return False


# --- tokenizing ------------------------------------------------------------------------------

@dataclass
class TokenizedPair:
    """The chosen and the rejected conversation as token ids; labels on the final answer only."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    source: str

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


@dataclass
class TokenizedPairs:
    pairs: list[TokenizedPair]
    truncated: list[str]  # sources with an answer cut at max_seq_length
    dropped: list[str]  # sources where an answer has no token left after cutting


def _cut(item: TokenizedExample, limit: int) -> TokenizedExample:
    return TokenizedExample(item.input_ids[:limit], item.labels[:limit], item.source)


def tokenize_pairs(tokenizer: Any, examples: list[PreferenceExample], max_seq_length: int) -> TokenizedPairs:
    """Tokenize both sides of each comparison, cutting each at `max_seq_length` like SFT does."""
    result = TokenizedPairs([], [], [])
    for example in examples:
        chosen = text_data.tokenize_chat(tokenizer, example.chat(example.chosen), last_turn_only=True)
        rejected = text_data.tokenize_chat(tokenizer, example.chat(example.rejected), last_turn_only=True)
        if len(chosen) > max_seq_length or len(rejected) > max_seq_length:
            result.truncated.append(example.source)
            chosen, rejected = _cut(chosen, max_seq_length), _cut(rejected, max_seq_length)
        if chosen.trained_tokens == 0 or rejected.trained_tokens == 0:
            result.dropped.append(example.source)
            continue
        result.pairs.append(TokenizedPair(chosen, rejected, example.source))
    return result


# Shared with KTO's and GRPO's rows (core.data.rl_data), which read the same prompt forms.
lower_keys = _lower_keys
json_records = _json_records
prompt_messages = _prompt
