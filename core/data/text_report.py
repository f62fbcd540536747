"""What a text data set holds, before training: its kind, a few rows, token lengths against the
model's context, and the health of its rows.

Rows come from the same parsers training uses (`core.data.text.load_examples`,
`core.data.preference.read_preference_rows`), so what the Dataset tab shows is what a run
will see. Token lengths are counted with the model's tokenizer and chat template when one is
given (exactly what training tokenizes), else estimated without one: a token per word or
punctuation mark, two per Chinese, Japanese or Korean character. Checked: empty answers and
prompts, rows longer than `max_seq_length` (training cuts them) or than the model's context,
exact duplicates, and for preference data the rows training would refuse.
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.data.text import TEXT_EXTENSIONS

PREVIEW_ROWS = 200
ESTIMATED = "estimated from words and marks"


@dataclass
class TextIssue:
    file: str
    severity: str  # error | warning | info, as the image health check
    problem: str
    advice: str


@dataclass
class TextDataReport:
    """A text data set as the Dataset tab shows it."""

    name: str
    kind: str = ""  # "chat", "plain text", "chat and plain text", "preference"; "" when it cannot be read
    count: int = 0
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    issues: list[TextIssue] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens of each example
    counted_by: str = ESTIMATED
    max_seq_length: int = 512
    context_length: int = 0  # the model's own limit; 0 when unknown
    error: str = ""
    labels: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})  # KTO: good / bad answers

    def severity_count(self, severity: str) -> int:
        return sum(1 for issue in self.issues if issue.severity == severity)

    def issue_rows(self) -> list[list[str]]:
        return [[i.severity, i.file, i.problem, i.advice] for i in self.issues]

    def summary_lines(self) -> list[str]:
        """Plain sentences: what it is, how long its rows are against the limits, and its health."""
        if self.error:
            return [f"{self.name} cannot be used yet: {self.error}"]
        noun = {"preference": "preference comparisons (prompt, chosen, rejected: for text_method dpo or orpo)",
                "labelled": f"labelled answers (prompt, completion, label: for text_method kto), "
                            f"{self.labels[True]} good and {self.labels[False]} bad",
                "prompts": "prompts (prompt, optional answer: for text_method grpo)"}.get(
                    self.kind, f"examples ({self.kind})")
        lines = [f"{self.name} — {self.count} {noun}."]
        if self.lengths:
            over = sum(1 for n in self.lengths if n > self.max_seq_length)
            context = f"; the model reads up to {self.context_length}" if self.context_length else ""
            lines.append(f"Tokens per example, {self.counted_by}: shortest {min(self.lengths)}, median "
                         f"{int(statistics.median(self.lengths))}, longest {max(self.lengths)}; {over} longer "
                         f"than max_seq_length {self.max_seq_length}{context}.")
        if self.issues:
            lines.append(f"Health: {self.severity_count('error')} errors, {self.severity_count('warning')} warnings, "
                         f"{self.severity_count('info')} notes.")
        else:
            lines.append("Health: no problems found.")
        if self.count > len(self.rows):
            lines.append(f"Showing the first {len(self.rows)} rows.")
        return lines


def text_data_files(folder: str | Path) -> list[Path]:
    """The text data files directly in `folder` (hidden ones left out), sorted."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in TEXT_EXTENSIONS)


def is_text_dataset(path: str | Path) -> bool:
    """A text data file, or a folder of text data files without images (captions beside images are not data)."""
    from core.data.image_io import IMAGE_EXTENSIONS

    root = Path(path)
    if root.is_file():
        return root.suffix.lower() in TEXT_EXTENSIONS
    if not text_data_files(root):
        return False
    return not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file())


def _role_text(messages: list[dict[str, str]], role: str) -> str:
    return "\n".join(m.get("content", "") for m in messages if m.get("role") == role)


