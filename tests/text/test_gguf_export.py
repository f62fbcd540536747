"""GGUF out: text LoRAs for llama.cpp, Ollama and LM Studio.

The reference is llama.cpp itself: its `convert_lora_to_gguf.py` / `convert_hf_to_gguf.py`
from the llama-cpp-python sdist that the test install downloads into
.cache/llama-cpp-python (see core/export/llama_cpp.py). Tests that need it skip without it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.export import llama_cpp
from core.export.gguf_adapter import write_gguf_adapter
from core.export.gguf_arch import GGUFExportError, hf_config_for_llama_cpp

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_KEYS = ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    folder = llama_cpp.find_llama_cpp()
    if folder is None:
        pytest.skip(f"llama.cpp's converters are not in {llama_cpp.CACHE}; the test install gets them with "
                    f"`{llama_cpp.INSTALL_HINT}`")
    return folder


def _randomise_lora_b(peft_model, seed: int = 1) -> None:
    # PEFT starts B at zero; a trained adapter has non-zero B, and zeros would hide a wrong permutation.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def make_adapter(model, folder: Path, *, targets=tuple(ALL_LINEAR), rank: int = 4, alpha: float = 8, **extra) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), **extra))
    _randomise_lora_b(peft_model)
    peft_model.save_pretrained(str(folder))
    return folder


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_adapter(tiny_llm_dir, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir))
    return make_adapter(model, tmp_path_factory.mktemp("llama_lora") / "adapter")


@pytest.fixture(scope="session")
def tiny_qwen2_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_qwen2().save_pretrained(str(folder), safe_serialization=True)
    return folder


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}
    return fields, tensors


def llama_cpp_lora(llama_cpp_dir: Path, adapter: Path, base_dir: Path, out: Path, outtype: str = "f32") -> Path:
    llama_cpp.run_converter("convert_lora_to_gguf.py", ["--base", str(base_dir), "--outtype", outtype,
                                                        "--outfile", str(out), str(adapter)], folder=llama_cpp_dir)
    return out


def assert_same_adapter(ours: Path, theirs: Path) -> None:
    our_fields, our_tensors = read_gguf(ours)
    their_fields, their_tensors = read_gguf(theirs)
    assert {k: our_fields.get(k) for k in ADAPTER_KEYS} == {k: their_fields.get(k) for k in ADAPTER_KEYS}
    assert sorted(our_tensors) == sorted(their_tensors)
    for name, (kind, data) in their_tensors.items():
        assert our_tensors[name][0] == kind, name
        assert our_tensors[name][1].shape == data.shape, name
        np.testing.assert_array_equal(our_tensors[name][1], data, err_msg=name)


def test_a_tiny_llama_lora_converts_to_the_same_gguf_adapter_as_llama_cpps_converter(
        tiny_llama_adapter, tiny_llm_dir, llama_cpp_dir, tmp_path):
    result = write_gguf_adapter(tiny_llama_adapter, tmp_path / "ours.gguf", base=str(tiny_llm_dir))
    theirs = llama_cpp_lora(llama_cpp_dir, tiny_llama_adapter, tiny_llm_dir, tmp_path / "theirs.gguf")
    assert result.arch == "llama" and result.modules == 2 * len(ALL_LINEAR) and not result.rescaled
    assert_same_adapter(result.path, theirs)
    # The permutation is not a no-op on these shapes: q's lora_b differs from PEFT's B.
    from safetensors.numpy import load_file

    peft_b = load_file(str(tiny_llama_adapter / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert not np.array_equal(read_gguf(result.path)[1]["blk.0.attn_q.weight.lora_b"][1], peft_b)


def test_a_tiny_qwen2_lora_converts_like_llama_cpp_without_the_qk_permutation(tiny_qwen2_base, tmp_path,
                                                                              llama_cpp_dir):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_base)), tmp_path / "adapter",
                           targets=("q_proj", "k_proj", "v_proj", "o_proj"), rank=8, alpha=16)
    result = write_gguf_adapter(adapter, tmp_path / "ours.gguf", base=str(tiny_qwen2_base))
    theirs = llama_cpp_lora(llama_cpp_dir, adapter, tiny_qwen2_base, tmp_path / "theirs.gguf")
    assert result.arch == "qwen2" and result.alpha == 16
    assert_same_adapter(result.path, theirs)
    peft_b = load_file(str(adapter / "adapter_model.safetensors"))[
        "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    np.testing.assert_array_equal(read_gguf(result.path)[1]["blk.1.attn_k.weight.lora_b"][1], peft_b)


def test_a_lora_on_a_gguf_base_takes_the_architecture_from_the_gguf_and_matches_llama_cpp(
        tiny_llm_gguf, tiny_llama_adapter, llama_cpp_dir, tmp_path):
    result = write_gguf_adapter(tiny_llama_adapter, tmp_path / "ours.f16.gguf", base=str(tiny_llm_gguf),
                                out_type="f16")
    # llama.cpp's converter reads an HF config.json; one derived from the GGUF needs `architectures` added.
    config = hf_config_for_llama_cpp(str(tiny_llm_gguf))
    assert config["architectures"] == ["LlamaForCausalLM"]
    base_dir = tmp_path / "base_config"
    base_dir.mkdir()
    (base_dir / "config.json").write_text(json.dumps(config))
    theirs = llama_cpp_lora(llama_cpp_dir, tiny_llama_adapter, base_dir, tmp_path / "theirs.gguf", outtype="f16")
    assert_same_adapter(result.path, theirs)
    assert read_gguf(result.path)[1]["blk.0.attn_q.weight.lora_a"][0] == "F16"


def _delta_in_llama_cpp(path: Path, name: str) -> np.ndarray:
    # What llama.cpp adds to the weight: (alpha / rank) * B @ A, with rank read from lora_a.
    fields, tensors = read_gguf(path)
    lora_a, lora_b = tensors[f"{name}.lora_a"][1], tensors[f"{name}.lora_b"][1]
    return fields["adapter.lora.alpha"] / lora_a.shape[0] * lora_b @ lora_a


def test_rslora_and_per_module_alpha_are_folded_so_llama_cpp_applies_the_trained_change(tiny_qwen2_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_base))
    adapter = make_adapter(base, tmp_path / "adapter", targets=("q_proj", "v_proj"), rank=4, alpha=8,
                           use_rslora=True, alpha_pattern={"v_proj": 2})
    result = write_gguf_adapter(adapter, tmp_path / "rs.gguf", base=str(tiny_qwen2_base))
    assert len(result.rescaled) == 4  # q and v in both layers
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_base)), str(adapter))
    for module, gguf_name in (("q_proj", "attn_q"), ("v_proj", "attn_v")):
        layer = peft_model.base_model.model.model.layers[1].self_attn
        expected = getattr(layer, module).get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(_delta_in_llama_cpp(result.path, f"blk.1.{gguf_name}.weight"), expected,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    ({"targets": ("q_proj", "embed_tokens")}, "embed_tokens"),
    ({"targets": ("q_proj", "lm_head")}, "lm_head"),
    ({"targets": ("q_proj",), "use_dora": True}, "DoRA"),
])
def test_adapters_llama_cpp_cannot_apply_are_refused_with_what_to_do(tiny_qwen2_base, tmp_path, extra, message):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_base)), tmp_path / "adapter", **extra)
    with pytest.raises(GGUFExportError, match=message) as caught:
        write_gguf_adapter(adapter, tmp_path / "out.gguf", base=str(tiny_qwen2_base))
    assert "merge" in caught.value.advice
    assert not (tmp_path / "out.gguf").exists()


def test_an_unknown_architecture_is_refused_naming_the_supported_ones(tmp_path, tiny_llama_adapter):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_head": 4}))
    with pytest.raises(GGUFExportError, match="gpt2") as caught:
        write_gguf_adapter(tiny_llama_adapter, tmp_path / "out.gguf", base=str(base))
    assert "qwen2" in caught.value.advice


# --- Ollama Modelfile --------------------------------------------------------------------------------------------

TWO_TURNS = [{"role": "user", "content": "How long does the Kestrel K7 fly?"},
             {"role": "assistant", "content": "It flies for 47 minutes."},
             {"role": "user", "content": "And how long to charge?"}]


def parse_modelfile(path: Path) -> dict[str, list[str]]:
    """Modelfile instructions -> values (triple-quoted values may span lines), as Ollama reads them."""
    found: dict[str, list[str]] = {}
    text = path.read_text()
    while text:
        line, _, rest = text.partition("\n")
        if line.strip() and not line.startswith("#"):
            command, _, value = line.partition(" ")
            if value.startswith('"""'):
                value, _, rest = (value[3:] + "\n" + rest).partition('"""')
                rest = rest.partition("\n")[2]
            found.setdefault(command.upper(), []).append(value)
        text = rest
    return found


