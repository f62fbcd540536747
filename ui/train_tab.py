"""Train tab: the config form beside the live view of the run (Start/Stop/Resume, queue, progress, loss,
previews, log), the VRAM-aware preset and the memory line, YAML save/load.

The form comes from `ui.form` (derived from TrainConfig). Start validates the form with
`core.config.config_from_dict` (errors shown per key) and hands the config to the one
`ui.state.JOB`; the page then only polls `JOB.snapshot()` every 2 s with a `gr.Timer`,
so training never runs in a request handler and a reloaded page reattaches.

The handlers are module functions of the form's values (tested without a browser);
`create_train_tab` only lays the widgets out and wires them at the bottom.
"""
from __future__ import annotations

import html
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import gradio as gr

from core import presets
from core.config import (RETIRED_KEYS, ConfigError, TrainConfig, config_from_dict, config_to_yaml, read_yaml,
                         save_config)
from core.job import JobBusyError
from ui import catalog, form, lists, state, train_gpus
from ui.memory_line import memory_line
from ui.plots import loss_csv_rows, loss_figure, with_history
from ui.queue_view import HEADERS as QUEUE_HEADERS
from ui.queue_view import queue_rows
from ui.status import log_text, newest_clip, progress_html, sample_gallery, sample_texts_markdown
from ui.wiring import bind

POLL_SECONDS = 2.0
LOG_LINES = 40  # the last lines of the log beside the form; the full log is in the run folder
MEMORY_KEYS = ("task_type", "base_model", "resolution", "batch_size", "lora_rank", "conv_rank", "lora_variant", "mixed_precision",
               "gradient_checkpointing", "train_text_encoder", "optimizer", "cache_latents", "max_seq_length",
               "cache_text_encoder_outputs", "fp8_base", "blocks_to_swap", "base_quantization", "lora_blocks",
               "training_adapter")


# -- what the form's values mean ------------------------------------------------------
def preset_choices() -> list[tuple[str, str]]:
    return catalog.with_empty("(none: the form's values)", ["auto", *presets.preset_names()])


