"""Build the four-tab app and serve it: `python launch.py [--listen] [--port N] [--share] [--auth u:p]`.

Only Gradio and light modules are imported here; torch, diffusers and transformers load
the first time a tab needs them, so the page answers a few seconds after launch.
The server binds 127.0.0.1 unless `--listen` is given, never makes a share link unless
`--share` is given, sends no analytics, and serves files only from the project's folders
and the folders the user opened.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import sys
import threading
import webbrowser
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DEFAULT_PORT = 7860
TITLE = "lora-scripts"

CSS = """
.ls-progress {background:#e5e7eb;border-radius:6px;height:18px;overflow:hidden}
.ls-progress > div {background:#2563eb;height:100%;transition:width .5s}
.ls-status {font-size:0.95em}
.ls-error {color:#b91c1c}
.ls-warn {color:#b45309}
.ls-invalid {border-color:#b91c1c !important;box-shadow:inset 0 0 0 1px #b91c1c}
.ls-invalid .info-text {color:#b91c1c !important}
.ls-refresh {align-self:center; max-width:48px}
/* The Train tab's live view stays in sight while the form beside it scrolls. */
#train-live {position:sticky; top:8px; align-self:flex-start; max-height:calc(100vh - 16px); overflow-y:auto}
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch.py", description="Open the lora-scripts app in your browser.",
                                     epilog="python launch.py --test runs the test suite instead.")
    parser.add_argument("--listen", action="store_true",
                        help="Serve on all network interfaces (0.0.0.0) instead of only this computer.")
    parser.add_argument("--host", default=None, help="Exact address to bind (implies --listen when not 127.0.0.1).")
    parser.add_argument("--port", type=int, default=None,
                        help=f"Port (default {DEFAULT_PORT}; the next free one if it is taken).")
    parser.add_argument("--share", action="store_true",
                        help="Make a public gradio.live link (your data passes through Gradio's servers).")
    parser.add_argument("--auth", default=None,
                        help="Require a login, 'user:password' (or several separated by commas).")
    parser.add_argument("--no-browser", action="store_true", help="Do not open a browser window.")
    return parser.parse_args(argv)


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """'alice:pw,bob:pw2' -> [('alice','pw'), ('bob','pw2')]; a pair without ':' is refused."""
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"--auth expects user:password, got {item.strip()!r}.")
        pairs.append((user, password))
    return pairs


def serving_warnings(host: str, has_auth: bool, share: bool) -> list[str]:
    """What to tell the user before serving beyond this computer without a login."""
    warnings = []
    if host not in ("127.0.0.1", "localhost", "::1") and not has_auth:
        warnings.append(f"serving on {host} without --auth: anyone on your network can open the app, read your "
                        "data sets and start runs. Add --auth user:password.")
    if share and not has_auth:
        warnings.append("--share makes a public link without a login; add --auth user:password.")
    return warnings


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(host: str, preferred: int, tries: int = 50) -> int:
    """`preferred` if free, else the next free port above it, else one the OS picks."""
    for port in range(preferred, preferred + tries):
        if port_is_free(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is present (checked without importing torch)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def torch_cuda_version() -> str | None:
    """The CUDA version the installed torch was built for, read from torch/version.py without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_file = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        for line in version_file.read_text(encoding="utf-8").splitlines():
            if line.startswith("cuda"):
                value = line.split("=", 1)[1].strip().strip("'\"")
                return None if value in ("None", "") else value
    except OSError:
        return None
    return None


def cuda_notice(nvidia: bool | None = None, cuda: str | None | bool = False) -> str | None:
    """A message when this machine has an NVIDIA GPU but torch was installed without CUDA."""
    nvidia = has_nvidia_gpu() if nvidia is None else nvidia
    cuda = torch_cuda_version() if cuda is False else cuda
    if not nvidia or cuda:
        return None
    return ("[lora-scripts] This computer has an NVIDIA GPU, but the installed torch is the CPU-only build, "
            "so training would be very slow. Install the CUDA build into the app's environment:\n"
            "    .venv/bin/python -m pip install --force-reinstall torch --index-url "
            "https://download.pytorch.org/whl/cu128\n"
            "(on Windows: .venv\\Scripts\\python.exe -m pip ...), then start launch.py again.")


def library_notice() -> str | None:
    """The libraries outside the tested set and the command that restores it, or None."""
    from core.versions import library_problems, restore_advice, untested_message

    problems = library_problems()
    return f"{untested_message(problems)} {restore_advice()}" if problems else None


def build_app():
    """The Blocks with the four tabs of the work (Dataset, Caption, Train, Test) and the LoRA Tools."""
    import gradio as gr

    from ui import caption_tab, dataset_tab, lists, state, tools_tab, train_tab, tryout_tab

    state.ensure_folders()
    drift = library_notice()
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown("## lora-scripts — Dataset → Caption → Train → Test  \n"
                    "Everything runs on this computer; nothing is uploaded.")
        if drift:
            gr.Markdown(f"<span class='ls-warn'>⚠ {drift}</span>", elem_id="library-notice")
        with gr.Tabs():
            with gr.Tab("Dataset", id="dataset") as data_page:
                data = dataset_tab.create_dataset_tab()
            with gr.Tab("Caption", id="caption") as caption_page:
                caption = caption_tab.create_caption_tab(data)
            with gr.Tab("Train", id="train") as train_page:
                train = train_tab.create_train_tab(data)
            with gr.Tab("Test", id="test") as test_page:
                test = tryout_tab.create_tryout_tab(train)
            with gr.Tab("Tools", id="tools") as tools_page:
                tools = tools_tab.create_tools_tab()
        # Selecting a tab rescans its dropdowns: a model copied into models/ meanwhile shows up.
        for page, built in ((data_page, data), (caption_page, caption), (train_page, train), (test_page, test),
                            (tools_page, tools)):
            lists.wire(page, built.get("lists", []))
        # A reloaded page shows the running (or last) run's settings and state, not a blank form.
        restore, restore_outputs = train["page_load"]
        app.load(restore, None, restore_outputs, show_progress="hidden")
    state.register_app(app)
    return app


def patient_localhost_check(seconds: float = 60.0) -> None:
    """Gradio checks that the page it serves answers on localhost with one 3-second request, and on a timeout
    refuses to start ("When localhost is not accessible, a shareable link must be created"). A machine busy
    with a training run, a caption job or a slow disk answers later than that: ask again until `seconds`."""
    import time

    import httpx
    from gradio import networking

    def url_ok(url: str) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if httpx.head(url, timeout=5, verify=False).status_code in (200, 401, 301, 302, 303, 307, 308):
                    return True
            except (httpx.TimeoutException, httpx.TransportError):
                pass
            time.sleep(0.5)
        return False

    networking.url_ok = url_ok


def main(argv: list[str] | None = None) -> None:
    from core.cpu_memory import one_arena

    one_arena()  # before Gradio's threads: a run thread on the CPU reuses its freed memory (core.cpu_memory)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    auth = parse_auth(args.auth)
    for warning in serving_warnings(host, bool(auth), args.share):
        print(f"[lora-scripts] WARNING: {warning}", flush=True)
    for notice in (cuda_notice(), library_notice()):
        if notice:
            print(notice if notice.startswith("[") else f"[lora-scripts] WARNING: {notice}", flush=True)
    port = find_free_port(host, args.port or DEFAULT_PORT)
    if args.port and port != args.port:
        print(f"[lora-scripts] Port {args.port} is taken; using {port}.", flush=True)

    from ui import state

    os.chdir(state.WORK)  # relative paths in configs (./output/x) mean the same as in the form
    app = build_app()
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    app.queue(default_concurrency_limit=4)
    patient_localhost_check()
    app.launch(server_name=host, server_port=port, share=args.share, auth=auth, inbrowser=False,
               prevent_thread_lock=True, allowed_paths=state.allowed_folders(), quiet=True,
               show_error=True, css=CSS)
    print(f"[lora-scripts] The app is open at {url}  (Ctrl+C to quit)", flush=True)
    if not args.no_browser:
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        state.QUEUE.close()  # queued runs do not start while the app quits
        if state.JOB.running:
            print("[lora-scripts] Stopping the running job and saving a checkpoint ...", flush=True)
            state.JOB.stop()
            state.JOB.wait(120)
        app.close()


if __name__ == "__main__":
    main()
