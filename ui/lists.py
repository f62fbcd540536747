"""Live lists: every dropdown of models, LoRAs, data sets and runs rescans the disk when its tab
is selected and when its ↻ button is pressed (WebUI's 🔄 habit), so a model copied into models/
while the app runs shows up without a restart.

A tab says which of its dropdowns are live with `LiveList`s; `rescan` is the one handler that
gives each of them its new choices (the value typed or chosen stays); `wire` hooks a button or a
tab's select event to it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from ui.wiring import bind

Lister = Callable[..., list[str]]


@dataclass(frozen=True)
class LiveList:
    """A dropdown, the function that lists its choices from the disk, and the widgets whose values
    that function takes (the Train tab's base models depend on the task type)."""

    dropdown: Any
    choices: Lister
    inputs: tuple[Any, ...] = ()


def rescan(listers: Sequence[tuple[Lister, int]], *values: Any) -> list[Any]:
    """One `gr.update(choices=...)` per (lister, number of its inputs), read from the disk now;
    `values` are all the listers' inputs, in order."""
    updates, at = [], 0
    for lister, count in listers:
        updates.append(gr.update(choices=lister(*values[at:at + count])))
        at += count
    return updates


def rescan_one(lister: tuple[Lister, int], *values: Any) -> Any:
    """The update of a single list: Gradio takes a one-output handler's whole return value as that
    output's value, so a one-item list would become the dropdown's value."""
    return rescan([lister], *values)[0]


def refresh_button(elem_id: str) -> gr.Button:
    """The small ↻ beside a dropdown; must be made inside the dropdown's Row."""
    return gr.Button("↻", size="sm", scale=0, min_width=44, elem_id=elem_id, elem_classes=["ls-refresh"])


def wire(trigger: Any, lists: Sequence[LiveList]) -> None:
    """`trigger` (a button's click, a tab's select) rescans `lists`."""
    if not lists:
        return
    listers = [(item.choices, len(item.inputs)) for item in lists]
    handler = bind(rescan_one, listers[0]) if len(listers) == 1 else bind(rescan, listers)
    inputs = [widget for item in lists for widget in item.inputs]
    event = trigger.click if isinstance(trigger, gr.Button) else trigger.select
    event(handler, inputs or None, [item.dropdown for item in lists], show_progress="hidden")