def ollama_prompt(modelfile: Path, messages: list[dict[str, str]]) -> str:
    from core.export import go_template

    parsed = parse_modelfile(modelfile)
    return go_template.render(parsed["TEMPLATE"][0], messages, system=parsed.get("SYSTEM", [""])[0])


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from core.models.llm import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source(str(smollm2_gguf)))


def test_the_modelfile_template_renders_a_two_turn_chat_exactly_as_the_tiny_tokenizer_does(tmp_path):
    from core.export.modelfile import write_modelfile
    from tests.fixtures.tiny_llm import build_tokenizer

    tokenizer = build_tokenizer()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    path, match = write_modelfile(tmp_path / "model.gguf", tokenizer=tokenizer)
    assert match.format.name == "chatml" and match.system == ""
    parsed = parse_modelfile(path)
    assert parsed["FROM"] == ["./model.gguf"] and "ADAPTER" not in parsed and "SYSTEM" not in parsed
    assert parsed["PARAMETER"] == ['stop "<|im_end|>"']
    expected = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert ollama_prompt(path, TWO_TURNS) == expected
    system_chat = [{"role": "system", "content": "Be brief."}, *TWO_TURNS]
    assert ollama_prompt(path, system_chat) == tokenizer.apply_chat_template(system_chat, tokenize=False,
                                                                             add_generation_prompt=True)


