"""The Train tab's config form, derived from `core.config.TrainConfig`'s field metadata.

Nothing here copies a widget list by hand: every key of the config becomes one widget
(checkbox, dropdown, number or text) with its help text, limits and group read from the
field's metadata, so a key added to the config appears in the form by itself. The pure
functions (`field_specs`, `to_widget`, `from_widget`, `form_to_raw`, `command_line`)
carry the logic and are tested without a browser; `build_form` makes the Gradio widgets.
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from typing import Any, get_origin
from collections.abc import Callable

from core.config import FIELDS, GROUP_TITLES, TYPES, TrainConfig
from core.family_api.registry import FAMILY_CONFIG_GROUPS, config_groups_of

TASK_OF = {"image-generation": "image", "text-generation": "text"}
# The family-specific config groups ("flow", "flux") show only for base models whose family lists them.
KIND_GROUPS = FAMILY_CONFIG_GROUPS

# The words a person reads for a key, where the key's own words are not enough; every other key is
# read from its name (`human_label`), so a key added to the config gets a label by itself.
LABELS = {
    "train_data_dir": "Data set", "metadata_path": "Captions file", "task_type": "What to train",
    "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha", "epochs": "Epochs", "output_dir": "Output folder",
    "save_steps": "Save a checkpoint every N steps", "resolution": "Resolution (px)",
    "gradient_accumulation_steps": "Gradient accumulation steps", "output_name": "Run name",
    "preset": "Preset (memory-aware defaults)", "max_train_steps": "Stop after N steps",
    "resume_from": "Resume from", "init_lora": "Start from a LoRA", "keep_checkpoints": "Checkpoints to keep",
    "auto_downshift": "Downshift when out of memory", "allow_pickle": "Allow pickled checkpoints (.ckpt)",
    "lr_scheduler": "Learning rate schedule", "lr_warmup_steps": "Warm-up steps", "max_grad_norm": "Gradient clipping",
    "text_encoder_lr": "Text encoder learning rate", "loraplus_lr_ratio": "LoRA+ learning rate ratio",
    "conv_rank": "Conv rank (LoCon)", "conv_alpha": "Conv alpha (LoCon)", "repeats": "Repeats per image",
    "bucketing": "Aspect-ratio buckets", "min_bucket_reso": "Smallest bucket (px)",
    "max_bucket_reso": "Largest bucket (px)", "snr_gamma": "Min-SNR gamma", "base_model_config": "Base model config",
    "vae": "VAE", "clip_l": "CLIP-L text encoder", "t5": "T5 text encoder", "sample_steps": "Preview every N steps",
    "sample_prompts": "Preview prompts", "sample_negative_prompt": "Preview negative prompt",
    "sample_num_inference_steps": "Preview sampling steps", "sample_guidance_scale": "Preview guidance",
    "sample_seed": "Preview seed", "sample_max_new_tokens": "Preview answer length (tokens)",
    "max_seq_length": "Max sequence length (tokens)", "save_merged_model": "Also save the merged model",
    "gguf_file": "GGUF file in the folder", "save_precision": "Save precision", "logging_steps": "Log every N steps",
}
# Abbreviations kept as people write them when a label is read from a key's name.
WORDS = {"lr": "learning rate", "lora": "LoRA", "te": "text encoder", "vae": "VAE", "fp8": "FP8", "fp16": "FP16",
         "bf16": "BF16", "snr": "SNR", "ema": "EMA", "gguf": "GGUF", "dora": "DoRA", "dir": "folder",
         "reso": "resolution", "num": "number of", "t5": "T5", "llm": "LLM", "dpo": "DPO", "orpo": "ORPO",
         "kl": "KL", "id": "ID", "url": "URL"}


def human_label(name: str) -> str:
    """'learning_rate' -> 'Learning rate': the LABELS entry, else the key's words with the usual spellings."""
    if name in LABELS:
        return LABELS[name]
    words = [WORDS.get(word, word) for word in name.split("_") if word]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def field_label(name: str) -> str:
    """What a field's label says: the words, then the YAML key, so the form still maps to the file."""
    return f"{human_label(name)} · {name}"


