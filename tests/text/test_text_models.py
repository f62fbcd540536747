"""Loading text base models: HF folders, GGUF files (alone or named inside a folder),
and clear refusals for old GGML files and pickled weights."""
from __future__ import annotations

import shutil

import pytest
import torch

from core.models import llm


def test_a_gguf_file_loads_to_the_same_model_as_its_hf_folder(tiny_llm_dir, tiny_llm_gguf):
    folder_model, folder_tok, _ = llm.load_llm(str(tiny_llm_dir))
    gguf_model, gguf_tok, source = llm.load_llm(str(tiny_llm_gguf))
    assert source.is_gguf and source.gguf_file == tiny_llm_gguf.name
    ids = folder_tok("The Kestrel K7 flies for 47 minutes.", return_tensors="pt").input_ids
    assert gguf_tok("The Kestrel K7 flies for 47 minutes.", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.allclose(folder_model(ids).logits, gguf_model(ids).logits, atol=1e-5)
    # Dequantized: a plain model that saves and trains like any other.
    assert getattr(gguf_model, "hf_quantizer", None) is None
    assert gguf_tok.chat_template and gguf_tok.pad_token_id is not None


def test_a_folder_plus_gguf_file_name_and_a_folder_with_one_gguf_both_resolve(tiny_llm_gguf):
    named = llm.resolve_source(str(tiny_llm_gguf.parent), tiny_llm_gguf.name)
    alone = llm.resolve_source(str(tiny_llm_gguf.parent))
    assert named.gguf_file == alone.gguf_file == tiny_llm_gguf.name


def test_a_gguf_file_name_missing_from_the_folder_is_named(tiny_llm_gguf):
    with pytest.raises(llm.ModelLoadError, match="gguf_file 'other.gguf' is not inside"):
        llm.resolve_source(str(tiny_llm_gguf.parent), "other.gguf")


def test_an_old_ggml_file_gets_a_message_about_gguf_and_converting_not_a_stack_trace(tmp_path):
    old = tmp_path / "llama-2-7b-chat.ggmlv3.q4_0.bin"
    old.write_bytes(b"tjgg" + b"\0" * 64)
    with pytest.raises(llm.ModelLoadError) as caught:
        llm.load_llm(str(old))
    assert "GGML was replaced by GGUF" in str(caught.value)
    assert "convert_llama_ggml_to_gguf.py" in caught.value.advice


def test_a_folder_with_only_pickled_weights_needs_allow_pickle(tiny_llm_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llm_dir, folder)
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(llm.ModelLoadError, match="only has pickled weights"):
        llm.load_llm(str(folder))
    model, _, _ = llm.load_llm(str(folder), allow_pickle=True)
    assert model.config.num_hidden_layers == 2


def test_a_single_file_that_is_not_gguf_is_refused_with_what_a_text_model_can_be(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\0" * 16)
    with pytest.raises(llm.ModelLoadError, match="not a GGUF file"):
        llm.resolve_source(str(file))


def test_an_empty_base_model_means_the_bundled_smollm2(smollm2_gguf):
    source = llm.resolve_source("")
    assert source.is_gguf and source.display == str(smollm2_gguf)


def test_the_default_model_is_found_in_models_llm_and_its_absence_says_to_run_launch_py(monkeypatch, tmp_path):
    from core.models import llm

    monkeypatch.setattr(llm, "_PROJECT", tmp_path)
    monkeypatch.setattr(llm, "DEFAULT_GGUF_PACKAGE", "no_such_package_for_this_test")
    monkeypatch.delenv("LORA_SCRIPTS_WORKDIR", raising=False)
    with pytest.raises(llm.ModelLoadError, match="not in .*models/llm") as caught:
        llm.default_text_model()
    assert "python launch.py" in caught.value.advice
    gguf = tmp_path / "models" / "llm" / llm.DEFAULT_GGUF_NAME
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    assert llm.default_text_model() == str(gguf)
