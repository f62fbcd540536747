"""VLM LoRA (text_method: vlm) on a tiny LLaVA-style chat VLM built in code: the caption loss falls and the
caption changes, stop + resume equals the uninterrupted run, the adapter and merged model load, and the
trained adapter captions a folder in the Caption tab's engine as "my captioner"."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.config import ConfigError, config_from_dict
from core.data.text import TextDataError
from core.events import ProgressEvent, RunContext
from core.train import run_training
from tests.helpers import read_loss_csv

# Four flat colours, each with the caption the tiny model must learn (words of its vocabulary).
TOY = {"red.png": ((220, 30, 30), "a red car on the road"), "blue.png": ((30, 30, 220), "a blue sea under the sky"),
       "green.png": ((30, 200, 30), "green grass in a field"), "white.png": ((240, 240, 240), "a white cloud")}


@pytest.fixture
def tiny_vlm_dir(tiny_llava_dir) -> Path:
    return tiny_llava_dir  # tests.fixtures.tiny_blip: a LLaVA-style chat VLM (CLIP vision + Llama text)


@pytest.fixture(params=["tiny_llava_dir", "tiny_idefics3_dir"])
def each_tiny_vlm(request) -> Path:
    """The LLaVA-style VLM and the SmolVLM-style one (Idefics3: tiled images, <end_of_utterance> turns)."""
    return request.getfixturevalue(request.param)


def toy_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (colour, _) in TOY.items():
        Image.new("RGB", (80, 64), colour).save(folder / name)
    with (folder / "metadata.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows([name, caption] for name, (_, caption) in TOY.items())
    return folder


def vlm_config(base: Path, data: Path, out: Path, **extra):
    raw = dict(task_type="text-generation", text_method="vlm", base_model=str(base), train_data_dir=str(data),
               output_dir=str(out), batch_size=2, max_train_steps=24, learning_rate=2e-2, lora_rank=8,
               lora_alpha=16, save_steps=0, seed=3, max_seq_length=64, lr_scheduler="constant", lora_dropout=0.0)
    raw.update(extra)
    return config_from_dict(raw)


def collect() -> tuple[RunContext, list]:
    events: list = []
    return RunContext(listeners=[events.append]), events


def caption_with(model_name: str, images: Path) -> dict[str, str]:
    from core.caption import load_captioner

    captioner = load_captioner(model_name, device="cpu")
    names = sorted(TOY)
    pictures = [Image.open(images / n).convert("RGB") for n in names]
    return dict(zip(names, captioner.caption_batch([images / n for n in names], pictures, max_new_tokens=8)))


def test_caption_loss_falls_and_the_captions_change_toward_the_training_captions(each_tiny_vlm, tmp_path):
    tiny_vlm_dir = each_tiny_vlm
    data = toy_folder(tmp_path / "toy")
    ctx, events = collect()
    outputs = run_training(vlm_config(tiny_vlm_dir, data, tmp_path / "run", sample_prompts=["red.png"],
                                      sample_steps=0), ctx)
    losses = [r.loss for r in read_loss_csv(tmp_path / "run")]
    print(f"\nVLM caption loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == 24 and losses[-1] < losses[0] * 0.5
    before, after = caption_with(str(tiny_vlm_dir), data), caption_with(str(tmp_path / "run"), data)
    print(f"captions before: {before}\ncaptions after:  {after}")
    assert before != after
    right = sum(after[name].startswith(" ".join(caption.split()[:2])) for name, (_, caption) in TOY.items())
    assert right >= 2  # the start of most captions is learnt
    samples = json.loads(next((tmp_path / "run" / "samples").glob("*.json")).read_text())
    assert samples[0]["prompt"] == "red.png" and samples[0]["lora"] == after["red.png"]
    info = json.loads((Path(outputs["adapter"]) / "captioner.json").read_text())
    assert info == {"base_model": str(tiny_vlm_dir.resolve()), "prompt": "Describe this image in detail."}


def test_only_the_language_models_projections_get_a_lora_and_the_export_loads_with_peft(tiny_vlm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    data = toy_folder(tmp_path / "toy")
    outputs = run_training(vlm_config(tiny_vlm_dir, data, tmp_path / "run", max_train_steps=4,
                                      save_merged_model=True), collect()[0])
    adapter = Path(outputs["adapter"])
    assert {p.name for p in adapter.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    from safetensors.torch import load_file

    keys = list(load_file(str(adapter / "adapter_model.safetensors")))
    assert keys and all(".language_model." in k for k in keys)
    assert any("q_proj" in k for k in keys) and any("down_proj" in k for k in keys)
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir), str(adapter))
    merged = AutoModelForImageTextToText.from_pretrained(outputs["merged"])
    ids = torch.tensor([[5, 4, 7, 8, 12, 26]])
    with torch.no_grad():
        a = loaded(input_ids=ids[:, 2:]).logits
        b = merged(input_ids=ids[:, 2:]).logits
        base = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir)(input_ids=ids[:, 2:]).logits
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, base, atol=1e-3)
    assert (Path(outputs["merged"]) / "processor_config.json").is_file() or \
        (Path(outputs["merged"]) / "preprocessor_config.json").is_file()


def test_stop_then_resume_gives_the_uninterrupted_runs_losses(each_tiny_vlm, tmp_path):
    tiny_vlm_dir = each_tiny_vlm
    data = toy_folder(tmp_path / "toy")
    run_training(vlm_config(tiny_vlm_dir, data, tmp_path / "straight", max_train_steps=4), collect()[0])
    ctx, _ = collect()
    ctx.listeners.append(lambda e: ctx.stop_flag.set() if isinstance(e, ProgressEvent) and e.step == 2 else None)
    run_training(vlm_config(tiny_vlm_dir, data, tmp_path / "broken", max_train_steps=4), ctx)
    resumed_ctx, resumed = collect()
    run_training(vlm_config(tiny_vlm_dir, data, tmp_path / "broken", max_train_steps=4, resume_from="latest"),
                 resumed_ctx)
    assert [e.step for e in resumed if isinstance(e, ProgressEvent)] == [3, 4]
    for a, b in zip(read_loss_csv(tmp_path / "straight"), read_loss_csv(tmp_path / "broken"), strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=1e-6), (a, b)


def test_my_captioner_captions_a_folder_with_the_trained_adapter(tiny_vlm_dir, tmp_path):
    from core.caption import CaptionOptions, caption_folder

    data = toy_folder(tmp_path / "toy")
    # Chat rows train the same captioner: image + caption, paths relative to the file.
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"image": f"toy/{name}", "caption": caption}) + "\n"
                            for name, (_, caption) in TOY.items()), encoding="utf-8")
    run_training(vlm_config(tiny_vlm_dir, rows, tmp_path / "run"), collect()[0])
    target = tmp_path / "to_caption"
    shutil.copytree(data, target)
    (target / "metadata.csv").unlink()
    result = caption_folder(CaptionOptions(input_dir=target, model=str(tmp_path / "run" / "adapter"),
                                           max_length=8), collect()[0])
    written = dict(csv.reader((target / "metadata.csv").open(encoding="utf-8")))
    expected = caption_with(str(tmp_path / "run"), data)
    assert result.total == 4 and all(written[name] == expected[name] for name in TOY)
    assert expected != caption_with(str(tiny_vlm_dir), data)
    from ui.caption_tab import captioner_choices  # the Caption tab offers it by name

    mine = [(label, value) for label, value in captioner_choices(tmp_path) if label.startswith("my captioner")]
    assert len(mine) == 1 and mine[0][0] == f"my captioner: run — your VLM LoRA on {tiny_vlm_dir.name}"
    assert Path(mine[0][1]).resolve() == (tmp_path / "run" / "adapter").resolve()


def test_vlm_data_and_settings_that_cannot_train_are_refused_in_one_sentence(tiny_vlm_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"image": "missing.png", "caption": "a cat"}) + "\n", encoding="utf-8")
    with pytest.raises(TextDataError, match=r"rows.jsonl:1: the image 'missing.png' does not exist"):
        run_training(vlm_config(tiny_vlm_dir, rows, tmp_path / "r"), collect()[0])
    with pytest.raises(ConfigError) as error:
        vlm_config(tiny_vlm_dir, tmp_path, tmp_path / "r", base_quantization="nf4")
    assert "unquantized" in error.value.errors["base_quantization"]
    assert config_from_dict(dict(task_type="text-generation", text_method="vlm", base_model="smolvlm-256m",
                                 train_data_dir=str(tmp_path))).base_model == "smolvlm-256m"