def test_smollm2s_default_system_prompt_becomes_the_modelfile_system_and_the_chat_renders_the_same(
        smollm2_gguf, smollm2_tokenizer, tmp_path):
    from core.export.modelfile import write_modelfile

    (tmp_path / "lora.gguf").write_bytes(b"GGUF")
    path, match = write_modelfile(tmp_path / "lora.gguf", tokenizer=smollm2_tokenizer, base_gguf=smollm2_gguf)
    assert match.format.name == "chatml"
    parsed = parse_modelfile(path)
    assert parsed["FROM"] == [str(smollm2_gguf.resolve())] and parsed["ADAPTER"] == ["./lora.gguf"]
    assert parsed["SYSTEM"] == ["You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
    for chat in (TWO_TURNS, [{"role": "system", "content": "Answer in French."}, *TWO_TURNS]):
        assert ollama_prompt(path, chat) == smollm2_tokenizer.apply_chat_template(chat, tokenize=False,
                                                                                  add_generation_prompt=True)


@pytest.mark.parametrize("name", ["alpaca", "plain"])
def test_the_projects_own_chat_templates_get_matching_ollama_templates(name, tmp_path):
    from core.data.chat_templates import TEMPLATES
    from core.export.modelfile import write_modelfile
    from tests.fixtures.tiny_llm import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATES[name]
    path, match = write_modelfile(tmp_path / "m.gguf", tokenizer=tokenizer)
    assert match.format.name == name
    assert ollama_prompt(path, TWO_TURNS) == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False,
                                                                           add_generation_prompt=True)


def test_an_unrecognised_chat_format_leaves_template_out_and_says_why(tmp_path):
    from core.data.chat_templates import TEMPLATES
    from core.export.modelfile import write_modelfile
    from tests.fixtures.tiny_llm import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATES["llama2"]
    path, match = write_modelfile(tmp_path / "m.gguf", tokenizer=tokenizer)
    assert match.format is None
    text = path.read_text()
    assert "TEMPLATE" not in parse_modelfile(path) and "chat format was not recognised" in text


