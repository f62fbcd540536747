"""An Ollama Modelfile for an exported GGUF: FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER stop.

Answers that are worse in Ollama than in training are usually a chat-format mismatch, so
the TEMPLATE is not guessed from names: the tokenizer's own chat template (the one the
LoRA was trained with) is rendered for probe chats, the matching chat format's Go template
is rendered for the same chats (core/export/go_template.py, Ollama's semantics), and the
TEMPLATE is written only when the two agree character for character. A template's default
system prompt (SmolLM2 adds one when a chat has none) becomes the Modelfile's SYSTEM, which
Ollama inserts in the same place. When no known format reproduces the tokenizer's output,
the Modelfile leaves TEMPLATE out (Ollama then derives one from the GGUF's own
tokenizer.chat_template) and says so in a comment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_text
from core.export import go_template

MODELFILE_SUFFIX = ".Modelfile"
_PROBE_SYSTEM = "You answer questions about the Kestrel K7 drone."
_PROBES = [
    [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "How long does it fly?"},
     {"role": "assistant", "content": "47 minutes."}, {"role": "user", "content": "And the top speed?"}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What is the warranty?"}],
    [{"role": "user", "content": "Hi"}],
]


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as per-role text around each message's content, plus the generation prompt."""

    name: str
    template: str          # Go template for Ollama
    stops: tuple[str, ...]


def _role_template(parts: dict[str, tuple[str, str]], generation: str) -> str:
    system, user, assistant = parts["system"], parts["user"], parts["assistant"]
    return ("{{ range .Messages }}"
            f'{{{{ if eq .Role "system" }}}}{system[0]}{{{{ .Content }}}}{system[1]}'
            f'{{{{ else if eq .Role "user" }}}}{user[0]}{{{{ .Content }}}}{user[1]}'
            f"{{{{ else }}}}{assistant[0]}{{{{ .Content }}}}{assistant[1]}{{{{ end }}}}"
            "{{ end }}" + generation)


def candidate_formats(eos: str) -> list[ChatFormat]:
    """The chat formats we can write as Ollama templates (`eos`: the tokenizer's end token)."""
    chatml = ("{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
              "<|im_start|>assistant\n")
    # The project's own named templates (core/data/chat_templates.py) end answers with eos.
    alpaca = _role_template({"system": ("", "\n\n"), "user": ("### Instruction:\n", "\n\n"),
                             "assistant": ("### Response:\n", f"{eos}\n\n")}, "### Response:\n")
    plain = _role_template({"system": ("", "\n"), "user": ("User: ", "\n"),
                            "assistant": ("Assistant: ", f"{eos}\n")}, "Assistant:")
    return [ChatFormat("chatml", chatml, tuple(dict.fromkeys(("<|im_end|>", eos)))),
            ChatFormat("alpaca", alpaca, (eos, "### Instruction:")),
            ChatFormat("plain", plain, (eos, "User:"))]


@dataclass
class TemplateMatch:
    """The Go template that reproduces the tokenizer's chat format, or why there is none."""

    format: ChatFormat | None
    system: str = ""                              # the template's default system prompt
    problems: list[str] = field(default_factory=list)


def _hf_render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _default_system(fmt: ChatFormat, tokenizer: Any) -> str | None:
    """The system prompt the tokenizer's template adds to chats without one ('' if none, None if no fit)."""
    chat = _PROBES[2]
    expected = _hf_render(tokenizer, chat)
    if go_template.render(fmt.template, chat) == expected:
        return ""
    marker = "\x00SYSTEM\x00"
    with_marker = go_template.render(fmt.template, chat, system=marker)
    before, _, after = with_marker.partition(marker)
    if expected.startswith(before) and expected.endswith(after) and len(expected) >= len(before) + len(after):
        return expected[len(before):len(expected) - len(after)]
    return None


