"""Preference tuning (DPO, ORPO) on prompt,chosen,rejected data, end to end on the tiny Llama.

The data is learnable in a few steps: every chosen answer is "No, the X is fine. Goodbye.",
the rejected one "Yes, the X is fine. Thank you!" (the pattern the untrained base model
prefers, by 11 nats). Held-out comparisons ask about things never seen in training, so a
higher margin logp(chosen) - logp(rejected) there means the preference was learned, not
the pairs.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from core.config import ConfigError, config_from_dict
from core.data.preference import load_preference_examples, read_preference_rows, tokenize_pairs
from core.data.text import IGNORE_INDEX, TextDataError
from core.events import ProgressEvent, RunContext
from core.train import run_training
from tests.helpers import read_loss_csv

TRAIN_THINGS = ["battery", "camera", "warranty", "weight", "speed", "charger", "propeller", "case",
                "remote", "screen", "motor", "antenna", "gimbal", "sensor", "light", "strap"]
HELD_THINGS = ["cable", "manual", "lens", "wheel", "button", "filter"]


def comparison(thing: str) -> dict[str, str]:
    return {"prompt": f"What about the {thing}?", "chosen": f"No, the {thing} is fine. Goodbye.",
            "rejected": f"Yes, the {thing} is fine. Thank you!"}


def write_csv(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("prompt", "chosen", "rejected")
              ) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def preference_config(base: Path, data: Path, out: Path, **extra):
    raw = dict(task_type="text-generation", base_model=str(base), train_data_dir=str(data), output_dir=str(out),
               text_method="dpo", preference_beta=0.1, batch_size=4, max_train_steps=8, learning_rate=5e-3,
               lora_rank=4, lora_alpha=8, save_steps=0, seed=7, max_seq_length=64, lr_scheduler="constant")
    raw.update(extra)
    return config_from_dict(raw)


def collect() -> tuple[RunContext, list]:
    events: list = []
    return RunContext(listeners=[events.append]), events


def held_out_margins(base: Path, adapter: Path | None, held: Path) -> torch.Tensor:
    """logp(chosen) - logp(rejected) (summed answer tokens) of each held-out comparison."""
    from peft import PeftModel

    from core.models.llm import load_llm
    from core.train.preference_step import answer_margins, make_pair_batch

    model, tokenizer, _ = load_llm(str(base))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    pairs = tokenize_pairs(tokenizer, load_preference_examples(held), 64).pairs
    batches = [make_pair_batch(pairs[i:i + 3], tokenizer.pad_token_id or 0) for i in range(0, len(pairs), 3)]
    return answer_margins(model, batches, torch.device("cpu"))


@pytest.fixture
def comparisons(tmp_path) -> tuple[Path, Path]:
    train = write_csv(tmp_path / "prefs.csv", [comparison(t) for t in TRAIN_THINGS])
    held = write_csv(tmp_path / "held.csv", [comparison(t) for t in HELD_THINGS])
    return train, held


# -- learning ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_after_a_short_run_the_policy_prefers_chosen_on_held_out_pairs_more_than_the_base(
        tiny_llm_dir, comparisons, tmp_path, method):
    train, held = comparisons
    ctx, _ = collect()
    outputs = run_training(preference_config(tiny_llm_dir, train, tmp_path / method, text_method=method,
                                             validation_file=str(held)), ctx)
    before = held_out_margins(tiny_llm_dir, None, held)
    after = held_out_margins(tiny_llm_dir, Path(outputs["adapter"]), held)
    summary = json.loads(Path(outputs["summary"]).read_text())
    print(f"\n{method}: held-out mean margin logp(chosen) - logp(rejected): base {before.mean():.2f} -> "
          f"LoRA {after.mean():.2f}; chosen more likely in {(before > 0).float().mean():.0%} -> "
          f"{(after > 0).float().mean():.0%} of {len(after)}; validation accuracy {summary['validation_accuracy']:.0%}")
    assert float(after.mean()) > float(before.mean()) + 5.0
    assert (after > before).all()
    assert summary["text_method"] == method and summary["validation_accuracy"] == 1.0
    losses = [r.loss for r in read_loss_csv(tmp_path / method)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / method / "logs"))
    events.Reload()
    accuracy = [e.value for e in events.Scalars("preference/accuracy")]
    assert len(accuracy) == 8 and len(events.Scalars("preference/margin")) == 8 and accuracy[-1] == 1.0


def test_stop_then_resume_from_latest_gives_the_uninterrupted_runs_losses_for_dpo(
        tiny_llm_dir, comparisons, tmp_path):
    train, _ = comparisons
    straight_ctx, _ = collect()
    run_training(preference_config(tiny_llm_dir, train, tmp_path / "straight", max_train_steps=4), straight_ctx)

    ctx, _ = collect()
    ctx.listeners.append(lambda e: ctx.stop_flag.set() if isinstance(e, ProgressEvent) and e.step == 2 else None)
    run_training(preference_config(tiny_llm_dir, train, tmp_path / "broken", max_train_steps=4), ctx)
    resumed_ctx, resumed_events = collect()
    run_training(preference_config(tiny_llm_dir, train, tmp_path / "broken", max_train_steps=4,
                                   resume_from="latest"), resumed_ctx)
    assert [e.step for e in resumed_events if isinstance(e, ProgressEvent)] == [3, 4]
    straight = read_loss_csv(tmp_path / "straight")
    resumed = read_loss_csv(tmp_path / "broken")
    assert [r.step for r in resumed] == [1, 2, 3, 4]
    # The first DPO loss is log 2 (policy == reference); the later ones depend on the reference staying put.
    assert straight[0].loss == pytest.approx(0.693147, abs=1e-5)
    for a, b in zip(straight, resumed):
        assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=1e-6), (a, b)


# -- data -------------------------------------------------------------------------------------
def test_a_csv_without_a_rejected_column_is_refused_with_the_file_and_the_columns_it_has(tiny_llm_dir, tmp_path):
    data = write_csv(tmp_path / "half.csv", [comparison("x")], columns=("prompt", "chosen"))
    ctx, events = collect()
    with pytest.raises(TextDataError) as caught:
        run_training(preference_config(tiny_llm_dir, data, tmp_path / "r"), ctx)
    message = str(caught.value)
    assert "half.csv" in message and "found prompt, chosen" in message and "prompt,chosen,rejected" in message
    assert not any(isinstance(e, ProgressEvent) for e in events)


def test_bad_rows_are_each_named_by_file_and_line(tmp_path):
    data = tmp_path / "bad.csv"
    data.write_text("prompt,chosen,rejected\n"
                    "Hi?,Hello!,Go away.\n"
                    "Same?,Yes.,Yes.\n"
                    "Empty?,,No.\n"
                    "Short?,Only chosen\n", encoding="utf-8")
    rows = read_preference_rows(data)
    assert [e.source for e in rows.examples] == ["bad.csv:2"]
    problems = dict(rows.problems)
    assert "the same answer" in problems["bad.csv:3"]
    assert "'chosen' answer is empty" in problems["bad.csv:4"]
    assert "no 'rejected' value" in problems["bad.csv:5"]
    with pytest.raises(TextDataError, match=r"3 row\(s\) cannot be used: bad\.csv:3"):
        load_preference_examples(data)


def test_jsonl_chat_form_and_question_key_are_read_and_only_the_final_answer_carries_loss(tmp_path):
    from tests.fixtures.tiny_llm import build_tokenizer

    data = tmp_path / "prefs.jsonl"
    records = [{"question": "Hello?", "chosen": "Hello! How can I help?", "rejected": "Goodbye."},
               {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Speed?"}],
                "chosen": [{"role": "assistant", "content": "83 km/h."}],
                "rejected": [{"role": "assistant", "content": "No idea."}]},
               {"chosen": [{"role": "user", "content": "Weight?"}, {"role": "assistant", "content": "612 g."}],
                "rejected": [{"role": "user", "content": "Weight?"}, {"role": "assistant", "content": "Heavy."}]}]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    examples = load_preference_examples(data)
    assert [e.prompt_text for e in examples] == ["Hello?", "Hi\nHello!\nSpeed?", "Weight?"]
    assert examples[1].system_text == "Be kind."
    tokenizer = build_tokenizer()
    pair = tokenize_pairs(tokenizer, examples, 512).pairs[1]
    learned = tokenizer.decode([t for t in pair.chosen.labels if t != IGNORE_INDEX])
    assert learned == "83 km/h.<|im_end|>"  # not the earlier assistant turn "Hello!"
    assert pair.chosen.input_ids[:-len(learned)] != [] and pair.rejected.trained_tokens > 0


def test_packed_and_padded_comparisons_score_each_answer_as_if_it_were_alone(tiny_llm_dir, comparisons):
    from core.models.llm import load_llm
    from core.train.preference_step import answer_logps, make_pair_batch

    model, tokenizer, _ = load_llm(str(tiny_llm_dir))
    pairs = tokenize_pairs(tokenizer, load_preference_examples(comparisons[0])[:3], 64).pairs
    cpu = torch.device("cpu")
    packed_batch, padded_batch = make_pair_batch(pairs, 0), make_pair_batch(pairs, 0, max_packed=0)
    assert packed_batch.batch.attention_mask is None and padded_batch.batch.attention_mask is not None
    with torch.no_grad():
        alone = [answer_logps(model, make_pair_batch([p], 0), cpu) for p in pairs]
        for scored in (answer_logps(model, packed_batch, cpu), answer_logps(model, padded_batch, cpu)):
            assert scored.chosen_tokens.tolist() == [p.chosen.trained_tokens for p in pairs]
            assert torch.allclose(scored.chosen, torch.cat([a.chosen for a in alone]), atol=1e-4)
            assert torch.allclose(scored.rejected, torch.cat([a.rejected for a in alone]), atol=1e-4)


def test_a_cut_comparison_is_warned_about_like_sft(tiny_llm_dir, tmp_path):
    rows = [comparison(t) for t in TRAIN_THINGS[:4]]
    rows[1]["prompt"] = "Please explain " * 30 + "the warranty?"
    data = write_csv(tmp_path / "long.csv", rows)
    ctx, events = collect()
    run_training(preference_config(tiny_llm_dir, data, tmp_path / "cut", max_train_steps=1, text_method="orpo"), ctx)
    warnings = [e.message for e in events if type(e).__name__ == "WarningEvent"]
    assert any("no answer left after cutting" in w and "long.csv:3" in w for w in warnings), warnings


def test_sft_on_preference_data_points_at_dpo_and_orpo(tmp_path):
    from core.data.text import load_examples

    data = write_csv(tmp_path / "prefs.csv", [comparison("x")])
    with pytest.raises(TextDataError, match="text_method: dpo or orpo"):
        load_examples(data)


# -- config and app ---------------------------------------------------------------------------
def test_text_method_and_preference_beta_are_checked_and_dpo_refuses_pissa(tmp_path):
    base = dict(task_type="text-generation", train_data_dir=str(tmp_path), output_dir=str(tmp_path / "o"))
    assert config_from_dict(base).text_method == "sft"
    with pytest.raises(ConfigError) as caught:
        config_from_dict({**base, "text_method": "ppo", "preference_beta": 0})
    assert set(caught.value.errors) == {"text_method", "preference_beta"}
    with pytest.raises(ConfigError, match="PiSSA"):
        config_from_dict({**base, "text_method": "dpo", "lora_variant": "pissa"})
    assert config_from_dict({**base, "text_method": "orpo", "lora_variant": "pissa"}).text_method == "orpo"


def test_the_train_form_shows_the_preference_keys_for_text_tasks_only():
    from ui import form

    specs = {s.name: s for s in form.field_specs()}
    for name in ("text_method", "preference_beta"):
        assert specs[name].shown_for("text-generation") and not specs[name].shown_for("image-generation")
    assert specs["text_method"].kind == "choice" and specs["text_method"].choices == ("sft", "dpo", "orpo", "kto", "grpo", "vlm")


def test_the_dataset_preview_shows_prompt_chosen_rejected_and_lists_bad_rows(tmp_path):
    from core.data.text_report import describe_text_data

    data = tmp_path / "prefs.csv"
    data.write_text("prompt,chosen,rejected\n"
                    "Hi?,Hello!,Go away.\n"
                    "Same?,Yes.,Yes.\n"
                    "Hi?,Hello!,Go away.\n", encoding="utf-8")
    result = describe_text_data(data)
    assert result.headers == ["where", "system", "prompt", "chosen", "rejected", "tokens"]
    assert result.rows[0][:5] == ["prefs.csv:2", "", "Hi?", "Hello!", "Go away."]
    issues = {(i.file, i.severity): i.problem for i in result.issues}
    assert "the same answer" in issues[("prefs.csv:3", "error")]
    assert "same as prefs.csv:2" in issues[("prefs.csv:4", "info")]
    summary = " ".join(result.summary_lines())
    assert "comparisons" in summary and "1 errors" in summary
