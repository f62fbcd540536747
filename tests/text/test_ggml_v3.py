"""GGML v3 (ggjt v3) llama files as text base models: the reader, the weights and tokenizer in
transformers, a LoRA run on one, and plain messages for the GGML versions that do not load.

The files are written here from a tiny llama (tests/fixtures/ggml_v3_file.py) in each tensor type
llama.cpp's 2023 quantizer produced, so every number the loader returns can be checked against
the model the file came from.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.models import llm
from core.models.ggml_v3 import GGMLFormatError, dequantize, read_ggml
from tests.fixtures.ggml_v3_file import TYPES, sp_vocabulary, write_ggml_v3, write_header, write_record

QUANTIZED = ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
# Largest logit error allowed, relative to the largest logit. Each weight is off by at most half a
# quantization step of its 32-value block: 1/254 of the block's largest weight for q8_0, 1/30 to
# 1/62 for the 5-bit types and 1/14 to 1/30 for the 4-bit ones (rounding errors of 1 of 64-128
# products partly cancel, and three matmuls stack them). Measured: 1.1% (q8_0), 7.5-7.9% (q5), 17-19% (q4);
# the bounds leave ~2x room and stay tight enough that a misread block (wrong scale, nibble order
# or high bit) lands far outside them.
RELATIVE_BOUND = {"q8_0": 0.03, "q5_1": 0.15, "q5_0": 0.15, "q4_1": 0.3, "q4_0": 0.3}
IDS = torch.tensor([[1, 300, 305, 400, 420, 500, 12, 100, 259, 2]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def quantized_copy(model, qtype: str):
    """The model with every 2-D weight replaced by its `qtype` blocks dequantized: what the file should give."""
    import copy

    import gguf

    twin = copy.deepcopy(model)
    kind = gguf.GGMLQuantizationType(TYPES[qtype])
    with torch.no_grad():
        for param in twin.parameters():
            if param.ndim == 2:
                blocks = gguf.quants.quantize(param.numpy().astype(np.float32), kind)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, kind)))
    return twin


@pytest.fixture(scope="module")
def ggml_files(tiny_ggml_llama, tmp_path_factory):
    """One file per tensor type, written once for the module."""
    model, tokens, scores = tiny_ggml_llama
    folder = tmp_path_factory.mktemp("ggml_v3")
    return {q: write_ggml_v3(model, tokens, scores, folder / f"tiny-llama-2.ggmlv3.{q}.bin", q) for q in TYPES}


def test_the_reader_gives_the_hparams_vocabulary_and_tensor_table(tiny_ggml_llama, ggml_files):
    model, tokens, scores = tiny_ggml_llama
    ggml = read_ggml(ggml_files["q4_0"])
    hp = ggml.hparams
    assert (hp.n_vocab, hp.n_embd, hp.n_head, hp.n_layer, hp.n_rot, hp.ftype_name) == (len(tokens), 64, 4, 2, 16, "q4_0")
    assert ggml.tokens == tokens and ggml.scores == scores
    assert len(ggml.tensors) == 3 + 9 * 2
    assert ggml.tensors["layers.1.attention.wk.weight"].shape == (32, 64)  # 2 key/value heads of 16
    assert ggml.tensors["layers.0.feed_forward.w2.weight"].shape == (64, 128)
    assert ggml.type_counts() == {"q4_0": 16, "f32": 5}
    assert all(t.offset % 32 == 0 for t in ggml.tensors.values())


def test_the_memory_estimate_reads_the_shape_from_the_header(tiny_ggml_llama, ggml_files):
    from core.model_info import detect_model

    model, _, _ = tiny_ggml_llama
    info = detect_model(str(ggml_files["q4_0"]), "text-generation")
    assert info.params == sum(p.numel() for p in model.parameters())  # not the file size: q4_0 is ~1/7 of fp32
    assert (info.hidden_size, info.num_layers, info.intermediate_size, info.kv_dim) == (64, 2, 128, 32)
    assert "GGML v3 header" in info.source


def test_the_text_model_dropdown_lists_ggml_v3_files_and_not_other_bins(ggml_files, tmp_path):
    import shutil

    from ui.catalog import text_models

    folder = tmp_path / "models" / "llm"
    folder.mkdir(parents=True)
    shutil.copy(ggml_files["q4_0"], folder / "llama-2-7b-chat.ggmlv3.q4_0.bin")
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    (folder / "old.ggml.bin").write_bytes(b"tjgg" + struct.pack("<I", 1))
    assert [Path(p).name for p in text_models(tmp_path / "models")] == ["llama-2-7b-chat.ggmlv3.q4_0.bin"]


@pytest.mark.parametrize("qtype", ["f32", "f16"])
def test_float_files_give_the_original_logits(tiny_ggml_llama, ggml_files, qtype):
    model, _, _ = tiny_ggml_llama
    loaded, _, source = llm.load_llm(str(ggml_files[qtype]))
    assert source.ggml_v3 and source.display == str(ggml_files[qtype]) and not source.is_gguf
    assert loaded.config.num_key_value_heads == 2 and loaded.config.intermediate_size == 128
    # f32 is bit for bit; f16 rounds each weight by at most 2^-11 of itself.
    tolerance = 1e-5 if qtype == "f32" else 2e-3
    assert torch.allclose(logits(loaded), logits(model), atol=tolerance, rtol=0)


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_quantized_files_decode_every_block_and_stay_near_the_original(tiny_ggml_llama, ggml_files, qtype):
    model, _, _ = tiny_ggml_llama
    loaded, _, _ = llm.load_llm(str(ggml_files[qtype]))
    got = logits(loaded)
    # Exact: the file's blocks, decoded and put back in HF's row order, are the model's weights quantized.
    assert torch.allclose(got, logits(quantized_copy(model, qtype)), atol=1e-5, rtol=0)
    reference = logits(model)
    error = ((got - reference).abs().max() / reference.abs().max()).item()
    assert 0 < error < RELATIVE_BOUND[qtype], error


def test_more_bits_give_closer_logits(tiny_ggml_llama, ggml_files):
    model, _, _ = tiny_ggml_llama
    reference = logits(model)
    error = {q: (logits(llm.load_llm(str(ggml_files[q]), with_tokenizer=False)[0]) - reference).abs().max().item()
             for q in ("f16", "q8_0", "q5_0", "q4_0")}
    assert error["f16"] < error["q8_0"] < error["q5_0"] < error["q4_0"], error


def test_a_file_without_gqa_loads_with_as_many_key_value_heads_as_heads(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, scores = sp_vocabulary()
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                         rms_norm_eps=1e-5, tie_word_embeddings=False)).eval()
    path = write_ggml_v3(model, tokens, scores, tmp_path / "mha.ggmlv3.f32.bin")
    loaded, _, _ = llm.load_llm(str(path), with_tokenizer=False)
    assert loaded.config.num_key_value_heads == 4 and loaded.config.intermediate_size == 96
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5, rtol=0)


def test_the_tokenizer_round_trips_text_and_knows_the_llama_specials(ggml_files):
    _, tokenizer, _ = llm.load_llm(str(ggml_files["q8_0"]))
    text = "The Kestrel K7 flies for 47 minutes on a full battery.\nHello! Thank you, goodbye."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_ids_to_tokens(ids[1:4]) == ["\u2581The", "\u2581Kestrel", "\u2581K7"]
    # Characters outside the vocabulary fall back to their UTF-8 bytes and come back whole.
    accented = "Café déjà vu"
    assert tokenizer.decode(tokenizer(accented).input_ids, skip_special_tokens=True) == accented
    assert {"<0xC3>", "<0xA9>"} <= set(tokenizer.tokenize(accented))
    assert tokenizer("</s>", add_special_tokens=False).input_ids == [2]
    assert tokenizer.pad_token_id is not None


def test_the_load_line_names_the_type_and_dtype_and_the_weights_come_in_that_dtype(ggml_files):
    lines: list[str] = []
    model, _, _ = llm.load_llm(str(ggml_files["q4_1"]), dtype=torch.bfloat16, with_tokenizer=False, log=lines.append)
    assert lines[0].startswith("GGML v3 file, q4_1, dequantized to bfloat16 (5 f32, 16 q4_1 tensors; 2 layers")
    assert "2 key/value heads (GQA" in lines[0]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"


def test_a_lora_trains_on_a_ggml_v3_base_and_writes_the_adapter(ggml_files, qa_file, tmp_path):
    from core.config import config_from_dict
    from core.events import LogEvent, RunContext
    from core.train import run_training
    from tests.helpers import read_loss_csv

    base = ggml_files["q4_0"]
    out = tmp_path / "run"
    cfg = config_from_dict(dict(task_type="text-generation", base_model=str(base), train_data_dir=str(qa_file),
                                output_dir=str(out), batch_size=2, max_train_steps=3, learning_rate=5e-3,
                                lora_rank=4, lora_alpha=8, save_steps=0, seed=7, max_seq_length=64))
    events: list = []
    outputs = run_training(cfg, RunContext(listeners=[events.append]))
    adapter = out / "adapter"
    assert Path(outputs["adapter"]) == adapter
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    rows = read_loss_csv(out)
    assert [r.step for r in rows] == [1, 2, 3] and all(np.isfinite(r.loss) for r in rows)
    logged = [e.message for e in events if isinstance(e, LogEvent)]
    assert any(m.startswith("GGML v3 file, q4_0, dequantized to float32") for m in logged), logged


@pytest.mark.parametrize(("magic", "version", "named"), [(b"tjgg", 1, "ggjt v1"), (b"tjgg", 2, "ggjt v2"),
                                                         (b"fmgg", 1, "ggmf v1"), (b"lmgg", 0, "(ggml)")])
def test_older_ggml_versions_say_which_they_are_and_how_to_convert(tmp_path, magic, version, named):
    from core.config import ConfigError, config_from_dict

    old = tmp_path / "llama-7b.ggml.q4_0.bin"
    old.write_bytes(magic + struct.pack("<I", version) + b"\0" * 64)
    with pytest.raises(llm.ModelLoadError) as caught:
        llm.load_llm(str(old))
    assert named in str(caught.value) and "Only GGML v3" in str(caught.value)
    assert "convert_llama_ggml_to_gguf.py" in caught.value.advice
    with pytest.raises(ConfigError, match="not GGML v3"):
        config_from_dict(dict(task_type="text-generation", base_model=str(old), train_data_dir=str(tmp_path),
                              output_dir=str(tmp_path / "out")))


def test_a_bin_that_is_not_ggml_is_refused_plainly(tmp_path):
    pickled = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(llm.ModelLoadError, match="not a GGUF file"):
        llm.load_llm(str(pickled))
    named = tmp_path / "llama-2-7b-chat.ggmlv3.q4_0.bin"
    named.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(llm.ModelLoadError, match="named like an old GGML file but is not one"):
        llm.load_llm(str(named))


def test_a_truncated_file_says_so(ggml_files, tmp_path):
    cut = tmp_path / "cut.ggmlv3.q8_0.bin"
    cut.write_bytes(ggml_files["q8_0"].read_bytes()[:-100])
    with pytest.raises(llm.ModelLoadError, match="truncated") as caught:
        llm.load_llm(str(cut))
    assert "Download the file again" in caught.value.advice


def test_k_quant_blocks_are_sized_and_decoded_as_gguf_does(tmp_path):
    """k-quants (q2_K..q6_K) came with ggjt v3 and kept their layout in GGUF: a q6_K tensor is read
    with the right size, so the tensor after it comes out exact."""
    import gguf

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(2, 210), dtype=np.uint8)  # 2 rows of one 256-value q6_K block
    blocks[:, -2:] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # the block scale d, fp16, last
    after = rng.standard_normal((3, 8)).astype(np.float32)
    path = tmp_path / "k.ggmlv3.q6_K.bin"
    with open(path, "wb") as handle:
        write_header(handle, (1, 8, 256, 1, 0, 8, 18), [b"a"], [0.0])
        write_record(handle, "k.weight", 14, (2, 256), blocks.tobytes())
        write_record(handle, "after.weight", 0, after.shape, after.tobytes())
    ggml = read_ggml(path)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q6_K)
    assert np.array_equal(dequantize(ggml, ggml.tensors["k.weight"]), expected)
    assert np.array_equal(dequantize(ggml, ggml.tensors["after.weight"]), after)
    assert ggml.hparams.ftype_name == "q6_K"


def test_a_tensor_type_ggml_v3_never_held_is_named(tmp_path):
    path = tmp_path / "odd.ggmlv3.bin"
    with open(path, "wb") as handle:
        write_header(handle, (1, 8, 256, 1, 0, 8, 0), [b"a"], [0.0])
        write_record(handle, "w", 4, (1, 32), b"\0" * 20)  # 4 was q4_2, removed before v3
    with pytest.raises(GGMLFormatError, match="type 4"):
        read_ggml(path)


# llama.cpp's GGML -> GGUF converter, run as it is, except that it hands gguf-py element shapes
# where today's gguf-py wants byte shapes for raw tensors (a bug of the legacy converter, which
# llama.cpp no longer maintains); this shim passes the shape as gguf-py expects.
_CONVERTER_SHIM = """
import runpy, sys
folder = sys.argv[1]
sys.path.insert(0, folder + "/gguf-py")
import gguf
original = gguf.GGUFWriter.add_tensor
def add_tensor(self, name, tensor, raw_shape=None, raw_dtype=None, **kwargs):
    if raw_shape is not None and raw_dtype is not None:
        raw_shape = gguf.quant_shape_to_byte_shape(raw_shape, raw_dtype)
    return original(self, name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, **kwargs)
