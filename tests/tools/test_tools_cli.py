"""tools/export.py as a user runs it: inspect, convert, merge, resize, extract."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures.tool_loras import make_sd_lora
from core.tools.merge import parse_lora_spec as _lora_arg
from tools.export import main


@pytest.fixture(scope="module")
def sd1_lora(tiny_sd1, tmp_path_factory):
    return make_sd_lora(tiny_sd1.folder, tmp_path_factory.mktemp("cli_lora"), variant="rslora", seed=21)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_shows_format_family_ranks_alphas_and_trained_parts(sd1_lora, tmp_path, capsys):
    # A file written by convert carries ss_base_model_version, which is how WebUI tells the family.
    code, _, _ = run(capsys, "convert", sd1_lora.diffusers, tmp_path / "webui.safetensors", "--to", "kohya")
    assert code == 0
    code, out, _ = run(capsys, "inspect", tmp_path / "webui.safetensors")
    assert code == 0
    assert "kohya / WebUI" in out and "SD 1.x" in out
    assert "rank    4  alpha 16  scale 4" in out      # rsLoRA: 8 / sqrt(4) = 4, stored as alpha 16
    assert "rank    2  alpha 1.41421  scale 0.7071" in out  # LoCon conv layers: conv_alpha 1 / sqrt(2)
    assert "UNet" in out and "text encoder" in out and "LoCon conv layers" in out
    assert "ss_base_model_version: sd_v1" in out
    code, out, _ = run(capsys, "inspect", sd1_lora.diffusers.parent, "--json")
    facts = json.loads(out)
    assert facts["format"] == "diffusers" and facts["has_conv"] and not facts["nonfinite"]


def test_inspect_flags_a_lora_with_nan_weights_and_exits_nonzero(sd1_lora, tmp_path, capsys):
    tensors = load_file(str(sd1_lora.kohya))
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = float("nan")
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    code, out, _ = run(capsys, "inspect", broken)
    assert code == 1
    assert "WARNING: 1 tensor(s) hold NaN or inf" in out and key in out


def test_kohya_to_diffusers_and_back_gives_the_same_tensors(sd1_lora, tmp_path, capsys):
    assert run(capsys, "convert", sd1_lora.kohya, tmp_path / "diffusers", "--to", "diffusers")[0] == 0
    assert (tmp_path / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert run(capsys, "convert", tmp_path / "diffusers", tmp_path / "back.safetensors", "--to", "kohya")[0] == 0
    before, after = load_file(str(sd1_lora.kohya)), load_file(str(tmp_path / "back.safetensors"))
    assert set(before) == set(after)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_convert_to_fp16_halves_the_tensors_but_keeps_alpha_exact(sd1_lora, tmp_path, capsys):
    out = tmp_path / "half.safetensors"
    assert run(capsys, "convert", sd1_lora.kohya, out, "--to", "kohya", "--precision", "fp16")[0] == 0
    tensors = load_file(str(out))
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {v.dtype for k, v in tensors.items() if k.endswith(".alpha")} == {torch.float32}


def test_a_peft_adapter_becomes_one_safetensors_that_loads_with_the_same_output(tiny_llm_dir, tmp_path, capsys):
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.tools.test_tools_merge import _logits, _trained_adapter

    adapter = _trained_adapter(tiny_llm_dir, tmp_path / "adapter", use_rslora=True)
    single = tmp_path / "chat_lora.safetensors"
    assert run(capsys, "convert", adapter, single, "--to", "peft-single")[0] == 0
    expected = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)),
                                                 str(adapter)))
    # A server reading the single file: config from the header, tensors as they are.
    from safetensors import safe_open

    with safe_open(str(single), "pt") as handle:
        config = json.loads(handle.metadata()["adapter_config"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)), LoraConfig(**fields))
    set_peft_model_state_dict(model, tensors)
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    code, out, _ = run(capsys, "inspect", single)  # the header's config gives inspect the alpha
    assert code == 0 and "PEFT adapter" in out and "a language model" in out
    assert "rank    4  alpha 16  scale 4" in out  # rsLoRA: 8 / sqrt(4)
    # ...and back to a folder PeftModel reads, here in fp16.
    assert run(capsys, "convert", single, tmp_path / "again", "--to", "peft", "--precision", "fp16")[0] == 0
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)), str(tmp_path / "again"))
    torch.testing.assert_close(_logits(again), expected, rtol=2e-2, atol=2e-2)


def test_resize_prints_the_error_and_writes_the_smaller_rank(sd1_lora, tmp_path, capsys):
    code, out, _ = run(capsys, "resize", sd1_lora.kohya, "--rank", "1", "-o", tmp_path / "r1.safetensors")
    assert code == 0 and "relative error overall" in out
    tensors = load_file(str(tmp_path / "r1.safetensors"))
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {1}
    code, out, _ = run(capsys, "resize", sd1_lora.kohya, "--energy", "0.99", "-o", tmp_path / "e.safetensors", "-v")
    assert code == 0 and "rank 4 -> " in out


def test_pickled_loras_are_refused_unless_allowed(sd1_lora, tmp_path, capsys):
    pickled = tmp_path / "old.pt"
    torch.save(load_file(str(sd1_lora.kohya)), pickled)
    code, _, err = run(capsys, "inspect", pickled)
    assert code == 2 and "pickle" in err
    code, _, err = run(capsys, "resize", pickled, "--rank", "2", "-o", tmp_path / "r.safetensors")
    assert code == 2 and "--allow-pickle" in err
    code, _, _ = run(capsys, "--allow-pickle", "resize", pickled, "--rank", "2", "-o", tmp_path / "r.safetensors")
    assert code == 0 and (tmp_path / "r.safetensors").is_file()


def test_merge_without_base_combines_and_with_base_bakes(tiny_sd1, sd1_lora, tmp_path, capsys):
    code, out, _ = run(capsys, "merge", "--lora", f"{sd1_lora.kohya}:0.5", "--lora", f"{sd1_lora.kohya}:0.5",
                       "--output", tmp_path / "combined.safetensors")
    assert code == 0 and "Combined 2 LoRAs" in out
    code, out, _ = run(capsys, "merge", "--base", tiny_sd1.single_file, "--model-config", tiny_sd1.folder,
                       "--lora", f"{sd1_lora.kohya}:0.8", "--output", tmp_path / "merged.safetensors")
    assert code == 0 and "modules merged" in out
    assert (tmp_path / "merged.safetensors").stat().st_size > 100_000
    code, _, err = run(capsys, "merge", "--base", tiny_sd1.folder, "--lora", tmp_path / "missing.safetensors",
                       "--output", tmp_path / "x.safetensors")
    assert code == 2 and "missing.safetensors" in err and not (tmp_path / "x.safetensors").exists()


def test_extract_from_an_llm_and_its_merged_copy_gives_the_adapter_back(tiny_llm_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.tools.merge import bake_into_llm
    from tests.tools.test_tools_merge import _logits, _trained_adapter

    adapter = _trained_adapter(tiny_llm_dir, tmp_path / "adapter")
    merged = bake_into_llm(str(tiny_llm_dir), adapter, tmp_path / "merged")
    code, out, _ = run(capsys, "extract", "--llm", "--base", tiny_llm_dir, "--tuned", merged, "--rank", "4",
                       "-o", tmp_path / "extracted")
    assert code == 0 and "left out" in out
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)),
                                       str(tmp_path / "extracted"))
    torch.testing.assert_close(_logits(loaded), _logits(AutoModelForCausalLM.from_pretrained(str(merged))),
                               rtol=1e-4, atol=1e-4)


def test_lora_weights_parse_from_the_path_and_windows_drives_are_not_weights():
    assert _lora_arg("a.safetensors:0.7") == ("a.safetensors", 0.7)
    assert _lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert _lora_arg(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert _lora_arg(r"C:\loras\a.safetensors:-0.5") == (r"C:\loras\a.safetensors", -0.5)
    assert Path(_lora_arg("dir/adapter")[0]).name == "adapter"
