"""Dataset tab: open or upload a data set, see it, and check its health before training.

Images: a thumbnail gallery, counts of formats / modes / sizes / buckets, the health
check table from `core.data.health` (unreadable files, too small, extreme shapes,
near-duplicates, missing/empty/too long captions, conversions) and, for the picked
image, the crop its bucket keeps. Text data (a CSV/JSONL/TXT file, or a folder of them):
`core.data.text_report` describes it (kind, count, rows, token lengths against max_seq_length
and the chosen text model's context, empty answers, duplicates, over-long rows), read as the data of the
picked text_method (sft, dpo / orpo, kto, grpo; auto: as its columns say), whose format it names.

The handlers are module functions of the widgets' values; `create_dataset_tab` only lays
the widgets out and wires them. The health check loads torch and PIL, so it is imported
when a data set is opened, not when the app starts.
"""
from __future__ import annotations

import html
from collections import Counter
from pathlib import Path
from typing import Any

import gradio as gr

from ui import catalog, lists, state
from ui.thumbs import strip_thumbnail, thumbnail
from ui.uploads import import_files

GALLERY_LIMIT = 300
HEALTH_HEADERS = ["severity", "file", "problem", "advice"]


def summary_markdown(report: Any, folder: Path) -> str:
    """Counts, formats, modes, size range and buckets of a HealthReport, in a few lines."""
    sizes = [(w, h) for _, w, h in report.sizes]
    lines = [f"**{html.escape(folder.name)}** — {report.image_count} images, {report.usable_count} usable; "
             f"captions from {report.caption_source}."]
    if report.formats:
        lines.append("Formats: " + ", ".join(f"{k} {v}" for k, v in sorted(report.formats.items())))
    if report.modes:
        lines.append("Modes: " + ", ".join(f"{k} {v}" for k, v in sorted(report.modes.items())))
    if sizes:
        areas = sorted(sizes, key=lambda s: s[0] * s[1])
        lines.append(f"Sizes: smallest {areas[0][0]}×{areas[0][1]}, largest {areas[-1][0]}×{areas[-1][1]}")
    if getattr(report, "clips", None):
        seconds = sum(c.duration for c in report.clips)
        lines.append(f"Video clips: {len(report.clips)} ({seconds:.1f} s in all, "
                     f"{min(c.frames for c in report.clips)}-{max(c.frames for c in report.clips)} frames each); "
                     "video models (Wan) train on them, image models skip them.")
    references = getattr(report, "references", None) or {}
    if references:
        counts = Counter(len(r) for r in references.values())
        plain = max(0, report.usable_count - len(references))
        lines.append(f"Edit pairs: {len(references)} target(s) with reference images ("
                     + ", ".join(f"{c} with {n}" for n, c in sorted(counts.items()))
                     + f"), {plain} plain image(s); the gallery shows each target after its references. "
                     "Edit models of several references (Qwen-Image-Edit-2509 / 2511, FLUX.2 klein) train the "
                     "plain images as text-to-image; one-control models (Kontext, Qwen-Image-Edit) skip them.")
    if report.buckets:
        lines.append("Buckets: " + ", ".join(f"{k}: {v}" for k, v in sorted(report.buckets.items())))
    counts = Counter(i.severity for i in report.issues)
    lines.append(f"Health: {counts.get('error', 0)} errors (skipped), {counts.get('warning', 0)} warnings, "
                 f"{counts.get('info', 0)} notes." if report.issues else "Health: no problems found.")
    return "  \n".join(lines)


def text_model_choices() -> list[tuple[str, str]]:
    return catalog.with_empty("(the default SmolLM2-135M)", catalog.text_models())


TEXT_METHOD_CHOICES = [("auto (told by the columns)", "auto"), ("sft: prompt, response", "sft"),
                       ("dpo: prompt, chosen, rejected", "dpo"), ("orpo: prompt, chosen, rejected", "orpo"),
                       ("kto: prompt, completion, label", "kto"), ("grpo: prompt (+ answer)", "grpo")]


