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
EXAMPLES = {"configs/text_example.yaml": 150, "configs/text_preference_example.yaml": 50,
            "configs/text_kto_example.yaml": 60, "configs/text_grpo_example.yaml": 40, "configs/vlm_example.yaml": 6}


def examples_in(cfg) -> list:
    """The rows a run of `cfg` reads, through its method's own reader."""
    from core.data import rl_data
    from core.data.vlm import load_vlm_examples

    data = ROOT / cfg.train_data_dir
    readers = {"dpo": load_preference_examples, "orpo": load_preference_examples, "kto": rl_data.load_labelled,
               "grpo": rl_data.load_prompts}
    if cfg.text_method == "vlm":
        from dataclasses import replace

        return load_vlm_examples(replace(cfg, train_data_dir=str(data)))
    return readers.get(cfg.text_method, load_examples)(data)


def test_the_example_data_is_part_of_a_fresh_clone_not_ignored_like_the_rest_of_data():
    shipped = ["data/clinic_qa.csv", "data/clinic_qa_heldout.csv", "data/clinic_preferences.csv",
               "data/clinic_kto.csv", "data/math_grpo.csv", "data/vlm_icons/metadata.csv",
               "data/vlm_icons/red_circle.png"]
    ignored = subprocess.run(["git", "check-ignore", *shipped], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout == ""  # none of them is ignored ...
    assert subprocess.run(["git", "check-ignore", "-q", "data/my_own_set/a.csv"], cwd=ROOT).returncode == 0  # ... yours are


@pytest.mark.parametrize("config", list(EXAMPLES))
def test_each_example_config_finds_its_data_where_it_says(config):
    cfg = load_config(ROOT / config)  # checks the paths, as train.py does
    assert len(examples_in(cfg)) == EXAMPLES[config]


@pytest.mark.slow  # five short runs in this process: loading and saving take ~30 s on a busy CPU
@pytest.mark.parametrize("config", list(EXAMPLES))
def test_train_py_runs_each_example_config_unchanged_but_for_the_model(config, request, tmp_path):
    from train import main

    out = tmp_path / "run"
    # The VLM example's stand-in is the tiny LLaVA-style chat VLM, the others' the tiny Llama.
    tiny = request.getfixturevalue("tiny_llava_dir" if "vlm" in config else "tiny_llm_dir")
    code = main(["--config", str(ROOT / config), "--base_model", str(tiny), "--output_dir", str(out),
                 "--max_train_steps", "2", "--sample_prompts", "[]"])
    assert code == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == load_config(ROOT / config).lora_rank