def apply_preset_values(raw: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The preset's values merged under nothing but the task/model keys, and the reason sentence."""
    name = raw.get("preset") or ""
    if not name:
        return {}, "No preset: every value is yours."
    keep = {k: raw[k] for k in ("preset", "task_type", "base_model", "sample_base", "train_data_dir") if raw.get(k)}
    try:
        merged = presets.apply_preset(keep)
    except (ValueError, OSError) as exc:
        return {}, f"Preset problem: {exc}"
    try:
        reason = str(presets.describe_choice(keep))
    except Exception as exc:  # noqa: BLE001 - the values apply even when the explanation fails
        reason = f"(could not explain the choice: {exc})"
    values = {k: v for k, v in merged.items() if k in form.FIELDS and k not in ("preset",)}
    chosen = merged.get("preset", name)
    return values, reason or f"Preset {chosen}: its values are now in the form; change any of them."


def free_tryout_models() -> None:
    """Drop the Test tab's cached pipelines before a run needs the memory.

    Only modules already imported are asked: importing them here would load torch for nothing.
    """
    if "core.sample" in sys.modules:
        sys.modules["core.sample"].clear_pipeline_cache()
    if "core.sample_text" in sys.modules:
        sys.modules["core.sample_text"].clear_cache()


def errors_markdown(errors: dict[str, str]) -> str:
    lines = ["**Please fix these settings first:**"]
    lines += [f"- `{key}`: {html.escape(message)}" for key, message in errors.items()]
    return "\n".join(lines)


def default_config_path(raw: dict[str, Any]) -> str:
    name = state.safe_name(raw.get("output_name") or Path(raw.get("output_dir") or "my_lora").name, "my_lora")
    return f"./configs/{name}.yaml"


@dataclass(frozen=True)
class TrainForm:
    """The form as its handlers see it: the specs in widget order, and each field's own help
    line (given back to a field once the error shown in its place is fixed)."""

    specs: list[form.FieldSpec]
    infos: dict[str, str]

    def raw(self, values: Sequence[Any]) -> dict[str, Any]:
        return form.form_to_raw(self.specs, list(values))


def validated(train_form: TrainForm, values: Sequence[Any], **changes: Any) -> TrainConfig:
    raw = train_form.raw(values)
    raw.update(changes)
    raw.pop("preset", None)  # the preset's values are already in the form
    return config_from_dict(raw)


def marks(train_form: TrainForm, errors: dict[str, str], previously: list[str] | None) -> list[Any]:
    """The wrong keys say so under their field; fixed ones get their help back; [..., marked]."""
    updates = form.error_marks(train_form.specs, errors, train_form.infos, previously or [])
    return [*(gr.update(**m) if m else gr.skip() for m in updates), sorted(errors)]


# -- handlers: outputs in the order the wiring at the bottom lists them ----------------
def model_family_and_line(task_type: str, base_model: str) -> tuple[str, str]:
    """(the base model's registry family, a sentence naming its family and size) from headers only."""
    from core.model_info import detect_model

    if not base_model:
        return "", ""
    local = state.resolve_user_path(base_model)
    try:
        # A path under the work folder (what the dropdown lists), else a hub id (only its name is read).
        info = detect_model(str(local) if local.exists() else base_model, task_type or "image-generation")
    except Exception as exc:  # noqa: BLE001 - a model line must never break the form
        return "", f"Base model: could not be read ({exc})."
    source = f", read from {info.source}" if info.source else ""
    return info.family, f"**Base model:** {info.label}{source}."


def on_base_model(specs: list[form.FieldSpec], task_type: str, base_model: str) -> list[Any]:
    """[the family line, one update per family-group field]: the FLUX keys show for FLUX.1 / Chroma."""
    family, line = model_family_and_line(task_type, base_model)
    return [line, *(gr.update(visible=s.shown_for(task_type, family)) for s in form.kind_specs(specs))]


def on_sections(specs: list[form.FieldSpec], task_type: str, base_model: str = "") -> list[Any]:
    """One update per Advanced section (in build order): a section shows only while one of its keys
    does, so an SD 1.x model shows no FLUX or flow-matching section and a text task no image ones."""
    family = model_family_and_line(task_type, base_model)[0] if task_type != "text-generation" else ""
    return [gr.update(visible=shown) for shown in form.section_visibility(specs, task_type, family).values()]


def on_task(specs: list[form.FieldSpec], task_type: str, base_model: str = "") -> list[Any]:
    """[one update per field, the sample gallery]: the fields of the other task hide."""
    family = model_family_and_line(task_type, base_model)[0] if task_type != "text-generation" else ""
    updates = form.visibility_updates(specs, task_type, family)
    index = [s.name for s in specs].index("base_model")
    updates[index] = gr.update(visible=True, choices=catalog.base_models(task_type))
    # Image previews go to the gallery, text previews to the table under it.
    return [*updates, gr.update(visible=task_type != "text-generation")]


def on_preset(train_form: TrainForm, *values: Any) -> list[Any]:
    """[reason, one update per field]: the preset's values fill the form."""
    preset_values, reason = apply_preset_values(train_form.raw(values))
    out = [gr.update(value=form.to_widget(s, preset_values[s.name])) if s.name in preset_values else gr.skip()
           for s in train_form.specs]
    return [reason, *out]


def distilled_line(raw: dict[str, Any]) -> str:
    """The warning sentence when the form trains a distilled model (Turbo, schnell) without a training adapter."""
    from core.family_api.registry import distilled_warning

    if raw.get("task_type", "image-generation") != "image-generation":
        return ""
    family, _ = model_family_and_line("image-generation", str(raw.get("base_model") or ""))
    warning = distilled_warning(family, str(raw.get("training_adapter") or ""))
    return f"  \n**Distilled model:** {warning}" if warning else ""


def sample_base_line(raw: dict[str, Any]) -> str:
    """Where previews are drawn when the base model's distilled model (Krea 2 Turbo for Raw) is the one its LoRA
    is used on: on it when it is on this machine, else on the base model (one sentence each)."""
    from core.sample_base import default_sample_base

    if raw.get("task_type", "image-generation") != "image-generation":
        return ""
    base = str(raw.get("base_model") or "")
    family, _ = model_family_and_line("image-generation", base)
    local = state.resolve_user_path(base) if base else None
    path = str(local) if local is not None and local.exists() else base
    choice = default_sample_base(path, family or "", str(raw.get("sample_base") or ""))
    return f"  \n**Previews:** {choice.sentence}" if choice.sentence else ""


def on_estimate(train_form: TrainForm, *values: Any) -> str:
    raw = train_form.raw(values)
    return memory_line(raw) + distilled_line(raw) + sample_base_line(raw)


def start_run(job: Any, cfg: TrainConfig) -> None:
    """Start `cfg` on `job`: its output folder becomes servable and the Test tab's models leave the device."""
    state.allow_folder(cfg.output_dir)
    free_tryout_models()
    cfg, plan = train_gpus.plan_for(cfg)  # several GPUs picked: launched through Accelerate
    state.remember_run(cfg)
    if plan is not None and plan.launched:
        job.start(cfg, plan)
    else:
        job.start(cfg)


def on_start(train_form: TrainForm, *args: Any, resume: bool = False, queue: bool = False) -> list[Any]:
    """args: the field values, then the keys marked by the last attempt. -> [message, *marks].

    `queue`: add the run to the queue instead (it starts when the runs before it have ended)."""
    *values, previously = args
    try:
        cfg = validated(train_form, values, **({"resume_from": "latest"} if resume else {}))
    except ConfigError as exc:
        return [errors_markdown(exc.errors), *marks(train_form, exc.errors, previously)]
    cleared = marks(train_form, {}, previously)
    if queue:
        entry = state.QUEUE.add(cfg)
        return [f"Queued **{entry.name}** (#{entry.id}) → `{entry.output_dir}`; it starts when the device is "
                "free. The queue is under the log.", *cleared]
    try:
        start_run(state.JOB, cfg)
    except JobBusyError as exc:
        return [f"**{exc}** Or press *Add to queue*: it starts when this one ends.", *cleared]
    except Exception as exc:  # noqa: BLE001 - say it instead of freezing the page
        return [f"**Could not start:** {exc}", *cleared]
    word = "Resuming" if resume else "Started"
    return [f"{word} **{cfg.name}** → `{cfg.output_dir}`. Progress, loss and previews update here.", *cleared]


def on_resume(train_form: TrainForm, *args: Any) -> list[Any]:
    return on_start(train_form, *args, resume=True)


def on_queue(train_form: TrainForm, *args: Any) -> list[Any]:
    return on_start(train_form, *args, queue=True)


def on_remove(entry_id: float | None) -> str:
    """Take a waiting run out of the queue by its #."""
    if entry_id is None or entry_id == "":
        return "Type the # of a queued run first."
    if state.QUEUE.remove(int(entry_id)):
        return f"Removed #{int(entry_id)} from the queue."
    return f"#{int(entry_id)} is not waiting in the queue (a running one is stopped with Stop)."


def on_stop() -> str:
    if state.JOB.stop():
        return "Stopping: the current step finishes, a checkpoint is saved, then the run ends (queued runs go on)."
    return "Nothing is running."


def on_save(train_form: TrainForm, path_text: str, *args: Any) -> list[Any]:
    """args: the field values, then the marked keys. -> [message, command, yaml, *marks]."""
    *values, previously = args
    raw = train_form.raw(values)
    try:
        cfg = config_from_dict(raw, check_paths=False)
    except ConfigError as exc:
        return [errors_markdown(exc.errors), gr.skip(), gr.skip(), *marks(train_form, exc.errors, previously)]
    cleared = marks(train_form, {}, previously)
    path = state.resolve_user_path(path_text or default_config_path(raw))
    if path.suffix.lower() not in (".yaml", ".yml"):
        path = path.with_suffix(".yaml")
    save_config(cfg, path, only_changed=True)
    shown = catalog.rel(path)
    return [f"Saved `{shown}`.", form.command_line(shown), config_to_yaml(cfg, only_changed=True), *cleared]


def load_values(specs: list[form.FieldSpec], path: str | Path) -> list[Any]:
    """[message, one value per field] from a YAML file; keys it cannot take are listed, not loaded."""
    try:
        loaded = read_yaml(path)
    except ConfigError as exc:
        return [errors_markdown(exc.errors)] + [gr.skip()] * len(specs)
    # Keys older versions wrote and nothing reads are dropped quietly, as train.py does.
    unknown = {k: "unknown key, not loaded" for k in loaded if k not in form.FIELDS and k not in RETIRED_KEYS}
    known = {k: v for k, v in loaded.items() if k in form.FIELDS}
    try:
        cfg = config_from_dict(known, check_paths=False)
        values = form.config_values(specs, cfg)
        note = f"Loaded `{Path(path).name}`."
    except ConfigError as exc:
        values = form.config_values(specs, {k: v for k, v in known.items() if k not in exc.errors})
        unknown.update(exc.errors)
        note = f"Loaded `{Path(path).name}` except the keys below."
    if unknown:
        note += "\n\n" + errors_markdown(unknown)
    return [note, *values]


def on_load(specs: list[form.FieldSpec], path_text: str) -> list[Any]:
    return load_values(specs, state.resolve_user_path(path_text))


def on_upload(specs: list[form.FieldSpec], file_path: str | None) -> list[Any]:
    if not file_path:
        return [gr.skip()] * (len(specs) + 1)
    return load_values(specs, file_path)


def on_output_name(name: str) -> tuple[Any, Any]:
    """(output_dir, config path) follow the run's name."""
    if not name:
        return gr.skip(), gr.skip()
    clean = state.safe_name(name, "my_lora")
    return f"./output/{clean}", f"./configs/{clean}.yaml"


def run_losses(snap: Any) -> list[tuple]:
    """The plot's rows: this process's steps, after the earlier steps of a resumed run (from its loss.csv)."""
    cfg = state.last_run()
    if cfg is None or not getattr(cfg, "resume_from", ""):
        return list(snap.losses)
    return with_history(loss_csv_rows(Path(cfg.output_dir) / "loss.csv"), snap.losses)


def on_page_load(specs: list[form.FieldSpec]) -> list[Any]:
    """[message, progress, one value per field]: a reloaded page shows the running (or last) run's settings
    and state instead of a blank form and "Idle"."""
    snap = state.JOB.snapshot()
    cfg = state.last_run()
    if cfg is None:
        return [gr.skip(), progress_html(snap, "train"), *([gr.skip()] * len(specs))]
    word = "running" if snap.running and snap.kind == "train" else "last"
    message = f"The form shows the settings of the {word} run **{html.escape(cfg.name)}** (`{cfg.output_dir}`)."
    return [message, progress_html(snap, "train"), *form.config_values(specs, cfg)]


def poll(seen: dict | None) -> tuple[Any, ...]:
    """(progress, plot, gallery, text samples, eval table, eval chart, log, device line, queue, seen): only what
    changed is redrawn."""
    snap = state.JOB.snapshot()
    seen = dict(seen or {})
    rows = queue_rows(state.QUEUE.entries())
    queue_out: Any = gr.skip()
    if rows != seen.get("queue"):
        queue_out = gr.update(value=rows, visible=bool(rows))
        seen["queue"] = rows
    device_out: Any = gr.skip()
    state.start_warmup()
    if not seen.get("device") and state.device_line():
        device_out = state.device_line()
        seen["device"] = True
    ours = snap.kind == "train"
    key_losses = (snap.started_at, len(snap.losses)) if ours else None
    key_samples = (snap.started_at, len(snap.samples)) if ours else None
    plot_out: Any = gr.skip()
    gallery_out: Any = gr.skip()
    texts_out: Any = gr.skip()
    if key_losses != seen.get("losses"):
        plot_out = loss_figure(run_losses(snap) if ours else [], rewards=snap.rewards if ours else ())
        seen["losses"] = key_losses
    if key_samples != seen.get("samples"):
        gallery_out = sample_gallery(snap) if ours else []
        texts_out = sample_texts_markdown(snap) if ours else ""
        seen["samples"] = key_samples
    table_out, chart_out = evaluation_outputs(snap if ours else None, seen)
    log_out = log_text(snap, LOG_LINES) if ours else gr.skip()
    return (progress_html(snap, "train"), plot_out, gallery_out, texts_out, table_out, chart_out, log_out, device_out,
            queue_out, seen)


def poll_clip(shown: str | None) -> tuple[Any, str | None]:
    """(the clip player, what it shows): the newest preview clip of a video run; hidden for image and text runs."""
    snap = state.JOB.snapshot()
    clip = newest_clip(snap) if snap.kind == "train" else None
    if clip == shown:
        return gr.skip(), shown
    return gr.update(value=clip, visible=clip is not None), clip


def evaluation_outputs(snap: Any, seen: dict) -> tuple[Any, Any]:
    """(table, chart) of a text run's evaluation before/after (core.text_eval); hidden when it has none."""
    event = snap.evaluation if snap is not None else None
    key = (snap.started_at, event.time) if event is not None else None
    if key == seen.get("evaluation"):
        return gr.skip(), gr.skip()
    seen["evaluation"] = key
    if event is None:
        return gr.update(value="", visible=False), gr.update(value=None, visible=False)
    from core.text_eval.report import before_after_figure, table_markdown

    title = "Before training: the base model" if event.step == 0 else f"Base vs LoRA at step {event.step}"
    return (gr.update(value=table_markdown(event.rows, event.step or None), visible=True),
            gr.update(value=before_after_figure(event.rows, title), visible=True))


def on_dataset(folder: str) -> Any:
    """A data set opened in the Dataset tab becomes the one to train on."""
    return gr.update(value=folder or "", choices=catalog.datasets())


# -- widgets richer than the metadata gives ---------------------------------------------
def base_model_widget(refreshers: list[Any], spec: form.FieldSpec, label: str) -> gr.Dropdown:
    with gr.Row(equal_height=True):
        dropdown = gr.Dropdown(choices=catalog.base_models("image-generation"), value="", label=label,
                               info=spec.help + " Found under models/ (WebUI layout); or type a path or hub id.",
                               allow_custom_value=True, elem_id="cfg-base_model", scale=8)
        refreshers.append(lists.refresh_button("train-refresh-models"))
    return dropdown


def data_widget(refreshers: list[Any], spec: form.FieldSpec, label: str) -> gr.Dropdown:
    with gr.Row(equal_height=True):
        dropdown = gr.Dropdown(choices=catalog.datasets(), value="", label=label, info=spec.help,
                               allow_custom_value=True, elem_id="cfg-train_data_dir", scale=8)
        refreshers.append(lists.refresh_button("train-refresh-data"))
    return dropdown


def preset_widget(spec: form.FieldSpec, label: str) -> gr.Dropdown:
    return gr.Dropdown(choices=preset_choices(), value="", label=label, info=spec.help,
                       allow_custom_value=True, elem_id="cfg-preset")


# -- the tab ----------------------------------------------------------------------------
def create_train_tab(data: dict[str, Any] | None = None) -> dict[str, Any]:
    """One screen: the form on the left, the run (Start/Stop, progress, loss, previews, log, queue)
    on the right, beside it, so the run is watched while the settings are read."""
    specs = form.field_specs()
    refreshers: list[Any] = []
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, elem_id="train-form"):
            device_md = gr.Markdown(state.device_line() or "Detecting the device …", elem_id="train-device")
            preset_reason = gr.Markdown("", elem_id="train-preset-reason")
            model_md = gr.Markdown("", elem_id="train-base-model")
            sections: dict[str, Any] = {}
            widgets = form.build_form(specs, custom={"base_model": bind(base_model_widget, refreshers),
                                                     "train_data_dir": bind(data_widget, refreshers),
                                                     "preset": preset_widget}, sections=sections)
            with gr.Accordion("Save / load the config (YAML) and the command line", open=False):
                with gr.Row():
                    config_path = gr.Textbox(value="./configs/my_lora.yaml", label="Config file", max_lines=1,
                                             elem_id="train-config-path", scale=3)
                    save_btn = gr.Button("Save YAML", elem_id="train-save", scale=1)
                    load_btn = gr.Button("Load YAML", elem_id="train-load", scale=1)
                upload = gr.File(label="…or drop a YAML file here to load it", file_types=[".yaml", ".yml"],
                                 type="filepath", height=80)
                command = gr.Code(value=form.command_line("./configs/my_lora.yaml"), language="shell",
                                  label="The same run without the app", interactive=False, elem_id="train-command")
                yaml_view = gr.Code(value="", language="yaml", label="YAML", interactive=False)
        with gr.Column(scale=2, elem_id="train-live"):
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", size="md", elem_id="train-start")
                stop_btn = gr.Button("Stop (save a checkpoint)", variant="stop", size="md", elem_id="train-stop")
            with gr.Row():
                resume_btn = gr.Button("Resume latest", size="md", elem_id="train-resume")
                queue_btn = gr.Button("Add to queue", size="md", elem_id="train-queue-add")
            train_gpus.create_gpu_picker()
            message = gr.Markdown("", elem_id="train-message")
            memory_md = gr.Markdown("", elem_id="train-memory")
            progress = gr.HTML(progress_html(state.JOB.snapshot(), "train"), elem_id="train-progress")
            # The figure names its own lines; Gradio's label would sit over its title.
            plot = gr.Plot(label="Loss (raw, smoothed) and learning rate", show_label=False,
                           elem_id="train-loss-plot")
            samples = gr.Gallery(label="Sample previews by step (newest first)", columns=4, height=160,
                                 object_fit="contain", elem_id="train-samples", allow_preview=True)
            # A video family's previews are clips: the row shows their first frames, this plays the newest.
            sample_clip = gr.Video(label="Newest preview clip", visible=False, interactive=False, autoplay=True,
                                   loop=True, height=240, elem_id="train-sample-clip")
            text_samples = gr.Markdown("", elem_id="train-text-samples")
            eval_table = gr.Markdown("", visible=False, elem_id="train-eval-table")
            eval_chart = gr.Plot(show_label=False, visible=False, elem_id="train-eval-chart")
            log = gr.Textbox(label="Log (last lines)", lines=6, max_lines=6, autoscroll=True, interactive=False,
                             elem_id="train-log")
            queue_table = gr.Dataframe(headers=QUEUE_HEADERS, value=[], label="Queue: runs start one after another",
                                       interactive=False, wrap=True, visible=False, elem_id="train-queue")
            with gr.Row():
                # No `minimum`: an empty box would show as an invalid 0 before anything is typed; on_remove checks.
                remove_id = gr.Number(value=None, precision=0, label="# to remove", scale=1,
                                      elem_id="train-queue-id")
                remove_btn = gr.Button("Remove from the queue", scale=2, elem_id="train-queue-remove")
    inputs = form.ordered(widgets, specs)
    train_form = TrainForm(specs, {name: getattr(widget, "info", None) or "" for name, widget in widgets.items()})
    marked = gr.State([])  # the keys marked wrong by the last Start / Save
    memo = gr.State({})
    timer = gr.Timer(POLL_SECONDS)

    # -- wiring ---------------------------------------------------------------------------
    widgets["task_type"].change(bind(on_task, specs), [widgets["task_type"], widgets["base_model"]],
                                [*inputs, samples])
    kind_widgets = [widgets[s.name] for s in form.kind_specs(specs)]
    widgets["base_model"].change(bind(on_base_model, specs), [widgets["task_type"], widgets["base_model"]],
                                 [model_md, *kind_widgets], show_progress="hidden")
    for trigger in (widgets["task_type"], widgets["base_model"]):
        trigger.change(bind(on_sections, specs), [widgets["task_type"], widgets["base_model"]],
                       list(sections.values()), show_progress="hidden")
    widgets["preset"].input(bind(on_preset, train_form), inputs, [preset_reason, *inputs])
    for key in MEMORY_KEYS:
        widgets[key].change(bind(on_estimate, train_form), inputs, memory_md, show_progress="hidden")
    # Start, Resume, Queue and Save also mark the fields a config error names (no spinner over the form).
    for button, handler in ((start_btn, on_start), (resume_btn, on_resume), (queue_btn, on_queue)):
        button.click(bind(handler, train_form), [*inputs, marked], [message, *inputs, marked],
                     show_progress="hidden")
    stop_btn.click(on_stop, None, message)
    remove_btn.click(on_remove, remove_id, message)
    save_btn.click(bind(on_save, train_form), [config_path, *inputs, marked],
                   [message, command, yaml_view, *inputs, marked], show_progress="hidden")
    load_btn.click(bind(on_load, specs), config_path, [message, *inputs])
    upload.upload(bind(on_upload, specs), upload, [message, *inputs])
    widgets["output_name"].change(on_output_name, widgets["output_name"], [widgets["output_dir"], config_path])
    timer.tick(poll, memo, [progress, plot, samples, text_samples, eval_table, eval_chart, log, device_md, queue_table,
                            memo],
               show_progress="hidden")
    clip_memo = gr.State(None)
    timer.tick(poll_clip, clip_memo, [sample_clip, clip_memo], show_progress="hidden")
    if data and "folder" in data:
        data["folder"].change(on_dataset, data["folder"], widgets["train_data_dir"])
    live = [lists.LiveList(widgets["base_model"], catalog.base_models, (widgets["task_type"],)),
            lists.LiveList(widgets["train_data_dir"], catalog.datasets)]
    for button in refreshers:
        lists.wire(button, live)
    return {"widgets": widgets, "specs": specs, "start": start_btn, "stop": stop_btn, "message": message,
            "progress": progress, "timer": timer, "lists": live, "queue": queue_table,
            # app.py runs this on every page load (the tab cannot reach its Blocks' load event).
            "page_load": (bind(on_page_load, specs), [message, progress, *inputs])}
