"""The user's own held-out questions, answered greedily and scored against their answers.

The file is any text data file SFT reads (CSV `prompt,response`, JSONL pairs or chats): the
last assistant turn of each example is the expected answer, the turns before it the question.
An answer counts as right when, after normalising both (lower case, punctuation and extra
spaces dropped), it is the expected answer (`exact`) or contains it (`contains`).
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.data import text as text_data
from core.data.text import TextDataError

MATCHES = ("contains", "exact")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


@dataclass
class Question:
    source: str  # "file.csv:12"
    messages: list[dict[str, str]]  # the conversation up to the answer
    answer: str


@dataclass
class HeldoutScore:
    """How many answers matched, and each question's answer (for the table in the run folder)."""

    correct: int
    total: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def load_questions(path: str | Path) -> list[Question]:
    """The questions and expected answers of `path`; TextDataError when a record has no answer."""
    questions = []
    for example in text_data.load_examples(path):
        if not example.is_chat:
            raise TextDataError(f"{example.source}: plain text has no answer to check; the evaluation file needs "
                                "prompt,response rows (CSV or JSONL) or chats that end with the answer.")
        *before, last = example.messages
        if last["role"] != "assistant" or not last["content"].strip():
            raise TextDataError(f"{example.source}: the last turn must be the expected answer (assistant).")
        questions.append(Question(example.source, before, last["content"]))
    if not questions:
        raise TextDataError(f"{path}: no questions found (the file is empty).")
    return questions


def normalise(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def matches(answer: str, expected: str, how: str) -> bool:
    got, want = normalise(answer), normalise(expected)
    if how == "exact":
        return got == want
    return bool(want) and f" {want} " in f" {got} "  # whole words: "7" is not in "47"


def score(answers: list[str], questions: list[Question], how: str) -> HeldoutScore:
    rows = [{"source": q.source, "question": q.messages[-1]["content"] if q.messages else "",
             "expected": q.answer, "answer": a, "correct": matches(a, q.answer, how)}
            for q, a in zip(questions, answers)]
    return HeldoutScore(sum(r["correct"] for r in rows), len(rows), rows)


def answer_and_score(model: Any, tokenizer: Any, questions: list[Question], how: str,
                     max_new_tokens: int) -> HeldoutScore:
    """Greedy answers of `model` as it is now (adapter on or off), scored."""
    from core.sample_text import generate_answers

    answers = generate_answers(model, tokenizer, [q.messages for q in questions], max_new_tokens)
    return score(answers, questions, how)