gguf.GGUFWriter.add_tensor = add_tensor
sys.argv = [folder + "/convert_llama_ggml_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
def test_the_load_equals_llama_cpps_own_ggml_to_gguf_conversion(ggml_files, tmp_path, qtype):
    """llama.cpp reads the same file independently; transformers then loads its GGUF with its own
    q/k un-permutation and SentencePiece tokenizer. Both must agree with ours exactly."""
    from core.export import llama_cpp

    folder = llama_cpp.find_llama_cpp()
    if folder is None or not (folder / "convert_llama_ggml_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's converters are not in {llama_cpp.CACHE}; get them with `{llama_cpp.INSTALL_HINT}`")
    shim = tmp_path / "convert.py"
    shim.write_text(_CONVERTER_SHIM, encoding="utf-8")
    converted = tmp_path / f"tiny.{qtype}.gguf"
    result = subprocess.run([sys.executable, str(shim), str(folder), "--input", str(ggml_files[qtype]), "--output",
                             str(converted), "--gqa", "2", "--eps", "1e-5"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ours, our_tokenizer, _ = llm.load_llm(str(ggml_files[qtype]))
    theirs, their_tokenizer, _ = llm.load_llm(str(converted))
    assert torch.equal(logits(ours), logits(theirs))
    for text in ["The Kestrel K7 flies for 47 minutes.", "Hello! Café déjà vu\n  two  spaces", "<s>[INST] hi [/INST]"]:
        assert our_tokenizer(text).input_ids == their_tokenizer(text).input_ids, text