class _Counter:
    """Tokens of an example: the training tokenization when a tokenizer is given, else the estimate."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer

    def chat(self, example: Any, whole: str) -> int:
        if self.tokenizer is None:
            # The caption estimate (words, marks, CJK characters twice) suits LLM tokenizers too; a flat
            # characters/4 undercounts Chinese several times over, and a clinic's answers may be Chinese.
            from core.data.health import estimate_tokens

            return estimate_tokens(whole)
        from core.data.text import tokenize_chat, tokenize_text

        if example.is_chat:
            return len(tokenize_chat(self.tokenizer, example))
        return sum(len(piece) for piece in tokenize_text(self.tokenizer, example, 1 << 30))


def _check_length(report: TextDataReport, where: str, tokens: int, what: str) -> None:
    if tokens > report.max_seq_length:
        report.issues.append(TextIssue(where, "warning",
                                       f"{tokens} tokens, longer than max_seq_length {report.max_seq_length}",
                                       f"It will be cut: raise max_seq_length or shorten the {what}."))
    if report.context_length and tokens > report.context_length:
        report.issues.append(TextIssue(where, "warning", f"{tokens} tokens, longer than the model's context "
                                                         f"({report.context_length})",
                                       f"The model never saw sequences this long: shorten the {what}."))


# What each text_method reads, as the Dataset tab says it when that method is picked.
METHOD_FORMATS = {
    "sft": "sft: prompt,response rows (or instruction,output / question,answer), chat 'messages', or plain text.",
    "dpo": "dpo: prompt,chosen,rejected rows: the answer to prefer and the one to avoid for each prompt.",
    "orpo": "orpo: prompt,chosen,rejected rows, as dpo.",
    "kto": "kto: prompt,completion,label rows: one answer each, label true (good) or false (bad); no pairs needed.",
    "grpo": "grpo: prompt rows, plus any columns your rewards read (answer for the numeric check); the model "
            "writes the answers itself.",
}


def describe_text_data(path: str | Path, *, max_seq_length: int = 512, tokenizer: Any | None = None,
                       context_length: int = 0, limit: int = PREVIEW_ROWS, method: str = "auto") -> TextDataReport:
    """Parse the data file/folder and check every example; a broken file becomes one error row.

    `tokenizer`: the model's (with its chat template set, as training sets it), for exact counts;
    None estimates. `context_length`: the model's maximum sequence length, 0 when unknown.
    `method`: the text_method the data is for (its parser reads it); auto: told by the columns.
    """
    name = Path(path).name
    report = TextDataReport(name=name, max_seq_length=int(max_seq_length), context_length=int(context_length or 0),
                            counted_by=ESTIMATED if tokenizer is None else "counted with the model's tokenizer")
    method = guess_method(path) if method in ("", "auto") else method
    if method in ("dpo", "orpo"):
        _describe_preferences(report, path, _Counter(tokenizer), limit)
    elif method == "kto":
        _describe_labelled(report, path, _Counter(tokenizer), limit)
    elif method == "grpo":
        _describe_prompts(report, path, _Counter(tokenizer), limit)
    else:
        _describe_examples(report, path, _Counter(tokenizer), limit)
    return report


def guess_method(path: str | Path) -> str:
    """dpo for chosen/rejected columns, kto for a label column, else sft (prompts alone look like sft too)."""
    from core.data.preference import looks_like_preference
    from core.data.rl_data import COMPLETION_KEYS, read_records
    from core.data.text import TextDataError

    if looks_like_preference(path):
        return "dpo"
    try:
        first = read_records(path, "auto")[0][1]
    except (TextDataError, OSError, IndexError):
        return "sft"
    return "kto" if "label" in first and any(k in first for k in COMPLETION_KEYS) else "sft"


def _row_problems(report: TextDataReport, problems: list[tuple[str, str]], method: str) -> None:
    """Each bad row as an error; a column missing from every row is said once, in one sentence."""
    columns = [p for p in problems if "needs the columns" in p[1]]
    if columns and len(columns) == report.count:
        where, problem = columns[0]
        report.issues.append(TextIssue(report.name, "error", f"{where.split(':')[0].split('[')[0]}: {problem}",
                                       f"Rename the columns, or pick the text method this file is for "
                                       f"(not {method})."))
        return
    for where, problem in problems:
        report.issues.append(TextIssue(where, "error", problem,
                                       "Fix or remove the row: training refuses the file until then."))


def _read_rows(report: TextDataReport, path: str | Path, method: str) -> list[tuple[str, dict[str, Any]]] | None:
    from core.data.rl_data import read_records
    from core.data.text import TextDataError

    try:
        return read_records(path, method)
    except TextDataError as exc:
        report.error = str(exc)
        report.issues.append(TextIssue(report.name, "error", str(exc), "Fix the file and open it again."))
        return None


def _parsed_rows(report: TextDataReport, path: str | Path, method: str, parse: Any) -> list[tuple[str, Any, Any]]:
    """(where, record, parsed row) of every row `parse(record, where)` reads; the rows it refuses become the
    report's errors (a column missing from all of them said once)."""
    from core.data.text import TextDataError

    records = _read_rows(report, path, method)
    if records is None:
        return []
    report.count = len(records)
    parsed, problems = [], []
    for where, record in records:
        try:
            parsed.append((where, record, parse(record, where)))
        except TextDataError as exc:
            problems.append((where, str(exc).removeprefix(f"{where}: ")))
    _row_problems(report, problems, method)
    return parsed


