"""EMA of the adapter weights (core.train.ema): the average is the textbook one, the files hold it,
the raw weights are kept when asked, and a stopped run resumes to the uninterrupted run's files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.events import ProgressEvent
from core.train import run_training
from core.train.ema import EMA_FILE, AdapterEMA, warmup_decay
from tests.text.test_text_training import collect, text_config

ADAPTER = Path("adapter") / "adapter_model.safetensors"


def test_the_ema_over_three_optimizer_steps_equals_the_hand_computed_average():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    ema = AdapterEMA(list(layer.parameters()), 0.9, warmup=True, where="cpu")
    expected = [p.detach().clone() for p in layer.parameters()]
    for n in (1, 2, 3):
        layer(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        d = min(0.9, n / (n + 9))  # warm-up: 0.1, 0.1818..., 0.25
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, layer.parameters())]
    for got, want in zip(ema.shadow, expected):
        assert torch.allclose(got, want, atol=1e-7)
    raw = [p.detach().clone() for p in layer.parameters()]
    with ema.applied():
        for param, want in zip(layer.parameters(), expected):
            assert torch.equal(param.detach(), want.to(param.dtype))
    for param, value in zip(layer.parameters(), raw):
        assert torch.equal(param.detach(), value)  # the raw weights are back, bit for bit
    assert warmup_decay(0.999, 1, warmup=False) == 0.999


def _ema_config(base, data, out, **extra):
    return text_config(base, data, out, ema=True, ema_decay=0.5, ema_warmup=False, ema_save_raw=True, **extra)


def _by_value(state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]) -> dict[str, str]:
    """Which raw.N of a checkpoint's EMA file is which adapter key (matched by value: random weights)."""
    out = {}
    for key, value in adapter.items():
        hits = [k for k, v in state.items() if k.startswith("raw.") and v.shape == value.shape
                and torch.equal(v, value.float())]
        assert len(hits) == 1, key
        out[key] = hits[0]
    return out


@pytest.mark.slow
def test_a_text_run_with_ema_writes_the_average_and_the_raw_weights_and_resumes_exactly(tiny_llm_dir, qa_file,
                                                                                      tmp_path):
    straight = tmp_path / "straight"
    run_training(_ema_config(tiny_llm_dir, qa_file, straight, save_steps=1), collect()[0])
    final, raw = load_file(str(straight / ADAPTER)), load_file(str(straight / "raw" / ADAPTER))
    assert any(not torch.equal(final[k], raw[k]) for k in final)

    # The written file is the EMA: from step 1's average, fold in the raw weights of steps 2, 3, 4 by hand.
    states = {step: load_file(str(straight / "checkpoints" / f"step-{step:06d}" / EMA_FILE)) for step in (1, 2, 3, 4)}
    names = _by_value(states[4], raw)
    for key, raw_name in names.items():
        index = raw_name.split(".")[1]
        average = states[1][f"ema.{index}"]
        for step in (2, 3, 4):
            average = 0.5 * average + 0.5 * states[step][f"raw.{index}"]
        assert torch.allclose(final[key].float(), average, atol=1e-6), key
    # A checkpoint's adapter is the EMA too (what a user picks from step-N); its raw weights are in ema.safetensors.
    step2 = load_file(str(straight / "checkpoints" / "step-000002" / ADAPTER))
    for key, raw_name in names.items():
        assert torch.allclose(step2[key].float(), states[2][f"ema.{raw_name.split('.')[1]}"], atol=1e-6)

    broken = tmp_path / "broken"
    ctx, _ = collect()
    ctx.listeners.append(lambda e: ctx.stop_flag.set() if isinstance(e, ProgressEvent) and e.step == 2 else None)
    run_training(_ema_config(tiny_llm_dir, qa_file, broken), ctx)
    resumed_ctx, events = collect()
    run_training(_ema_config(tiny_llm_dir, qa_file, broken, resume_from="latest"), resumed_ctx)
    assert [e.step for e in events if isinstance(e, ProgressEvent)] == [3, 4]
    for name in (ADAPTER, Path("raw") / ADAPTER):
        want, got = load_file(str(straight / name)), load_file(str(broken / name))
        assert want.keys() == got.keys()
        for key in want:
            assert torch.allclose(want[key], got[key], atol=1e-6), (name, key)


def test_ema_settings_are_checked_like_every_other_setting():
    from core.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as caught:
        config_from_dict(dict(train_data_dir="x", output_dir="y", task_type="text-generation", ema=True,
                              ema_decay=1.5, ema_device="tpu"), check_paths=False)
    assert "ema_decay" in caught.value.errors and "ema_device" in caught.value.errors


@pytest.mark.slow
def test_an_sd_run_with_ema_resumes_to_the_uninterrupted_runs_files(tiny_sd1, sd_image_folder, tmp_path):
    from tests.fixtures.tiny_sd import run_collect, tiny_run_config

    common = dict(ema=True, ema_decay=0.9, ema_save_raw=True, max_train_steps=4, save_steps=2, output_name="e")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, straight, **common))
    run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, stopped, **common), stop_at=2)
    _, events = run_collect(tiny_run_config(tiny_sd1.folder, sd_image_folder, stopped, resume_from="latest", **common))
    assert [e.step for e in events if e.kind == "progress"] == [3, 4]
    for name in ("e.safetensors", "raw/e.safetensors", "pytorch_lora_weights.safetensors"):
        want, got = load_file(str(straight / name)), load_file(str(stopped / name))
        assert want.keys() == got.keys()
        for key in want:
            assert torch.allclose(want[key], got[key], atol=1e-6), (name, key)
    ema, raw = load_file(str(straight / "e.safetensors")), load_file(str(straight / "raw" / "e.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.endswith("lora_up.weight"))


def test_ema_and_lokr_are_refused_with_fsdp_in_one_sentence():
    from core.config import ConfigError, config_from_dict

    for extra in (dict(ema=True), dict(lora_variant="lokr")):
        with pytest.raises(ConfigError) as caught:
            config_from_dict(dict(train_data_dir="x", output_dir="y", task_type="text-generation", distributed="fsdp",
                                  **extra), check_paths=False)
        assert "distributed: ddp" in caught.value.errors["distributed"]
