"""A text data set as the Dataset tab describes it: what it is, a few rows, token lengths against the
model's context, and the health of its rows (core.data.text_report)."""
from __future__ import annotations

import json
from pathlib import Path

from core.data.text_report import describe_text_data, is_text_dataset, model_context_length

ROOT = Path(__file__).resolve().parents[2]


def _chat(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}]})


def test_the_shipped_clinic_examples_are_described_as_healthy_text_data():
    qa = describe_text_data(ROOT / "data" / "clinic_qa.csv")
    assert (qa.kind, qa.count, qa.issues, qa.error) == ("chat", 150, [], "")
    assert qa.rows[0][2].endswith("?") or qa.rows[0][2].endswith(".")  # a question in the prompt column
    assert "150 examples (chat)" in qa.summary_lines()[0] and qa.summary_lines()[-1] == "Health: no problems found."
    heldout = describe_text_data(ROOT / "data" / "clinic_qa_heldout.csv")
    assert heldout.count == 50 and not heldout.issues
    prefs = describe_text_data(ROOT / "data" / "clinic_preferences.csv")
    assert (prefs.kind, prefs.count, prefs.issues) == ("preference", 50, [])
    assert prefs.headers == ["where", "system", "prompt", "chosen", "rejected", "tokens"]
    # The held-out questions are worded differently: none of them is a training question.
    trained = {row[2] for row in qa.rows}
    assert not trained & {row[2] for row in heldout.rows}


def test_empty_answers_duplicates_and_over_long_rows_are_listed_with_their_line(tmp_path):
    data = tmp_path / "faq.jsonl"
    long_answer = " ".join(["word"] * 60)
    data.write_text("\n".join([_chat("Open on Sunday?", "No, closed on Sundays."),
                               _chat("Parking?", ""),
                               _chat("Open on Sunday?", "No, closed on Sundays."),
                               _chat("Tell me everything.", long_answer)]) + "\n", encoding="utf-8")
    report = describe_text_data(data, max_seq_length=40, context_length=50)
    found = {(i.file, i.severity, i.problem.split(",")[0].split(" (")[0]) for i in report.issues}
    assert ("faq.jsonl:2", "error", "empty answer") in found
    assert ("faq.jsonl:3", "info", "same as faq.jsonl:1") in found
    long_ones = [i for i in report.issues if i.file == "faq.jsonl:4"]
    assert [i.problem.split(", ")[1] for i in long_ones] == ["longer than max_seq_length 40",
                                                            "longer than the model's context (50)"]
    lines = report.summary_lines()
    assert "4 examples (chat)" in lines[0]
    assert "1 longer than max_seq_length 40; the model reads up to 50" in lines[1]
    assert lines[2] == "Health: 1 errors, 2 warnings, 1 notes."


def test_counting_with_the_models_tokenizer_gives_what_training_tokenizes(tmp_path, tiny_llm_dir):
    from core.data.text import load_examples, tokenize_chat
    from core.data.text_report import counting_tokenizer

    data = tmp_path / "faq.csv"
    data.write_text("prompt,response\nHow long does the K7 fly?,It flies for 47 minutes.\n", encoding="utf-8")
    tokenizer = counting_tokenizer(str(tiny_llm_dir))
    report = describe_text_data(data, tokenizer=tokenizer, context_length=model_context_length(str(tiny_llm_dir)))
    assert report.lengths == [len(tokenize_chat(tokenizer, load_examples(data)[0]))]
    assert report.counted_by == "counted with the model's tokenizer" and report.context_length == 512
    assert describe_text_data(data).counted_by.startswith("estimated")


def test_the_models_context_comes_from_its_gguf_header_or_config(tiny_llm_gguf, tiny_llm_dir):
    assert model_context_length(str(tiny_llm_gguf)) == 512 == model_context_length(str(tiny_llm_dir))
    assert model_context_length("") == 8192  # the default SmolLM2-135M


def test_a_folder_of_text_files_is_text_data_and_an_image_folder_with_captions_is_not(tmp_path):
    text = tmp_path / "clinic"
    text.mkdir()
    (text / "a.csv").write_text("prompt,response\nHi?,Hello.\n", encoding="utf-8")
    images = tmp_path / "cats"
    images.mkdir()
    (images / "cat.png").write_bytes(b"")
    (images / "cat.txt").write_text("a cat", encoding="utf-8")
    assert is_text_dataset(text) and is_text_dataset(text / "a.csv")
    assert not is_text_dataset(images) and not is_text_dataset(tmp_path / "missing")


def test_a_broken_file_is_one_error_that_names_the_line(tmp_path):
    data = tmp_path / "faq.csv"
    data.write_text("question,reply\nHi?,Hello.\n", encoding="utf-8")
    report = describe_text_data(data)
    assert report.error and report.issues[0].severity == "error"
    assert report.summary_lines()[0].startswith("faq.csv cannot be used yet:")


def test_kto_and_grpo_files_are_described_as_their_methods_read_them():
    kto = describe_text_data(ROOT / "data" / "clinic_kto.csv")  # auto: the label column says kto
    assert (kto.kind, kto.count, kto.labels, kto.issues) == ("labelled", 60, {True: 30, False: 30}, [])
    assert kto.headers == ["where", "prompt", "completion", "label", "tokens"] and kto.rows[1][3] == "bad"
    assert "60 labelled answers (prompt, completion, label: for text_method kto), 30 good and 30 bad" in \
        kto.summary_lines()[0]
    grpo = describe_text_data(ROOT / "data" / "math_grpo.csv", method="grpo")
    assert (grpo.kind, grpo.count, grpo.issues) == ("prompts", 40, [])
    assert grpo.rows[0][1].startswith("What is ") and grpo.rows[0][2] == "48"
    assert "for text_method grpo" in grpo.summary_lines()[0]


def test_a_file_without_the_methods_columns_is_named_in_one_sentence(tmp_path):
    sft_file = ROOT / "data" / "clinic_qa.csv"
    report = describe_text_data(sft_file, method="kto")
    assert len(report.issues) == 1
    issue = report.issues[0]
    assert issue.severity == "error" and issue.problem == (
        "clinic_qa.csv: text_method kto needs the columns prompt,completion,label (label true or false); "
        "found prompt, response.")
    data = tmp_path / "ask.csv"
    data.write_text("question_text,answer\nWhat is 2 times 3?,6\n", encoding="utf-8")
    issue = describe_text_data(data, method="grpo").issues[0]
    assert issue.problem.startswith("ask.csv: text_method grpo needs the columns prompt") and \
        issue.problem.endswith("found question_text, answer.")
    one_bad = tmp_path / "labels.csv"
    one_bad.write_text("prompt,completion,label\nHi?,Hello.,true\nHi?,Go away.,maybe\n", encoding="utf-8")
    report = describe_text_data(one_bad, method="kto")
    assert [i.file for i in report.issues] == ["labels.csv:3", "labels.csv"]  # the bad row, then: one label only
    assert "neither true nor false" in report.issues[0].problem
