"""Text data sets for LLM LoRA: reading files, and turning examples into token ids + labels.

Accepted (a file, or a folder of such files):
- CSV with `prompt,response` (also `instruction,output` (+ `input`), `question,answer`),
  and an optional `system` column;
- JSONL (or a JSON list) with chat `messages` (`role`/`content`), alpaca
  `instruction`/`input`/`output`, `prompt`/`response`, `question`/`answer`, or `text`;
- plain `.txt` for continued pre-training (every token carries loss).

A wrong column or a broken line raises `TextDataError` naming the file, the line and
what was expected. Chat examples are rendered with the tokenizer's chat template and
only the assistant's tokens (with the end-of-turn marker) carry loss.
"""
from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import Any, TypeVar

TEXT_EXTENSIONS = (".csv", ".jsonl", ".json", ".txt")
IGNORE_INDEX = -100
# (question column, answer column) pairs, in the order they are looked for.
_PAIR_COLUMNS = (("prompt", "response"), ("instruction", "output"), ("question", "answer"),
                 ("input", "output"), ("prompt", "completion"))
_EXPECTED = ("prompt,response (or instruction,output / question,answer)")
Example = TypeVar("Example")  # split_validation also splits preference pairs


class TextDataError(ValueError):
    """A data file cannot be used; the message names the file, the line and what to fix."""


@dataclass
class TextExample:
    """One training example: a chat (`messages`) or raw text for continued pre-training."""

    source: str  # "file.csv:12" for messages in errors and warnings
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str = ""

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


# --- reading files ---------------------------------------------------------------------------

def data_files(path: str | Path) -> list[Path]:
    """The data files at `path` (a file, or the supported files in a folder, sorted)."""
    root = Path(path)
    if root.is_file():
        if root.suffix.lower() not in TEXT_EXTENSIONS:
            raise TextDataError(f"{root.name}: unsupported data file; use .csv, .jsonl, .json or .txt.")
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS)
        if not files:
            raise TextDataError(f"{root}: no .csv, .jsonl, .json or .txt data files in this folder.")
        return files
    raise TextDataError(f"{root}: the data file or folder does not exist.")


def read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="replace")


def _pair_to_messages(record: dict[str, Any], where: str) -> list[dict[str, str]] | None:
    """prompt/response style columns (any of the known pairs) to a chat, or None if absent."""
    keys = {str(k).strip().lower(): v for k, v in record.items() if k is not None}
    for question_key, answer_key in _PAIR_COLUMNS:
        if question_key in keys and answer_key in keys:
            question = as_text(keys[question_key], where, question_key)
            if question_key == "instruction" and keys.get("input"):
                question = f"{question}\n\n{as_text(keys['input'], where, 'input')}"
            answer = as_text(keys[answer_key], where, answer_key)
            if not question.strip() or not answer.strip():
                empty = question_key if not question.strip() else answer_key
                raise TextDataError(f"{where}: the '{empty}' value is empty.")
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            system = keys.get("system")
            if system:
                messages.insert(0, {"role": "system", "content": as_text(system, where, "system")})
            return messages
    return None


def as_text(value: Any, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TextDataError(f"{where}: '{key}' must be text, got {type(value).__name__}.")


def chat_messages(raw: Any, where: str, need_answer: bool = True) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise TextDataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}}.")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise TextDataError(f"{where}: message {index + 1} is not an object with role and content.")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(str(role), role)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise TextDataError(f"{where}: message {index + 1} needs a role (system, user or assistant) "
                                f"and text content; got role={role!r}.")
        messages.append({"role": role, "content": content})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise TextDataError(f"{where}: the conversation has no assistant message, so there is nothing to "
                            "learn.")
    return messages


def _record_to_example(record: Any, where: str) -> TextExample:
    if not isinstance(record, dict):
        raise TextDataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    for key in ("messages", "conversations"):
        if key in record:
            return TextExample(where, messages=chat_messages(record[key], where))
    messages = _pair_to_messages(record, where)
    if messages is not None:
        return TextExample(where, messages=messages)
    if isinstance(record.get("text"), str):
        return TextExample(where, text=record["text"])
    found = ", ".join(map(str, record)) or "nothing"
    raise TextDataError(f"{where}: expected 'messages', {_EXPECTED} or 'text'; found {found}."
                        f"{_preference_hint([str(k).lower() for k in record])}")


def _preference_hint(columns: list[str]) -> str:
    if "chosen" in columns and "rejected" in columns:
        return " This is preference data (chosen/rejected): train it with text_method: dpo or orpo."
    return ""