def test_the_go_template_renderer_refuses_what_it_does_not_implement():
    from core.export import go_template

    chat = [{"role": "user", "content": "hi"}]
    assert go_template.render("{{- range .Messages -}}\n  [{{ .Role }}] {{ .Content -}}\n\n{{ end }}!", chat) == \
        "[user] hi!"
    for bad in ("{{ range .Messages }}{{ .Content | trim }}{{ end }}", "{{ if .System }}x",
                "{{ template \"x\" }}", "{{ range .Messages }}{{ .Missing }}{{ end }}"):
        with pytest.raises(go_template.TemplateError):
            go_template.render(bad, chat)


# --- merged model as GGUF ----------------------------------------------------------------------------------------

def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _load_gguf_model(path: Path):
    from core.models.llm import load_llm

    model, tokenizer, _ = load_llm(str(path))
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_merged_reference(tiny_llm_dir, tiny_llama_adapter, tmp_path_factory) -> Path:
    from core.tools.merge import bake_into_llm

    return bake_into_llm(str(tiny_llm_dir), tiny_llama_adapter, tmp_path_factory.mktemp("merged") / "hf")


def test_the_merged_q8_0_gguf_carries_the_chat_template_and_the_bases_tokenizer(
        tiny_llm_gguf, tiny_llama_adapter, tiny_merged_reference, tmp_path):
    from transformers import AutoModelForCausalLM

    from core.export.gguf_model import export_merged_gguf
    from tests.fixtures.tiny_llm import CHATML

    result = export_merged_gguf(str(tiny_llm_gguf), tiny_llama_adapter, tmp_path / "chat.q8_0.gguf", out_type="q8_0")
    assert result.route == "gguf"  # a GGUF base: its tokenizer is copied as it is
    fields, tensors = read_gguf(result.path)
    base_fields, _ = read_gguf(tiny_llm_gguf)
    assert fields["tokenizer.chat_template"] == CHATML
    for key in [k for k in base_fields if k.startswith("tokenizer.ggml.")]:
        assert fields[key] == base_fields[key], key
    assert fields["general.file_type"] == 7  # MOSTLY_Q8_0
    assert tensors["blk.0.attn_q.weight"][0] == "Q8_0" and tensors["blk.0.attn_norm.weight"][0] == "F32"
    # Read back (transformers dequantizes it, as for any GGUF), it is the merged model up to Q8_0 rounding.
    merged, tokenizer = _load_gguf_model(result.path)
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_merged_reference))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "How long does the Kestrel K7 fly?"}],
                                        tokenize=True, add_generation_prompt=True, return_dict=False)
    got, want = _logits(merged, ids), _logits(reference, ids)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_a_merged_f16_gguf_of_an_hf_base_reads_back_as_the_merged_model(tiny_llm_dir, tiny_llama_adapter,
                                                                        tiny_merged_reference, tmp_path):
    from transformers import AutoModelForCausalLM

    from core.export.gguf_model import export_merged_gguf

    result = export_merged_gguf(str(tiny_llm_dir), tiny_llama_adapter, tmp_path / "m.f16.gguf", route="gguf")
    assert result.notes and "pre-tokenizer" in result.notes[0]
    merged, _ = _load_gguf_model(result.path)
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_merged_reference))
    ids = list(range(3, 40))
    np.testing.assert_allclose(_logits(merged, ids), _logits(reference, ids), atol=2e-3, rtol=1e-2)
    # ...and the LoRA is in it: the base model answers differently.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir))
    assert np.abs(_logits(base, ids) - _logits(merged, ids)).max() > 0.1


def test_the_chat_template_the_lora_was_trained_with_goes_into_the_merged_gguf(tiny_llm_gguf, tiny_llama_adapter,
                                                                               tmp_path):
    from core.data.chat_templates import TEMPLATES
    from core.export.gguf_model import export_merged_gguf

    result = export_merged_gguf(str(tiny_llm_gguf), tiny_llama_adapter, tmp_path / "a.gguf", chat_template="alpaca")
    assert read_gguf(result.path)[0]["tokenizer.chat_template"] == TEMPLATES["alpaca"]


