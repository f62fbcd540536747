"""Browser-test fixtures: the real app in its own process over a temporary work folder, and
Debian's Chromium driven by Playwright (its own browser download is not available offline).

The browser tests skip, saying why, only when Chromium or Playwright is absent.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("LORA_SCRIPTS_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = ROOT / "docs" / "screenshots"


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        return f"Chromium is not installed ({CHROMIUM}); `apt-get install chromium` (done by .ci/run) enables these tests."
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed; `pip install -r requirements-dev.txt` enables these tests."
    return None


@dataclass
class RunningApp:
    url: str
    work: Path
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(work: Path, extra_env: dict[str, str] | None = None) -> RunningApp:
    """`ui.app.main` in a fresh process, the same entry launch.py calls, serving `work`'s folders."""
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = work / "app.log"
    env = dict(os.environ, LORA_SCRIPTS_WORKDIR=str(work), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **(extra_env or {}))
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from ui.app import main; main(sys.argv[1:])"
    with open(log, "w", encoding="utf-8") as sink:
        process = subprocess.Popen([sys.executable, "-c", code, "--no-browser", "--port", str(port)], cwd=work,
                                   env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the app exited:\n" + log.read_text(encoding="utf-8", errors="replace"))
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return RunningApp(url, work, process, log)
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the app did not answer within 120 s:\n" + log.read_text(encoding="utf-8", errors="replace"))


def stop_app(app: RunningApp) -> None:
    app.process.terminate()
    try:
        app.process.wait(30)
    except subprocess.TimeoutExpired:
        app.process.kill()


@pytest.fixture(scope="module")
def browser():
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                      args=["--no-sandbox", "--headless", "--disable-gpu"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot: into docs/screenshots/ for the README when
    LORA_SCREENSHOTS=1 is set, else into a temporary folder (a test run leaves the tree as it was)."""
    folder = SCREENSHOTS if os.environ.get("LORA_SCREENSHOTS") == "1" else Path(tempfile.gettempdir()) / "lora-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.png"
    page.screenshot(path=str(target), full_page=True)
    return target
