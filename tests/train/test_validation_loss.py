"""A validation loss you can trust: the same noise and noise levels at every measurement, so a run that
learns shows it going down, where the raw training loss is mostly the luck of the drawn noise level."""
from __future__ import annotations

import pytest

from tests.fixtures.tiny_sd import make_image_folder, run_collect, tiny_run_config
from tests.helpers import read_loss_csv


def _colour_set(folder, captions):
    """Four flat colours, each with its own caption (metadata.csv)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 40)]
    rows = ["filename,prompt"]
    for i, (colour, caption) in enumerate(zip(colours, captions)):
        Image.fromarray(np.full((64, 64, 3), colour, dtype=np.uint8)).save(folder / f"c{i}.png")
        rows.append(f"c{i}.png,{caption}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def _run(model, data, out, **overrides):
    raw = tiny_run_config(model, data, out, batch_size=2, max_train_steps=40, learning_rate=5e-3,
                          validation_steps=10, **overrides)
    outputs, events = run_collect(raw)
    return read_loss_csv(out), events


def test_the_validation_loss_of_a_run_that_learns_goes_down_and_reaches_the_plot(tiny_sd1, tmp_path):
    data = _colour_set(tmp_path / "data", ["a red photo", "a green photo", "a blue photo", "a yellow photo"])
    rows, events = _run(tiny_sd1.folder, data, tmp_path / "out")
    measured = [(r.step, r.val_loss) for r in rows if r.val_loss is not None]
    assert [step for step, _ in measured] == [10, 20, 30, 40]
    print("validation loss by step:", measured)
    assert measured[-1][1] < measured[0][1], measured
    # Every validation also travels with its progress event, for the live plot.
    assert [e.step for e in events if e.kind == "progress" and e.validation_loss is not None] == [10, 20, 30, 40]


def test_training_on_shuffled_captions_is_not_better_than_on_the_real_ones(tiny_sd1, tmp_path):
    real = _colour_set(tmp_path / "real", ["a red photo", "a green photo", "a blue photo", "a yellow photo"])
    shuffled = _colour_set(tmp_path / "shuffled", ["a blue photo", "a yellow photo", "a red photo", "a green photo"])
    real_rows, _ = _run(tiny_sd1.folder, real, tmp_path / "out-real")
    control_rows, _ = _run(tiny_sd1.folder, shuffled, tmp_path / "out-shuffled")
    real_last = [r.val_loss for r in real_rows if r.val_loss is not None][-1]
    control_last = [r.val_loss for r in control_rows if r.val_loss is not None][-1]
    print(f"validation loss after 40 steps: real captions {real_last:.4f}, shuffled {control_last:.4f}")
    assert control_last >= real_last * 0.98, (real_last, control_last)


def test_without_validation_steps_an_image_run_measures_none(tiny_sd1, tmp_path):
    data = make_image_folder(tmp_path / "data", count=2)
    outputs, events = run_collect(tiny_run_config(tiny_sd1.folder, data, tmp_path / "out", max_train_steps=2))
    assert all(r.val_loss is None for r in read_loss_csv(tmp_path / "out"))


@pytest.mark.parametrize("steps", [3])
def test_a_text_run_with_validation_steps_measures_its_validation_split_every_n_steps(tiny_llm_dir, qa_file,
                                                                                      tmp_path, steps):
    from core.config import config_from_dict
    from core.events import RunContext
    from core.train import run_training

    out = tmp_path / "text"
    cfg = config_from_dict(dict(task_type="text-generation", base_model=str(tiny_llm_dir), train_data_dir=str(qa_file),
                                output_dir=str(out), max_train_steps=9, validation_steps=steps, validation_split=0.25,
                                learning_rate=2e-3, batch_size=2, lora_rank=4, seed=1, save_steps=0,
                                mixed_precision="no"))
    run_training(cfg, RunContext())
    measured = [r for r in read_loss_csv(out) if r.val_loss is not None]
    assert [r.step for r in measured] == [3, 6, 9]
    assert measured[-1].val_loss < measured[0].val_loss
