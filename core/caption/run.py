"""The batch captioning job: caption every image of a folder and write metadata.csv / .txt.

`caption_folder(options, ctx)` is what the CLI (`tools/auto_label.py`) and the GUI's
Caption tab both call; the GUI runs it in the background with
`Job.run(lambda ctx: caption_folder(opts, ctx), kind="caption")`. Progress leaves as
`ProgressEvent(step=done, total=to_caption, message="<file>: <caption>")`; files that will
not open are reported as warnings and skipped. The stop flag is checked between batches,
and captions are written as they come (the .txt at once, metadata.csv every few seconds and
at the end), so a stop or a crash keeps what was done.

An existing metadata.csv is backed up once before it is first replaced; its rows for
images that are not captioned again are kept.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import atomic_write_text, backup_file
from core.caption.models import Captioner, load_captioner
from core.data.captions import (CaptionFileError, format_metadata_csv, read_caption_txt,
                                read_metadata_csv, write_caption_txt)
from core.data.image_io import ImageReadError, is_image_file, load_rgb
from core.data.images import TRAINING_EXTENSIONS, find_image_files, match_metadata_rows
from core.data.video_io import VIDEO_EXTENSIONS, middle_frame
from core.devices import free_memory, is_out_of_memory
from core.events import DoneEvent, LogEvent, ProgressEvent, RunContext, StopRequested

EXISTING_MODES = ("skip", "overwrite")
CSV_FLUSH_SECONDS = 5.0
DRAFT_SIZE = 1024


class CaptionJobError(ValueError):
    """The job cannot start (no folder, no images, nothing to write); the message says what to change."""


@dataclass
class CaptionOptions:
    """Everything a captioning run needs; the GUI form and the CLI flags fill it."""

    input_dir: str | Path
    model: str = "blip-base"
    output_csv: str | Path | None = None  # None -> <input_dir>/metadata.csv
    write_csv: bool = True
    write_txt: bool = False
    txt_extension: str = ".txt"
    prefix: str = ""  # a trigger word or fixed text before every caption
    suffix: str = ""
    max_length: int | None = None  # new tokens per caption; None -> the family's default
    batch_size: int = 8
    existing: str = "skip"  # skip: keep captions images already have | overwrite: caption again
    device: str = "auto"
    recursive: bool = True  # sub-folders too, as training reads them
    num_beams: int = 1
    prompt: str | None = None  # Florence-2 task token or VLM instruction; None -> the model's default
    trust_remote_code: bool = False


@dataclass
class CaptionResult:
    """What a run did; `summary()` is the line shown to the user."""

    captions: dict[str, str] = field(default_factory=dict)  # written this run: relative name -> caption
    kept: dict[str, str] = field(default_factory=dict)  # skipped: they already had a caption
    failed: dict[str, str] = field(default_factory=dict)  # relative name -> why it was skipped
    empty: list[str] = field(default_factory=list)  # the captioner gave no words
    total: int = 0  # images found
    csv_path: Path | None = None
    csv_backup: Path | None = None
    txt_files: list[Path] = field(default_factory=list)
    stopped: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"captioned {len(self.captions)} of {self.total} images in {self.seconds:.1f} s"]
        if self.kept:
            parts.append(f"{len(self.kept)} already had a caption and were kept (use overwrite to redo them)")
        if self.failed:
            parts.append(f"{len(self.failed)} could not be read and were skipped: {', '.join(self.failed)}")
        if self.empty:
            parts.append(f"{len(self.empty)} got an empty caption and were not written: {', '.join(self.empty)}")
        if self.stopped:
            parts.append("stopped early; what was captioned is saved")
        if self.csv_path is not None:
            parts.append(f"wrote {self.csv_path}" + (f" (old file backed up to {self.csv_backup.name})"
                                                     if self.csv_backup else ""))
        if self.txt_files:
            parts.append(f"wrote {len(self.txt_files)} caption .txt files")
        return "; ".join(parts) + "."


def join_caption(prefix: str, caption: str, suffix: str) -> str:
    """`prefix, caption, suffix` without doubled commas, and without adding a prefix twice."""
    caption = caption.strip().strip(",").strip()
    head, tail = prefix.strip().rstrip(",").strip(), suffix.strip().lstrip(",").strip()
    if head and (caption.lower() == head.lower() or caption.lower().startswith(head.lower() + ",")):
        head = ""  # re-running with the same trigger word must not stack it
    if tail and caption.lower().endswith(tail.lower()):
        tail = ""
    return ", ".join(part for part in (head, caption, tail) if part)


def find_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files and video clips in `folder`, sorted; by default the same set training reads (sub-folders too).
    A clip is captioned from its middle frame (core.data.video_io.middle_frame).

    A paired data set's `control/` (and `control_2/` ...) folders are left out: their images are the edit
    models' inputs, and captions describe the targets.
    """
    from core.data.pairs import control_dirs

    if recursive:
        return find_image_files(folder, exclude=control_dirs(folder), extensions=TRAINING_EXTENSIONS)[0]
    found = [path for path in folder.iterdir()
             if path.is_file() and not path.name.startswith(".")
             and (is_image_file(path) or path.suffix.lower() in VIDEO_EXTENSIONS)]
    return sorted(found, key=lambda p: p.name.lower())


