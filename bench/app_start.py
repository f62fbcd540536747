"""How long until the app answers: a bare Gradio 6 app with four empty tabs vs ours.

Both are started as fresh processes in turn (same machine, same moment), and timed from
the spawn to the first HTTP 200 on "/". Prints each run, the medians, our lead/lag in
seconds and the ratio, and whether building our UI imported torch/diffusers/transformers
(it must not: they load lazily). Target (DESIGN.md): ours within 2 s of the bare app.

    .venv/bin/python bench/app_start.py [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BARE = """
import sys, gradio as gr
with gr.Blocks() as demo:
    with gr.Tabs():
        for name in ("Dataset", "Caption", "Train", "Test"):
            with gr.Tab(name):
                pass
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), prevent_thread_lock=True, quiet=True)
demo.block_thread()
"""

OURS = """
import sys
sys.path.insert(0, {root!r})
from ui.app import main
main(["--no-browser", "--port", sys.argv[1]])
"""

IMPORT_CHECK = """
import sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
import gradio as gr
t1 = time.perf_counter()
with gr.Blocks() as bare:
    with gr.Tabs():
        for name in ("Dataset", "Caption", "Train", "Test"):
            with gr.Tab(name):
                pass
t2 = time.perf_counter()
from ui.app import build_app
t3 = time.perf_counter()
build_app()
t4 = time.perf_counter()
heavy = [m for m in ("torch", "diffusers", "transformers", "peft", "accelerate") if m in sys.modules]
print(f"in one process: import gradio {{t1 - t0:.2f}} s; bare 4-tab Blocks {{t2 - t1:.2f}} s; "
      f"import ui {{t3 - t2:.2f}} s; build our five tabs {{t4 - t3:.2f}} s")
print(",".join(heavy) or "none")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_to_answer(code: str, timeout: float = 120.0) -> float:
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.05)
            if proc.poll() is not None:
                raise RuntimeError("the app exited before answering")
        raise TimeoutError("no answer")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    bare, ours = [], []
    time_to_answer(BARE)  # warm the OS file cache once so neither side pays for cold disk reads
    for run in range(args.runs):
        bare.append(time_to_answer(BARE))
        ours.append(time_to_answer(OURS.format(root=str(ROOT))))
        print(f"run {run + 1}: bare Gradio {bare[-1]:.2f} s, lora-scripts {ours[-1]:.2f} s", flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"median: bare Gradio 4 empty tabs {b:.2f} s, lora-scripts {o:.2f} s")
    print(f"difference {o - b:+.2f} s (target: within +2.00 s), ratio ours/bare {o / b:.2f}x")
    heavy = subprocess.run([sys.executable, "-c", IMPORT_CHECK.format(root=str(ROOT))], cwd=ROOT,
                           capture_output=True, text=True, env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
    lines = heavy.stdout.strip().splitlines()
    if len(lines) >= 2:
        print(lines[-2])
        print(f"heavy libraries imported while building the UI: {lines[-1]}")
    else:
        print(f"the import check failed: {heavy.stderr[-300:]}")


if __name__ == "__main__":
    main()
