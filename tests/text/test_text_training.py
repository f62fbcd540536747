"""Text LoRA training end to end on a tiny Llama: train.py, the adapter PEFT loads back,
stop and resume, NaN guard, variants, samples and the merged model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from core.config import config_from_dict
from core.events import DoneEvent, ProgressEvent, RunContext, SampleEvent
from core.train import run_training, runtime
from tests.helpers import read_loss_csv

ROOT = Path(__file__).resolve().parents[2]
def text_config(base: Path, data: Path, out: Path, **extra):
    raw = dict(task_type="text-generation", base_model=str(base), train_data_dir=str(data), output_dir=str(out),
               batch_size=2, max_train_steps=4, learning_rate=5e-3, lora_rank=4, lora_alpha=8, save_steps=0,
               seed=7, max_seq_length=64)
    raw.update(extra)
    return config_from_dict(raw)


def collect() -> tuple[RunContext, list]:
    events: list = []
    return RunContext(listeners=[events.append]), events


def logits_with_adapter(base: Path, adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel

    from core.models.llm import load_llm

    model, tokenizer, _ = load_llm(str(base))
    ids = tokenizer("How long does the Kestrel K7 fly?", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
        peft_model = PeftModel.from_pretrained(model, str(adapter))
        after = peft_model(ids).logits
    return before, after


def test_train_py_trains_a_gguf_llama_and_the_adapter_loads_back_with_peft(tiny_llm_gguf, qa_file, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "text.yaml"
    config.write_text(yaml.safe_dump(dict(task_type="text-generation", base_model=str(tiny_llm_gguf),
                                          train_data_dir=str(qa_file), output_dir=str(out), batch_size=2,
                                          max_train_steps=3, learning_rate=5e-3, lora_rank=4, save_steps=2)))
    result = subprocess.run([sys.executable, "train.py", "--config", str(config), "--quiet"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llm_gguf)
    assert (out / "checkpoints" / "step-000002").is_dir()
    assert [r.step for r in read_loss_csv(out)] == [1, 2, 3]  # one row per step
    before, after = logits_with_adapter(tiny_llm_gguf, adapter)
    assert not torch.allclose(before, after, atol=1e-4)


def test_stopping_saves_the_adapter_and_resuming_ends_where_an_unbroken_run_ends(tiny_llm_dir, qa_file, tmp_path):
    from safetensors.torch import load_file

    straight_ctx, _ = collect()
    run_training(text_config(tiny_llm_dir, qa_file, tmp_path / "straight"), straight_ctx)

    ctx, events = collect()
    ctx.listeners.append(lambda e: ctx.stop_flag.set() if isinstance(e, ProgressEvent) and e.step == 2 else None)
    outputs = run_training(text_config(tiny_llm_dir, qa_file, tmp_path / "broken"), ctx)
    done = [e for e in events if isinstance(e, DoneEvent)][-1]
    assert done.stopped and Path(outputs["checkpoint"]).name == "step-000002"
    assert (Path(outputs["adapter"]) / "adapter_model.safetensors").is_file()

    resumed_ctx, resumed_events = collect()
    run_training(text_config(tiny_llm_dir, qa_file, tmp_path / "broken", resume_from="latest"), resumed_ctx)
    steps = [e.step for e in resumed_events if isinstance(e, ProgressEvent)]
    assert steps == [3, 4]
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "broken" / "adapter" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key
    assert [r.step for r in read_loss_csv(tmp_path / "broken")] == [1, 2, 3, 4]


def test_a_nan_loss_stops_the_run_with_advice(tiny_llm_dir, qa_file, tmp_path, monkeypatch):
    def poisoned(loss, step, cfg):
        if step == 2:
            raise runtime.NonFiniteLossError(step, cfg)

    monkeypatch.setattr(runtime, "check_finite", poisoned)
    ctx, _ = collect()
    with pytest.raises(runtime.NonFiniteLossError) as caught:
        run_training(text_config(tiny_llm_dir, qa_file, tmp_path / "nan"), ctx)
    assert "Lower learning_rate" in caught.value.advice


@pytest.mark.parametrize("extra", [{"lora_variant": "dora"}, {"lora_variant": "rslora"},
                                   {"lora_variant": "pissa"}, {"loraplus_lr_ratio": 16.0},
                                   {"lora_variant": "lokr", "lokr_factor": 4}, {"lora_variant": "loha"}],
                         ids=["dora", "rslora", "pissa", "loraplus", "lokr", "loha"])
def test_each_lora_variant_trains_and_its_adapter_loads_on_the_original_base(tiny_llm_dir, qa_file, tmp_path, extra):
    ctx, _ = collect()
    outputs = run_training(text_config(tiny_llm_dir, qa_file, tmp_path / "v", max_train_steps=2, **extra), ctx)
    config = json.loads((Path(outputs["adapter"]) / "adapter_config.json").read_text())
    if extra.get("lora_variant") == "dora":
        assert config["use_dora"]
    if extra.get("lora_variant") == "rslora":
        assert config["use_rslora"]
    if extra.get("lora_variant") in ("lokr", "loha"):
        assert config["peft_type"] == extra["lora_variant"].upper()
    before, after = logits_with_adapter(tiny_llm_dir, Path(outputs["adapter"]))
    assert not torch.allclose(before, after, atol=1e-5)
    assert torch.isfinite(after).all()


def test_samples_hold_answers_with_the_adapter_on_and_off_and_validation_loss_is_logged(
        tiny_llm_dir, qa_file, tmp_path):
    ctx, events = collect()
    outputs = run_training(text_config(tiny_llm_dir, qa_file, tmp_path / "s", sample_steps=2,
                                       sample_prompts=["What is the top speed?"], sample_max_new_tokens=5,
                                       validation_split=0.2), ctx)
    samples = [e for e in events if isinstance(e, SampleEvent)]
    assert [s.step for s in samples] == [2, 4]
    assert set(samples[0].texts[0]) == {"prompt", "lora", "base"}
    saved = json.loads((tmp_path / "s" / "samples" / "step-000002.json").read_text())
    assert saved[0]["prompt"] == "What is the top speed?"
    summary = json.loads(Path(outputs["summary"]).read_text())
    assert summary["validation_loss"] > 0 and summary["tokens_per_second"] > 0


def test_the_merged_model_folder_answers_like_base_plus_adapter(tiny_llm_dir, qa_file, tmp_path):
    from transformers import AutoModelForCausalLM

    ctx, _ = collect()
    outputs = run_training(text_config(tiny_llm_dir, qa_file, tmp_path / "m", save_merged_model=True), ctx)
    merged_dir = Path(outputs["merged"])
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    _, with_adapter = logits_with_adapter(tiny_llm_dir, Path(outputs["adapter"]))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    from core.models.llm import load_tokenizer, resolve_source

    ids = load_tokenizer(resolve_source(str(tiny_llm_dir)))("How long does the Kestrel K7 fly?",
                                                             return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter, atol=1e-4)


def test_a_broken_data_file_fails_before_training_naming_the_line(tiny_llm_dir, tmp_path):
    data = tmp_path / "bad.csv"
    data.write_text("prompt,response\nfine,ok\nonly one field\n", encoding="utf-8")
    ctx, _ = collect()
    from core.data.text import TextDataError

    with pytest.raises(TextDataError, match=r"bad\.csv:3: fewer fields"):
        run_training(text_config(tiny_llm_dir, data, tmp_path / "bad"), ctx)


def test_the_test_tab_helpers_answer_with_the_adapter_at_a_weight_and_without(tiny_llm_dir, qa_file, tmp_path):
    from core import sample_text

    ctx, _ = collect()
    outputs = run_training(text_config(tiny_llm_dir, qa_file, tmp_path / "t"), ctx)
    sample_text.clear_cache()
    rows = sample_text.compare_answers(str(tiny_llm_dir), outputs["adapter"], ["What is the top speed?"],
                                       max_new_tokens=4)
    assert rows[0]["prompt"] == "What is the top speed?" and set(rows[0]) == {"prompt", "lora", "base"}
    off = sample_text.chat(str(tiny_llm_dir), outputs["adapter"], "What is the top speed?", weight=0.0,
                           max_new_tokens=4)
    assert off == rows[0]["base"]
    on = sample_text.chat(str(tiny_llm_dir), outputs["adapter"], [{"role": "user", "content": "What is the top speed?"}],
                          max_new_tokens=4)
    assert on == rows[0]["lora"]
