"""Every image LoRA variant, exported as the trainer exports it, loads in diffusers with the trained output.

The in-memory PEFT model is the truth: diffusers' `load_lora_weights` on a fresh base pipeline
must reproduce its UNet and text-encoder outputs from our files. Variants: plain LoRA, rsLoRA
(scale alpha/sqrt(r) baked into the file's alpha), DoRA (diffusers file only: diffusers drops
kohya's dora_scale), PiSSA (after converting to plain LoRA against the original base), all with
LoCon conv layers.
"""
from __future__ import annotations

import pytest
import torch

from core.tools.convert import read_lora, write_kohya
from core.tools.pissa import pissa_to_lora
from tests.fixtures.tool_loras import make_sd_lora
from tests.tools.test_tools_merge import text_out, unet_out


def _fresh_pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_same(pipe, model):
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(model.unet), rtol=1e-4, atol=1e-5)
    if model.text_encoders and hasattr(model.text_encoders[0], "peft_config"):
        torch.testing.assert_close(text_out(pipe.text_encoder), text_out(model.text_encoders[0]),
                                   rtol=1e-4, atol=1e-5)


# DoRA with the text encoder too: diffusers 0.42 + transformers 5 load a text encoder's
# `lora_magnitude_vector` only under a `.weight` name, which the exporter writes.
@pytest.mark.parametrize("variant,text_encoder", [("lora", True), ("rslora", True), ("dora", True)])
def test_the_diffusers_file_of_each_variant_loads_in_diffusers_with_the_trained_output(tiny_sd1, tmp_path, variant,
                                                                                       text_encoder):
    made = make_sd_lora(tiny_sd1.folder, tmp_path, variant=variant, seed=7, text_encoder=text_encoder)
    pipe = _fresh_pipe(tiny_sd1.folder)
    pipe.load_lora_weights(str(made.diffusers.parent))
    _assert_same(pipe, made.model)


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_the_kohya_file_of_each_variant_loads_in_diffusers_with_the_trained_output(tiny_sd1, tmp_path, variant):
    made = make_sd_lora(tiny_sd1.folder, tmp_path, variant=variant, seed=8)
    lora = read_lora(made.kohya)
    assert any(m.is_conv for m in lora.modules.values())  # the LoCon layers are in the file
    pipe = _fresh_pipe(tiny_sd1.folder)
    pipe.load_lora_weights(str(made.kohya))
    _assert_same(pipe, made.model)


def test_diffusers_drops_the_dora_scale_of_a_kohya_file_so_use_the_diffusers_file(tiny_sd1, tmp_path):
    made = make_sd_lora(tiny_sd1.folder, tmp_path, variant="dora", conv_rank=0, seed=9)
    assert read_lora(made.kohya).has_dora
    pipe = _fresh_pipe(tiny_sd1.folder)
    pipe.load_lora_weights(str(made.kohya))
    # What the compatibility table states: the kohya DoRA file gives only the plain LoRA part in diffusers.
    assert (unet_out(pipe.unet) - unet_out(made.model.unet)).abs().max() > 1e-4


def test_a_pissa_lora_converted_to_plain_lora_works_on_the_original_base_model(tiny_sd1, tmp_path):
    # PEFT has no PiSSA init for conv layers, so PiSSA runs without LoCon (conv_rank 0).
    made = make_sd_lora(tiny_sd1.folder, tmp_path, variant="pissa", conv_rank=0, seed=10)
    trained, initial = read_lora(made.kohya), read_lora(made.initial_kohya)
    trained.modules = pissa_to_lora(trained.modules, initial.modules)
    assert {m.rank for m in trained.modules.values()} == {8}  # twice the trained rank
    converted = write_kohya(trained, tmp_path / "pissa_as_lora.safetensors", dtype=None)
    pipe = _fresh_pipe(tiny_sd1.folder)  # the ORIGINAL weights, not PiSSA's residual
    pipe.load_lora_weights(str(converted))
    _assert_same(pipe, made.model)
    # The same conversion from the command line, to a diffusers folder.
    from tools.export import main

    assert main(["convert", str(made.kohya), str(tmp_path / "cli"), "--to", "diffusers",
                 "--pissa-init", str(made.initial_kohya)]) == 0
    pipe.delete_adapters(pipe.get_active_adapters())
    pipe.load_lora_weights(str(tmp_path / "cli"))
    _assert_same(pipe, made.model)


def test_a_dora_lora_made_plain_gives_the_trained_output_in_diffusers_and_says_what_was_lost(tiny_sd1, tmp_path,
                                                                                             capsys):
    from tools.export import main

    made = make_sd_lora(tiny_sd1.folder, tmp_path, variant="dora", conv_rank=0, seed=11)
    truth = unet_out(made.model.unet)
    as_is = _fresh_pipe(tiny_sd1.folder)
    as_is.load_lora_weights(str(made.kohya))  # diffusers drops dora_scale: only the plain part
    dropped = (unet_out(as_is.unet) - truth).abs().max()

    # At the DoRA's own rank (the default) the plain file is closer than that, and the error is reported.
    # (The fixture moves the magnitudes by up to 10%, a full-rank change; real runs move them far less.)
    plain = tmp_path / "plain.safetensors"
    assert main(["convert", str(made.kohya), str(plain), "--to", "plain", "--base", str(tiny_sd1.folder),
                 "--precision", "fp32"]) == 0
    assert "relative error overall" in capsys.readouterr().out
    lora = read_lora(plain)
    assert not lora.has_dora and {m.rank for m in lora.modules.values() if not m.is_conv} == {4}
    pipe = _fresh_pipe(tiny_sd1.folder)
    pipe.load_lora_weights(str(plain))
    assert (unet_out(pipe.unet) - truth).abs().max() < dropped

    # ...and at full rank it is exact, text encoder included (every layer of the tiny model is <= 64 wide).
    full = tmp_path / "full.safetensors"
    assert main(["convert", str(made.kohya), str(full), "--to", "plain", "--base", str(tiny_sd1.folder),
                 "--rank", "64", "--precision", "fp32"]) == 0
    pipe = _fresh_pipe(tiny_sd1.folder)
    pipe.load_lora_weights(str(full))
    _assert_same(pipe, made.model)


def test_making_a_plain_lora_plain_is_refused_with_the_right_command(tiny_sd1, tmp_path):
    from core.tools.modules import LoraToolError
    from core.tools.undora import dora_to_lora

    made = make_sd_lora(tiny_sd1.folder, tmp_path, variant="lora", conv_rank=0, seed=12)
    with pytest.raises(LoraToolError, match="convert --to kohya"):
        dora_to_lora(str(tiny_sd1.folder), made.kohya, tmp_path / "x.safetensors")
