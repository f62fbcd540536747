"""Bind a module-level handler to the state its tab built, for Gradio's event wiring.

The tabs keep their handlers as plain module functions (tested without a browser) and
give them what they need from the layout, such as the form's field specs, with `bind`.
"""
from __future__ import annotations

from functools import partial
from typing import Any
from collections.abc import Callable


def bind(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> partial:
    """`partial(fn, *args, **kwargs)` that keeps `fn`'s name.

    Gradio names an event's API endpoint after its function; a bare partial has no name.
    `functools.update_wrapper` is not used on purpose: its `__wrapped__` would make
    Gradio read `fn`'s full signature and count the bound arguments as inputs.
    """
    handler = partial(fn, *args, **kwargs)
    handler.__name__ = fn.__name__  # type: ignore[attr-defined]
    return handler
