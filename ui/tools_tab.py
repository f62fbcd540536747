"""Tools tab: inspect, convert, resize and merge LoRA files, and GGUF out (the GUI of tools/export.py).

Every action is a plain function of the form's values that returns a message, so the same
code runs from tests without a browser; the builder only lays the widgets out and wires
them at the bottom. Heavy actions (merging into a base model) are refused while a training
job holds the device.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ui import catalog, state

FORMATS = {"WebUI / ComfyUI (kohya .safetensors)": "kohya", "diffusers folder": "diffusers",
           "One .safetensors from a PEFT adapter (LLM servers)": "peft-single",
           "DoRA made plain: works the same in WebUI, ComfyUI, diffusers (needs the base model)": "plain"}
PRECISIONS = ["fp16", "bf16", "fp32", "keep"]


def _path(text: str, what: str) -> Path:
    if not text or not str(text).strip():
        raise ValueError(f"Choose the {what} first.")
    path = state.resolve_user_path(str(text).strip())
    if not path.exists():
        raise ValueError(f"{text} does not exist.")
    return path


def _output(text: str, default_name: str, source: Path) -> Path:
    """The output path: as typed (relative to the working folder), or beside the source."""
    if text and str(text).strip():
        return state.resolve_user_path(str(text).strip())
    return source.parent / default_name


def _fail(exc: Exception) -> str:
    advice = getattr(exc, "advice", "")
    return f"❌ {exc}" + (f"\n\n{advice}" if advice else "")


def _device_free() -> None:
    snap = state.JOB.snapshot()
    if snap.running:
        raise ValueError(f"A {snap.kind or 'training'} run is using the device ({snap.name}); merge when it is done.")


def inspect_action(lora: str, all_modules: bool = False) -> str:
    """The inspect report of a LoRA (as `tools/export.py inspect` prints it), in a code block."""
    from core.tools.describe import describe_lora

    try:
        text = describe_lora(_path(lora, "LoRA file"), all_modules=all_modules)
    except (ValueError, OSError) as exc:
        return _fail(exc)
    warning = "⚠ This LoRA holds NaN/inf weights: it is broken.\n\n" if "WARNING" in text else ""
    return f"{warning}```\n{text}\n```"


def convert_action(lora: str, target: str, output: str, precision: str, base: str = "") -> str:
    from core.tools.convert import convert_lora, parse_dtype

    try:
        source = _path(lora, "LoRA file or adapter folder")
        to = FORMATS.get(target, target)
        default = {"kohya": f"{source.stem}_webui.safetensors", "diffusers": f"{source.stem}_diffusers",
                   "peft-single": f"{source.name}.safetensors", "plain": f"{source.stem}_plain.safetensors"}[to]
        if to == "plain":
            from core.tools.undora import dora_to_lora

            _device_free()
            base_arg = str(_path(base, "base model the DoRA LoRA was trained on"))
            out, report = dora_to_lora(base_arg, source, _output(output, default, source),
                                       dtype=parse_dtype("fp16" if precision == "keep" else precision))
            return f"✅ Wrote `{out}`\n\nDoRA modules made plain: {report.summary()}"
        out = convert_lora(source, _output(output, default, source), to, dtype=parse_dtype(precision))
    except (ValueError, OSError, KeyError) as exc:
        return _fail(exc)
    return f"✅ Wrote `{out}`"


def resize_action(lora: str, mode: str, rank: float, energy: float, output: str, precision: str) -> str:
    from core.tools.convert import parse_dtype
    from core.tools.extract import resize_file

    try:
        source = _path(lora, "LoRA file")
        by_rank = mode == "rank"
        suffix = f"_r{int(rank)}" if by_rank else f"_e{energy:g}"
        out, report = resize_file(source, _output(output, f"{source.stem}{suffix}{source.suffix}", source),
                                  rank=int(rank) if by_rank else None, energy=None if by_rank else float(energy),
                                  dtype=parse_dtype(precision))
    except (ValueError, OSError) as exc:
        return _fail(exc)
    return f"✅ Wrote `{out}`\n\n{report.summary()}"


def parse_lora_lines(text: str) -> list[tuple[str, float]]:
    """'path[:weight]' per line (blank lines and # comments skipped)."""
    from core.tools.merge import parse_lora_spec

    items = []
    for line in (text or "").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path, weight = parse_lora_spec(line)
            items.append((str(state.resolve_user_path(path)), weight))
    if not items:
        raise ValueError("List at least one LoRA, one per line, as path or path:weight.")
    return items


def merge_action(base: str, loras: str, output: str, precision: str, rank: float = 0) -> str:
    """Bake the LoRAs into `base` (SD checkpoint / LLM folder), or, with no base, combine them into one LoRA."""
    from core.tools.convert import parse_dtype, write_like
    from core.tools.merge import bake_into_llm, bake_into_sd, combine_files

    try:
        items = parse_lora_lines(loras)
        first = Path(items[0][0])
        if not base or not str(base).strip():
            merged, report = combine_files([p for p, _ in items], [w for _, w in items], rank=int(rank) or None)
            name = f"{first.stem}_merged" + ("" if merged.format == "peft" else ".safetensors")
            out = write_like(merged, _output(output, name, first), dtype=parse_dtype(precision),
                             metadata=merged.metadata)
            return f"✅ Combined {len(items)} LoRAs into `{out}`\n\n{report.summary()}"
        _device_free()
        base_arg = str(state.resolve_user_path(base)) if state.resolve_user_path(base).exists() else str(base)
        if all((Path(p) / "adapter_config.json").is_file() for p, _ in items):
            if len(items) != 1:
                raise ValueError("Bake one text adapter at a time (combine several first, without a base model).")
            out = bake_into_llm(base_arg, items[0][0], _output(output, f"{first.name}_merged_model", first),
                                weight=items[0][1], dtype=parse_dtype(precision) if precision != "fp16" else None)
            return f"✅ Wrote the merged model folder `{out}`"
        out, report = bake_into_sd(base_arg, items, _output(output, f"{Path(base_arg).stem}_{first.stem}.safetensors",
                                                            first), dtype=parse_dtype(precision))
    except (ValueError, OSError) as exc:
        return _fail(exc)
    return f"✅ Wrote `{out}` (load it in WebUI/ComfyUI as a checkpoint)\n\n{report.summary()}"


def lora_choices() -> list[str]:
    """Every LoRA file and text adapter the app knows of, for the tools' file boxes."""
    return catalog.lora_files() + catalog.text_adapters()


def image_model_choices() -> list[tuple[str, str]]:
    """Image base models, after an empty choice (no base model)."""
    return catalog.with_empty("(none)", catalog.image_models())


def text_model_choices() -> list[tuple[str, str]]:
    return catalog.with_empty("(the one the adapter was trained on)", catalog.text_models())


def any_model_choices() -> list[tuple[str, str]]:
    return catalog.with_empty("(none: combine the LoRAs into one LoRA)", [*catalog.image_models(), *catalog.text_models()])


GGUF_MODES = {"LoRA adapter (.gguf, used with the base model)": "adapter",
              "Merged model, f16 (.gguf)": "f16", "Merged model, q8_0 (.gguf, half the size)": "q8_0"}


def gguf_action(adapter: str, mode: str, base: str = "", output: str = "") -> str:
    """A text adapter as GGUF for llama.cpp / Ollama / LM Studio (adapter or merged model), with a Modelfile."""
    from core.export.gguf_out import adapter_to_gguf, merged_to_gguf

    try:
        source = _path(adapter, "text adapter folder")
        if not (source / "adapter_config.json").is_file():
            raise ValueError(f"{adapter} is not a text adapter folder (no adapter_config.json).")
        kind = GGUF_MODES.get(mode, mode)
        base_arg = ""
        if base and str(base).strip():
            resolved = state.resolve_user_path(str(base).strip())
            base_arg = str(resolved) if resolved.exists() else str(base).strip()
        # The adapter folder sits inside its run folder: the GGUF goes beside it, named after the run.
        run_name = source.parent.name if source.name == "adapter" else source.name
        if kind == "adapter":
            result = adapter_to_gguf(source, _output(output, f"{run_name}.lora.gguf", source), base=base_arg)
        else:
            _device_free()
            result = merged_to_gguf(base_arg, source, _output(output, f"{run_name}.{kind}.gguf", source),
                                    out_type=kind)
    except (ValueError, OSError) as exc:
        return _fail(exc)
    return "✅ " + result.report().replace("\n", "\n\n")


def create_tools_tab() -> dict[str, Any]:
    import gradio as gr

    from ui import lists

    gr.Markdown("Inspect, convert, resize and merge LoRA files. The same tools run from the command line: "
                "`python tools/export.py --help`.")
    with gr.Accordion("Inspect a LoRA", open=True):
        with gr.Row():
            inspect_file = gr.Dropdown(choices=lora_choices(), value="", allow_custom_value=True, scale=4,
                                       label="LoRA file or adapter folder", elem_id="tools-inspect-file")
            refreshers = [lists.refresh_button("tools-inspect-refresh")]
            inspect_all = gr.Checkbox(value=False, label="List every module", scale=1, elem_id="tools-inspect-all")
            inspect_btn = gr.Button("Inspect", variant="primary", scale=1, elem_id="tools-inspect")
        inspect_out = gr.Markdown("", elem_id="tools-inspect-out")
    with gr.Accordion("Convert", open=False):
        with gr.Row():
            convert_file = gr.Dropdown(choices=lora_choices(), value="", allow_custom_value=True, scale=3,
                                       label="LoRA to convert", elem_id="tools-convert-file")
            refreshers.append(lists.refresh_button("tools-convert-refresh"))
            convert_to = gr.Dropdown(choices=list(FORMATS), value=list(FORMATS)[0], label="To", scale=2,
                                     elem_id="tools-convert-to")
            convert_precision = gr.Dropdown(PRECISIONS, value="fp16", label="Precision", scale=1,
                                            elem_id="tools-convert-precision")
        with gr.Row():
            convert_base = gr.Dropdown(choices=image_model_choices(), value="", allow_custom_value=True, scale=8,
                                       label="Base model (only for 'DoRA made plain': the model it was trained on)",
                                       elem_id="tools-convert-base")
            refreshers.append(lists.refresh_button("tools-convert-base-refresh"))
        convert_output = gr.Textbox(label="Output (empty: beside the source)", elem_id="tools-convert-output")
        convert_btn = gr.Button("Convert", variant="primary", elem_id="tools-convert")
        convert_out = gr.Markdown("", elem_id="tools-convert-out")
    with gr.Accordion("Resize (lower the rank by SVD)", open=False):
        with gr.Row():
            resize_file_box = gr.Dropdown(choices=lora_choices(), value="", allow_custom_value=True, scale=3,
                                          label="LoRA to resize", elem_id="tools-resize-file")
            refreshers.append(lists.refresh_button("tools-resize-refresh"))
            resize_mode = gr.Radio(["rank", "energy"], value="rank", label="Target", scale=1,
                                   elem_id="tools-resize-mode")
            resize_rank = gr.Number(value=8, precision=0, minimum=1, maximum=1024, label="Rank", scale=1,
                                    elem_id="tools-resize-rank")
            resize_energy = gr.Slider(0.5, 1.0, value=0.95, step=0.01, label="Kept energy", scale=2,
                                      elem_id="tools-resize-energy")
            resize_precision = gr.Dropdown(PRECISIONS, value="fp16", label="Precision", scale=1,
                                           elem_id="tools-resize-precision")
        resize_output = gr.Textbox(label="Output (empty: beside the source)", elem_id="tools-resize-output")
        resize_btn = gr.Button("Resize", variant="primary", elem_id="tools-resize")
        resize_out = gr.Markdown("", elem_id="tools-resize-out")
    with gr.Accordion("Merge", open=False):
        with gr.Row():
            merge_base = gr.Dropdown(choices=any_model_choices(), value="", scale=8,
                                     allow_custom_value=True, elem_id="tools-merge-base",
                                     label="Base model to bake into (empty: combine the LoRAs into one LoRA)")
            refreshers.append(lists.refresh_button("tools-merge-refresh"))
        merge_loras = gr.Textbox(lines=3, label="LoRAs, one per line: path or path:weight", elem_id="tools-merge-loras",
                                 placeholder="output/my_style/my_style.safetensors:0.8")
        with gr.Row():
            merge_rank = gr.Number(value=0, precision=0, minimum=0, maximum=1024, elem_id="tools-merge-rank",
                                   label="Combined LoRA: SVD down to rank (0: exact)")
            merge_precision = gr.Dropdown(PRECISIONS, value="fp16", label="Precision", elem_id="tools-merge-precision")
        merge_output = gr.Textbox(label="Output (empty: beside the first LoRA)", elem_id="tools-merge-output")
        merge_btn = gr.Button("Merge", variant="primary", elem_id="tools-merge")
        merge_out = gr.Markdown("", elem_id="tools-merge-out")

    with gr.Accordion("GGUF for llama.cpp / Ollama / LM Studio", open=False):
        with gr.Row():
            gguf_adapter = gr.Dropdown(choices=catalog.text_adapters(), value="", allow_custom_value=True, scale=3,
                                       label="Text adapter folder", elem_id="tools-gguf-adapter")
            refreshers.append(lists.refresh_button("tools-gguf-refresh"))
            gguf_mode = gr.Dropdown(choices=list(GGUF_MODES), value=list(GGUF_MODES)[0], label="Write", scale=2,
                                    elem_id="tools-gguf-mode")
        with gr.Row():
            gguf_base = gr.Dropdown(choices=text_model_choices(), value="", allow_custom_value=True, scale=8,
                                    label="Base model (empty: the one the adapter was trained on)",
                                    elem_id="tools-gguf-base")
            refreshers.append(lists.refresh_button("tools-gguf-base-refresh"))
        gguf_output = gr.Textbox(label="Output .gguf (empty: beside the adapter); an Ollama Modelfile goes beside it",
                                 elem_id="tools-gguf-output")
        gguf_btn = gr.Button("Write GGUF", variant="primary", elem_id="tools-gguf")
        gguf_out = gr.Markdown("", elem_id="tools-gguf-out")

    live = [lists.LiveList(box, lora_choices) for box in (inspect_file, convert_file, resize_file_box)]
    live += [lists.LiveList(convert_base, image_model_choices), lists.LiveList(merge_base, any_model_choices),
             lists.LiveList(gguf_adapter, catalog.text_adapters), lists.LiveList(gguf_base, text_model_choices)]
    for button in refreshers:
        lists.wire(button, live)  # each ↻ rescans every list of the tab: one look at the disk
    inspect_btn.click(inspect_action, [inspect_file, inspect_all], inspect_out)
    convert_btn.click(convert_action, [convert_file, convert_to, convert_output, convert_precision, convert_base],
                      convert_out)
    resize_btn.click(resize_action, [resize_file_box, resize_mode, resize_rank, resize_energy, resize_output,
                                     resize_precision], resize_out)
    merge_btn.click(merge_action, [merge_base, merge_loras, merge_output, merge_precision, merge_rank], merge_out)
    gguf_btn.click(gguf_action, [gguf_adapter, gguf_mode, gguf_base, gguf_output], gguf_out)
    return {"inspect_file": inspect_file, "inspect_out": inspect_out, "convert_file": convert_file,
            "convert_to": convert_to, "convert_out": convert_out, "resize_file": resize_file_box,
            "resize_out": resize_out, "merge_base": merge_base, "merge_loras": merge_loras, "merge_out": merge_out,
            "gguf_adapter": gguf_adapter, "gguf_out": gguf_out, "lists": live}
