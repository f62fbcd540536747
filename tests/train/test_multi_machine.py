"""Two machines x one process, here both on localhost over gloo, started as `accelerate launch
--multi_gpu --num_machines 2 --machine_rank R --main_process_ip ...` starts them (torchrun with
--nnodes 2 --node_rank R --master_addr: accelerate's CPU launcher needs mpirun for several
machines): one run, its files written by the main machine only, and the same LoRA as one process
with twice the accumulation."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from core.events import RunContext
from core.presets import resolve_config
from core.train import run_training
from tests.fixtures.tiny_llm import KESTREL_QA, write_qa_jsonl
from tests.helpers import read_loss_csv
from tests.text.test_text_multi_process import text_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # two train.py processes and one run in this process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_of_one_process_train_like_one_process_with_twice_the_accumulation(tiny_llm_dir, tmp_path):
    train = write_qa_jsonl(tmp_path / "train.jsonl", KESTREL_QA[:4])
    validation = write_qa_jsonl(tmp_path / "val.jsonl", KESTREL_QA[4:])
    raw = text_config(tiny_llm_dir, train, validation, tmp_path / "two", max_train_steps=2, save_steps=0,
                      sample_prompts=[])
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    port = str(_free_port())
    machines = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                  str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                                  port, str(ROOT / "train.py"), "--config", str(config), "--quiet"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
                for rank in (0, 1)]
    said = [m.communicate(timeout=600)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], said[0][-3000:] + said[1][-3000:]
    assert "x 2 processes" in said[0] and "Done: 2 steps" in said[0]
    assert "Done" not in said[1]  # the second machine prints and writes nothing of its own

    one = tmp_path / "one"
    run_training(resolve_config(dict(raw, output_dir=str(one), gradient_accumulation_steps=4)), RunContext())
    for a, b in zip(read_loss_csv(one), read_loss_csv(tmp_path / "two"), strict=True):
        assert a.step == b.step and a.loss == pytest.approx(b.loss, rel=1e-4), f"step {a.step}"
    left = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    right = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-4, atol=1e-6, msg=key)