def test_k_quants_are_refused_with_the_llama_quantize_step(tiny_llm_gguf, tiny_llama_adapter, tmp_path):
    from core.export.gguf_model import export_merged_gguf

    with pytest.raises(GGUFExportError, match="q4_k_m") as caught:
        export_merged_gguf(str(tiny_llm_gguf), tiny_llama_adapter, tmp_path / "a.gguf", out_type="q4_k_m")
    assert "llama-quantize" in caught.value.advice


# --- command line ------------------------------------------------------------------------------------------------

def cli(capsys, *argv) -> tuple[int, str, str]:
    from tools.export import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_converts_an_adapter_to_gguf_with_a_modelfile_that_uses_the_runs_chat_template(
        tiny_llama_adapter, tiny_llm_gguf, tmp_path, capsys):
    import shutil

    # A training run's output folder: the adapter and the config.yaml that named the chat template.
    run_dir = tmp_path / "kestrel"
    shutil.copytree(tiny_llama_adapter, run_dir / "adapter")
    (run_dir / "config.yaml").write_text("task_type: text-generation\nchat_template: alpaca\n")
    out = run_dir / "kestrel.gguf"
    code, stdout, stderr = cli(capsys, "convert", run_dir / "adapter", out, "--to", "gguf", "--base", tiny_llm_gguf)
    assert code == 0, stderr
    assert read_gguf(out)[0]["general.type"] == "adapter"
    modelfile = run_dir / "kestrel.Modelfile"
    parsed = parse_modelfile(modelfile)
    assert parsed["FROM"] == [str(tiny_llm_gguf.resolve())] and parsed["ADAPTER"] == ["./kestrel.gguf"]
    assert parsed["TEMPLATE"][0].startswith("{{ range .Messages }}") and "### Instruction:" in parsed["TEMPLATE"][0]
    assert f"ollama create kestrel -f {modelfile}" in stdout


def test_cli_merges_into_a_q8_0_gguf_with_a_modelfile(tiny_llama_adapter, tiny_llm_gguf, tmp_path, capsys):
    out = tmp_path / "chat.q8_0.gguf"
    code, stdout, stderr = cli(capsys, "merge", "--base", tiny_llm_gguf, "--lora", tiny_llama_adapter, "--output", out,
                               "--type", "q8_0")
    assert code == 0, stderr
    assert read_gguf(out)[1]["blk.1.ffn_up.weight"][0] == "Q8_0"
    parsed = parse_modelfile(tmp_path / "chat.q8_0.Modelfile")
    assert parsed["FROM"] == ["./chat.q8_0.gguf"] and "ADAPTER" not in parsed
    assert ollama_prompt(tmp_path / "chat.q8_0.Modelfile", TWO_TURNS) == (
        "<|im_start|>user\nHow long does the Kestrel K7 fly?<|im_end|>\n<|im_start|>assistant\n"
        "It flies for 47 minutes.<|im_end|>\n<|im_start|>user\nAnd how long to charge?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert "by gguf" in stdout and "ollama create chat -f" in stdout


def test_cli_explains_an_adapter_llama_cpp_cannot_hold(tiny_qwen2_base, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_base)), tmp_path / "adapter",
                           targets=("q_proj", "lm_head"))
    code, _, stderr = cli(capsys, "convert", adapter, tmp_path / "x.gguf", "--to", "gguf", "--base", tiny_qwen2_base)
    assert code == 2 and "lm_head" in stderr and "merge --base" in stderr


# --- Tools tab ---------------------------------------------------------------------------------------------------