def _check_options(options: CaptionOptions) -> tuple[Path, Path | None]:
    folder = Path(options.input_dir).expanduser()
    if not folder.is_dir():
        raise CaptionJobError(f"input folder {folder} does not exist. Point it at the folder of images.")
    if not (options.write_csv or options.write_txt):
        raise CaptionJobError("nothing to write: choose metadata.csv, .txt files, or both.")
    if options.existing not in EXISTING_MODES:
        raise CaptionJobError(f"existing={options.existing!r}: choose 'skip' or 'overwrite'.")
    if options.batch_size < 1:
        raise CaptionJobError(f"batch_size={options.batch_size}: use 1 or more.")
    if options.max_length is not None and options.max_length < 1:
        raise CaptionJobError(f"max_length={options.max_length}: use 1 or more tokens.")
    csv_path = None
    if options.write_csv:
        csv_path = Path(options.output_csv).expanduser() if options.output_csv else folder / "metadata.csv"
        if csv_path.is_dir():
            csv_path = csv_path / "metadata.csv"
    return folder, csv_path


class _CsvWriter:
    """Keeps all rows in memory (old ones first) and rewrites metadata.csv atomically.

    An image already listed under another spelling (`./a.png`, `sub\\a.png`, an absolute
    path, a bare name) keeps its row: the match is the one training uses.
    """

    def __init__(self, path: Path, folder: Path, images: list[Path], ctx: RunContext) -> None:
        self.path = path
        self.rows: dict[str, str] = {}
        self.backup: Path | None = None
        self._row_of: dict[str, str] = {}  # our relative name -> the name as written in the old file
        self._backed_up = False
        self._dirty = False
        self._last_flush = time.monotonic()
        if path.is_file():
            try:
                read = read_metadata_csv(path)
            except CaptionFileError as exc:
                ctx.warn(f"{exc} Its rows cannot be kept; the file is backed up before it is replaced.")
                return
            self.rows.update(read.captions)
            for warning in read.warnings:
                ctx.warn(warning)
            found, _ = match_metadata_rows(list(read.captions), images, folder, path)
            for written, image in found.items():
                self._row_of.setdefault(image.relative_to(folder).as_posix(), written)

    def get(self, name: str) -> str:
        return self.rows.get(self._row_of.get(name, name), "")

    def set(self, name: str, caption: str) -> None:
        self.rows[self._row_of.get(name, name)] = caption
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        if not self._dirty or (not force and time.monotonic() - self._last_flush < CSV_FLUSH_SECONDS):
            return
        if not self._backed_up:
            self.backup = backup_file(self.path)  # once per run: the user's file before we touched it
            self._backed_up = True
        atomic_write_text(self.path, format_metadata_csv(self.rows))
        self._dirty = False
        self._last_flush = time.monotonic()


def _load_batch(paths: list[Path], needs_images: bool) -> list[tuple[Path, object]]:
    """(path, RGB image or the ImageReadError) for each path; decoding runs off the model's thread."""
    if not needs_images:
        return [(path, None) for path in paths]
    loaded: list[tuple[Path, object]] = []
    for path in paths:
        try:
            if path.suffix.lower() in VIDEO_EXTENSIONS:
                loaded.append((path, middle_frame(path)))  # a clip: its middle frame describes it best
            else:
                # Big JPEGs decode at a reduced scale: every captioner resizes far below 1024 px.
                loaded.append((path, load_rgb(path, draft_size=DRAFT_SIZE)))
        except ImageReadError as exc:
            loaded.append((path, exc))
    return loaded


def _caption_with_backoff(captioner: Captioner, good: list[tuple[Path, object]], max_length: int | None,
                          ctx: RunContext) -> list[str]:
    """Caption `good` in one call; when the device runs out of memory, in halves (down to one image)."""
    if not good:
        return []
    paths = [path for path, _ in good]
    images = [image for _, image in good] if captioner.needs_images else None
    try:
        return captioner.caption_batch(paths, images, max_length, should_stop=ctx.should_stop)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc) or len(good) == 1:
            raise
    free_memory()
    half = len(good) // 2
    ctx.warn(f"Out of memory captioning {len(good)} images at once; trying {half} and {len(good) - half}.",
             "Lower the batch size to avoid the retries.")
    return (_caption_with_backoff(captioner, good[:half], max_length, ctx)
            + _caption_with_backoff(captioner, good[half:], max_length, ctx))


def _existing_caption(name: str, path: Path, csv: _CsvWriter | None, options: CaptionOptions) -> str:
    """The caption an image already has: its metadata.csv row, else its .txt (kohya) file."""
    if csv is not None and csv.get(name).strip():
        return csv.get(name).strip()
    return (read_caption_txt(path, options.txt_extension) or "").strip()


