"""Named chat templates for models whose tokenizer has none (or when the config names one).

Each is a Jinja template in the format `tokenizer.apply_chat_template` reads. `{{ eos }}`
is filled with the tokenizer's end-of-sequence token so generation learns where to stop.
"""
from __future__ import annotations

from typing import Any

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

_ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

_PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {"chatml": _CHATML, "llama2": _LLAMA2, "alpaca": _ALPACA, "plain": _PLAIN}
FALLBACK = "chatml"


def apply_template(tokenizer: Any, name: str, log: Any = None) -> str:
    """Set the tokenizer's chat template: `name` if given, else its own, else ChatML.

    Returns a short description of the template in use (for the run log).
    """
    name = (name or "").strip()
    if name:
        key = name.lower()
        if key in TEMPLATES:
            tokenizer.chat_template = TEMPLATES[key]
            return key
        if "{%" in name or "{{" in name:  # a Jinja template written into the config
            tokenizer.chat_template = name
            return "custom (from the config)"
        raise ValueError(f"chat_template: {name!r} is not known; use one of {', '.join(TEMPLATES)}, "
                         "a Jinja template, or leave it empty for the tokenizer's own.")
    if getattr(tokenizer, "chat_template", None):
        return "the tokenizer's own"
    tokenizer.chat_template = TEMPLATES[FALLBACK]
    if log is not None:
        log(f"The tokenizer has no chat template; using {FALLBACK}. Set chat_template to choose another.")
    return FALLBACK
