"""A bf16 run loads the frozen model in bf16 (half the CPU memory of fp32: FLUX.1's transformer needed 48 GB of
RAM to load before), and a run that continues from a LoRA file keeps the file's values exactly: the LoRA
trains in fp32 on the bf16 base."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.config import TrainConfig

from tests.fixtures.tiny_sd import run_collect, two_step_config


@pytest.mark.parametrize(("precision", "expected"), [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_the_model_loads_in_the_dtype_it_will_train_in(precision, expected):
    from core.families.dit.common import load_dtype_and_quantization

    assert load_dtype_and_quantization(TrainConfig(mixed_precision=precision)) == (expected, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains in fp16 on a CUDA machine")
def test_fp16_without_a_gpu_loads_in_fp32_as_the_run_then_trains():
    from core.families.dit.common import load_dtype_and_quantization

    assert load_dtype_and_quantization(TrainConfig(mixed_precision="fp16"))[0] == torch.float32


def test_a_bf16_run_continuing_from_a_lora_keeps_the_files_values_in_fp32(tiny_zimage, two_images, tmp_path):
    from core.family_api.lookup import family_for_model

    outputs, _ = run_collect(two_step_config(tiny_zimage.folder, two_images, tmp_path / "first"))
    lora = Path(outputs["lora"])
    cfg = TrainConfig(**two_step_config(tiny_zimage.folder, two_images, tmp_path / "second", mixed_precision="bf16",
                                        init_lora=str(lora)))
    family = family_for_model(cfg.base_model)
    model = family.load(cfg)
    frozen = {p.dtype for n, p in model.transformer.named_parameters()}
    assert frozen == {torch.bfloat16}, "loaded in fp32 first: twice the CPU memory"

    family.add_lora(model, cfg, lora, lambda line: None)
    expected, _ = family.lora_files.to_peft(lora)
    state = {n: p for n, p in model.transformer.named_parameters() if "lora_" in n}
    assert {p.dtype for p in state.values()} == {torch.float32}
    for key, value in expected.items():
        name = next(n for n in state if n.replace(".default", "") == key)
        assert torch.equal(state[name].detach(), value.float()), f"{key} rounded on the way in"
