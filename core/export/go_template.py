"""Render the subset of Go's text/template that our Ollama Modelfiles use, as Ollama would.

Ollama renders a Modelfile's TEMPLATE with Go's text/template over `.Messages` (each with
`.Role` and `.Content`). To check that an exported TEMPLATE gives the model exactly the text
it was trained on, we render it here and compare with the tokenizer's own chat template.
Supported: literal text, `{{ .Role }}`, `{{ .Content }}`, `{{ .System }}`,
`{{ range .Messages }}`, `{{ if .X }}`, `{{ if eq .Role "name" }}`, `{{ else if ... }}`,
`{{ else }}`, `{{ end }}` and the `{{-` / `-}}` whitespace trims. Anything else raises, so
a template we emit can never be "checked" by a renderer that silently skips part of it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_EQ = re.compile(r'^eq\s+\.(\w+)\s+"((?:[^"\\]|\\.)*)"$')
_FIELD = re.compile(r"^\.(\w+)$")


class TemplateError(ValueError):
    """The template uses Go template features outside the supported subset."""


@dataclass
class _Node:
    kind: str                       # text, field, range, if
    value: str = ""                 # text / field name / range field
    branches: list[tuple[str, list[_Node]]] = field(default_factory=list)  # (condition, body) for if
    body: list[_Node] = field(default_factory=list)                        # range body


def _tokens(template: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) pieces, with Go's trim markers already applied to the text."""
    pieces: list[tuple[str, str]] = []
    position = 0
    trim_next = False
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            pieces.append(("text", text))
        pieces.append(("action", match.group(2)))
        trim_next = bool(match.group(3))
        position = match.end()
    tail = template[position:]
    if trim_next:
        tail = tail.lstrip(" \t\r\n")
    if "{{" in tail:
        raise TemplateError(f"Unclosed action in {tail[:40]!r}")
    if tail:
        pieces.append(("text", tail))
    return pieces


def _parse(pieces: list[tuple[str, str]], index: int, stops: tuple[str, ...]) -> tuple[list[_Node], int, str]:
    nodes: list[_Node] = []
    while index < len(pieces):
        kind, value = pieces[index]
        index += 1
        if kind == "text":
            nodes.append(_Node("text", value))
            continue
        if value == "end" or value == "else" or value.startswith("else if "):
            if value.split(" ")[0] in stops or value in stops:
                return nodes, index, value
            raise TemplateError(f"Unexpected {{{{ {value} }}}}")
        if value.startswith("range "):
            target = _FIELD.match(value[6:].strip())
            if not target:
                raise TemplateError(f"Unsupported range: {value}")
            body, index, _ = _parse(pieces, index, ("end",))
            nodes.append(_Node("range", target.group(1), body=body))
        elif value.startswith("if "):
            node = _Node("if")
            condition = value[3:].strip()
            while True:
                body, index, stop = _parse(pieces, index, ("end", "else"))
                node.branches.append((condition, body))
                if stop == "end":
                    break
                condition = stop[8:].strip() if stop.startswith("else if ") else "true"
            nodes.append(node)
        elif _FIELD.match(value):
            nodes.append(_Node("field", value[1:]))
        else:
            raise TemplateError(f"Unsupported action: {{{{ {value} }}}}")
    if stops:
        raise TemplateError("Missing {{ end }}")
    return nodes, index, ""


def _truthy(condition: str, data: dict[str, Any]) -> bool:
    if condition == "true":
        return True
    equals = _EQ.match(condition)
    if equals:
        return str(data.get(equals.group(1), "")) == equals.group(2).encode().decode("unicode_escape")
    single = _FIELD.match(condition)
    if single:
        return bool(data.get(single.group(1)))
    raise TemplateError(f"Unsupported condition: {condition}")


def _execute(nodes: list[_Node], data: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.value)
        elif node.kind == "field":
            if node.value not in data:
                raise TemplateError(f"No field .{node.value} here")
            out.append(str(data[node.value]))
        elif node.kind == "range":
            for item in data.get(node.value) or []:
                _execute(node.body, {key.capitalize(): value for key, value in item.items()}, out)
        else:
            for condition, body in node.branches:
                if _truthy(condition, data):
                    _execute(body, data, out)
                    break


def render(template: str, messages: list[dict[str, str]], system: str = "") -> str:
    """The prompt Ollama builds from `template` for a chat.

    Like Ollama, a Modelfile SYSTEM (`system`) becomes the first message when the chat
    brings no system message of its own.
    """
    if system and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    nodes, _, _ = _parse(_tokens(template), 0, ())
    out: list[str] = []
    _execute(nodes, {"Messages": messages, "System": system}, out)
    return "".join(out)
