"""The examples run as shipped: a fresh clone holds their data, and their configs train with no other step.

The real runs use the default SmolLM2 GGUF (README, "The shipped text examples"); here a tiny Llama
stands in for it, so the test takes seconds: only the base model and the length of the run change.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from core.config import load_config
from core.data.preference import load_preference_examples
from core.data.text import load_examples

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {"configs/text_example.yaml": 150, "configs/text_preference_example.yaml": 50}


def test_the_example_data_is_part_of_a_fresh_clone_not_ignored_like_the_rest_of_data():
    shipped = ["data/clinic_qa.csv", "data/clinic_qa_heldout.csv", "data/clinic_preferences.csv"]
    ignored = subprocess.run(["git", "check-ignore", *shipped], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout == ""  # none of them is ignored ...
    assert subprocess.run(["git", "check-ignore", "-q", "data/my_own_set/a.csv"], cwd=ROOT).returncode == 0  # ... yours are


@pytest.mark.parametrize("config", list(EXAMPLES))
def test_each_example_config_finds_its_data_where_it_says(config):
    cfg = load_config(ROOT / config)  # checks the paths, as train.py does
    data = ROOT / cfg.train_data_dir
    count = len(load_preference_examples(data) if cfg.text_method in ("dpo", "orpo") else load_examples(data))
    assert count == EXAMPLES[config]


@pytest.mark.slow  # two short runs in this process: loading and saving take ~30 s on a busy CPU
@pytest.mark.parametrize("config", list(EXAMPLES))
def test_train_py_runs_each_example_config_unchanged_but_for_the_model(config, tiny_llm_dir, tmp_path):
    from train import main

    out = tmp_path / "run"
    code = main(["--config", str(ROOT / config), "--base_model", str(tiny_llm_dir), "--output_dir", str(out),
                 "--max_train_steps", "2", "--sample_prompts", "[]"])
    assert code == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == load_config(ROOT / config).lora_rank
