"""The Test tab, where you try a LoRA. Images: generate at a LoRA weight (with up to two more LoRAs
applied together, each at its own weight, as WebUI's `<lora:a:0.8> <lora:b:0.5>`) and compare weights x
checkpoints in one labelled grid. Text: chat with the adapter, and the base and the LoRA side by side.

Generating images and the compare grid run as jobs on the one `ui.state.JOB`
(`core.tryout` targets, one image at a time) with a progress bar and a Stop button; the page
polls the job, so a reloaded page shows the one still running and then its result. The chat
answers in the request. Both are refused while another job holds the device; the pipelines
load lazily in `core.sample` / `core.sample_text` and are cached between clicks. Those modules import torch, so they
are imported in the handlers that use them, never when the app starts.

The handlers are module functions of the widgets' values (tested without a browser);
`create_tryout_tab` only lays the widgets out and wires them at the bottom.
"""
from __future__ import annotations

import html
import re
import time
from pathlib import Path
from typing import Any

import gradio as gr

from core.job import JobBusyError, JobSnapshot
from core.model_info import detect_model
from ui import catalog, lists, state
from ui.status import STATE_WORDS, progress_html

DEFAULT_WEIGHT = 0.8
EXTRA_LORAS = 2  # rows for more LoRAs applied together with the first (WebUI's <lora:a:0.8> <lora:b:0.5>)
POLL_SECONDS = 2.0
TRYOUT_KINDS = ("generate", "compare")  # the Job kinds this tab starts and shows


class DeviceBusy(RuntimeError):
    pass


def ensure_device_free() -> None:
    snap = state.JOB.snapshot()
    if snap.running:
        raise DeviceBusy(f"A {snap.kind or 'job'} run is using the device ({snap.name}). Stop it or wait for it "
                         "to finish, then generate.")


def webui_syntax(lora_path: str, weight: float) -> str:
    """What to type in WebUI / Forge to use this LoRA: `<lora:name:0.8>`."""
    if not lora_path:
        return "<lora:your_lora:0.8>"
    path = Path(lora_path)
    name = path.parent.name if path.name == "pytorch_lora_weights.safetensors" else path.stem
    return f"<lora:{name}:{weight:g}>"


def chosen_loras(*pairs: Any) -> list[tuple[str, float]]:
    """The (LoRA text, weight) rows that name a LoRA, from lora1, weight1, lora2, weight2, ..."""
    rows = zip(pairs[0::2], pairs[1::2])
    return [(str(text), float(weight if weight is not None else DEFAULT_WEIGHT)) for text, weight in rows if text]


def webui_prompt(loras: list[tuple[str, float]]) -> str:
    """What to type in WebUI / Forge for all the chosen LoRAs: `<lora:a:0.8> <lora:b:0.5>`."""
    if not loras:
        return webui_syntax("", DEFAULT_WEIGHT)
    return " ".join(webui_syntax(text, weight) for text, weight in loras)


def family_note(lora_path: str, base_model: str) -> str:
    """'This LoRA was trained for SDXL' when the file's family and the base model's differ."""
    if not lora_path or not base_model:
        return ""
    from core.export import inspect as inspect_mod

    try:
        info = inspect_mod.inspect_lora(state.resolve_user_path(lora_path))
        model = detect_model(str(state.resolve_user_path(base_model)), "image-generation")
        message = inspect_mod.lora_family_mismatch(info, model.family)
    except Exception:  # noqa: BLE001 - a check that cannot run must not block generating
        return ""
    return f"⚠ {message}" if message else ""


def check_family(lora_path: str, base_model: str) -> None:
    """Refuse to load a LoRA made for another model family (it would fail, or do nothing)."""
    note = family_note(lora_path, base_model)
    if note:
        raise ValueError(note)


def family_notes(base_model: str, *lora_texts: str) -> str:
    """The family warning of each chosen LoRA that does not fit the base model, one per line."""
    notes = [family_note(text, base_model) for text in lora_texts if text]
    return "\n\n".join(note for note in notes if note)