def _read_jsonl(path: Path) -> list[TextExample]:
    text = read_text_file(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TextDataError(f"{path.name}:{exc.lineno}: broken JSON ({exc.msg}).") from None
        return [_record_to_example(r, f"{path.name}[{i}]") for i, r in enumerate(records)]
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TextDataError(f"{where}: broken JSON line ({exc.msg} at column {exc.colno}). Each line must "
                                "be one complete JSON object.") from None
        examples.append(_record_to_example(record, where))
    return examples


def _read_csv(path: Path) -> list[TextExample]:
    text = read_text_file(path)
    sample = text[:4096]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if not any(q in header and a in header for q, a in _PAIR_COLUMNS):
        raise TextDataError(f"{path.name}:1: expected the columns {_EXPECTED}; the header has "
                            f"{', '.join(header) or 'no columns'}.{_preference_hint(header)}")
    examples = []
    for record in reader:
        where = f"{path.name}:{reader.line_num}"
        if None in record:  # more fields than the header
            raise TextDataError(f"{where}: more fields than the header's {len(header)}; quote values that "
                                'contain commas ("like, this").')
        if all(not (v or "").strip() for v in record.values()):
            continue
        if any(v is None for v in record.values()):
            raise TextDataError(f"{where}: fewer fields than the header's {len(header)} ({', '.join(header)}).")
        messages = _pair_to_messages(record, where)
        assert messages is not None  # the header check guarantees a pair
        examples.append(TextExample(where, messages=messages))
    return examples


def _read_txt(path: Path) -> list[TextExample]:
    text = read_text_file(path)
    return [TextExample(f"{path.name}", text=text)] if text.strip() else []


def load_examples(path: str | Path) -> list[TextExample]:
    """All examples of a data file or folder, in file order."""
    examples: list[TextExample] = []
    for file in data_files(path):
        suffix = file.suffix.lower()
        if suffix == ".csv":
            examples.extend(_read_csv(file))
        elif suffix in (".jsonl", ".json"):
            examples.extend(_read_jsonl(file))
        else:
            examples.extend(_read_txt(file))
    if not examples:
        raise TextDataError(f"{path}: no training examples found (the files are empty).")
    return examples


def split_validation(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `share` of the examples (at least one, seeded) for validation loss."""
    if share <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = min(len(examples) - 1, max(1, round(len(examples) * share)))
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


# --- tokenizing ------------------------------------------------------------------------------

def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of each assistant turn (with its end marker).

    Rendering the conversation up to each turn gives the spans exactly for templates
    whose output grows by appending (nearly all); otherwise the content is searched for.
    """
    full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], True) if index else ""
        upto = _render(tokenizer, messages[: index + 1], False)
        if full.startswith(before) and full.startswith(upto) and len(upto) > len(before):
            end = len(upto)
            # A trailing newline after the end-of-turn marker is formatting, not an answer.
            while end > len(before) and upto[end - 1] in "\n ":
                end -= 1
            spans.append((len(before), end))
            cursor = len(upto)
        else:
            start = full.find(message["content"], cursor)
            if start < 0:
                continue
            spans.append((start, start + len(message["content"])))
            cursor = start + len(message["content"])
    return full, spans


def tokenize_chat(tokenizer: Any, example: TextExample, last_turn_only: bool = False) -> TokenizedExample:
    """Token ids and labels for a chat; only assistant turns (or only the last one) are labelled."""
    full, spans = _assistant_spans(tokenizer, example.messages)
    if last_turn_only:
        spans = spans[-1:]
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        if end <= start:
            continue
        if any(span_start <= start < span_end for span_start, span_end in spans):
            labels[position] = ids[position]
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]
    return TokenizedExample(ids, labels, example.source)


def tokenize_text(tokenizer: Any, example: TextExample, block: int) -> list[TokenizedExample]:
    """Continued pre-training: the text in blocks of `block` tokens, all of them labelled."""
    ids = list(tokenizer(example.text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    pieces = []
    for start in range(0, len(ids), block):
        chunk = ids[start:start + block]
        if len(chunk) > 1:
            pieces.append(TokenizedExample(chunk, list(chunk), f"{example.source} (block {start // block + 1})"))
    return pieces


@dataclass
class TokenizedSet:
    examples: list[TokenizedExample]
    truncated: list[str]  # sources of examples cut at max_seq_length
    dropped: list[str]  # sources with no trained token left after cutting


def tokenize_examples(tokenizer: Any, examples: Iterable[TextExample], max_seq_length: int) -> TokenizedSet:
    """Tokenize every example, cutting at `max_seq_length` (the cut ones are listed)."""
    result = TokenizedSet([], [], [])
    for example in examples:
        if not example.is_chat:
            result.examples.extend(tokenize_text(tokenizer, example, max_seq_length))
            continue
        item = tokenize_chat(tokenizer, example)
        if len(item) > max_seq_length:
            result.truncated.append(item.source)
            item = TokenizedExample(item.input_ids[:max_seq_length], item.labels[:max_seq_length], item.source)
        if item.trained_tokens == 0:
            result.dropped.append(item.source)
            continue
        result.examples.append(item)
    return result


def describe_sources(sources: list[str], limit: int = 10) -> str:
    shown = ", ".join(sources[:limit])
    return shown + (f" and {len(sources) - limit} more" if len(sources) > limit else "")
