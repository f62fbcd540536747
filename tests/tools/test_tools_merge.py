"""Merging LoRAs: baked into a base model (SD single file, LLM folder), or several into one LoRA."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.tools.convert import read_lora, write_kohya
from core.tools.merge import bake_into_llm, bake_into_sd, combine_files, scale_peft_adapter
from core.tools.modules import LoraToolError
from tests.fixtures.tool_loras import make_sd_lora


def unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    latents = torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(1, 8, dim, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop ids
        time_dim = unet.config.addition_time_embed_dim
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * time_dim
        added = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(latents, torch.tensor([10]), encoder_hidden_states=text, added_cond_kwargs=added).sample


def text_out(encoder) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 9, 17, 33, 1]])
    with torch.no_grad():
        return encoder(ids)[0]


@pytest.fixture(scope="module")
def sd1_lora(tiny_sd1, tmp_path_factory):
    return make_sd_lora(tiny_sd1.folder, tmp_path_factory.mktemp("merge_lora"), variant="lora", seed=3)


@pytest.mark.parametrize("weight", [1.0, 0.7])
def test_a_lora_baked_into_an_sd_checkpoint_gives_the_base_plus_lora_output_at_that_weight(
        tiny_sd1, sd1_lora, tmp_path, weight):
    from core.families.sd.load import load_sd_model

    out, report = bake_into_sd(str(tiny_sd1.single_file), [(sd1_lora.kohya, weight)], tmp_path / "merged.safetensors",
                               dtype=None, model_config=str(tiny_sd1.folder))
    assert len(report.merged) == len(read_lora(sd1_lora.kohya).modules)
    merged = load_sd_model(str(out), model_config=str(tiny_sd1.folder))  # the project's single-file loader
    reference = sd1_lora.model
    scale_peft_adapter(reference.unet, weight)
    scale_peft_adapter(reference.text_encoders[0], weight)
    try:
        torch.testing.assert_close(unet_out(merged.unet), unet_out(reference.unet), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(text_out(merged.text_encoders[0]), text_out(reference.text_encoders[0]),
                                   rtol=1e-4, atol=1e-5)
    finally:
        scale_peft_adapter(reference.unet, 1 / weight)
        scale_peft_adapter(reference.text_encoders[0], 1 / weight)
    # ...and the base really changed (the comparison is not base == base).
    base = load_sd_model(str(tiny_sd1.single_file), model_config=str(tiny_sd1.folder))
    assert (unet_out(base.unet) - unet_out(merged.unet)).abs().max() > 1e-3


def test_the_merged_checkpoint_loads_in_diffusers_from_single_file_and_remembers_its_loras(
        tiny_sd1, sd1_lora, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    out, _ = bake_into_sd(str(tiny_sd1.folder), [(sd1_lora.diffusers, 0.5)], tmp_path / "merged.safetensors")
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_sd1.folder), local_files_only=True,
                                                    safety_checker=None)
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
        dtype = handle.get_tensor("model.diffusion_model.input_blocks.0.0.weight").dtype
    assert dtype == torch.float16  # the default save precision, like kohya_ss' GUI
    assert json.loads(meta["merged_loras"]) == [{"file": "pytorch_lora_weights.safetensors", "weight": 0.5}]
    scale_peft_adapter(sd1_lora.model.unet, 0.5)
    try:
        expected = unet_out(sd1_lora.model.unet)
    finally:
        scale_peft_adapter(sd1_lora.model.unet, 2.0)
    torch.testing.assert_close(unet_out(pipe.unet.float()), expected, rtol=2e-2, atol=2e-2)


def test_a_dora_lora_bakes_into_the_same_weights_peft_fuses(tiny_sd1, tmp_path):
    from core.families.sd.load import load_sd_model

    made = make_sd_lora(tiny_sd1.folder, tmp_path / "dora", variant="dora", conv_rank=0, seed=5)
    out, _ = bake_into_sd(str(tiny_sd1.folder), [(made.kohya, 1.0)], tmp_path / "merged.safetensors", dtype=None)
    merged = load_sd_model(str(out), model_config=str(tiny_sd1.folder))
    torch.testing.assert_close(unet_out(merged.unet), unet_out(made.model.unet), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_out(merged.text_encoders[0]), text_out(made.model.text_encoders[0]),
                               rtol=1e-4, atol=1e-5)


def test_an_sdxl_lora_with_sgm_names_bakes_into_an_sdxl_checkpoint(tiny_sdxl, tmp_path):
    from core.families.sd.load import load_sd_model

    made = make_sd_lora(tiny_sdxl.folder, tmp_path / "xl", variant="lora", seed=13)
    assert any("input_blocks" in n for n in read_lora(made.kohya).modules)  # WebUI's SDXL names
    out, report = bake_into_sd(str(tiny_sdxl.folder), [(made.kohya, 0.6)], tmp_path / "xl.safetensors", dtype=None)
    merged = load_sd_model(str(out), model_config=str(tiny_sdxl.folder))
    assert merged.family == "sdxl"
    for part in [made.model.unet] + made.model.text_encoders:
        scale_peft_adapter(part, 0.6)
    torch.testing.assert_close(unet_out(merged.unet), unet_out(made.model.unet), rtol=1e-4, atol=1e-5)
    for mine, reference in zip(merged.text_encoders, made.model.text_encoders):
        torch.testing.assert_close(text_out(mine), text_out(reference), rtol=1e-4, atol=1e-5)


def test_an_sdxl_lora_is_refused_for_an_sd1_base_with_both_families_named(tiny_sd1, tiny_sdxl, tmp_path):
    made = make_sd_lora(tiny_sdxl.folder, tmp_path / "xl", conv_rank=0, text_encoder=False)
    with pytest.raises(LoraToolError, match="sdxl LoRA but the base model is sd1"):
        bake_into_sd(str(tiny_sd1.folder), [(made.kohya, 1.0)], tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()


def test_two_loras_combined_into_one_equal_both_applied_at_their_weights(tiny_sd1, sd1_lora, tmp_path):
    other = make_sd_lora(tiny_sd1.folder, tmp_path / "other", rank=2, alpha=1, conv_rank=0, seed=11)
    combined, report = combine_files([sd1_lora.kohya, other.kohya], [0.8, -0.5])
    a, b = read_lora(sd1_lora.kohya), read_lora(other.kohya)
    for name, module in combined.modules.items():
        expected = 0.8 * a.modules[name].delta() if name in a.modules else 0
        if name in b.modules:
            expected = expected - 0.5 * b.modules[name].delta()
        torch.testing.assert_close(module.delta(), expected, rtol=1e-5, atol=1e-6)
    assert set(combined.modules) == set(a.modules) | set(b.modules)
    attn = next(n for n in combined.modules if n.endswith("attn1_to_q"))
    assert combined.modules[attn].rank == 4 + 2  # exact: ranks concatenated
    # written as a kohya file, diffusers loads it and gives the output of both adapters at those weights
    from diffusers import StableDiffusionPipeline

    path = write_kohya(combined, tmp_path / "combined.safetensors", dtype=None)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1.folder), safety_checker=None)
    pipe.load_lora_weights(str(path), adapter_name="combined")
    merged_out = unet_out(pipe.unet)
    pipe.delete_adapters("combined")
    pipe.load_lora_weights(str(sd1_lora.kohya), adapter_name="a")
    pipe.load_lora_weights(str(other.kohya), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, -0.5])
    torch.testing.assert_close(merged_out, unet_out(pipe.unet), rtol=1e-4, atol=1e-5)
    assert report.resize is None


def test_combining_down_to_a_rank_reports_the_svd_error(sd1_lora, tmp_path):
    combined, report = combine_files([sd1_lora.kohya, sd1_lora.kohya], [0.5, 0.5], rank=2)
    assert {m.rank for m in combined.modules.values()} == {2}
    assert report.resize is not None and 0 < report.resize.overall_error < 1
    full, full_report = combine_files([sd1_lora.kohya, sd1_lora.kohya], [0.5, 0.5], rank=4)
    # the same LoRA twice at 0.5 is that LoRA: rank 4 holds it exactly
    assert full_report.resize.overall_error < 1e-4
    original = read_lora(sd1_lora.kohya)
    name = next(iter(original.modules))
    torch.testing.assert_close(full.modules[name].delta(), original.modules[name].delta(), rtol=1e-4, atol=1e-5)


def test_dora_loras_cannot_be_combined_and_the_message_says_to_bake_them(tiny_sd1, tmp_path):
    made = make_sd_lora(tiny_sd1.folder, tmp_path / "dora", variant="dora", conv_rank=0, text_encoder=False)
    with pytest.raises(LoraToolError, match="DoRA"):
        combine_files([made.kohya, made.kohya], [1, 1])


# --- text adapters --------------------------------------------------------------------------------

def _trained_adapter(base: Path, folder: Path, seed: int = 0, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
    peft_model.save_pretrained(str(folder))
    return folder


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 30, 2]])).logits


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_an_adapter_baked_into_an_llm_folder_loads_and_equals_peft_merge_and_unload(tiny_llm_dir, tmp_path, weight):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _trained_adapter(tiny_llm_dir, tmp_path / "adapter")
    out = bake_into_llm(str(tiny_llm_dir), adapter, tmp_path / "merged", weight=weight)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)), str(adapter))
    scale_peft_adapter(reference, weight)
    expected = reference.merge_and_unload()
    torch.testing.assert_close(_logits(merged), _logits(expected), rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir))
    assert (_logits(base) - _logits(merged)).abs().max() > 1e-4
    # A folder of other files is never replaced by a merge output.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(LoraToolError, match="already holds other files"):
        bake_into_llm(str(tiny_llm_dir), adapter, tmp_path / "notes", weight=weight)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_two_text_adapters_combine_into_one_peft_folder_that_peft_loads(tiny_llm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.tools.convert import write_peft

    first = _trained_adapter(tiny_llm_dir, tmp_path / "a", seed=1)
    second = _trained_adapter(tiny_llm_dir, tmp_path / "b", seed=2, use_rslora=True)
    combined, _ = combine_files([first, second], [1.0, 0.5])
    folder = write_peft(combined, tmp_path / "combined")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)), str(folder))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)), str(first),
                                          adapter_name="a")
    reference.load_adapter(str(second), adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], [1.0, 0.5], "sum", combination_type="cat")
    reference.set_adapter("sum")
    torch.testing.assert_close(_logits(loaded), _logits(reference), rtol=1e-5, atol=1e-5)
