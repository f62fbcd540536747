"""The real default text model: SmolLM2-135M-Instruct as a 4-bit GGUF (models/llm/, put there by launch.py).

Skipped when the package is absent; CI installs it (`python launch.py --test`)."""
from __future__ import annotations

import json
from pathlib import Path

from core.config import config_from_dict
from core.events import DoneEvent, RunContext, SampleEvent
from core.train import run_training
from tests.helpers import read_loss_csv


def test_the_bundled_smollm2_gguf_loads_trains_a_few_steps_and_answers(smollm2_gguf, kestrel_dir, tmp_path):
    events: list = []
    cfg = config_from_dict(dict(task_type="text-generation", base_model="", train_data_dir=str(kestrel_dir /
                                "kestrel_train.csv"), output_dir=str(tmp_path / "smol"), batch_size=4,
                                max_train_steps=2, learning_rate=1e-3, lora_rank=4, save_steps=0,
                                sample_prompts=["How long does the Kestrel K7 fly?"], sample_max_new_tokens=8))
    outputs = run_training(cfg, RunContext(listeners=[events.append]))
    adapter = Path(outputs["adapter"])
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(smollm2_gguf)
    [sample] = [e for e in events if isinstance(e, SampleEvent)]
    assert sample.texts[0]["lora"] and sample.texts[0]["base"]
    done = [e for e in events if isinstance(e, DoneEvent)][-1]
    assert not done.stopped and "tokens/s" in done.message
    losses = [r.loss for r in read_loss_csv(tmp_path / "smol")]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
