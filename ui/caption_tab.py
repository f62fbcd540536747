"""Caption tab: caption a folder with a chosen model, then read, edit and fix the captions.

The captioning runs as a job of the one `ui.state.JOB` (kind "caption") through
`core.caption.caption_folder`, so the page only polls; captions appear beside the
thumbnails as metadata.csv fills. Edits, search/replace and saving use `ui.caption_edit`.

The handlers are module functions of the widgets' values; `create_caption_tab` only lays
the widgets out and wires them. `core.caption` loads PIL, so it is imported on use.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from core.job import JobBusyError
from ui import catalog, lists, state
from ui.caption_edit import read_captions, save_captions, search_replace
from ui.status import progress_html
from ui.thumbs import thumbnail

POLL_SECONDS = 2.0


def captioner_choices(output_dir: Path | None = None) -> list[tuple[str, str]]:
    """The built-in captioners, then "my captioner" entries: the VLM LoRAs trained here (text_method: vlm),
    newest first, each applied to its base when chosen."""
    from core.caption import CAPTIONERS
    from core.caption.adapter import adapter_captioner, captioner_adapters

    built_in = [(f"{spec.name} — {spec.description}", spec.name) for spec in CAPTIONERS.values()]
    mine = []
    for adapter in captioner_adapters(output_dir or state.OUTPUT_DIR):
        run = adapter.parent if adapter.name == "adapter" else adapter
        try:
            base = adapter_captioner(adapter)[0]
        except (OSError, ValueError):  # a half-copied or foreign adapter folder is left out, not the list
            continue
        mine.append((f"my captioner: {run.name} — your VLM LoRA on {Path(base).name or base}", catalog.rel(adapter)))
    return built_in + mine


def gallery_items(folder: Path, rows: list[list[str]]) -> list[tuple[str, str]]:
    items = []
    for name, caption in rows:
        thumb = thumbnail(folder / name)
        if thumb is not None:
            items.append((str(thumb), f"{name}: {caption or '(no caption)'}"))
    return items


def folder_path(text: str) -> Path | None:
    """The image folder the user named, or None when it is empty or not a folder."""
    if not text:
        return None
    path = state.resolve_user_path(text)
    return path if path.is_dir() else None


def table_rows(rows: Any) -> list[list[str]]:
    """The caption table's value as rows (Gradio hands a DataFrame, tests a list)."""
    return rows.values.tolist() if hasattr(rows, "values") else (rows or [])


def load_folder(text: str) -> tuple[Any, Any, str]:
    """(table, gallery, message): the folder's images and their captions."""
    path = folder_path(text)
    if path is None:
        return gr.skip(), gr.skip(), "Choose an existing image folder first."
    from core.caption import find_images

    state.allow_folder(path)
    rows = read_captions(path, find_images(path))
    done = sum(1 for _, c in rows if c)
    return rows, gallery_items(path, rows), f"{len(rows)} images, {done} with a caption."


def start_captioning(text: str, model_name: str, trigger: str, prefix: str, suffix: str, existing: str,
                     to_csv: bool, to_txt: bool, batch_size: float | None) -> str:
    """Start a caption job on the folder; the message says what runs (or why not)."""
    path = folder_path(text)
    if path is None:
        return "Choose an existing image folder first."
    if not to_csv and not to_txt:
        return "Choose where to write the captions: metadata.csv, .txt files, or both."
    from core.caption import CaptionOptions, caption_folder

    full_prefix = ", ".join(p for p in (trigger.strip(), prefix.strip()) if p)
    name = model_name.strip()
    # A path-like name that exists is a local model folder; anything else is a captioner's name or a hub id.
    model_arg = str(state.resolve_user_path(name)) if ("/" in name or "\\" in name) and \
        state.resolve_user_path(name).exists() else name
    options = CaptionOptions(input_dir=path, model=model_arg, write_csv=bool(to_csv), write_txt=bool(to_txt),
                             prefix=full_prefix, suffix=suffix.strip(), existing=existing,
                             batch_size=int(batch_size or 8))
    try:
        state.JOB.run(lambda ctx: caption_folder(options, ctx), kind="caption", name=path.name)
    except JobBusyError as exc:
        return f"**{exc}**"
    return f"Captioning `{html.escape(path.name)}` with {html.escape(name)} …"


def stop_captioning() -> str:
    snap = state.JOB.snapshot()
    if snap.kind == "caption" and state.JOB.stop():
        return "Stopping after the current batch; captions so far are saved."
    return "No captioning is running."


def replace_in_captions(rows: Any, find_text: str, replace_text: str, use_regex: bool) -> tuple[Any, str]:
    """(table, message): find/replace over every caption in the table (saved only by Save)."""
    try:
        new_rows, changed = search_replace(table_rows(rows), find_text, replace_text or "", regex=bool(use_regex))
    except ValueError as exc:
        return gr.skip(), str(exc)
    return new_rows, f"Changed {changed} captions. Press Save captions to write them."


