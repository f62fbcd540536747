"""`distributed: fsdp` without launching processes: what the config refuses, what the memory
estimate and `preset: auto` make of several GPUs, how a checkpoint's optimizer state and epoch
position move between process counts, and how the app plans, launches and follows a run on several
devices (the runs themselves: tests/train/test_sharded_training.py, tests/test_app_launch.py)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from core import launch
from core.config import ConfigError, config_from_dict
from core.devices import DeviceInfo
from core.events import CheckpointEvent, DoneEvent, ProgressEvent, SampleEvent
from core.memory import estimate_memory
from core.model_info import ModelInfo
from core.presets import choose_preset, next_smaller_preset
from core.train import sharding

GPU_24 = DeviceInfo("cuda", "RTX 4090", 24.0, 23.5, bf16=True, bitsandbytes=True)
# A 14B decoder: 28 GB of bf16 weights, more than one 24 GB GPU holds.
LLM_14B = ModelInfo("llm", 14_000_000_000, "test", hidden_size=5120, num_layers=48, intermediate_size=13824,
                    vocab_size=152064, kv_dim=1024)


def _cfg(**values):
    return config_from_dict({"task_type": "text-generation", "base_model": "x", "train_data_dir": "d",
                             "output_dir": "o", **values}, check_paths=False)


@pytest.mark.parametrize("values, says", [
    ({"base_quantization": "nf4"}, "does not combine with base_quantization: nf4"),
    ({"save_merged_model": True}, "merge the adapter afterwards"),
    ({"lora_variant": "pissa"}, "PiSSA rewrites the base weights"),
    ({"text_method": "dpo"}, "does not run sharded yet"),
])
def test_a_sharded_run_refuses_what_it_cannot_do_in_one_sentence(values, says):
    with pytest.raises(ConfigError) as caught:
        _cfg(distributed="fsdp", **values)
    assert says in caught.value.errors["distributed"]
    assert _cfg(**values).distributed == "ddp"  # the default, where all of these run


def test_the_estimate_counts_a_sharded_base_per_gpu():
    cfg = _cfg(mixed_precision="bf16", gradient_checkpointing=True, max_seq_length=1024, batch_size=1)
    whole = estimate_memory(cfg, LLM_14B, GPU_24, processes=2)
    sharded = estimate_memory(dataclasses.replace(cfg, distributed="fsdp"), LLM_14B, GPU_24, processes=2)
    assert not whole.fits and sharded.fits
    assert sharded.parts["model weights"] == pytest.approx(whole.parts["model weights"] / 2)
    assert sharded.parts["gathered blocks (fsdp)"] < whole.parts["model weights"] / 10
    alone = estimate_memory(dataclasses.replace(cfg, distributed="fsdp"), LLM_14B, GPU_24, processes=1)
    assert alone.total_gb == pytest.approx(whole.total_gb)  # one process: nothing to shard over


def test_preset_auto_shards_on_two_gpus_when_one_cannot_hold_the_model():
    raw = {"task_type": "text-generation", "base_model": "x", "train_data_dir": "d", "output_dir": "o"}
    two = choose_preset(raw, GPU_24, LLM_14B, processes=2)
    assert two.values.get("distributed") == "fsdp" and two.fits
    assert "sharded over 2 GPUs" in two.reason
    one = choose_preset(raw, GPU_24, LLM_14B, processes=1)
    assert "distributed" not in one.values
    assert choose_preset({**raw, "distributed": "ddp"}, GPU_24, LLM_14B, processes=2).values.get(
        "distributed") is None  # the user's choice stays


def test_out_of_memory_on_several_gpus_shards_before_anything_gets_smaller(monkeypatch):
    cfg = _cfg(mixed_precision="bf16", gradient_checkpointing=True, preset="llm-24gb")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert next_smaller_preset(cfg, LLM_14B, GPU_24) == ("sharded", {"distributed": "fsdp"})
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert next_smaller_preset(cfg, LLM_14B, GPU_24) != ("sharded", {"distributed": "fsdp"})


def test_a_resumed_epoch_position_is_counted_in_global_batches():
    assert sharding.continue_on_processes(3, saved=2, now=2) == 3
    assert sharding.continue_on_processes(3, saved=2, now=1) == 6
    assert sharding.continue_on_processes(3, saved=1, now=2) == 1  # rounded down: none skipped
    assert sharding.processes_in({"rng_by_rank": [{}, {}, {}]}) == 3 and sharding.processes_in({}) == 1


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_the_optimizer_state_moves_between_numbered_and_named_layouts():
    model, optimizer = _trained()
    named = sharding.FullOptimizerState.gather(model, optimizer).state_dict()
    assert set(named["state"]) == {"1.weight", "1.bias"}
    fresh, fresh_optimizer = _trained()
    for p in fresh_optimizer.param_groups[0]["params"]:
        fresh_optimizer.state[p]["exp_avg"].zero_()
    sharding.FullOptimizerState(fresh, fresh_optimizer, sharded=False).load_state_dict(named)
    torch.testing.assert_close(fresh_optimizer.state_dict()["state"][0]["exp_avg"],
                               optimizer.state_dict()["state"][0]["exp_avg"])
    # A DDP / one-process (numbered) state, as a sharded run reads it: by this run's parameter names.
    numbered = optimizer.state_dict()
    target = sharding.FullOptimizerState(fresh, fresh_optimizer)
    assert set(target._named(numbered)["state"]) == {"1.weight", "1.bias"}


def test_a_launched_runs_events_come_back_as_the_events_they_were(tmp_path):
    sent = [ProgressEvent(step=3, total=8, loss=0.5, lr=1e-4), SampleEvent(step=3, images=["a.png"]),
            CheckpointEvent(step=3, path="c"), DoneEvent(outputs={"lora": "x"}, stopped=True, message="m")]
    path = tmp_path / "events.jsonl"
    reader = launch._EventReader(path)
    text = "".join(json.dumps(e.to_dict()) + "\n" for e in sent)
    path.write_text(text[:-20], encoding="utf-8")  # the last line still being written
    first = reader.read()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text[-20:])
    assert first + reader.read() == sent


def test_the_launch_command_is_accelerate_on_gpus_and_torchrun_on_cpu_processes(tmp_path):
    gpus = launch.LaunchPlan((launch.Device(0, "A", 24.0), launch.Device(2, "B", 24.0)))
    line = launch.command(tmp_path / "c.yaml", gpus, tmp_path)
    assert line[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"]
    assert line[line.index("--gpu_ids") + 1] == "0,2" and line[line.index("--num_processes") + 1] == "2"
    assert "--stop_file" in line and "--events_file" in line
    cpus = launch.LaunchPlan((launch.Device(0, "CPU", 0, "cpu"), launch.Device(1, "CPU", 0, "cpu")))
    assert launch.command(tmp_path / "c.yaml", cpus, tmp_path)[1:3] == ["-m", "torch.distributed.run"]
    assert not launch.LaunchPlan((launch.Device(0, "A", 24.0),)).launched  # the app's own GPU: in the app
    assert launch.LaunchPlan((launch.Device(1, "A", 24.0),)).launched


def test_the_train_tab_plans_a_run_from_the_gpus_picked():
    from ui.train_gpus import GpuChoice, plan_for

    two = [launch.Device(0, "RTX 4090", 24.0), launch.Device(1, "RTX 4090", 24.0)]
    cfg = _cfg()
    shard = plan_for(cfg, two, GpuChoice(shard=True))
    assert shard[0].distributed == "fsdp" and shard[1].processes == 2
    assert plan_for(cfg, two, GpuChoice())[0].distributed == "ddp"
    assert plan_for(cfg, two, GpuChoice(picked=[two[1].label]))[1].devices == (two[1],)
    assert plan_for(cfg, two[:1], GpuChoice(shard=True)) == (cfg, None)  # one GPU: the plain run
    assert "No GPU found" in launch.describe_devices([])
    assert "One GPU" in launch.describe_devices(two[:1])
