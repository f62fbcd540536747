"""Small helpers to drive Gradio widgets with Playwright by their elem_id."""
from __future__ import annotations

import time


def field(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("textarea, input:not([type=file]):not([type=checkbox])").first


def fill(page, elem_id: str, value: str) -> None:
    """Type into a textbox, number or (custom-value) dropdown and commit it like a user (blur)."""
    box = field(page, elem_id)
    box.scroll_into_view_if_needed()
    box.click()
    box.fill(str(value))
    box.press("Enter" if box.evaluate("e => e.tagName") == "INPUT" else "Tab")
    page.locator("body").click(position={"x": 2, "y": 2})


def choose(page, elem_id: str, option: str, timeout_s: float = 90) -> None:
    """Pick an option of a dropdown by its visible text. A dropdown whose choices another field's event is
    still updating (the base models after the task changed) opened with the old ones: close it and open it
    again until the option is there, as a user would."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = field(page, elem_id)
    deadline = time.monotonic() + timeout_s
    while True:
        box.scroll_into_view_if_needed()
        box.click()
        try:
            page.get_by_role("option", name=option).first.click(timeout=5000)
            return
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise
            page.keyboard.press("Escape")
            page.locator("body").click(position={"x": 2, "y": 2})


def open_accordion(page, title: str) -> None:
    button = page.get_by_role("button", name=title).first
    button.scroll_into_view_if_needed()
    if button.get_attribute("aria-expanded") != "true":
        button.click()


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    time.sleep(0.5)


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0, describe=None):
    """Poll `predicate()` until it returns something truthy; fail saying `what` did not happen
    (and `describe()`: what the page showed instead)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    seen = f"; the page showed {describe()}" if describe else ""
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s (last: {last!r}){seen}")


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def in_viewport(page, elem_id: str) -> bool:
    """The element is shown and lies wholly inside the window as it is now, without scrolling."""
    element = page.locator(f"#{elem_id}")
    if not element.is_visible():
        return False
    box = element.bounding_box()
    height = page.viewport_size["height"]
    return box is not None and box["height"] > 0 and box["y"] >= 0 and box["y"] + box["height"] <= height


def has_option(page, elem_id: str, option: str) -> bool:
    """Open the dropdown and tell whether `option` is among its choices (closed again afterwards)."""
    box = field(page, elem_id)
    box.scroll_into_view_if_needed()
    box.click()
    try:
        page.get_by_role("option", name=option).first.wait_for(timeout=5_000)
        return True
    except Exception:  # noqa: BLE001 - playwright's TimeoutError: the option is not there
        return False
    finally:
        box.press("Escape")
        page.locator("body").click(position={"x": 2, "y": 2})
