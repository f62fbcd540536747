"""Proof with the real client: llama.cpp itself (the llama-cpp-python package) runs the base GGUF
with our GGUF adapter, and the merged GGUF alone, and computes what the trained PEFT model computes.

llama-cpp-python ships no wheel on the package index: `python launch.py --test` builds it from its
source (a few minutes with cmake and g++). Where that build could not run, these tests say so and
skip; the adapter files themselves are checked against llama.cpp's converter in test_gguf_export.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.text.test_gguf_export import make_adapter

pytestmark = pytest.mark.slow

TOKENS = [1, 5, 9, 13, 2, 7, 21, 3]


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (python launch.py --test builds it from source with "
                    "cmake and g++)")
    return llama_cpp


def llama_cpp_logits(llama_cpp, model_path, lora_path=None) -> np.ndarray:
    """The logits llama.cpp computes at every position of TOKENS."""
    kwargs = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                          **kwargs)
    try:
        llm.eval(TOKENS)
        return np.array(llm.scores[:len(TOKENS)], dtype=np.float32)
    finally:
        llm.close()


def transformers_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([TOKENS])).logits[0].float().numpy()


def test_llama_cpp_runs_our_adapter_and_our_merged_model_as_the_trained_model_computes(
        llama_cpp, tiny_llm_dir, tiny_llm_gguf, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.export.gguf_adapter import write_gguf_adapter
    from core.export.gguf_model import export_merged_gguf

    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)), tmp_path / "adapter")
    base_hf = transformers_logits(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)))
    lora_hf = transformers_logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)),
                                                            str(adapter)))
    assert np.abs(lora_hf - base_hf).max() > 1e-2  # the adapter changes what the model computes

    # The base GGUF alone is the base model in llama.cpp too.
    base_cpp = llama_cpp_logits(llama_cpp, tiny_llm_gguf)
    np.testing.assert_allclose(base_cpp, base_hf, atol=2e-3, rtol=1e-3)

    # The base GGUF with our adapter (as `llama-cli -m base.gguf --lora ours.gguf` and Ollama's ADAPTER).
    gguf_adapter = write_gguf_adapter(adapter, tmp_path / "ours.lora.gguf", base=str(tiny_llm_gguf)).path
    with_adapter = llama_cpp_logits(llama_cpp, tiny_llm_gguf, gguf_adapter)
    np.testing.assert_allclose(with_adapter, lora_hf, atol=2e-3, rtol=1e-3)
    assert int(with_adapter[-1].argmax()) == int(lora_hf[-1].argmax())  # the same greedy next token

    # The merged model as one GGUF (f16), alone.
    merged = export_merged_gguf(str(tiny_llm_gguf), adapter, tmp_path / "merged.f16.gguf", out_type="f16").path
    alone = llama_cpp_logits(llama_cpp, merged)
    np.testing.assert_allclose(alone, lora_hf, atol=2e-2, rtol=1e-2)  # f16 weights
