"""Turn a JobSnapshot into what the page shows: progress bar, status line, log, sample gallery.

Pure functions (no Gradio), so each is tested on a hand-made snapshot.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

from core.job import JobSnapshot

STATE_WORDS = {"idle": "Idle", "running": "Running", "stopping": "Stopping (finishing the step, saving)",
               "done": "Finished", "stopped": "Stopped", "failed": "Failed"}


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_fraction(snap: JobSnapshot) -> float:
    p = snap.progress
    if p is None or not p.total:
        return 1.0 if snap.state == "done" else 0.0
    return max(0.0, min(1.0, p.step / p.total))


def progress_line(snap: JobSnapshot) -> str:
    """'step 12/100 · epoch 2 · 1.30 s/it · ETA 1:54 · smoothed loss 0.1234'."""
    p = snap.progress
    if p is None:
        return "waiting for the first step…" if snap.running else ""
    parts = [f"step {p.step}/{p.total}"]
    if snap.kind == "train":
        parts.append(f"epoch {p.epoch}")
    if p.seconds_per_step:
        rate = p.seconds_per_step
        parts.append(f"{rate:.2f} s/it" if rate >= 1 else f"{1 / rate:.2f} it/s")
    if snap.running:
        parts.append(f"ETA {format_duration(p.eta_seconds)}")
    if p.smoothed_loss is not None:
        # The moving average (what the plot's bold line shows), not the step's own loss in loss.csv.
        parts.append(f"smoothed loss {p.smoothed_loss:.4f}")
    elif p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.vram_gb:
        parts.append(f"{p.vram_gb:.1f} GB")
    if p.message:
        parts.append(p.message)
    return " · ".join(parts)


def progress_html(snap: JobSnapshot, kind: str | None = None) -> str:
    """A progress bar with the state and the step line; empty-looking when no job of `kind` ran."""
    if kind and snap.kind and snap.kind != kind and snap.running:
        return (f"<div class='ls-status'>Another job is running ({html.escape(snap.kind)}"
                f"{': ' + html.escape(snap.name) if snap.name else ''}). One job runs at a time.</div>")
    if kind and snap.kind != kind:
        snap = JobSnapshot()
    percent = progress_fraction(snap) * 100
    word = STATE_WORDS.get(snap.state, snap.state)
    line = html.escape(progress_line(snap))
    error = ""
    if snap.error is not None:
        error = (f"<div class='ls-error'><b>{html.escape(snap.error.message)}</b>"
                 f"{'<br>What to change: ' + html.escape(snap.error.advice) if snap.error.advice else ''}</div>")
    warnings = "".join(f"<div class='ls-warn'>⚠ {html.escape(w.message)}"
                       f"{' — ' + html.escape(w.advice) if w.advice else ''}</div>" for w in snap.warnings[-3:])
    outputs = ""
    if snap.outputs and not snap.running:
        items = "".join(f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in snap.outputs.items())
        outputs = f"<div>Results:<ul>{items}</ul></div>"
    return (f"<div class='ls-status' data-state='{snap.state}' data-step='{snap.progress.step if snap.progress else 0}'>"
            f"<b>{word}</b>{' — ' + html.escape(snap.name) if snap.name else ''}</div>"
            f"<div class='ls-progress' role='progressbar' aria-valuenow='{percent:.0f}'>"
            f"<div style='width:{percent:.1f}%'></div></div>"
            f"<div class='ls-status'>{line}</div>{error}{warnings}{outputs}")


def log_text(snap: JobSnapshot, lines: int = 200) -> str:
    return "\n".join(snap.log[-lines:])


def sample_gallery(snap: JobSnapshot) -> list[tuple[str, str]]:
    """(image path, 'step N') for every preview image that exists, newest first."""
    items = []
    for event in reversed(snap.samples):
        for index, path in enumerate(event.images):
            if Path(path).is_file():
                items.append((str(path), f"step {event.step}" + (f" #{index + 1}" if len(event.images) > 1 else "")))
    return items


def newest_clip(snap: JobSnapshot) -> str | None:
    """The newest preview's clip (a video family's mp4 beside its first frame, core.sample.save_image), if any."""
    for event in reversed(snap.samples):
        for path in reversed(event.images):
            clip = Path(path).with_suffix(".mp4")
            if clip.is_file():
                return str(clip)
    return None


def sample_texts_markdown(snap: JobSnapshot, limit: int = 6) -> str:
    """Text previews as a table: the question, the base model's answer and the LoRA's answer, by step."""
    rows = []
    for event in reversed(snap.samples):
        for item in event.texts:
            prompt = item.get("prompt", "")
            rows.append((event.step, prompt, item.get("base", ""), item.get("lora", item.get("text", ""))))
            if len(rows) >= limit:
                break
        if len(rows) >= limit:
            break
    if not rows:
        return ""

    def cell(text: str) -> str:
        return html.escape(str(text)).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| step | prompt | base | LoRA |", "|---|---|---|---|"]
    lines += [f"| {s} | {cell(p)} | {cell(b)} | {cell(lo)} |" for s, p, b, lo in rows]
    return "\n".join(lines)