def save_table(text: str, rows: Any, to_csv: bool, to_txt: bool) -> tuple[str, Any]:
    """(message, gallery): the table's captions written to metadata.csv and/or .txt files."""
    path = folder_path(text)
    if path is None:
        return "Choose an existing image folder first.", gr.skip()
    current = table_rows(rows)
    if not to_csv and not to_txt:
        return "Choose metadata.csv, .txt files, or both.", gr.skip()
    result = save_captions(path, current, to_csv=bool(to_csv), to_txt=bool(to_txt))
    return result.summary(), gallery_items(path, current)


def poll(text: str, seen: dict | None) -> tuple[Any, ...]:
    """(progress, table, gallery, message, seen): the captions are re-read as a caption job advances."""
    snap = state.JOB.snapshot()
    seen = dict(seen or {})
    key = (snap.started_at, snap.progress.step if snap.progress else -1, snap.state) \
        if snap.kind == "caption" else None
    html_out = progress_html(snap, "caption")
    if key == seen.get("key") or key is None:
        return html_out, gr.skip(), gr.skip(), gr.skip(), seen
    seen["key"] = key
    path = folder_path(text)
    if path is None:
        return html_out, gr.skip(), gr.skip(), gr.skip(), seen
    from core.caption import find_images

    rows = read_captions(path, find_images(path))
    note: Any = gr.skip()
    if not snap.running:
        note = snap.log[-1] if snap.log else ""
        if snap.error is not None:
            note = f"**{snap.error.message}**" + (f"  \n{snap.error.advice}" if snap.error.advice else "")
    return html_out, rows, gallery_items(path, rows), note, seen


def follow_dataset(folder: str) -> Any:
    """A data set opened in the Dataset tab becomes the folder to caption."""
    return gr.update(value=folder, choices=catalog.datasets())


def create_caption_tab(data: dict[str, Any] | None = None) -> dict[str, Any]:
    with gr.Row():
        folder = gr.Dropdown(choices=catalog.datasets(), value="", allow_custom_value=True, scale=3,
                             label="Image folder", elem_id="cap-folder")
        refresh = lists.refresh_button("cap-refresh")
        model = gr.Dropdown(choices=captioner_choices(), value="blip-base", allow_custom_value=True, scale=3,
                            label="Captioner (or a path to a captioning model folder, or to a VLM LoRA run: "
                            "my captioner)", elem_id="cap-model")
    with gr.Row():
        trigger = gr.Textbox(label="Trigger word (put first in every caption)", max_lines=1, elem_id="cap-trigger")
        prefix = gr.Textbox(label="Prefix", max_lines=1, elem_id="cap-prefix")
        suffix = gr.Textbox(label="Suffix", max_lines=1, elem_id="cap-suffix")
    with gr.Row():
        existing = gr.Radio(["skip", "overwrite"], value="skip", label="Images that already have a caption",
                            elem_id="cap-existing")
        to_csv = gr.Checkbox(value=True, label="Write metadata.csv (backed up first)", elem_id="cap-csv")
        to_txt = gr.Checkbox(value=False, label="Write .txt beside each image", elem_id="cap-txt")
        batch = gr.Number(value=8, precision=0, minimum=1, maximum=256, label="Batch size", elem_id="cap-batch")
    with gr.Row():
        run_btn = gr.Button("Caption", variant="primary", elem_id="cap-run")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="cap-stop")
        load_btn = gr.Button("Load captions", elem_id="cap-load")
    message = gr.Markdown("", elem_id="cap-message")
    progress = gr.HTML(progress_html(state.JOB.snapshot(), "caption"), elem_id="cap-progress")
    gallery = gr.Gallery(label="Images with their captions", columns=6, height=320, allow_preview=True,
                         elem_id="cap-gallery")
    with gr.Row():
        find = gr.Textbox(label="Find", max_lines=1, elem_id="cap-find")
        replace = gr.Textbox(label="Replace with", max_lines=1, elem_id="cap-replace")
        regex = gr.Checkbox(value=False, label="Regular expression")
        replace_btn = gr.Button("Replace in all captions", elem_id="cap-replace-btn")
    table = gr.Dataframe(headers=["file", "caption"], value=[], datatype=["str", "str"], interactive=True,
                         wrap=True, label="Captions (click a caption to edit it)", elem_id="cap-table",
                         column_widths=["25%", "75%"])
    save_btn = gr.Button("Save captions", variant="primary", elem_id="cap-save")
    memo = gr.State({})
    timer = gr.Timer(POLL_SECONDS)

    load_btn.click(load_folder, folder, [table, gallery, message])
    folder.select(load_folder, folder, [table, gallery, message])
    run_btn.click(start_captioning, [folder, model, trigger, prefix, suffix, existing, to_csv, to_txt, batch], message)
    stop_btn.click(stop_captioning, None, message)
    replace_btn.click(replace_in_captions, [table, find, replace, regex], [table, message])
    save_btn.click(save_table, [folder, table, to_csv, to_txt], [message, gallery])
    timer.tick(poll, [folder, memo], [progress, table, gallery, message, memo], show_progress="hidden")
    if data and "folder" in data:
        data["folder"].change(follow_dataset, data["folder"], folder).then(
            load_folder, folder, [table, gallery, message])
    live = [lists.LiveList(folder, catalog.datasets), lists.LiveList(model, captioner_choices)]
    lists.wire(refresh, live)
    return {"folder": folder, "run": run_btn, "table": table, "lists": live}