def lora_args(loras: list[tuple[str, float]], base_text: str) -> list[tuple[str, float]]:
    """(file, weight) for each chosen LoRA, each checked: it exists and fits the base model's family; on a model
    of two experts (Wan 2.2 A14B) a run's high-noise file brings its low-noise pair at the same weight."""
    checked = []
    for text, weight in loras:
        path = existing_arg(text, file_only=True)
        check_family(text, base_text)
        checked.append((str(path), weight))
    return with_expert_pairs(checked, base_text)


def with_expert_pairs(loras: list[tuple[str, float]], base_text: str) -> list[tuple[str, float]]:
    """The chosen files, and for each `<name>_high_noise.safetensors` on a two-expert model its
    `<name>_low_noise.safetensors` beside it (the run's pair), unless that is chosen too. Core puts each
    file on its expert (core.lora_stack.expert_target)."""
    highs = [(path, weight) for path, weight in loras if Path(path).stem.endswith("_high_noise")]
    if not highs or not base_text or not two_experts(base_text):
        return loras
    chosen = {Path(path).resolve() for path, _ in loras}
    pairs = []
    for path, weight in highs:
        low = Path(path).with_name(Path(path).name.replace("_high_noise", "_low_noise"))
        if low.is_file() and low.resolve() not in chosen:
            pairs.append((str(low), weight))
    return loras + pairs


def two_experts(base_text: str) -> bool:
    """A Wan 2.2 A14B base model (high- and low-noise experts)."""
    from core.family_api.registry import family_info

    try:
        family = detect_model(str(state.resolve_user_path(base_text)), "image-generation").family
        return family_info(family).two_experts
    except Exception:  # noqa: BLE001 - an unknown model has one network
        return False


