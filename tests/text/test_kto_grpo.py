"""KTO (answers marked good or bad) and GRPO (sampled answers scored by reward functions), end to end
on the tiny Llama: each moves its own number the right way, resumes exactly and exports an adapter."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from core.config import ConfigError, config_from_dict
from core.data import rl_data
from core.data.text import TextDataError
from core.events import ProgressEvent, RunContext
from core.train import run_training
from tests.helpers import read_loss_csv

TRAIN_THINGS = ["battery", "camera", "warranty", "weight", "speed", "charger", "propeller", "case"]
HELD_THINGS = ["cable", "manual", "lens", "wheel"]


def kto_rows(things: list[str]) -> list[dict[str, str]]:
    """Each prompt with a desirable answer (the pattern the base does not prefer) and an undesirable one."""
    rows = []
    for thing in things:
        rows.append({"prompt": f"What about the {thing}?", "completion": f"No, the {thing} is fine. Goodbye.",
                     "label": "true"})
        rows.append({"prompt": f"What about the {thing}?", "completion": f"Yes, the {thing} is fine. Thank you!",
                     "label": "false"})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def method_config(base: Path, data: Path, out: Path, method: str, **extra):
    raw = dict(task_type="text-generation", base_model=str(base), train_data_dir=str(data), output_dir=str(out),
               text_method=method, preference_beta=0.1, batch_size=4, max_train_steps=8, learning_rate=5e-3,
               lora_rank=4, lora_alpha=8, save_steps=0, seed=7, max_seq_length=64, lr_scheduler="constant")
    raw.update(extra)
    return config_from_dict(raw)


def collect() -> tuple[RunContext, list]:
    events: list = []
    return RunContext(listeners=[events.append]), events


def completion_logps(base: Path, adapter: Path | None, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the desirable and of the undesirable completions of `data`."""
    from peft import PeftModel

    from core.models.llm import load_llm
    from core.train.kto import make_labelled_batch
    from core.train.preference_step import segment_logps

    model, tokenizer, _ = load_llm(str(base))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    causal_lm = model.get_base_model() if adapter is not None else model
    causal_lm.eval()
    items = rl_data.tokenize_labelled(tokenizer, rl_data.load_labelled(data), 64).items
    batch = make_labelled_batch(items, tokenizer.pad_token_id or 0)
    with torch.no_grad():
        sums = segment_logps(causal_lm, batch.batch, batch.segments, batch.count, torch.device("cpu")).sums
    return sums[batch.desirable], sums[~batch.desirable]


# -- KTO --------------------------------------------------------------------------------------
def test_kto_raises_the_log_prob_of_desirable_answers_and_lowers_undesirable_ones_on_held_out_prompts(
        tiny_llm_dir, tmp_path):
    train = write_csv(tmp_path / "labelled.csv", kto_rows(TRAIN_THINGS))
    held = write_csv(tmp_path / "held.csv", kto_rows(HELD_THINGS))
    ctx, _ = collect()
    outputs = run_training(method_config(tiny_llm_dir, train, tmp_path / "kto", "kto", validation_file=str(held),
                                         save_merged_model=True), ctx)
    good_before, bad_before = completion_logps(tiny_llm_dir, None, held)
    good_after, bad_after = completion_logps(tiny_llm_dir, Path(outputs["adapter"]), held)
    print(f"\nKTO held-out: desirable logp {good_before.mean():.2f} -> {good_after.mean():.2f}, "
          f"undesirable {bad_before.mean():.2f} -> {bad_after.mean():.2f}")
    assert (good_after > good_before).all()
    assert float((good_after - bad_after).mean()) > float((good_before - bad_before).mean())
    summary = json.loads(Path(outputs["summary"]).read_text())
    assert summary["text_method"] == "kto" and summary["labelled_answers"] == 16
    assert summary["validation_reward_desirable"] > summary["validation_reward_undesirable"]
    assert (Path(outputs["merged"]) / "config.json").is_file()  # exported: adapter and merged model
    losses = [r.loss for r in read_loss_csv(tmp_path / "kto")]
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_kto_data_without_labels_is_refused_naming_the_columns(tiny_llm_dir, tmp_path):
    data = write_csv(tmp_path / "nolabel.csv", [{"prompt": "Hi?", "completion": "Hello."}])
    with pytest.raises(TextDataError, match=r"nolabel.csv:2: text_method kto needs the columns prompt,completion,label"):
        run_training(method_config(tiny_llm_dir, data, tmp_path / "r", "kto"), collect()[0])
    bad = write_csv(tmp_path / "maybe.csv", [{"prompt": "Hi?", "completion": "Hello.", "label": "maybe"}])
    with pytest.raises(TextDataError, match="neither true nor false"):
        rl_data.load_labelled(bad)


def test_kto_with_pissa_is_refused_because_its_reference_is_the_base():
    with pytest.raises(ConfigError) as error:
        config_from_dict(dict(task_type="text-generation", train_data_dir=".", text_method="kto",
                              lora_variant="pissa"), check_paths=False)
    assert "KTO's reference" in error.value.errors["lora_variant"]


