"""GGUF out, as the CLI and the Tools tab use it: the GGUF file plus an Ollama `<name>.Modelfile` beside it.

- `adapter_to_gguf`: a PEFT adapter as a GGUF LoRA adapter (core/export/gguf_adapter.py);
  the Modelfile says `FROM <base>` and `ADAPTER <adapter.gguf>`.
- `merged_to_gguf`: the adapter baked into its base as one GGUF model
  (core/export/gguf_model.py); the Modelfile says `FROM <model.gguf>`.

The Modelfile's TEMPLATE comes from the chat template the LoRA was trained with: the one
named in the training run's config.yaml (beside the adapter folder) when it names one,
else the base tokenizer's own (core/export/modelfile.py checks it renders identically).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.export.modelfile import TemplateMatch, ollama_create_command, write_modelfile


@dataclass
class GGUFResult:
    gguf: Path
    modelfile: Path | None
    summary: str
    template: TemplateMatch | None

    def report(self) -> str:
        lines = [f"Wrote {self.gguf}: {self.summary}"]
        if self.modelfile is not None:
            lines.append(f"Wrote {self.modelfile}")
            if self.template is not None and self.template.format is None:
                lines.append("Note: the chat format was not recognised, so the Modelfile has no TEMPLATE "
                             f"({'; '.join(self.template.problems)}).")
            lines.append(f"Ollama: {ollama_create_command(self.modelfile, _model_name(self.gguf))}")
        return "\n".join(lines)


def _model_name(path: Path) -> str:
    return path.name.split(".")[0].lower().replace(" ", "-").replace("_", "-") or "my-lora"


def trained_chat_template(adapter_dir: str | Path) -> str:
    """The chat_template of the training run that wrote `adapter_dir` ('' when it used the tokenizer's own)."""
    config = Path(adapter_dir).resolve().parent / "config.yaml"
    if not config.is_file():
        return ""
    import yaml

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return ""
    value = data.get("chat_template", "") if isinstance(data, dict) else ""
    return str(value or "")


def _tokenizer_for(base: str, chat_template: str) -> Any:
    from core.data.chat_templates import apply_template
    from core.models.llm import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source(base))
    apply_template(tokenizer, chat_template)
    return tokenizer


def adapter_base(adapter_dir: str | Path, base: str) -> str:
    """`base` when given, else the base model the adapter names."""
    import json

    from core.export.gguf_arch import GGUFExportError

    if base:
        return base
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    name = str(config.get("base_model_name_or_path") or "")
    if not name:
        raise GGUFExportError("The adapter does not name its base model.", "Pass the base model with --base.")
    return name


def adapter_to_gguf(adapter_dir: str | Path, output: str | Path, *, base: str = "", out_type: str = "f32",
                    chat_template: str | None = None, modelfile: bool = True) -> GGUFResult:
    """Write the adapter as GGUF at `output` and, with `modelfile`, an Ollama Modelfile beside it."""
    from core.export.gguf_adapter import write_gguf_adapter

    base_name = adapter_base(adapter_dir, base)
    result = write_gguf_adapter(adapter_dir, output, base=base_name, out_type=out_type)
    if not modelfile:
        return GGUFResult(result.path, None, result.summary(), None)
    template = trained_chat_template(adapter_dir) if chat_template is None else chat_template
    tokenizer = _tokenizer_for(base_name, template)
    base_path = Path(base_name).expanduser()
    base_ref: str | Path = base_path if base_path.exists() else base_name
    path, match = write_modelfile(result.path, tokenizer=tokenizer, base_gguf=base_ref)
    return GGUFResult(result.path, path, result.summary(), match)


def merged_to_gguf(base: str, adapter_dir: str | Path, output: str | Path, *, out_type: str = "f16",
                   route: str = "auto", weight: float = 1.0, chat_template: str | None = None,
                   modelfile: bool = True, allow_pickle: bool = False) -> GGUFResult:
    """Bake the adapter into `base` ('' for the one it names), write one GGUF model and, with `modelfile`, a Modelfile."""
    from core.export.gguf_model import export_merged_gguf

    base = adapter_base(adapter_dir, base)
    template = trained_chat_template(adapter_dir) if chat_template is None else chat_template
    result = export_merged_gguf(base, adapter_dir, output, out_type=out_type, route=route, weight=weight,
                                chat_template=template, allow_pickle=allow_pickle)
    if not modelfile:
        return GGUFResult(result.path, None, result.summary(), None)
    path, match = write_modelfile(result.path, tokenizer=result.tokenizer)
    return GGUFResult(result.path, path, result.summary(), match)