def text_preview(path: Path, max_seq_length: int = 512, text_model: str = "", exact: bool = False,
                 method: str = "auto") -> tuple[list[list[str]], list[str], list[list[str]], str]:
    """(rows, headers, issue rows, summary) of a text data file or folder, from core.data.text_report,
    read as `method`'s data (auto: as its columns say), with that method's format in one line."""
    from core.data.text_report import (METHOD_FORMATS, counting_tokenizer, describe_text_data, guess_method,
                                       model_context_length)
    from core.models.llm import ModelLoadError

    model = text_model or ""
    tokenizer, note = None, ""
    if exact:
        try:
            tokenizer = counting_tokenizer(str(state.resolve_user_path(model)) if model else "")
        except (ModelLoadError, OSError, ValueError) as exc:
            note = f"  \nThe tokenizer could not be loaded ({html.escape(str(exc))}); the counts are estimates."
    context = model_context_length(str(state.resolve_user_path(model)) if model else "")
    method = method if method and method != "auto" else guess_method(path)
    report = describe_text_data(path, max_seq_length=int(max_seq_length or 512), tokenizer=tokenizer,
                                context_length=context, method=method)
    lines = [html.escape(line) for line in report.summary_lines()]
    name = html.escape(report.name)
    lines[0] = f"**{name}**{lines[0][len(name):]}"  # every summary starts with the data set's name
    lines.insert(1, f"Format for text_method {html.escape(METHOD_FORMATS[method])}")
    return report.rows, report.headers, report.issue_rows(), "  \n".join(lines) + note


def open_dataset(path_text: str, resolution: float | None, text_model: str = "",
                 max_seq_length: float | None = 512, exact_tokens: bool = False,
                 text_method: str = "auto") -> tuple[Any, ...]:
    """(summary, gallery, health rows, text rows table, image paths, crop, crop text) of a data set."""
    from core.data.text_report import is_text_dataset

    resolution = int(resolution or 512)
    if not path_text:
        return ("Choose or type a data set first.", [], [], gr.update(visible=False), [], None, "")
    path = state.resolve_user_path(path_text)
    if not path.exists():
        return (f"`{html.escape(str(path))}` does not exist. Check the path.", [], [],
                gr.update(visible=False), [], None, "")
    state.allow_folder(path if path.is_dir() else path.parent)
    if is_text_dataset(path):
        rows, headers, issues, text = text_preview(path, int(max_seq_length or 512), text_model, bool(exact_tokens),
                                                   text_method or "auto")
        return (text, [], issues, gr.update(visible=True, value=rows, headers=headers), [], None, "")
    from core.data.health import health_check
    from core.data.images import DatasetError

    try:
        report = health_check(path, resolution=resolution)
    except DatasetError as exc:
        return (str(exc), [], [], gr.update(visible=False), [], None, "")
    items, paths = [], []
    clips = {c.path.resolve(): c for c in report.clips}
    for name, width, height in report.sizes[:GALLERY_LIMIT]:
        source = path / name
        refs = report.references.get(name, [])
        # An edit target: its references and then itself, side by side in one picture.
        thumb = (strip_thumbnail([*(path / r for r in refs), source]) if refs else None) or thumbnail(source)
        if thumb is not None:
            clip = clips.get(source.resolve())
            # A clip shows its first frame, with its duration, fps and frame count.
            more = f" · {clip.duration:.1f} s, {clip.fps:g} fps, {clip.frames} frames" if clip else ""
            if refs:
                more += f" · after its {len(refs)} reference(s): {', '.join(refs)}"
            items.append((str(thumb), f"{name} · {width}×{height}{more}"))
            paths.append(str(source))
    more = f"  \nShowing the first {GALLERY_LIMIT}." if len(report.sizes) > GALLERY_LIMIT else ""
    return (summary_markdown(report, path) + more, items, report.rows(), gr.update(visible=False), paths,
            None, "")


def crop_preview(paths: list[str], resolution: float | None, evt: gr.SelectData) -> tuple[Any, str]:
    """(image, sentence): what training keeps of the clicked image (Gradio fills `evt` from the annotation)."""
    from core.data.health import bucket_preview
    from core.data.image_io import ImageReadError

    if not paths or evt.index is None or evt.index >= len(paths):
        return None, ""
    try:
        image, sentence = bucket_preview(paths[evt.index], int(resolution or 512))
    except ImageReadError as exc:
        return None, str(exc)
    return image, f"**{html.escape(Path(paths[evt.index]).name)}**: {html.escape(sentence)}"