@pytest.mark.parametrize("method", ["kto"])
def test_stop_then_resume_gives_the_uninterrupted_runs_losses(tiny_llm_dir, tmp_path, method):
    data = write_csv(tmp_path / "labelled.csv", kto_rows(TRAIN_THINGS))
    straight_ctx, _ = collect()
    run_training(method_config(tiny_llm_dir, data, tmp_path / "straight", method, max_train_steps=4), straight_ctx)
    ctx, _ = collect()
    ctx.listeners.append(lambda e: ctx.stop_flag.set() if isinstance(e, ProgressEvent) and e.step == 2 else None)
    run_training(method_config(tiny_llm_dir, data, tmp_path / "broken", method, max_train_steps=4), ctx)
    resumed_ctx, resumed = collect()
    run_training(method_config(tiny_llm_dir, data, tmp_path / "broken", method, max_train_steps=4,
                               resume_from="latest"), resumed_ctx)
    assert [e.step for e in resumed if isinstance(e, ProgressEvent)] == [3, 4]
    for a, b in zip(read_loss_csv(tmp_path / "straight"), read_loss_csv(tmp_path / "broken"), strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=1e-6), (a, b)


# -- GRPO -------------------------------------------------------------------------------------
PROMPTS = ["What about the battery?", "How long does it fly?", "Hello!", "What is the warranty?"]
# The tiny Llama's random head gives near-uniform answers; LoRA on lm_head lets a few steps sharpen them.
GRPO_EXTRA = dict(grpo_rewards=["regex:^[A-Za-z]"], grpo_generations=8, grpo_max_new_tokens=2, grpo_kl=0.0,
                  batch_size=2, learning_rate=5e-2, lora_rank=8, lora_alpha=16,
                  target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"])


def step_rewards(out: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    return [e.value for e in events.Scalars("reward/mean")]


def test_grpo_raises_the_mean_reward_of_sampled_answers_on_a_regex_task(tiny_llm_dir, tmp_path):
    data = write_csv(tmp_path / "prompts.csv", [{"prompt": p} for p in PROMPTS])
    ctx, events = collect()
    outputs = run_training(method_config(tiny_llm_dir, data, tmp_path / "grpo", "grpo", **GRPO_EXTRA), ctx)
    rewards = step_rewards(tmp_path / "grpo")
    print(f"\nGRPO mean reward per step (answers starting with a letter): {[round(r, 2) for r in rewards]}")
    assert len(rewards) == 8
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15
    live = [e.scalars.get("reward/mean") for e in events if isinstance(e, ProgressEvent)]
    assert live == pytest.approx(rewards)  # the Train tab's reward plot gets the same numbers
    summary = json.loads(Path(outputs["summary"]).read_text())
    assert summary["text_method"] == "grpo" and summary["grpo_generations"] == 8
    adapter = json.loads((Path(outputs["adapter"]) / "adapter_config.json").read_text())
    assert "lm_head" in adapter["target_modules"]


@pytest.mark.slow  # three short GRPO runs
def test_grpo_stop_then_resume_samples_and_learns_as_the_uninterrupted_run(tiny_llm_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_csv(tmp_path / "prompts.csv", [{"prompt": p} for p in PROMPTS])
    extra = {**GRPO_EXTRA, "max_train_steps": 4}
    run_training(method_config(tiny_llm_dir, data, tmp_path / "straight", "grpo", **extra), collect()[0])
    ctx, _ = collect()
    ctx.listeners.append(lambda e: ctx.stop_flag.set() if isinstance(e, ProgressEvent) and e.step == 2 else None)
    run_training(method_config(tiny_llm_dir, data, tmp_path / "broken", "grpo", **extra), ctx)
    run_training(method_config(tiny_llm_dir, data, tmp_path / "broken", "grpo", resume_from="latest", **extra),
                 collect()[0])
    assert step_rewards(tmp_path / "broken")[-2:] == pytest.approx(step_rewards(tmp_path / "straight")[-2:])
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "broken" / "adapter" / "adapter_model.safetensors"))
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key


def test_reward_functions_score_answers_as_documented(tmp_path):
    from core.train.rewards import RewardError, RewardSet

    row = {"prompt": "2+2?", "answer": "4"}
    assert RewardSet.parse(["regex:^\\d+$"]).score("", "42", row) == 1.0
    assert RewardSet.parse(["json"]).score("", '```json\n{"a": 1}\n```', row) == 1.0
    assert RewardSet.parse(["json"]).score("", "{a: 1}", row) == 0.0
    assert RewardSet.parse(["numeric"]).score("", "2 and 2 make 4.", row) == 1.0
    assert RewardSet.parse(["numeric"]).score("", "It is 5", row) == 0.0
    assert RewardSet.parse(["length:10"]).score("", "x" * 15, row) == pytest.approx(-0.5)
    mine = tmp_path / "mine.py"
    mine.write_text("def reward(prompt, completion, row):\n    return len(completion) / 10\n")
    assert RewardSet.parse([str(mine), "regex:x"]).score("", "xx", row) == pytest.approx(1.2)  # summed
    with pytest.raises(RewardError, match="not a valid regular expression"):
        RewardSet.parse(["regex:("])
    with pytest.raises(RewardError, match="is not a reward; use regex"):
        RewardSet.parse(["shiny"])


def test_grpo_without_rewards_is_refused_by_the_config():
    with pytest.raises(ConfigError) as error:
        config_from_dict(dict(task_type="text-generation", train_data_dir=".", text_method="grpo"), check_paths=False)
    assert "at least one reward" in error.value.errors["grpo_rewards"]


def test_the_live_plot_draws_grpos_mean_reward_beside_the_loss():
    from ui.plots import loss_figure

    rows = [(1, 0.5, 0.5, 1e-3, None), (2, 0.4, 0.45, 1e-3, None)]
    assert len(loss_figure(rows).axes) == 2  # loss and its learning-rate axis
    fig = loss_figure(rows, rewards=[(1, 0.25), (2, 0.75)])
    reward_axes = [ax for ax in fig.axes if ax.get_title() == "Mean reward"]
    assert len(reward_axes) == 1 and list(reward_axes[0].lines[0].get_ydata()) == [0.25, 0.75]
