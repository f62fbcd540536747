"""Text data: the files a clinic or a developer brings, how they are refused when broken,
which tokens carry loss, and packing that keeps examples from seeing each other."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.data import text as td
from core.data.chat_templates import TEMPLATES, apply_template
from core.train.text_batches import epoch_batches, make_batch, pack, pad
from core.train.text_step import batch_loss_sum
from tests.fixtures.tiny_llm import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("header", ["prompt,response", "instruction,output", "question,answer"])
def test_a_csv_with_any_known_question_answer_columns_becomes_chats(tmp_path, header):
    file = write(tmp_path / "qa.csv", f'{header}\nHow long?,"About 47 minutes, on a full battery."\n')
    [example] = td.load_examples(file)
    assert example.messages == [{"role": "user", "content": "How long?"},
                                {"role": "assistant", "content": "About 47 minutes, on a full battery."}]
    assert example.source == "qa.csv:2"


def test_jsonl_chat_alpaca_and_plain_text_files_in_one_folder_are_all_read(tmp_path):
    write(tmp_path / "a.jsonl", "\n".join([
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}]}),
        "",
        json.dumps({"instruction": "Translate", "input": "bonjour", "output": "hello"}),
    ]))
    write(tmp_path / "b.txt", "Plain text for continued pre-training.")
    examples = td.load_examples(tmp_path)
    assert [e.is_chat for e in examples] == [True, True, False]
    assert examples[1].messages[0]["content"] == "Translate\n\nbonjour"
    assert examples[1].source == "a.jsonl:3"


def test_a_csv_with_wrong_columns_is_refused_naming_the_file_and_what_is_expected(tmp_path):
    file = write(tmp_path / "clinic.csv", "patient,doctor\nhi,hello\n")
    with pytest.raises(td.TextDataError, match=r"clinic\.csv:1: expected the columns prompt,response"):
        td.load_examples(file)


def test_a_csv_row_with_an_unquoted_comma_is_refused_with_its_line(tmp_path):
    file = write(tmp_path / "qa.csv", "prompt,response\na,b\nc,d,e\n")
    with pytest.raises(td.TextDataError, match=r"qa\.csv:3: more fields"):
        td.load_examples(file)


def test_a_broken_jsonl_line_is_refused_with_its_line_number(tmp_path):
    good = json.dumps({"prompt": "a", "response": "b"})
    file = write(tmp_path / "data.jsonl", f"{good}\n{good}\n{{\"prompt\": \"cut off\n")
    with pytest.raises(td.TextDataError, match=r"data\.jsonl:3: broken JSON line"):
        td.load_examples(file)


def test_a_jsonl_line_with_unknown_keys_says_what_was_expected(tmp_path):
    file = write(tmp_path / "data.jsonl", json.dumps({"q": "a", "a": "b"}) + "\n")
    with pytest.raises(td.TextDataError, match=r"data\.jsonl:1: expected 'messages'.*found q, a"):
        td.load_examples(file)


def test_a_chat_without_an_assistant_turn_is_refused(tmp_path):
    file = write(tmp_path / "data.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(td.TextDataError, match="no assistant message"):
        td.load_examples(file)


def test_prompt_tokens_carry_no_loss_only_the_answer_and_its_end_marker(tokenizer):
    example = td.TextExample("x:1", messages=[{"role": "user", "content": "What is the top speed?"},
                                              {"role": "assistant", "content": "It reaches 83 km/h."}])
    item = td.tokenize_chat(tokenizer, example)
    labelled = [i for i, label in zip(item.input_ids, item.labels) if label != td.IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "It reaches 83 km/h.<|im_end|>"
    prompt_part = tokenizer.decode(item.input_ids[: item.labels.index(labelled[0])])
    assert prompt_part.endswith("<|im_start|>assistant\n") and "top speed" in prompt_part


def test_every_assistant_turn_of_a_multi_turn_chat_is_learned(tokenizer):
    example = td.TextExample("x:1", messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Speed?"}, {"role": "assistant", "content": "83 km/h"}])
    item = td.tokenize_chat(tokenizer, example)
    labelled = tokenizer.decode([i for i, label in zip(item.input_ids, item.labels) if label != td.IGNORE_INDEX])
    assert labelled == "Hello<|im_end|>83 km/h<|im_end|>"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_named_template_labels_exactly_the_answer(name):
    tok = build_tokenizer()
    apply_template(tok, name)
    example = td.TextExample("x:1", messages=[{"role": "user", "content": "Speed?"},
                                              {"role": "assistant", "content": "83 km/h"}])
    item = td.tokenize_chat(tok, example)
    labelled = tok.decode([i for i, label in zip(item.input_ids, item.labels) if label != td.IGNORE_INDEX])
    assert labelled.lstrip().startswith("83 km/h") and "Speed" not in labelled


def test_an_unknown_template_name_is_refused_with_the_choices(tokenizer):
    with pytest.raises(ValueError, match="chatml, llama2, alpaca, plain"):
        apply_template(tokenizer, "vicuna")


def test_examples_longer_than_max_seq_length_are_cut_and_listed(tokenizer):
    long = td.TextExample("long.csv:7", messages=[{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "word " * 200}])
    short = td.TextExample("long.csv:8", messages=[{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "ok"}])
    result = td.tokenize_examples(tokenizer, [long, short], max_seq_length=32)
    assert result.truncated == ["long.csv:7"]
    assert max(len(e) for e in result.examples) == 32


def test_plain_text_is_split_into_blocks_that_all_carry_loss(tokenizer):
    example = td.TextExample("notes.txt", text="The Kestrel K7 flies for 47 minutes. " * 30)
    result = td.tokenize_examples(tokenizer, [example], max_seq_length=64)
    assert len(result.examples) > 2
    assert all(e.labels == e.input_ids and len(e) <= 64 for e in result.examples)


def test_validation_split_is_seeded_and_keeps_at_least_one_example():
    examples = [td.TextExample(f"f:{i}", text=str(i)) for i in range(20)]
    train, held = td.split_validation(examples, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18
    assert td.split_validation(examples, 0.1, seed=3)[1] == held
    assert len(td.split_validation(examples, 0.01, seed=3)[1]) == 1


def test_packed_batches_have_no_padding_and_restart_positions(tokenizer):
    items = [td.TokenizedExample([5, 6, 7], [-100, 6, 7], "a"), td.TokenizedExample([8, 9], [-100, 9], "b")]
    batch = pack(items)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # Shifted: each position predicts the next token of its own example, never across the border.
    assert batch.labels.tolist() == [[6, 7, -100, 9, -100]]
    assert batch.attention_mask is None and batch.tokens == 5


def test_packing_gives_the_same_loss_as_running_each_example_alone(tokenizer):
    model = build_model(len(tokenizer))
    examples = [td.tokenize_chat(tokenizer, td.TextExample("x", messages=[
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]))
        for q, a in [("Speed?", "83 km/h in Sport mode."), ("Weight?", "612 grams."), ("Hi", "Hello!")]]
    device = torch.device("cpu")
    packed = float(batch_loss_sum(model, pack(examples), device))
    alone = sum(float(batch_loss_sum(model, pack([e]), device)) for e in examples)
    padded = float(batch_loss_sum(model, pad(examples, tokenizer.pad_token_id), device))
    assert packed == pytest.approx(alone, rel=1e-4)
    assert padded == pytest.approx(alone, rel=1e-4)


def test_every_example_is_in_exactly_one_batch_per_epoch_and_orders_differ():
    first = epoch_batches(23, 4, seed=1, epoch=0)
    second = epoch_batches(23, 4, seed=1, epoch=1)
    assert sorted(i for b in first for i in b) == list(range(23))
    assert first != second and first == epoch_batches(23, 4, seed=1, epoch=0)
    grouped = epoch_batches(23, 4, seed=1, epoch=0, lengths=list(range(23)))
    assert sorted(i for b in grouped for i in b) == list(range(23))


def test_a_batch_too_long_to_pack_is_padded_instead():
    items = [td.TokenizedExample([1] * 30, [1] * 30, "a"), td.TokenizedExample([2] * 20, [2] * 20, "b")]
    batch = make_batch(items, pad_id=0, max_packed=40)
    assert batch.input_ids.shape == (2, 30) and batch.attention_mask is not None
    assert batch.tokens == 50
