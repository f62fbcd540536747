"""The Dataset tab's view of a text data set: parsed rows and their problems.

Rows come from `core.data.text.load_examples` (the same parser training uses), so what
the table shows is what the run will see. Checks: empty answers, empty prompts, examples
longer than `max_seq_length` (estimated without loading a tokenizer: a token per word or
punctuation mark, two per Chinese, Japanese or Korean character; training cuts them), and
exact duplicates. Preference data (prompt,chosen,rejected) is shown as comparisons,
with the rows training would refuse listed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The caption estimate (words, marks, CJK characters twice) suits LLM tokenizers too; a flat
# characters/4 undercounts Chinese several times over, and a clinic's answers may be Chinese.
from core.data.health import estimate_tokens

PREVIEW_ROWS = 200


@dataclass
class TextIssue:
    file: str
    severity: str
    problem: str
    advice: str


@dataclass
class TextPreview:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    issues: list[TextIssue] = field(default_factory=list)
    summary: str = ""


def _role_text(messages: list[dict[str, str]], role: str) -> str:
    return "\n".join(m.get("content", "") for m in messages if m.get("role") == role)


def preview_text_data(path: str | Path, max_seq_length: int = 512, limit: int = PREVIEW_ROWS) -> TextPreview:
    """Parse the data file/folder and check every example; a broken file becomes one error row."""
    from core.data.preference import looks_like_preference
    from core.data.text import TextDataError, load_examples

    if looks_like_preference(path):
        return preview_preference_data(path, max_seq_length, limit)
    result = TextPreview(headers=["where", "system", "prompt", "response", "≈ tokens"])
    try:
        examples = load_examples(path)
    except TextDataError as exc:
        result.issues.append(TextIssue(Path(path).name, "error", str(exc), "Fix the file at that line and open it again."))
        result.summary = f"**{Path(path).name}** cannot be used yet: {exc}"
        return result
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
                result.issues.append(TextIssue(example.source, "error", "empty answer",
                                               "Write the answer, or remove the row: it teaches nothing."))
            if not prompt.strip():
                result.issues.append(TextIssue(example.source, "warning", "empty prompt",
                                               "Add the question this answer belongs to."))
        else:
            system, prompt, answer, whole = "", "", example.text, example.text
        tokens = estimate_tokens(whole)
        if tokens > max_seq_length:
            result.issues.append(TextIssue(example.source, "warning",
                                           f"about {tokens} tokens, longer than max_seq_length {max_seq_length}",
                                           "It will be cut: raise max_seq_length or shorten the example."))
        key = whole.strip()
        if key and key in seen:
            result.issues.append(TextIssue(example.source, "info", f"same as {seen[key]}",
                                           "Duplicates weigh that example double; remove one unless meant."))
        seen.setdefault(key, example.source)
        if len(result.rows) < limit:
            result.rows.append([example.source, system, prompt, answer, str(tokens)])
    errors = sum(1 for i in result.issues if i.severity == "error")
    warnings = sum(1 for i in result.issues if i.severity == "warning")
    kind = f"{chat} chat examples" if chat == len(examples) else f"{chat} chat, {len(examples) - chat} plain text"
    result.summary = (f"**{Path(path).name}** — {len(examples)} examples ({kind}); {errors} errors, "
                      f"{warnings} warnings." + (f" Showing the first {limit}." if len(examples) > limit else ""))
    return result


def preview_preference_data(path: str | Path, max_seq_length: int = 512, limit: int = PREVIEW_ROWS) -> TextPreview:
    """prompt,chosen,rejected data (DPO / ORPO): the comparisons, bad rows, long and repeated ones."""
    from core.data.preference import read_preference_rows
    from core.data.text import TextDataError

    result = TextPreview(headers=["where", "system", "prompt", "chosen", "rejected", "≈ tokens"])
    name = Path(path).name
    try:
        rows = read_preference_rows(path)
    except TextDataError as exc:
        result.issues.append(TextIssue(name, "error", str(exc), "Fix the file and open it again."))
        result.summary = f"**{name}** cannot be used yet: {exc}"
        return result
    for source, problem in rows.problems:
        result.issues.append(TextIssue(source, "error", problem,
                                       "Fix or remove the row: training refuses the file until then."))
    seen: dict[str, str] = {}
    for example in rows.examples:
        system, prompt = example.system_text, example.prompt_text
        # Each side is trained as its own sequence: the longer one is what may be cut.
        tokens = estimate_tokens(system + prompt) + max(estimate_tokens(example.chosen),
                                                         estimate_tokens(example.rejected))
        if tokens > max_seq_length:
            result.issues.append(TextIssue(example.source, "warning",
                                           f"about {tokens} tokens, longer than max_seq_length {max_seq_length}",
                                           "It will be cut: raise max_seq_length or shorten the comparison."))
        key = "\x00".join((system, prompt, example.chosen, example.rejected)).strip()
        if key in seen:
            result.issues.append(TextIssue(example.source, "info", f"same as {seen[key]}",
                                           "Duplicates weigh that comparison double; remove one unless meant."))
        seen.setdefault(key, example.source)
        if len(result.rows) < limit:
            result.rows.append([example.source, system, prompt, example.chosen, example.rejected, str(tokens)])
    errors = sum(1 for i in result.issues if i.severity == "error")
    warnings = sum(1 for i in result.issues if i.severity == "warning")
    total = len(rows.examples) + len(rows.problems)
    result.summary = (f"**{name}** — {total} preference comparisons (prompt, chosen, rejected: for text_method "
                      f"dpo or orpo); {errors} errors, {warnings} warnings."
                      + (f" Showing the first {limit}." if len(rows.examples) > limit else ""))
    return result