@dataclass(frozen=True)
class FieldSpec:
    """What the form needs to know about one config key."""

    name: str
    kind: str  # bool | choice | int | float | list | str
    default: Any
    help: str
    group: str
    choices: tuple[str, ...] | None
    minimum: float | None
    maximum: float | None
    task: str  # image | text | both

    def shown_for(self, task_type: str, family: str = "") -> bool:
        """Shown for this task, and for a family group ("flow", "flux") only when the base model's family
        (a registry name) lists it."""
        if self.group in KIND_GROUPS and self.group not in config_groups_of(family):
            return False
        return self.task == "both" or self.task == TASK_OF.get(task_type, "image")


def _kind(name: str, meta: dict) -> str:
    hint = TYPES[name]
    if meta.get("choices"):
        return "choice"
    if get_origin(hint) is list:
        return "list"
    return {bool: "bool", int: "int", float: "float"}.get(hint, "str")


def field_specs() -> list[FieldSpec]:
    """One spec per config key, in the config's declaration order (seed keys first)."""
    specs = []
    for name, spec in FIELDS.items():
        meta = spec.metadata
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc]
        specs.append(FieldSpec(name=name, kind=_kind(name, meta), default=default, help=meta.get("help", ""),
                               group=meta.get("group", "advanced"), choices=meta.get("choices"),
                               minimum=meta.get("min"), maximum=meta.get("max"), task=meta.get("task", "both")))
    return specs


def groups(specs: list[FieldSpec]) -> dict[str, list[FieldSpec]]:
    """Specs by group, groups in the order they first appear (basic first)."""
    out: dict[str, list[FieldSpec]] = {}
    for spec in specs:
        out.setdefault(spec.group, []).append(spec)
    return out


def to_widget(spec: FieldSpec, value: Any) -> Any:
    """A config value as its widget shows it (lists as one item per line)."""
    if spec.kind == "list":
        return "\n".join(str(v) for v in (value or []))
    if value is None:
        return spec.default
    return value


def from_widget(spec: FieldSpec, value: Any) -> Any:
    """A widget's value as the config reads it; an emptied number field means the default."""
    if spec.kind == "list":
        text = str(value or "")
        separators = text.replace(",", "\n") if spec.name == "target_modules" else text
        return [line.strip() for line in separators.splitlines() if line.strip()]
    if spec.kind in ("int", "float"):
        if value is None or value == "":
            return spec.default
        if spec.kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if spec.kind == "str" or spec.kind == "choice":
        return "" if value is None else str(value).strip()
    return bool(value)


def form_to_raw(specs: list[FieldSpec], values: list[Any]) -> dict[str, Any]:
    """The form's widget values -> a raw dict for `config_from_dict` (every key)."""
    return {spec.name: from_widget(spec, value) for spec, value in zip(specs, values)}


def config_values(specs: list[FieldSpec], data: dict[str, Any] | TrainConfig) -> list[Any]:
    """Widget values for a config or a (partial) dict; keys it lacks get their defaults."""
    source = data.to_dict() if isinstance(data, TrainConfig) else dict(data)
    return [to_widget(spec, source.get(spec.name, spec.default)) for spec in specs]


def changed_keys(specs: list[FieldSpec], raw: dict[str, Any]) -> dict[str, Any]:
    """Only the keys whose value differs from the default (what a tidy YAML holds)."""
    return {s.name: raw[s.name] for s in specs if s.name in raw and raw[s.name] != s.default}


def command_line(config_path: str, *, python: str = "python") -> str:
    """The `train.py` command that runs the same config without the app."""
    return f"{python} train.py --config {shlex.quote(str(config_path))}"


def section_visibility(specs: list[FieldSpec], task_type: str, family: str = "") -> dict[str, bool]:
    """Per group of the Advanced part: shown when any of its keys is (the "FLUX.1 and Chroma" and
    "Flow-matching transformers" sections only for the families the registry gives them, text
    settings only for text), so no empty section stays on the page."""
    return {group: any(s.shown_for(task_type, family) for s in members)
            for group, members in groups(specs).items() if group != "basic"}