def pair_of(path: str, base_text: str, others: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """A compared high-noise file's low-noise pair, at weight 1 in every cell (the high one is swept)."""
    return with_expert_pairs([(path, 1.0), *others], base_text)[1 + len(others):]


def split_more(more: tuple[Any, ...]) -> tuple[tuple[Any, ...], str | None]:
    """(the extra LoRA rows' lora2, weight2, ..., the start image or None) of a handler's trailing inputs."""
    rows = more[:2 * EXTRA_LORAS]
    start = more[2 * EXTRA_LORAS] if len(more) > 2 * EXTRA_LORAS else None
    return rows, (str(start) if start else None)


def compare_files(lora_path: str, with_checkpoints: bool) -> list[Path]:
    """The chosen LoRA file, and before it the run's checkpoints (step 100, 200, ...) when asked."""
    main = state.resolve_user_path(lora_path)
    files = [p for _, p in catalog.checkpoint_loras(main)] if with_checkpoints else []
    return [p for p in files if p.resolve() != main.resolve()] + [main]


def grid_path(lora_path: str) -> Path:
    """Where a compare grid goes: the run's own compare/ folder for a run's file, else the app's cache."""
    path = state.resolve_user_path(lora_path).resolve()
    stem = re.sub(r"[^\w.-]+", "_", path.parent.name if path.name == "pytorch_lora_weights.safetensors" else path.stem)
    folder = state.CACHE_DIR / "compare"
    output = state.OUTPUT_DIR.resolve()
    if output in path.parents:
        folder = output / path.relative_to(output).parts[0] / "compare"
    return folder / f"{stem or 'lora'}-{time.strftime('%Y%m%d-%H%M%S')}.png"


def model_arg(text: str) -> str:
    """A typed model: a local path when it exists, else the text as it is (a hub id)."""
    path = state.resolve_user_path(text)
    return str(path) if path.exists() else text


def existing_arg(text: str, *, file_only: bool) -> str | None:
    """A LoRA file or adapter folder the user named, which must exist; None when empty."""
    if not text:
        return None
    path = state.resolve_user_path(text)
    if not (path.is_file() if file_only else path.exists()):
        raise ValueError(f"{text} does not exist.")
    return str(path)


def image_paths(base_text: str, lora_text: str) -> tuple[str, str | None]:
    """(base model, LoRA file or None) as the pipeline takes them."""
    if not base_text:
        raise ValueError("Choose a base model first.")
    return model_arg(base_text), existing_arg(lora_text, file_only=True)


def text_paths(base_text: str, adapter_text: str) -> tuple[str, str | None]:
    """(base model, adapter folder or None); an empty base model means the bundled default LLM."""
    return (model_arg(base_text) if base_text else ""), existing_arg(adapter_text, file_only=False)


# -- image handlers: generating and comparing run as jobs ------------------------------------
def generated_paths(lora_text: str, count: int) -> list[Path]:
    """Where generated images go: the app's cache, one file per image, named after the LoRA and the time."""
    stem = re.sub(r"[^\w.-]+", "_", Path(lora_text).stem if lora_text else "base") or "image"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [state.CACHE_DIR / "generate" / f"{stem}-{stamp}-{index + 1}.png" for index in range(count)]


def start_job(target: Any, kind: str, name: str) -> str:
    """Hand the work to the one Job; '' when it started, else why not."""
    try:
        state.JOB.run(target, kind=kind, name=name)
    except JobBusyError as exc:
        return str(exc)
    return ""


def reference_paths(files: Any) -> list[str]:
    """The uploaded reference images' paths, in the order given (gradio gives paths or file objects)."""
    if not files:
        return []
    files = files if isinstance(files, (list, tuple)) else [files]
    return [str(getattr(f, "name", f)) for f in files if f]


def generate_with_references(base_text: str, lora_text: str, prompt_text: str, negative_text: str, weight: float,
                             seed: float, steps: float, guidance: float, size: float, count: float, references: Any,
                             *more: Any) -> tuple[Any, str]:
    """The Generate button: `generate` with the uploaded reference images (an edit model edits them)."""
    return generate(base_text, lora_text, prompt_text, negative_text, weight, seed, steps, guidance, size, count,
                    *more, references=reference_paths(references))


def generate(base_text: str, lora_text: str, prompt_text: str, negative_text: str, weight: float, seed: float,
             steps: float, guidance: float, size: float, count: float = 1, *more: Any,
             references: list[str] | None = None) -> tuple[Any, str]:
    """(cleared image, message): `count` images with the chosen LoRAs at their weights (or from the base
    model alone), as a job. `more`: the extra rows' LoRA and weight, lora2, weight2, ..., then the start image
    of an image-to-video model. `references`: the images an edit model edits (Qwen-Image-Edit-2509 / 2511 and
    FLUX.2 klein read several, in order)."""
    more, start = split_more(more)
    loras = chosen_loras(lora_text, weight, *more)
    try:
        ensure_device_free()
        base_arg, _ = image_paths(base_text, "")
        lora_list = lora_args(loras, base_text)
    except (DeviceBusy, ValueError) as exc:
        return None, str(exc)
    from core.tryout import generate_target

    side = int(size or 0) or None
    number = max(1, int(count or 1))
    target = generate_target(base_arg, lora_list, prompt_text or "",
                             generated_paths(loras[0][0] if loras else "", number), seed=int(seed or 0),
                             steps=int(steps or 20), guidance=float(guidance or 0),
                             negative_prompt=negative_text or "", width=side, height=side, start_image=start,
                             **({"references": list(references)} if references else {}))
    refused = start_job(target, "generate", webui_prompt(loras) if loras else "base model")
    return None, refused or f"Generating {number} image(s) …"


def compare(base_text: str, lora_text: str, prompt_text: str, negative_text: str, seed: float, steps: float,
            guidance: float, size: float, with_checkpoints: bool, *more: Any) -> tuple[Any, str]:
    """(cleared grid, message): the first LoRA (and its checkpoints) at each compare weight, as a job;
    the LoRAs of the extra rows (`more`: lora2, weight2, ..., then the start image) stay at their weights in
    every cell; a high-noise file of a Wan 2.2 A14B run brings its low-noise pair into each cell."""
    more, start = split_more(more)
    others = chosen_loras(*more)
    try:
        ensure_device_free()
        base_arg, lora_arg = image_paths(base_text, lora_text)
        if lora_arg is None:
            raise ValueError("Choose a LoRA to compare.")
        check_family(lora_text, base_text)
        fixed = lora_args(others, base_text)
    except (DeviceBusy, ValueError) as exc:
        return None, str(exc)
    from core.sample import COMPARE_WEIGHTS
    from core.tryout import compare_target

    files = compare_files(lora_text, bool(with_checkpoints))
    side = int(size or 0) or None
    out = grid_path(lora_text)
    target = compare_target(base_arg, [str(f) for f in files], prompt_text or "", out, weights=COMPARE_WEIGHTS,
                            seed=int(seed or 0), steps=int(steps or 20), guidance=float(guidance or 0),
                            negative_prompt=negative_text or "", width=side, height=side,
                            others=fixed + pair_of(str(lora_arg), base_text, fixed), start_image=start)
    refused = start_job(target, "compare", Path(lora_text).name)
    if refused:
        return None, refused
    rows = ", ".join(Path(f).parent.name if Path(f).parent.name.startswith("step-") else "final" for f in files)
    weights = ", ".join(f"{w:g}" for w in COMPARE_WEIGHTS)
    kept = f"; in every cell {webui_prompt(others)}" if others else ""
    return None, (f"Rendering {len(files) * len(COMPARE_WEIGHTS)} images into `{catalog.rel(out)}` — "
                  f"columns: weights {weights}; rows: {rows}{kept} …")


def stop_tryout() -> str:
    snap = state.JOB.snapshot()
    if snap.kind in TRYOUT_KINDS and state.JOB.stop():
        return "Stopping after the image being drawn."
    return "No image job is running."


def result_message(snap: JobSnapshot, result: Any) -> str:
    """The sentence under the buttons once a generate / compare job has ended."""
    if snap.state == "failed":
        error = snap.error.message if snap.error else "unknown error"
        what = "make the grid" if snap.kind == "compare" else "generate"
        return f"**Could not {what}:** {html.escape(error)}"
    message = getattr(result, "message", "") or STATE_WORDS.get(snap.state, snap.state)
    if snap.kind == "compare" and getattr(result, "paths", None):
        message = f"Grid saved as `{catalog.rel(Path(result.paths[0]))}`. {message}"
    return message


def poll(seen: dict | None) -> tuple[Any, ...]:
    """(progress, image, grid, message, seen): the running or last generate / compare job, redrawn when
    it changes, so a reloaded page shows the job still running and then its result."""
    snap = state.JOB.snapshot()
    seen = dict(seen or {})
    ours = snap.kind in TRYOUT_KINDS
    if not ours:
        shown = progress_html(snap, "generate") if snap.running else ""
        return shown, gr.skip(), gr.skip(), gr.skip(), seen
    image_out: Any = gr.skip()
    grid_out: Any = gr.skip()
    message_out: Any = gr.skip()
    images = [path for event in snap.samples for path in event.images]
    key_images = (snap.started_at, len(images))
    if snap.kind == "generate" and images and key_images != seen.get("images"):
        image_out = images[-1]  # the newest image, as soon as it is drawn
        seen["images"] = key_images
    key_end = (snap.started_at, snap.state)
    if not snap.running and key_end != seen.get("end"):
        result = state.JOB.result
        if snap.kind == "compare" and getattr(result, "paths", None):
            grid_out = result.paths[0]
        message_out = result_message(snap, result)
        seen["end"] = key_end
    return progress_html(snap), image_out, grid_out, message_out, seen


def poll_clip(shown: str | None) -> tuple[Any, str | None]:
    """(the clip player, what it shows): the newest clip a generate job drew with a video model, else hidden."""
    from ui.status import newest_clip

    snap = state.JOB.snapshot()
    clip = newest_clip(snap) if snap.kind == "generate" else None
    if clip == shown:
        return gr.skip(), shown
    return gr.update(value=clip, visible=clip is not None), clip


def on_loras(base_text: str, *pairs: Any) -> tuple[str, str]:
    """(WebUI prompt line, family warnings) for the chosen LoRAs; `pairs`: lora1, weight1, lora2, ..."""
    return webui_prompt(chosen_loras(*pairs)), family_notes(base_text, *pairs[0::2])


def on_weights(*pairs: Any) -> str:
    """The WebUI prompt line again when a weight moves (the files, and so the warnings, are the same)."""
    return webui_prompt(chosen_loras(*pairs))


def on_task(task: str) -> tuple[Any, Any]:
    """(image box, text box): only the chosen kind of test shows."""
    return gr.update(visible=task == "image"), gr.update(visible=task == "text")


def local_sample_base(model: str) -> str:
    """The distilled model `model`'s LoRAs are used on, where its registry row names one and it is on this
    machine (core.sample_base), else ""."""
    from core.sample_base import find_local

    if not model:
        return ""
    local = state.resolve_user_path(model)
    path = str(local) if local.exists() else model
    try:
        return find_local(path, detect_model(path, "image-generation").family)
    except Exception:  # noqa: BLE001 - the Test tab keeps the base model when it cannot tell
        return ""


def follow_trained_model(model: str, task_type: str, sample_base: str = "") -> tuple[Any, Any]:
    """(image base, text base): the Train tab's base model goes to the box of its task; an image run's
    sample_base (the distilled model it is used on, or the base row's one found on this machine) wins over the
    model it trains on."""
    if task_type == "image-generation":
        return gr.update(value=sample_base or local_sample_base(model) or model), gr.skip()
    return gr.skip(), gr.update(value=model)


# -- text handlers ----------------------------------------------------------------------
def send(base_text: str, adapter_text: str, weight: float, tokens: float, history: list[dict] | None,
         message: str) -> tuple[list[dict], str, str]:
    """(chat history, message box, note): the adapter's answer is added to the chat."""
    history = list(history or [])
    if not (message or "").strip():
        return history, "", "Type a message first."
    try:
        ensure_device_free()
        base_arg, adapter_arg = text_paths(base_text, adapter_text)
    except (DeviceBusy, ValueError) as exc:
        return history, message, str(exc)
    from core import sample_text

    messages = [{"role": m["role"], "content": m["content"]} for m in history] + \
        [{"role": "user", "content": message}]
    try:
        answer = sample_text.chat(base_arg, adapter_arg, messages, weight=float(weight),
                                  max_new_tokens=int(tokens or 128))
    except Exception as exc:  # noqa: BLE001
        return history, message, f"**Could not answer:** {html.escape(str(exc))}"
    history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
    return history, "", ""


def side_by_side(base_text: str, adapter_text: str, weight: float, tokens: float, message: str) -> tuple[Any, Any, str]:
    """(base answer, LoRA answer, note) for the same message."""
    if not (message or "").strip():
        return gr.skip(), gr.skip(), "Type a message first."
    try:
        ensure_device_free()
        base_arg, adapter_arg = text_paths(base_text, adapter_text)
        if adapter_arg is None:
            raise ValueError("Choose an adapter to compare with the base model.")
    except (DeviceBusy, ValueError) as exc:
        return gr.skip(), gr.skip(), str(exc)
    from core import sample_text

    try:
        answers = sample_text.compare_answers(base_arg, adapter_arg, [message], weight=float(weight),
                                              max_new_tokens=int(tokens or 128))[0]
    except Exception as exc:  # noqa: BLE001
        return gr.skip(), gr.skip(), f"**Could not answer:** {html.escape(str(exc))}"
    return answers.get("base", ""), answers.get("lora", ""), "Same prompt, same settings; greedy decoding."


# -- the tab ----------------------------------------------------------------------------
def create_tryout_tab(train: dict[str, Any] | None = None) -> dict[str, Any]:
    with gr.Row():
        task = gr.Radio(["image", "text"], value="image", label="What to test", elem_id="test-task", scale=4)
        refresh = lists.refresh_button("test-refresh")  # rescans the four lists (also done on selecting the tab)
    with gr.Group(visible=True) as image_box:
        with gr.Row():
            base = gr.Dropdown(choices=catalog.image_models(), value="", allow_custom_value=True, scale=3,
                               label="Base model", elem_id="test-base")
            lora = gr.Dropdown(choices=catalog.lora_files(), value="", allow_custom_value=True, scale=3,
                               label="LoRA (a run's file, a checkpoint, or models/Lora/)", elem_id="test-lora")
        with gr.Accordion("More LoRAs, applied together with the first (each at its own weight)", open=False,
                          elem_id="test-more-loras"):
            extra = []
            for row in range(2, EXTRA_LORAS + 2):
                with gr.Row():
                    extra.append(gr.Dropdown(choices=catalog.lora_files(), value="", allow_custom_value=True,
                                             scale=3, label=f"LoRA {row}", elem_id=f"test-lora-{row}"))
                    extra.append(gr.Slider(0.0, 1.5, value=DEFAULT_WEIGHT, step=0.05, scale=2,
                                           label=f"LoRA {row} weight", elem_id=f"test-weight-{row}"))
        family = gr.Markdown("", elem_id="test-family")
        with gr.Accordion("Start image (image-to-video models: Wan I2V)", open=False, elem_id="test-start"):
            start = gr.Image(label="Start image: the clip's first frame", type="filepath", height=200,
                             elem_id="test-start-image")
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="test-prompt")
        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="test-negative")
        references = gr.File(label="Reference images to edit, in order (edit models: Qwen-Image-Edit-2509 / 2511 "
                                   "and FLUX.2 klein read several, Qwen-Image-Edit and Kontext the first)",
                             file_count="multiple", file_types=["image"], type="filepath",
                             elem_id="test-references")
        with gr.Row():
            weight = gr.Slider(0.0, 1.5, value=DEFAULT_WEIGHT, step=0.05, label="LoRA weight", elem_id="test-weight")
            seed = gr.Number(value=1234, precision=0, minimum=0, label="Seed", elem_id="test-seed")
            steps = gr.Number(value=20, precision=0, minimum=1, maximum=150, label="Steps", elem_id="test-steps")
            guidance = gr.Number(value=7.0, minimum=0, maximum=30, label="Guidance", elem_id="test-guidance")
            size = gr.Number(value=0, precision=0, minimum=0, maximum=2048, elem_id="test-size",
                             label="Size in px (0: the model's own)")
        syntax = gr.Textbox(value=webui_syntax("", DEFAULT_WEIGHT), label="In WebUI / Forge prompts, write",
                            interactive=False, buttons=["copy"], elem_id="test-syntax")
        with gr.Row():
            count = gr.Number(value=1, precision=0, minimum=1, maximum=64, label="Images", scale=1,
                              elem_id="test-count")
            generate_btn = gr.Button("Generate", variant="primary", scale=2, elem_id="test-generate")
            with_ckpts = gr.Checkbox(value=False, label="Compare over checkpoints too", scale=2, elem_id="test-ckpts")
            compare_btn = gr.Button("Compare weights", scale=2, elem_id="test-compare")
            stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="test-stop")
        progress = gr.HTML(progress_html(state.JOB.snapshot(), "generate"), elem_id="test-progress")
        image_message = gr.Markdown("", elem_id="test-message")
        with gr.Row():
            image_out = gr.Image(label="Result (the newest image)", type="filepath", interactive=False, height=400,
                                 elem_id="test-image")
            grid_out = gr.Image(label="Compare grid (saved as one PNG)", type="filepath", interactive=False,
                                height=400, elem_id="test-grid")
        # A video model (Wan) draws clips: the image above is the first frame, this plays the clip.
        clip_out = gr.Video(label="Result clip", visible=False, interactive=False, autoplay=True, loop=True,
                            height=400, elem_id="test-clip")
    with gr.Group(visible=False) as text_box:
        with gr.Row():
            text_base = gr.Dropdown(choices=catalog.text_models(), value="", allow_custom_value=True, scale=3,
                                    label="Base model (empty: the bundled SmolLM2-135M)", elem_id="test-text-base")
            adapter = gr.Dropdown(choices=catalog.text_adapters(), value="", allow_custom_value=True, scale=3,
                                  label="Adapter (a run's adapter folder)", elem_id="test-adapter")
            text_weight = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Adapter weight", scale=2,
                                    elem_id="test-text-weight")
            max_tokens = gr.Number(value=128, precision=0, minimum=1, maximum=4096, label="Max new tokens", scale=1,
                                   elem_id="test-max-tokens")
        chat = gr.Chatbot(label="Chat with the LoRA", height=320, elem_id="test-chat")
        with gr.Row():
            question = gr.Textbox(label="Message", scale=5, elem_id="test-question")
            send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="test-send")
            side_btn = gr.Button("Base vs LoRA", scale=1, elem_id="test-side")
        text_message = gr.Markdown("", elem_id="test-text-message")
        with gr.Row():
            base_answer = gr.Textbox(label="Base model", lines=6, interactive=False, elem_id="test-base-answer")
            lora_answer = gr.Textbox(label="With the LoRA", lines=6, interactive=False, elem_id="test-lora-answer")

    # -- wiring -----------------------------------------------------------------------------
    task.change(on_task, task, [image_box, text_box])
    memo = gr.State({})
    timer = gr.Timer(POLL_SECONDS)
    # Generate and Compare only start a job (the page polls it), so a long grid never holds a request.
    # The start image goes last, after the extra LoRA rows (`split_more`).
    generate_btn.click(generate_with_references,
                       [base, lora, prompt, negative, weight, seed, steps, guidance, size, count, references, *extra,
                        start], [image_out, image_message])
    compare_btn.click(compare, [base, lora, prompt, negative, seed, steps, guidance, size, with_ckpts, *extra, start],
                      [grid_out, image_message])
    stop_btn.click(stop_tryout, None, image_message)
    timer.tick(poll, memo, [progress, image_out, grid_out, image_message, memo], show_progress="hidden")
    clip_memo = gr.State(None)
    timer.tick(poll_clip, clip_memo, [clip_out, clip_memo], show_progress="hidden")
    pairs = [lora, weight, *extra]  # lora1, weight1, lora2, weight2, ...
    # One queue for both, in the order they were triggered: the first on_loras imports torch to read the
    # files (seconds), and a weight moved meanwhile must not be overwritten by its older line.
    in_order = {"concurrency_id": "test-loras", "concurrency_limit": 1}
    for box in (base, *pairs[0::2]):
        box.change(on_loras, [base, *pairs], [syntax, family], **in_order)
    for slider in pairs[1::2]:
        slider.change(on_weights, pairs, syntax, show_progress="hidden", **in_order)
    live = [lists.LiveList(base, catalog.image_models), lists.LiveList(lora, catalog.lora_files),
            *[lists.LiveList(box, catalog.lora_files) for box in extra[0::2]],
            lists.LiveList(text_base, catalog.text_models), lists.LiveList(adapter, catalog.text_adapters)]
    lists.wire(refresh, live)
    chat_inputs = [text_base, adapter, text_weight, max_tokens, chat, question]
    send_btn.click(send, chat_inputs, [chat, question, text_message], concurrency_limit=1, concurrency_id="device")
    question.submit(send, chat_inputs, [chat, question, text_message], concurrency_limit=1, concurrency_id="device")
    side_btn.click(side_by_side, [text_base, adapter, text_weight, max_tokens, question],
                   [base_answer, lora_answer, text_message], concurrency_limit=1, concurrency_id="device")
    if train and "widgets" in train:
        # After a run, the Test tab offers its base model and its files without a refresh.
        widgets = train["widgets"]
        for key in ("base_model", "sample_base"):  # a sample_base (the Turbo model) is what the LoRA is used on
            widgets[key].change(follow_trained_model, [widgets["base_model"], widgets["task_type"],
                                                       widgets["sample_base"]], [base, text_base])
    return {"task": task, "base": base, "lora": lora, "refresh": refresh, "lists": live}
