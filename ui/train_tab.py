"""Train tab: the config form, the VRAM-aware preset, YAML save/load, Start/Stop/Resume and the live view.

The form comes from `ui.form` (derived from TrainConfig). Start validates the form with
`core.config.config_from_dict` (errors shown per key) and hands the config to the one
`ui.state.JOB`; the page then only polls `JOB.snapshot()` every 2 s with a `gr.Timer`,
so training never runs in a request handler and a reloaded page reattaches.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from core.config import ConfigError, config_from_dict, config_to_yaml, read_yaml
from core.job import JobBusyError
from ui import catalog, form, state
from ui.status import log_text, progress_html, sample_gallery, sample_texts_markdown

POLL_SECONDS = 2.0
CONFIG_DIR = state.WORK / "configs"
MEMORY_KEYS = ("task_type", "base_model", "resolution", "batch_size", "lora_rank", "conv_rank", "lora_variant", "mixed_precision",
               "gradient_checkpointing", "train_text_encoder", "optimizer", "cache_latents", "max_seq_length")


# -- engine pieces that may not be there yet: each degrades to a plain sentence --------------
def preset_choices() -> list[str]:
    try:
        from core.presets import preset_names  # noqa: PLC0415

        return ["", "auto", *preset_names()]
    except Exception:  # noqa: BLE001
        return ["", "auto"]


def apply_preset_values(raw: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The preset's values merged under nothing but the task/model keys, and the reason sentence."""
    from core import presets  # noqa: PLC0415

    name = raw.get("preset") or ""
    if not name:
        return {}, "No preset: every value is yours."
    keep = {k: raw[k] for k in ("preset", "task_type", "base_model", "train_data_dir") if raw.get(k)}
    try:
        merged = presets.apply_preset(keep)
    except (ValueError, OSError) as exc:
        return {}, f"Preset problem: {exc}"
    describe = getattr(presets, "describe_choice", None)
    reason = ""
    if callable(describe):
        try:
            reason = str(describe(keep))
        except Exception as exc:  # noqa: BLE001
            reason = f"(could not explain the choice: {exc})"
    values = {k: v for k, v in merged.items() if k in form.FIELDS and k not in ("preset",)}
    chosen = merged.get("preset", name)
    return values, reason or f"Preset {chosen}: its values are now in the form; change any of them."


def memory_line(raw: dict[str, Any]) -> str:
    """The predicted peak memory of the form's own values, with what to change when it will not fit."""
    try:
        from core.presets import describe_choice  # noqa: PLC0415

        return "**Memory:** " + describe_choice(dict(raw, preset=""))
    except Exception as exc:  # noqa: BLE001 - an estimate must never break the form
        return f"Memory estimate unavailable: {exc}"


def free_test_models() -> None:
    """Drop the Test tab's cached pipelines before a run needs the memory (only if they were loaded)."""
    import sys  # noqa: PLC0415

    for module, name in (("core.sample", "clear_pipeline_cache"), ("core.sample_text", "clear_cache")):
        loaded = sys.modules.get(module)
        if loaded is not None and callable(getattr(loaded, name, None)):
            getattr(loaded, name)()


def errors_markdown(errors: dict[str, str]) -> str:
    lines = ["**Please fix these settings first:**"]
    lines += [f"- `{key}`: {html.escape(message)}" for key, message in errors.items()]
    return "\n".join(lines)


def default_config_path(raw: dict[str, Any]) -> str:
    name = state.safe_name(raw.get("output_name") or Path(raw.get("output_dir") or "my_lora").name, "my_lora")
    return f"./configs/{name}.yaml"