def create_from_uploads(name: str, files: list[str] | None) -> tuple[Any, str]:
    """(data set choice, message): the uploads saved into a new folder under data/."""
    if not files:
        return gr.skip(), "Add some files or a zip first."
    target = state.DATA_DIR / state.safe_name(name or "my_dataset", "my_dataset")
    result = import_files(files, target)
    rel = catalog.rel(target)
    note = f"Saved {len(result.saved)} files into `{rel}`."
    if result.skipped:
        note += "  \nSkipped: " + "; ".join(html.escape(s) for s in result.skipped[:20])
    return gr.update(choices=catalog.datasets(), value=rel), note


def create_dataset_tab() -> dict[str, Any]:
    gr.Markdown("Open a folder of images (or a text data file), or upload pictures / a zip into a new "
                "data set under `data/`. The check below lists what training would skip or get wrong.")
    with gr.Row():
        folder = gr.Dropdown(choices=catalog.datasets(), value="", allow_custom_value=True, scale=4,
                             label="Data set (a folder under data/, any folder path, or a .csv/.jsonl/.txt file)",
                             elem_id="data-folder")
        refresh = lists.refresh_button("data-refresh")
        resolution = gr.Number(value=512, precision=0, minimum=64, maximum=4096, label="Training resolution",
                               scale=1, elem_id="data-resolution")
        open_btn = gr.Button("Open and check", variant="primary", scale=1, elem_id="data-open")
    with gr.Accordion("For text data: the model whose context the rows are measured against", open=False):
        with gr.Row():
            text_model = gr.Dropdown(choices=text_model_choices(), value="", allow_custom_value=True,
                                     label="Text model", scale=4,
                                     elem_id="data-text-model")
            max_seq = gr.Number(value=512, precision=0, minimum=16, label="max_seq_length", scale=1,
                                elem_id="data-max-seq")
            method = gr.Dropdown(choices=TEXT_METHOD_CHOICES, value="auto", label="Read it as data for text_method",
                                 scale=2, elem_id="data-text-method")
            exact = gr.Checkbox(value=False, label="Count with the model's tokenizer (a GGUF's takes a minute "
                                "or two to load the first time; otherwise estimated from words)", scale=3,
                                elem_id="data-exact-tokens")
    with gr.Accordion("Upload images, captions or a zip into a new data set", open=False):
        with gr.Row():
            new_name = gr.Textbox(label="New data set name", value="my_dataset", max_lines=1, elem_id="data-new-name")
            uploads = gr.File(label="Files or a .zip", file_count="multiple", type="filepath", elem_id="data-upload")
        create_btn = gr.Button("Create data set from the uploads", elem_id="data-create")
    summary = gr.Markdown("", elem_id="data-summary")
    gallery = gr.Gallery(label="Images (click one for its crop / bucket preview)", columns=6, height=360,
                         allow_preview=False, elem_id="data-gallery")
    with gr.Row():
        crop = gr.Image(label="What training keeps (dimmed parts are cut off)", type="pil", height=300,
                        interactive=False, elem_id="data-crop")
        crop_text = gr.Markdown("", elem_id="data-crop-text")
    health = gr.Dataframe(headers=HEALTH_HEADERS, value=[], label="Health check", wrap=True,
                          interactive=False, elem_id="data-health")
    rows_table = gr.Dataframe(value=[], label="Text data: parsed rows", wrap=True, interactive=False,
                              visible=False, elem_id="data-text-rows")
    image_paths = gr.State([])

    outputs = [summary, gallery, health, rows_table, image_paths, crop, crop_text]
    inputs = [folder, resolution, text_model, max_seq, exact, method]
    open_btn.click(open_dataset, inputs, outputs)
    folder.select(open_dataset, inputs, outputs)
    gallery.select(crop_preview, [image_paths, resolution], [crop, crop_text])
    method.change(open_dataset, inputs, outputs)
    create_btn.click(create_from_uploads, [new_name, uploads], [folder, summary]).then(
        open_dataset, inputs, outputs)
    live = [lists.LiveList(folder, catalog.datasets), lists.LiveList(text_model, text_model_choices)]
    lists.wire(refresh, live)
    return {"folder": folder, "resolution": resolution, "open": open_btn, "lists": live}