def match_chat_format(tokenizer: Any) -> TemplateMatch:
    """Find the format whose Go template renders every probe chat exactly as `tokenizer` does."""
    if not getattr(tokenizer, "chat_template", None):
        return TemplateMatch(None, problems=["the tokenizer has no chat template"])
    problems = []
    for fmt in candidate_formats(str(tokenizer.eos_token or "")):
        system = _default_system(fmt, tokenizer)
        if system is None:
            problems.append(f"{fmt.name}: the first turn differs")
            continue
        mismatched = [i for i, chat in enumerate(_PROBES)
                      if go_template.render(fmt.template, chat, system=system) != _hf_render(tokenizer, chat)]
        if not mismatched:
            return TemplateMatch(fmt, system=system)
        problems.append(f"{fmt.name}: probe chats {mismatched} differ")
    return TemplateMatch(None, problems=problems)


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError('A Modelfile value cannot contain """.')
    return f'"""{text}"""'


def modelfile_path(gguf_path: str | Path) -> Path:
    """`<name>.Modelfile` beside `<name>.gguf`: an adapter and a merged model of one run can share a folder."""
    path = Path(gguf_path)
    stem = path.name[:-5] if path.name.lower().endswith(".gguf") else path.name
    return path.parent / f"{stem}{MODELFILE_SUFFIX}"


def modelfile_text(model: str, *, adapter: str = "", match: TemplateMatch | None = None,
                   extra_stops: tuple[str, ...] = (), filename: str = "Modelfile") -> str:
    """The Modelfile for `model` (a GGUF path, relative to the Modelfile when beside it)."""
    lines = [f"# Made by lora-scripts. Create the Ollama model with: ollama create NAME -f {filename}",
             f"FROM {model}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    stops: tuple[str, ...] = extra_stops
    if match is not None and match.format is not None:
        lines.append(f"# Chat format: {match.format.name}, checked against the tokenizer's chat template")
        lines.append(f"TEMPLATE {_quote(match.format.template)}")
        if match.system:
            lines.append(f"SYSTEM {_quote(match.system)}")
        stops = tuple(dict.fromkeys((*match.format.stops, *extra_stops)))
    else:
        why = "; ".join(match.problems) if match is not None else "no tokenizer given"
        lines.append(f"# No TEMPLATE: the chat format was not recognised ({why}). Ollama uses the GGUF's own")
        lines.append("# tokenizer.chat_template; check the prompt with `ollama show NAME --template`.")
    lines.extend(f'PARAMETER stop "{stop}"' for stop in stops if stop)
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, *, tokenizer: Any = None, base_gguf: str | Path | None = None) -> tuple[
        Path, TemplateMatch | None]:
    """Write `<name>.Modelfile` beside `gguf_path`; with `base_gguf`, `gguf_path` is an adapter on that base.

    Paths inside are relative when the files sit in the same folder, so the folder can move.
    """
    target = Path(gguf_path)
    folder = target.parent.resolve()

    def where(path: str | Path) -> str:
        resolved = Path(path).resolve()
        return f"./{resolved.name}" if resolved.parent == folder else str(resolved)

    match = match_chat_format(tokenizer) if tokenizer is not None else None
    eos = str(getattr(tokenizer, "eos_token", "") or "") if tokenizer is not None else ""
    destination = folder / modelfile_path(target).name
    stops = (eos,) if eos else ()
    if base_gguf is not None:
        text = modelfile_text(where(base_gguf), adapter=where(target), match=match, extra_stops=stops,
                              filename=destination.name)
    else:
        text = modelfile_text(where(target), match=match, extra_stops=stops, filename=destination.name)
    path = atomic_write_text(destination, text)
    return path, match


def ollama_create_command(modelfile: str | Path, name: str = "") -> str:
    path = Path(modelfile)
    model_name = name or path.parent.name.lower().replace(" ", "-") or "my-lora"
    return f"ollama create {model_name} -f {path}"
