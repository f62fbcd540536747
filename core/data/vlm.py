"""Vision-language training data: images with their captions, or images with chat rows.

Two shapes, both read into `VlmExample`s (an image, the user's question, the answer to learn):

- an image folder, captions as the image side reads them (metadata.csv, else a .txt beside each
  image; core.data.images): every image becomes "<image> + vlm_prompt -> caption", which is
  exactly what the Caption tab asks a chat captioner;
- a JSONL / JSON file of rows with an `image` (a path relative to the file's folder, or absolute)
  and either `messages` (a chat; the last assistant turn is the answer), `prompt` + `response`,
  or `caption` (asked with vlm_prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import TrainConfig
from core.data.preference import json_records
from core.data.text import TextDataError, as_text, chat_messages

DEFAULT_PROMPT = "Describe this image in detail."  # the Caption tab's chat-captioner prompt (core.caption)
ROW_FILE_SUFFIXES = (".jsonl", ".json")


@dataclass
class VlmExample:
    """One image and the conversation about it: `messages` end with the user's turn, `answer` follows."""

    image: Path
    messages: list[dict[str, str]]  # system / user / assistant turns before the answer; the last is the user's
    answer: str
    source: str  # "metadata.csv:cat.png" or "rows.jsonl:3", for warnings


def vlm_prompt(cfg: TrainConfig) -> str:
    return cfg.vlm_prompt.strip() or DEFAULT_PROMPT


def load_vlm_examples(cfg: TrainConfig, path: str | Path | None = None) -> list[VlmExample]:
    """The examples of `path` (default: train_data_dir): an image folder or a JSONL / JSON file of rows."""
    where = Path(path or cfg.train_data_dir)
    if where.is_dir():
        return _from_image_folder(cfg, where)
    if where.is_file() and where.suffix.lower() in ROW_FILE_SUFFIXES:
        return _from_rows(where, vlm_prompt(cfg))
    raise TextDataError(f"{where}: text_method vlm trains on an image folder (captions in metadata.csv or .txt "
                        "files) or a .jsonl file of rows with 'image' and 'caption' (or 'messages'); point "
                        "train_data_dir at one.")


def _from_image_folder(cfg: TrainConfig, folder: Path) -> list[VlmExample]:
    from dataclasses import replace

    from core.data.images import scan_image_dataset

    dataset = scan_image_dataset(replace(cfg, train_data_dir=str(folder)))
    prompt = vlm_prompt(cfg)
    examples = [VlmExample(item.path, [{"role": "user", "content": prompt}], item.caption.strip(),
                           f"{folder.name}/{item.relpath}") for item in dataset.items if item.caption.strip()]
    if not examples:
        raise TextDataError(f"{folder}: none of its {len(dataset.items)} images has a caption, so there is nothing "
                            "to learn. Write captions (metadata.csv or .txt files) in the Caption tab first.")
    return examples


def _from_rows(path: Path, prompt: str) -> list[VlmExample]:
    examples = [_row_to_example(record, where, path.parent, prompt) for where, record in json_records(path)]
    if not examples:
        raise TextDataError(f"{path}: no rows. Each line needs an 'image' and a 'caption' (or 'messages').")
    return examples


def _row_to_example(record: Any, where: str, folder: Path, prompt: str) -> VlmExample:
    if not isinstance(record, dict):
        raise TextDataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    keys = {str(k).strip().lower(): v for k, v in record.items()}
    image_value = keys.get("image", keys.get("images"))
    if isinstance(image_value, list) and len(image_value) == 1:
        image_value = image_value[0]
    if not isinstance(image_value, str) or not image_value.strip():
        raise TextDataError(f"{where}: needs an 'image' column with one image path; found "
                            f"{', '.join(keys) or 'nothing'}.")
    image = Path(image_value).expanduser()
    image = image if image.is_absolute() else folder / image
    if not image.is_file():
        raise TextDataError(f"{where}: the image {image_value!r} does not exist (paths are relative to "
                            f"{folder}).")
    if "messages" in keys or "conversations" in keys:
        messages = chat_messages(keys.get("messages", keys.get("conversations")), where)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        before = messages[:last]
        if not before or before[-1]["role"] != "user":
            raise TextDataError(f"{where}: the answer to learn (the last assistant message) must follow a user "
                                "message.")
        return VlmExample(image, before, messages[last]["content"].strip(), where)
    for question_key, answer_key in (("prompt", "response"), ("question", "answer"), ("prompt", "completion")):
        if question_key in keys and answer_key in keys:
            question, answer = as_text(keys[question_key], where, question_key), as_text(keys[answer_key], where,
                                                                                           answer_key)
            if answer.strip():
                return VlmExample(image, [{"role": "user", "content": question.strip() or prompt}], answer.strip(),
                                  where)
    for key in ("caption", "text"):
        if key in keys and as_text(keys[key], where, key).strip():
            return VlmExample(image, [{"role": "user", "content": prompt}], as_text(keys[key], where, key).strip(),
                              where)
    raise TextDataError(f"{where}: expected 'caption', 'messages' or 'prompt' + 'response' beside 'image'; found "
                        f"{', '.join(keys)}.")
