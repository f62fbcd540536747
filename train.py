"""Train a LoRA from a YAML config, without the GUI: the same engine the app's Train tab runs.

    python train.py --config configs/image_example.yaml [--learning_rate 1e-4 --epochs 5 ...]
    accelerate launch --multi_gpu --num_processes 2 train.py --config configs/x.yaml

Any config key can be overridden as `--key value` (lists: comma-separated or repeated).
Ctrl+C stops cleanly: the current step finishes, a checkpoint and the LoRA are saved.
Exit codes: 0 done or stopped, 1 the run failed, 2 the config is wrong.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHOWN_KEYS = ("task_type", "base_model", "train_data_dir", "output_dir", "preset", "resolution", "batch_size",
              "gradient_accumulation_steps", "epochs", "max_train_steps", "learning_rate", "lr_scheduler",
              "optimizer", "lora_rank", "lora_alpha", "lora_variant", "mixed_precision", "gradient_checkpointing",
              "train_text_encoder", "save_steps", "sample_steps", "resume_from", "seed")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """--config plus free `--key value` overrides (validated later by the config itself)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/).")
    parser.add_argument("--quiet", action="store_true", help="No progress bar, only stage lines.")
    parser.add_argument("--events_file", default="", help="Append every event as a JSON line here (the app "
                        "follows a multi-process run it launched through this file).")
    parser.add_argument("--stop_file", default="", help="Stop cleanly (as Ctrl+C) once this file exists.")
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    key = None
    for token in rest:
        if token.startswith("--"):
            if key is not None:
                overrides[key] = "true"  # a bare flag
            key, _, value = token[2:].partition("=")
            key = key.replace("-", "_")
            if value:
                overrides[key] = value
                key = None
        elif key is not None:
            if key in overrides:  # repeated value: a list
                previous = overrides[key]
                overrides[key] = (previous if isinstance(previous, list) else [previous]) + [token]
            else:
                overrides[key] = token
                key = None
        else:
            parser.error(f"unexpected argument {token!r}; overrides are written --key value.")
    if key is not None:
        overrides[key] = "true"
    for name, value in overrides.items():
        if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
            import yaml

            overrides[name] = yaml.safe_load(value)
    return args, overrides


class ConsoleListener:
    """Prints events: stage lines, warnings in plain words, and a tqdm bar with loss and ETA."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def __call__(self, event: Any) -> None:
        kind = event.kind
        if kind == "progress":
            self._progress(event)
        elif kind == "log":
            self.write(f"  {event.message}")
        elif kind == "warning":
            self.write(f"WARNING: {event.message}" + (f"\n         {event.advice}" if event.advice else ""))
        elif kind == "error":
            self.write(f"ERROR: {event.message}" + (f"\n       {event.advice}" if event.advice else ""))
        elif kind == "checkpoint":
            self.write(f"  checkpoint at step {event.step}: {event.path}")
        elif kind == "sample":
            self.write(f"  previews at step {event.step}: " + ", ".join(event.images or [t.get('lora', '') for t in event.texts]))
        elif kind == "done":
            self.close()
            print(event.message or "Done.", flush=True)
            for name, path in event.outputs.items():
                print(f"  {name}: {path}")

    def _progress(self, event: Any) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=event.total, initial=max(0, event.step - 1), unit="step", dynamic_ncols=True)
        self.bar.total = event.total
        self.bar.n = event.step
        post = {}
        if event.loss is not None:
            post["loss"] = f"{event.loss:.4f}"
        if event.smoothed_loss is not None:
            post["avg"] = f"{event.smoothed_loss:.4f}"
        if event.lr is not None:
            post["lr"] = f"{event.lr:.2e}"
        if event.vram_gb:
            post["vram"] = f"{event.vram_gb:.1f}G"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EventFileListener:
    """Appends each event as one JSON line (flushed at once: the app reads the file while the run goes on)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    def __call__(self, event: Any) -> None:
        import json

        self.handle.write(json.dumps(event.to_dict(), default=str) + "\n")
        self.handle.flush()


def watch_stop_file(path: Path, flag: threading.Event, every: float = 0.5) -> None:
    """Set `flag` once `path` exists (the main process's stop reaches the others through the loop)."""
    def watch() -> None:
        while not flag.is_set():
            if path.exists():
                flag.set()
                return
            flag.wait(every)

    threading.Thread(target=watch, name="stop-file", daemon=True).start()


def print_settings(cfg: Any) -> None:
    print("Settings:")
    for key in SHOWN_KEYS:
        value = getattr(cfg, key)
        if value in ("", 0, [], None) and key not in ("seed",):
            continue
        print(f"  {key}: {value}")
    print(f"  -> the full config is saved as {Path(cfg.output_dir) / 'config.yaml'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from core.cpu_memory import one_arena

    one_arena()  # before the stop-file thread: every thread shares the heap a CPU run keeps (core.cpu_memory)
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from core.config import ConfigError, read_yaml
    from core.presets import resolve_config

    try:
        cfg = resolve_config({**read_yaml(args.config), **overrides})
    except ConfigError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        print("Fix these keys in the config (or the --key overrides) and run again.", file=sys.stderr)
        return 2
    rank0 = os.environ.get("RANK", "0") in ("", "0") and os.environ.get("LOCAL_RANK", "0") in ("", "0")
    if rank0:
        print_settings(cfg)
    from core.events import RunContext

    listener = ConsoleListener(quiet=args.quiet)
    ctx = RunContext(listeners=[listener] if rank0 else [])
    if rank0 and args.events_file:
        ctx.listeners.append(EventFileListener(Path(args.events_file)))
    if rank0 and args.stop_file:
        watch_stop_file(Path(args.stop_file), ctx.stop_flag)
    presses = {"count": 0}

    def on_interrupt(signum: int, frame: Any) -> None:
        presses["count"] += 1
        if presses["count"] > 1:
            raise KeyboardInterrupt
        listener.write("Stopping after this step and saving a checkpoint (Ctrl+C again to abort at once)...")
        ctx.stop_flag.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_interrupt)
    from core.job import friendly_error
    from core.train import run_training

    try:
        run_training(cfg, ctx)
    except KeyboardInterrupt:
        listener.close()
        print("Aborted; the last saved checkpoint is kept (resume_from: latest).", file=sys.stderr)
        return 1
    except Exception as exc:
        listener.close()
        event = friendly_error(exc)
        print(f"ERROR: {event.message}", file=sys.stderr)
        if event.advice:
            print(f"What to change: {event.advice}", file=sys.stderr)
        if os.environ.get("LORA_DEBUG"):
            raise
        return 1
    finally:
        listener.close()
    return 0


def exit_now(code: int) -> None:
    """End the process once its output is flushed, skipping the interpreter's teardown of torch, diffusers and
    transformers' modules (1.6-2 s after every run, measured; every file of the run is written and closed by
    then). A distributed run exits normally, so its process group is torn down as usual."""
    import logging

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