def _describe_labelled(report: TextDataReport, path: str | Path, counter: _Counter, limit: int) -> None:
    """KTO's rows: prompt, completion, label (core.data.rl_data, as training reads them)."""
    from core.data.rl_data import labelled_row

    report.headers = ["where", "prompt", "completion", "label", "tokens"]
    report.kind = "labelled"
    seen: dict[str, str] = {}
    for where, _record, row in _parsed_rows(report, path, "kto", labelled_row):
        report.labels[row.desirable] += 1
        prompt = _role_text(row.prompt, "user")
        tokens = counter.chat(row.chat(), _role_text(row.prompt, "system") + prompt + row.completion)
        report.lengths.append(tokens)
        _check_length(report, where, tokens, "answer")
        key = "\x00".join((prompt, row.completion))
        if key in seen:
            report.issues.append(TextIssue(where, "info", f"same as {seen[key]}",
                                           "Duplicates weigh that answer double; remove one unless meant."))
        seen.setdefault(key, where)
        if len(report.rows) < limit:
            report.rows.append([where, prompt, row.completion, "good" if row.desirable else "bad", str(tokens)])
    if report.labels[True] and not report.labels[False] or report.labels[False] and not report.labels[True]:
        report.issues.append(TextIssue(report.name, "warning", "every label is the same",
                                       "KTO learns from both: add answers labelled "
                                       f"{'false (bad)' if report.labels[True] else 'true (good)'}."))


def _describe_prompts(report: TextDataReport, path: str | Path, counter: _Counter, limit: int) -> None:
    """GRPO's rows: a prompt and whatever columns the rewards read (answer shown when there)."""
    from core.data.rl_data import prompt_row
    from core.data.text import TextExample

    report.headers = ["where", "prompt", "answer", "tokens"]
    report.kind = "prompts"
    seen: dict[str, str] = {}
    for where, record, row in _parsed_rows(report, path, "grpo", prompt_row):
        prompt = _role_text(row.prompt, "user")
        tokens = counter.chat(TextExample(where, messages=row.prompt), prompt) if counter.tokenizer is None \
            else _prompt_tokens(counter.tokenizer, row.prompt)
        report.lengths.append(tokens)
        _check_length(report, where, tokens, "prompt")
        if prompt in seen:
            report.issues.append(TextIssue(where, "info", f"same prompt as {seen[prompt]}",
                                           "Duplicates weigh that prompt double; remove one unless meant."))
        seen.setdefault(prompt, where)
        if len(report.rows) < limit:
            report.rows.append([where, prompt, str(record.get("answer", "")), str(tokens)])