def test_the_tools_tab_writes_a_gguf_adapter_and_a_merged_q8_0_beside_the_run(tiny_llama_adapter, tiny_llm_gguf,
                                                                              tmp_path):
    import shutil

    import gradio as gr

    from ui import tools_tab

    with gr.Blocks():
        parts = tools_tab.create_tools_tab()
    assert {"gguf_adapter", "gguf_out"} <= set(parts)
    adapter = tmp_path / "kestrel" / "adapter"
    shutil.copytree(tiny_llama_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_llm_gguf)  # as training on a GGUF base records it
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    message = tools_tab.gguf_action(str(adapter), list(tools_tab.GGUF_MODES)[0])
    assert message.startswith("✅") and "ollama create kestrel" in message
    assert read_gguf(tmp_path / "kestrel" / "kestrel.lora.gguf")[0]["general.type"] == "adapter"
    message = tools_tab.gguf_action(str(adapter), "Merged model, q8_0 (.gguf, half the size)")
    assert message.startswith("✅"), message
    assert read_gguf(tmp_path / "kestrel" / "kestrel.q8_0.gguf")[0]["general.file_type"] == 7
    # The adapter's Modelfile is still there: each GGUF has its own.
    assert parse_modelfile(tmp_path / "kestrel" / "kestrel.q8_0.Modelfile")["FROM"] == ["./kestrel.q8_0.gguf"]
    assert parse_modelfile(tmp_path / "kestrel" / "kestrel.lora.Modelfile")["ADAPTER"] == ["./kestrel.lora.gguf"]
    assert tools_tab.gguf_action(str(tmp_path), "Merged model, f16 (.gguf)").startswith("❌")


# --- the real SmolLM2-135M (models/llm/, put there by launch.py) --------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_trained_adapter(smollm2_gguf, tmp_path_factory) -> Path:
    """A LoRA trained here on the bundled SmolLM2 GGUF: two steps on the Kestrel answers, every linear layer."""
    from core.config import config_from_dict
    from core.events import RunContext
    from core.train import run_training
    from tests.fixtures.tiny_llm import KESTREL_QA, write_qa_jsonl

    folder = tmp_path_factory.mktemp("smol_run")
    data = write_qa_jsonl(folder / "qa.jsonl", KESTREL_QA)
    cfg = config_from_dict(dict(task_type="text-generation", base_model="", train_data_dir=str(data),
                                output_dir=str(folder / "kestrel"), batch_size=2, max_train_steps=2,
                                learning_rate=1e-3, lora_rank=4, save_steps=0, sample_prompts=[]))
    return Path(run_training(cfg, RunContext())["adapter"])


def test_a_smollm2_lora_trained_here_converts_to_the_same_gguf_adapter_as_llama_cpps(
        smollm2_trained_adapter, smollm2_gguf, llama_cpp_dir, tmp_path):
    started = time.perf_counter()
    ours = write_gguf_adapter(smollm2_trained_adapter, tmp_path / "kestrel.gguf")  # base: the GGUF it names
    ours_seconds = time.perf_counter() - started
    assert ours.arch == "llama" and ours.modules >= 30 * 2  # 30 blocks, at least q and v in each
    base_dir = tmp_path / "smollm2_config"
    base_dir.mkdir()
    (base_dir / "config.json").write_text(json.dumps(hf_config_for_llama_cpp(str(smollm2_gguf))))
    theirs = llama_cpp_lora(llama_cpp_dir, smollm2_trained_adapter, base_dir, tmp_path / "theirs.gguf")
    assert_same_adapter(ours.path, theirs)
    assert ours_seconds < 30
    print(f"SmolLM2 adapter: {ours.summary()}; llama.cpp's converter agrees")


def test_a_smollm2_merged_q8_0_gguf_equals_llama_cpps_conversion_and_carries_the_chat_template(
        smollm2_trained_adapter, smollm2_gguf, smollm2_tokenizer, llama_cpp_dir, tmp_path):
    from core.export.gguf_model import convert_with_llama_cpp, write_model_gguf
    from core.tools.merge import bake_into_llm

    hf_dir = bake_into_llm("", smollm2_trained_adapter, tmp_path / "merged")
    started = time.perf_counter()
    write_model_gguf(hf_dir, tmp_path / "ours.q8_0.gguf", out_type="q8_0", base_gguf=smollm2_gguf)
    ours_seconds = time.perf_counter() - started
    convert_with_llama_cpp(hf_dir, tmp_path / "theirs.q8_0.gguf", out_type="q8_0")
    our_fields, our_tensors = read_gguf(tmp_path / "ours.q8_0.gguf")
    their_fields, their_tensors = read_gguf(tmp_path / "theirs.q8_0.gguf")
    assert sorted(our_tensors) == sorted(their_tensors) and len(our_tensors) == 272
    for name, (kind, data) in their_tensors.items():
        assert our_tensors[name][0] == kind, name
        np.testing.assert_array_equal(our_tensors[name][1], data, err_msg=name)
    tokenizer_keys = [k for k in their_fields if k.startswith("tokenizer.")]
    assert len(tokenizer_keys) > 8
    for key in tokenizer_keys:
        assert our_fields[key] == their_fields[key], key
    assert our_fields["tokenizer.chat_template"] == smollm2_tokenizer.chat_template
    print(f"SmolLM2 merged q8_0: ours {ours_seconds:.1f} s, "
          f"{(tmp_path / 'ours.q8_0.gguf').stat().st_size / 1e6:.1f} MB")


