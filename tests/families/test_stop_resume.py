"""Every family: a run stopped after step 2 and resumed from its checkpoint logs the same losses and learning
rates as the uninterrupted run and writes the same LoRA (data order, caption dropout, noise, optimizer and
scheduler state all come back). It trains from ComfyUI's single file where the family has one (the folder
path is the one test_trained_files takes)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.families.table import FAMILIES, TinyFamily
from tests.fixtures.tiny_sd import run_collect, tiny_run_config
from tests.helpers import read_loss_csv


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_stop_and_resume_equal_the_uninterrupted_run(family: TinyFamily, built, tmp_path):
    from core.families.tiny_parts import make_image_folder
    from core.tools.convert import read_lora

    tiny = built(family)
    data = make_image_folder(tmp_path / "data", count=2)
    model = tiny.single_file or tiny.folder
    extra = {"base_model_config": str(tiny.single_config)} if tiny.single_file and tiny.single_config else {}

    def config(out: Path, **more) -> dict:
        return tiny_run_config(model, data, out, batch_size=1, max_train_steps=4, save_steps=2, lr_scheduler="cosine",
                               lr_warmup_steps=1, caption_dropout=0.3, **extra, **more)

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    first, _ = run_collect(config(straight))
    _, events = run_collect(config(stopped), stop_at=2)
    assert [e for e in events if e.kind == "done"][0].stopped
    second, resumed = run_collect(config(stopped, resume_from="latest"))
    assert [e.step for e in resumed if e.kind == "progress"] == [3, 4]
    a, b = read_loss_csv(straight), read_loss_csv(stopped)
    assert [r.step for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a, b):
        assert row_a.lr == pytest.approx(row_b.lr, rel=1e-6), f"step {row_a.step}"
        assert row_a.loss == pytest.approx(row_b.loss, rel=1e-5), f"step {row_a.step}"
    x, y = read_lora(first["lora"], family=family.name), read_lora(second["lora"], family=family.name)
    assert x.modules.keys() == y.modules.keys()
    for key, module in x.modules.items():
        torch.testing.assert_close(y.modules[key].delta(), module.delta(), atol=1e-6, rtol=1e-5, msg=key)