def _prompt_tokens(tokenizer: Any, prompt: list[dict[str, str]]) -> int:
    """A GRPO prompt's tokens as generation sees it: the chat template up to the answer."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _describe_examples(report: TextDataReport, path: str | Path, counter: _Counter, limit: int) -> None:
    from core.data.text import TextDataError, load_examples

    report.headers = ["where", "system", "prompt", "response", "tokens"]
    try:
        examples = load_examples(path)
    except TextDataError as exc:
        report.error = str(exc)
        report.issues.append(TextIssue(report.name, "error", str(exc), "Fix the file at that line and open it again."))
        return
    seen: dict[str, str] = {}
    chat = 0
    for example in examples:
        if example.is_chat:
            chat += 1
            system = _role_text(example.messages, "system")
            prompt = _role_text(example.messages, "user")
            answer = _role_text(example.messages, "assistant")
            whole = system + prompt + answer
            if not answer.strip():
                report.issues.append(TextIssue(example.source, "error", "empty answer",
                                               "Write the answer, or remove the row: it teaches nothing."))
            if not prompt.strip():
                report.issues.append(TextIssue(example.source, "warning", "empty prompt",
                                               "Add the question this answer belongs to."))
        else:
            system, prompt, answer, whole = "", "", example.text, example.text
        tokens = counter.chat(example, whole)
        report.lengths.append(tokens)
        _check_length(report, example.source, tokens, "example")
        key = whole.strip()
        if key and key in seen:
            report.issues.append(TextIssue(example.source, "info", f"same as {seen[key]}",
                                           "Duplicates weigh that example double; remove one unless meant."))
        seen.setdefault(key, example.source)
        if len(report.rows) < limit:
            report.rows.append([example.source, system, prompt, answer, str(tokens)])
    report.count = len(examples)
    report.kind = ("chat" if chat == len(examples) else "plain text" if chat == 0 else "chat and plain text")


def _describe_preferences(report: TextDataReport, path: str | Path, counter: _Counter, limit: int) -> None:
    from core.data.preference import read_preference_rows
    from core.data.text import TextDataError

    report.headers = ["where", "system", "prompt", "chosen", "rejected", "tokens"]
    report.kind = "preference"
    try:
        rows = read_preference_rows(path)
    except TextDataError as exc:
        report.error = str(exc)
        report.issues.append(TextIssue(report.name, "error", str(exc), "Fix the file and open it again."))
        return
    for source, problem in rows.problems:
        report.issues.append(TextIssue(source, "error", problem,
                                       "Fix or remove the row: training refuses the file until then."))
    seen: dict[str, str] = {}
    for example in rows.examples:
        system, prompt = example.system_text, example.prompt_text
        # Each side is trained as its own sequence: the longer one is what may be cut.
        tokens = max(counter.chat(example.chat(example.chosen), system + prompt + example.chosen),
                     counter.chat(example.chat(example.rejected), system + prompt + example.rejected))
        report.lengths.append(tokens)
        _check_length(report, example.source, tokens, "comparison")
        key = "\x00".join((system, prompt, example.chosen, example.rejected)).strip()
        if key in seen:
            report.issues.append(TextIssue(example.source, "info", f"same as {seen[key]}",
                                           "Duplicates weigh that comparison double; remove one unless meant."))
        seen.setdefault(key, example.source)
        if len(report.rows) < limit:
            report.rows.append([example.source, system, prompt, example.chosen, example.rejected, str(tokens)])
    report.count = len(rows.examples) + len(rows.problems)


@functools.lru_cache(maxsize=2)
def counting_tokenizer(base_model: str, gguf_file: str = "", chat_template: str = "") -> Any:
    """The model's tokenizer with the chat template training would use (kept for the next data set).

    An HF folder's tokenizer loads in a second; a GGUF's is rebuilt from its header, which takes
    up to a minute or two on a busy CPU: the Dataset tab asks before it does that."""
    from core.data.chat_templates import apply_template
    from core.models.llm import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source(base_model, gguf_file))
    apply_template(tokenizer, chat_template)
    return tokenizer


def model_context_length(base_model: str, gguf_file: str = "") -> int:
    """The text model's maximum sequence length from its GGUF header or config.json (no weights read); 0 unknown."""
    from core.model_info import detect_model

    try:
        return detect_model(base_model, "text-generation", gguf_file).context_length
    except (OSError, ValueError):
        return 0