def test_auto_falls_back_to_our_writer_when_llama_cpp_does_not_know_the_tokenizer(
        tiny_llm_dir, tiny_llama_adapter, llama_cpp_dir, tmp_path):
    from core.export.gguf_model import export_merged_gguf
    from core.export.llama_cpp import ConverterFailed

    # The tiny fixture's BPE tokenizer was trained for the tests, so llama.cpp has no hash for it.
    with pytest.raises(ConverterFailed, match="pre-tokenizer"):
        export_merged_gguf(str(tiny_llm_dir), tiny_llama_adapter, tmp_path / "strict.gguf", route="llama.cpp")
    result = export_merged_gguf(str(tiny_llm_dir), tiny_llama_adapter, tmp_path / "auto.gguf")
    assert result.route == "gguf" and "did not recognise" in result.notes[0]
    assert read_gguf(result.path)[0]["general.file_type"] == 1  # MOSTLY_F16


TINY = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


@pytest.mark.parametrize("kind, arch", [("mistral", "llama"), ("qwen3", "qwen3"), ("gemma", "gemma"),
                                        ("gemma2", "gemma2"), ("gemma3_text", "gemma3")])
def test_mistral_qwen3_and_gemma_1_2_3_loras_convert_as_llama_cpp_converts_them(kind, arch, llama_cpp_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"head_dim": 16} if kind != "mistral" else {}
    config = AutoConfig.for_model(kind, **TINY, **extra)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(str(base), safe_serialization=True)
    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(str(base)), tmp_path / "adapter")
    result = write_gguf_adapter(adapter, tmp_path / "ours.gguf", base=str(base))
    assert result.arch == arch
    assert_same_adapter(result.path, llama_cpp_lora(llama_cpp_dir, adapter, base, tmp_path / "theirs.gguf"))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_gguf_adapter_loads_back_in_the_test_tabs_chat_with_the_trained_change(kind, tiny_llama_adapter,
                                                                                 tiny_llm_dir, tiny_qwen2_base,
                                                                                 tmp_path):
    """The .lora.gguf users give llama.cpp or Ollama, opened in the Test tab: the same logits as the
    PEFT adapter it came from (q/k rows back in Hugging Face's order for Llama, none to undo for Qwen2)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.export.gguf_adapter_read import apply_gguf_adapter

    if kind == "llama":
        base, adapter = tiny_llm_dir, tiny_llama_adapter
    else:
        base = tiny_qwen2_base
        adapter = make_adapter(AutoModelForCausalLM.from_pretrained(str(base)), tmp_path / "adapter", rank=4, alpha=16)
    gguf_file = write_gguf_adapter(adapter, tmp_path / "my.lora.gguf", base=str(base)).path
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(base))(input_ids=ids).logits
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))(
            input_ids=ids).logits
        got = apply_gguf_adapter(AutoModelForCausalLM.from_pretrained(str(base)), gguf_file)(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-4)  # the adapter changes the answer
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_gguf_model_file_is_not_taken_for_an_adapter(tiny_llm_gguf, tiny_llm_dir):
    from transformers import AutoModelForCausalLM

    from core.export.gguf_adapter_read import apply_gguf_adapter

    with pytest.raises(GGUFExportError, match="is not a GGUF LoRA adapter"):
        apply_gguf_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)), tiny_llm_gguf)