def caption_folder(options: CaptionOptions, ctx: RunContext | None = None, *,
                   captioner: Captioner | None = None) -> CaptionResult:
    """Caption the images of `options.input_dir`; see the module docstring for events and files.

    Pass a loaded `captioner` to reuse it across runs (it is then not closed here).
    """
    ctx = ctx or RunContext()
    started = time.perf_counter()
    folder, csv_path = _check_options(options)
    images = find_images(folder, options.recursive)
    if not images:
        raise CaptionJobError(f"{folder} holds no images (looked for .jpg, .jpeg, .png, .webp, .bmp, .gif, "
                              ".tif). Put the training images there or choose another folder.")
    result = CaptionResult(total=len(images), csv_path=csv_path)
    csv = _CsvWriter(csv_path, folder, images, ctx) if csv_path is not None else None

    todo: list[Path] = []
    for path in images:
        name = path.relative_to(folder).as_posix()
        existing = _existing_caption(name, path, csv, options) if options.existing == "skip" else ""
        if not existing:
            todo.append(path)
            continue
        result.kept[name] = existing
        # Keep both outputs in step: an image captioned only in its .txt gets its csv row, and back.
        if csv is not None and not csv.get(name).strip():
            csv.set(name, existing)
        if options.write_txt and read_caption_txt(path, options.txt_extension) is None:
            result.txt_files.append(write_caption_txt(path, existing, options.txt_extension))
    if result.kept:
        ctx.log(f"{len(result.kept)} of {len(images)} images already have a caption and are kept.")

    own_captioner = captioner is None
    if todo and captioner is None:
        ctx.log(f"Loading captioner {options.model} ...")
        captioner = load_captioner(options.model, device=options.device, prompt=options.prompt,
                                   trust_remote_code=options.trust_remote_code)
        if hasattr(captioner, "num_beams"):
            captioner.num_beams = options.num_beams
        ctx.log(f"Captioning {len(todo)} images with {options.model} in batches of {options.batch_size}.")
    try:
        _caption_all(todo, folder, options, captioner, csv, result, ctx)
    finally:
        if csv is not None:
            csv.flush(force=True)
            result.csv_backup = csv.backup
        if own_captioner and captioner is not None:
            captioner.close()
    result.seconds = time.perf_counter() - started
    outputs = {"metadata_csv": str(csv_path)} if csv_path is not None else {}
    ctx.emit(DoneEvent(outputs=outputs, stopped=result.stopped, message=result.summary()))
    return result


def _caption_all(todo: list[Path], folder: Path, options: CaptionOptions, captioner: Captioner | None,
                 csv: _CsvWriter | None, result: CaptionResult, ctx: RunContext) -> None:
    if not todo or captioner is None:
        return
    batches = [todo[i:i + options.batch_size] for i in range(0, len(todo), options.batch_size)]
    done = 0
    loop_started = time.perf_counter()
    # One worker decodes the next batch's images while the model captions the current one.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-io") as pool:
        pending: Future = pool.submit(_load_batch, batches[0], captioner.needs_images)
        for index in range(len(batches)):
            if ctx.should_stop():
                result.stopped = True
                ctx.emit(LogEvent(f"Stopped after {done} of {len(todo)} images; captions so far are saved."))
                return
            loaded = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(_load_batch, batches[index + 1], captioner.needs_images)
            good = [(path, image) for path, image in loaded if not isinstance(image, Exception)]
            for path, error in loaded:
                if isinstance(error, Exception):
                    name = path.relative_to(folder).as_posix()
                    result.failed[name] = str(error)
                    ctx.warn(f"skipped: {error}")
            try:
                captions = _caption_with_backoff(captioner, good, options.max_length, ctx)
            except StopRequested:
                result.stopped = True
                ctx.emit(LogEvent(f"Stopped after {done} of {len(todo)} images; captions so far are saved."))
                return
            for (path, _), caption in zip(good, captions):
                name = path.relative_to(folder).as_posix()
                if not caption.strip():
                    result.empty.append(name)
                    ctx.warn(f"{name}: the captioner gave an empty caption; nothing was written for it.")
                    continue
                text = join_caption(options.prefix, caption, options.suffix)
                result.captions[name] = text
                if options.write_txt:
                    result.txt_files.append(write_caption_txt(path, text, options.txt_extension))
                if csv is not None:
                    csv.set(name, text)
            for path, _ in loaded:
                done += 1
                name = path.relative_to(folder).as_posix()
                shown = result.captions.get(name) or ("(unreadable, skipped)" if name in result.failed
                                                      else "(empty caption)")
                elapsed = time.perf_counter() - loop_started
                ctx.emit(ProgressEvent(step=done, total=len(todo), message=f"{name}: {shown}",
                                       seconds_per_step=elapsed / done,
                                       eta_seconds=elapsed / done * (len(todo) - done)))
            if csv is not None:
                csv.flush()