def build_form(specs: list[FieldSpec], task_type: str = "image-generation",
               custom: dict[str, Callable[[FieldSpec, str], Any]] | None = None,
               sections: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make one Gradio widget per spec: the basic group up front, the others in an "Advanced" accordion.

    `custom` maps a key to a factory `(spec, label) -> component` for keys that need a
    richer widget (the base model dropdown); everything else follows the metadata.
    `sections`, when given, receives each group's accordion (to show or hide it with its keys).
    Must be called inside a Blocks context.
    """
    import gradio as gr

    custom = custom or {}
    widgets: dict[str, Any] = {}

    def make(spec: FieldSpec) -> Any:
        label = field_label(spec.name)
        visible = spec.shown_for(task_type)
        common = {"label": label, "info": spec.help, "visible": visible, "elem_id": f"cfg-{spec.name}"}
        if spec.name in custom:
            return custom[spec.name](spec, label)
        if spec.kind == "bool":
            return gr.Checkbox(value=bool(spec.default), **common)
        if spec.kind == "choice":
            return gr.Dropdown(choices=list(spec.choices or ()), value=spec.default, **common)
        if spec.kind in ("int", "float"):
            return gr.Number(value=spec.default, precision=0 if spec.kind == "int" else None,
                             minimum=spec.minimum, maximum=spec.maximum, **common)
        if spec.kind == "list":
            return gr.Textbox(value=to_widget(spec, spec.default), lines=2, max_lines=8,
                              placeholder="one per line", **common)
        return gr.Textbox(value=spec.default, max_lines=1, **common)

    grouped = groups(specs)
    with gr.Row(equal_height=False):
        basic = grouped.get("basic", [])
        half = (len(basic) + 1) // 2
        for column in (basic[:half], basic[half:]):
            with gr.Column():
                for spec in column:
                    widgets[spec.name] = make(spec)
    shown = section_visibility(specs, task_type)
    with gr.Accordion("Advanced (every other setting; the defaults are sound)", open=False):
        for group, members in grouped.items():
            if group == "basic":
                continue
            with gr.Accordion(GROUP_TITLES.get(group, group.title()), open=False, visible=shown[group],
                              elem_id=f"cfg-section-{group}") as accordion:
                if sections is not None:
                    sections[group] = accordion
                with gr.Row(equal_height=False):
                    for column in (members[0::2], members[1::2]):
                        with gr.Column():
                            for spec in column:
                                widgets[spec.name] = make(spec)
    return widgets


def ordered(widgets: dict[str, Any], specs: list[FieldSpec]) -> list[Any]:
    """The widgets in spec order (the order handlers receive their values)."""
    return [widgets[s.name] for s in specs]


def visibility_updates(specs: list[FieldSpec], task_type: str, family: str = "") -> list[Any]:
    """gr.update(visible=...) per spec for a task switch (image fields hide for text and back) or
    a base model of another family (the FLUX keys show for FLUX.1 / Chroma only)."""
    import gradio as gr

    return [gr.update(visible=s.shown_for(task_type, family)) for s in specs]


def kind_specs(specs: list[FieldSpec]) -> list[FieldSpec]:
    """The specs whose visibility depends on the base model's family."""
    return [s for s in specs if s.group in KIND_GROUPS]


def error_marks(specs: list[FieldSpec], errors: dict[str, str], infos: dict[str, str],
                marked: list[str]) -> list[dict[str, Any] | None]:
    """Per field: what to change so each wrong key says what is wrong under it.

    A key in `errors` gets the message as its info line and the `ls-invalid` class; a key
    marked by an earlier attempt (`marked`) and fixed since gets its own help back; every
    other field is left alone (None).
    """
    marks: list[dict[str, Any] | None] = []
    for spec in specs:
        if spec.name in errors:
            marks.append({"info": f"⚠ {errors[spec.name]}", "elem_classes": ["ls-invalid"]})
        elif spec.name in marked:
            marks.append({"info": infos.get(spec.name, spec.help), "elem_classes": []})
        else:
            marks.append(None)
    return marks
