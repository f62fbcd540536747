"""Runs train.py (or a caption write) with a fault injected, for the kill tests.

    python tests/reliability/fault_runner.py train --config x.yaml     (env: FAULT=kill_at_step:6)
    python tests/reliability/fault_runner.py captions <csv> <json rows> (env: FAULT=kill_before_rename)

The fault is applied by patching one function in this process, so the product code has
no test hooks. SIGKILL is what `kill -9` sends: no cleanup, no `finally`.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(spec: str) -> None:
    name, _, arg = spec.partition(":")
    if name == "kill_at_step":
        from core.train import runtime

        original = runtime.check_finite

        def check(loss, step, cfg):
            if step >= int(arg):
                _die()
            return original(loss, step, cfg)

        runtime.check_finite = check
    elif name == "kill_in_save":
        # Killed while the Nth torch.save of the run is half-way: a checkpoint folder is
        # being written (weights already in it, training state not).
        import torch

        original_save = torch.save
        calls = {"n": 0}

        def save(obj, f, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= int(arg):
                Path(f).write_bytes(b"half a file")
                _die()
            return original_save(obj, f, *args, **kwargs)

        torch.save = save
    elif name == "kill_before_rename":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith("metadata.csv"):
                _die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif name:
        raise SystemExit(f"unknown fault {spec!r}")


def main() -> int:
    install_fault(os.environ.get("FAULT", ""))
    mode, *args = sys.argv[1:]
    if mode == "train":
        import train

        return train.main(args)
    if mode == "captions":
        from core.data.captions import write_metadata_csv

        write_metadata_csv(args[0], json.loads(args[1]))
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
