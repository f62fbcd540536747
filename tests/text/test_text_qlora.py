"""base_quantization: nf4 for text runs (QLoRA). The 4-bit load itself needs CUDA and bitsandbytes,
which this machine has not: here the refusals, said before anything loads, and the load arguments."""
from __future__ import annotations

import pytest
import torch

from core.events import RunContext
from core.models import llm_quant
from core.presets import resolve_config
from core.train import run_training


def nf4_config(model: str, data, out, **extra):
    return resolve_config(dict(task_type="text-generation", base_model=model, train_data_dir=str(data),
                               output_dir=str(out), base_quantization="nf4", batch_size=1, max_train_steps=1,
                               mixed_precision="no", **extra))


@pytest.fixture
def no_model_load(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.skipif(llm_quant.nf4_available(), reason="this machine can load 4-bit models")
def test_nf4_on_a_machine_without_cuda_and_bitsandbytes_says_so_before_loading(
        tiny_llm_dir, qa_file, tmp_path, no_model_load):
    with pytest.raises(ValueError) as caught:
        run_training(nf4_config(str(tiny_llm_dir), qa_file, tmp_path / "out"), RunContext())
    assert str(caught.value) == ("4-bit (QLoRA) needs an NVIDIA GPU with bitsandbytes; "
                                 "use base_quantization: none on this machine.")


def test_nf4_refuses_a_gguf_base_it_would_quantize_twice(tiny_llm_gguf, qa_file, tmp_path, monkeypatch,
                                                          no_model_load):
    monkeypatch.setattr(llm_quant, "nf4_available", lambda: True)
    with pytest.raises(ValueError, match="GGUF / GGML file is already quantized"):
        run_training(nf4_config(str(tiny_llm_gguf), qa_file, tmp_path / "out"), RunContext())


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                  ("no", torch.float32)])
def test_nf4_loads_4_bit_nf4_on_this_process_gpu_computing_in_the_run_precision(precision, dtype):
    kwargs = llm_quant.nf4_load_kwargs(precision, torch.device("cuda", 1))
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == dtype
    assert kwargs["device_map"] == {"": 1}  # the whole model on the GPU of this process (rank 1 here)