# -- the tab ----------------------------------------------------------------------------
def create_train_tab(data: dict[str, Any] | None = None) -> dict[str, Any]:
    import gradio as gr  # noqa: PLC0415

    specs = form.field_specs()
    names = [s.name for s in specs]

    def base_model_widget(spec: form.FieldSpec, label: str):
        return gr.Dropdown(choices=catalog.base_models("image-generation"), value="", label=label,
                           info=spec.help + " Found under models/ (WebUI layout); or type a path or hub id.",
                           allow_custom_value=True, elem_id="cfg-base_model")

    def data_widget(spec: form.FieldSpec, label: str):
        return gr.Dropdown(choices=catalog.datasets(), value="", label=label, info=spec.help,
                           allow_custom_value=True, elem_id="cfg-train_data_dir")

    def preset_widget(spec: form.FieldSpec, label: str):
        return gr.Dropdown(choices=preset_choices(), value="", label=label, info=spec.help,
                           allow_custom_value=True, elem_id="cfg-preset")

    device_md = gr.Markdown(state.device_line() or "Detecting the device …", elem_id="train-device")
    preset_reason = gr.Markdown("", elem_id="train-preset-reason")
    widgets = form.build_form(specs, custom={"base_model": base_model_widget, "train_data_dir": data_widget,
                                             "preset": preset_widget})
    inputs = form.ordered(widgets, specs)
    infos = {name: getattr(widget, "info", None) or "" for name, widget in widgets.items()}
    marked = gr.State([])  # the keys marked wrong by the last Start / Save
    memory_md = gr.Markdown("", elem_id="train-memory")
    message = gr.Markdown("", elem_id="train-message")
    with gr.Row():
        start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
        stop_btn = gr.Button("Stop (save a checkpoint)", variant="stop", elem_id="train-stop")
        resume_btn = gr.Button("Resume latest", elem_id="train-resume")
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
    progress = gr.HTML(progress_html(state.JOB.snapshot(), "train"), elem_id="train-progress")
    with gr.Row():
        plot = gr.Plot(label="Loss (raw, smoothed) and learning rate", elem_id="train-loss-plot")
        samples = gr.Gallery(label="Sample previews by step", columns=3, height=300, elem_id="train-samples",
                             allow_preview=True)
    text_samples = gr.Markdown("", elem_id="train-text-samples")
    log = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False, elem_id="train-log")
    memo = gr.State({})
    timer = gr.Timer(POLL_SECONDS)

    # -- handlers -------------------------------------------------------------------------
    def raw_of(values: tuple) -> dict[str, Any]:
        return form.form_to_raw(specs, list(values))

    def on_task(task_type: str, *values):
        updates = form.visibility_updates(specs, task_type)
        index = names.index("base_model")
        updates[index] = gr.update(visible=True, choices=catalog.base_models(task_type))
        # Image previews go to the gallery, text previews to the table under it.
        return [*updates, gr.update(visible=task_type != "text-generation")]

    def on_preset(*values):
        raw = raw_of(values)
        preset_values, reason = apply_preset_values(raw)
        out = [gr.update(value=form.to_widget(s, preset_values[s.name])) if s.name in preset_values else gr.skip()
               for s in specs]
        return [reason, *out]

    def on_estimate(*values):
        return memory_line(raw_of(values))

    def validated(values: tuple, **changes: Any):
        raw = raw_of(values)
        raw.update(changes)
        raw.pop("preset", None)  # the preset's values are already in the form
        return config_from_dict(raw)

    def marks(errors: dict[str, str], previously: list[str] | None) -> list[Any]:
        """The wrong keys say so under their field; fixed ones get their help back; [..., marked]."""
        updates = form.error_marks(specs, errors, infos, previously or [])
        return [*(gr.update(**m) if m else gr.skip() for m in updates), sorted(errors)]

    def on_start(*args, resume: bool = False):
        *values, previously = args
        try:
            cfg = validated(tuple(values), **({"resume_from": "latest"} if resume else {}))
        except ConfigError as exc:
            return [errors_markdown(exc.errors), *marks(exc.errors, previously)]
        cleared = marks({}, previously)
        try:
            state.allow_folder(cfg.output_dir)
            free_test_models()
            state.JOB.start(cfg)
        except JobBusyError as exc:
            return [f"**{exc}**", *cleared]
        except Exception as exc:  # noqa: BLE001 - say it instead of freezing the page
            return [f"**Could not start:** {exc}", *cleared]
        word = "Resuming" if resume else "Started"
        return [f"{word} **{cfg.name}** → `{cfg.output_dir}`. Progress, loss and previews update below.", *cleared]

    def on_resume(*args):
        return on_start(*args, resume=True)

    def on_stop():
        if state.JOB.stop():
            return "Stopping: the current step finishes, a checkpoint is saved, then the run ends."
        return "Nothing is running."

    def on_save(path_text: str, *args):
        *values, previously = args
        raw = raw_of(tuple(values))
        try:
            cfg = config_from_dict(raw, check_paths=False)
        except ConfigError as exc:
            return [errors_markdown(exc.errors), gr.skip(), gr.skip(), *marks(exc.errors, previously)]
        cleared = marks({}, previously)
        path = state.resolve_user_path(path_text or default_config_path(raw))
        if path.suffix.lower() not in (".yaml", ".yml"):
            path = path.with_suffix(".yaml")
        from core.config import save_config  # noqa: PLC0415

        save_config(cfg, path, only_changed=True)
        shown = catalog.rel(path)
        return [f"Saved `{shown}`.", form.command_line(shown), config_to_yaml(cfg, only_changed=True), *cleared]

    def load_values(path: str | Path):
        try:
            loaded = read_yaml(path)
        except ConfigError as exc:
            return [errors_markdown(exc.errors)] + [gr.skip()] * len(specs)
        unknown = {k: "unknown key, not loaded" for k in loaded if k not in form.FIELDS}
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

    def on_load(path_text: str):
        return load_values(state.resolve_user_path(path_text))

    def on_upload(file_path: str | None):
        if not file_path:
            return [gr.skip()] * (len(specs) + 1)
        return load_values(file_path)

    def on_output_name(name: str, output_dir: str):
        if not name:
            return gr.skip(), gr.skip()
        clean = state.safe_name(name, "my_lora")
        return f"./output/{clean}", f"./configs/{clean}.yaml"

    def poll(seen: dict):
        snap = state.JOB.snapshot()
        seen = dict(seen or {})
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
            from ui.plots import loss_figure  # noqa: PLC0415

            plot_out = loss_figure(snap.losses if ours else [])
            seen["losses"] = key_losses
        if key_samples != seen.get("samples"):
            gallery_out = sample_gallery(snap) if ours else []
            texts_out = sample_texts_markdown(snap) if ours else ""
            seen["samples"] = key_samples
        log_out = log_text(snap) if ours else gr.skip()
        return progress_html(snap, "train"), plot_out, gallery_out, texts_out, log_out, device_out, seen

    # -- wiring ---------------------------------------------------------------------------
    widgets["task_type"].change(on_task, [widgets["task_type"], *inputs], [*inputs, samples])
    widgets["preset"].input(on_preset, inputs, [preset_reason, *inputs])
    for key in MEMORY_KEYS:
        widgets[key].change(on_estimate, inputs, memory_md, show_progress="hidden")
    # Start, Resume and Save also mark the fields a config error names (no spinner over the form).
    start_btn.click(on_start, [*inputs, marked], [message, *inputs, marked], show_progress="hidden")
    resume_btn.click(on_resume, [*inputs, marked], [message, *inputs, marked], show_progress="hidden")
    stop_btn.click(on_stop, None, message)
    save_btn.click(on_save, [config_path, *inputs, marked], [message, command, yaml_view, *inputs, marked],
                   show_progress="hidden")
    load_btn.click(on_load, config_path, [message, *inputs])
    upload.upload(on_upload, upload, [message, *inputs])
    widgets["output_name"].change(on_output_name, [widgets["output_name"], widgets["output_dir"]],
                                  [widgets["output_dir"], config_path])
    timer.tick(poll, memo, [progress, plot, samples, text_samples, log, device_md, memo], show_progress="hidden")
    if data and "folder" in data:
        def on_dataset(folder: str):
            return gr.update(value=folder or "", choices=catalog.datasets())

        data["folder"].change(on_dataset, data["folder"], widgets["train_data_dir"])
    return {"widgets": widgets, "specs": specs, "start": start_btn, "stop": stop_btn, "message": message,
            "progress": progress, "timer": timer}
