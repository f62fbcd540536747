"""One test per place where our code meets a library API that has moved between releases.

When a bump of the lock (tools/update_lock.py) breaks one of these, the test names the
library and the call, instead of a user meeting the library's own error deep in a run.
The other meeting points are guarded where they are exercised end to end:
- diffusers `load_lora_weights` reading our kohya and diffusers files: tests/export/test_export_kohya.py,
  tests/families/sd/test_sd_loading.py;
- transformers' GGUF dequantization: tests/text/test_text_models.py, tests/text/test_text_smollm2.py;
- accelerate's multi-process group: tests/train/test_multi_process.py.
"""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.tiny_sd import run_collect, tiny_run_config


@pytest.fixture()
def transformers_gate_refuses_our_peft(monkeypatch):
    """transformers 5.24 asked for a PEFT newer than any released: make the installed one ask the same."""
    import transformers.integrations.peft as hf_peft

    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "99.0.0")


def test_a_text_encoder_lora_trains_even_when_transformers_gates_peft(transformers_gate_refuses_our_peft,
                                                                      tiny_sd1, sd_image_folder, tmp_path):
    from safetensors.torch import load_file

    raw = tiny_run_config(tiny_sd1.folder, sd_image_folder, tmp_path / "out", max_train_steps=2,
                          train_text_encoder=True, text_encoder_lr=5e-4)
    outputs, events = run_collect(raw)
    assert [e.step for e in events if e.kind == "progress"] == [1, 2]
    assert any(k.startswith("lora_te_") for k in load_file(outputs["lora"]))


def test_peft_injects_lora_into_a_clip_text_encoder_and_reads_it_back():
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.config import TrainConfig
    from core.families.sd.lora import add_text_encoder_lora

    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                           num_hidden_layers=2, vocab_size=100, projection_dim=32))
    config = add_text_encoder_lora(encoder, TrainConfig(lora_rank=4, lora_alpha=8))
    state = get_peft_model_state_dict(encoder)
    assert config.r == 4 and state, "peft: inject_adapter_in_model / get_peft_model_state_dict changed"
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state} >= {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert all(not p.requires_grad for n, p in encoder.named_parameters() if "lora_" not in n)


def test_diffusers_add_adapter_puts_trainable_lora_on_the_unet(tiny_sd1):
    from diffusers import UNet2DConditionModel

    from core.config import TrainConfig
    from core.families.sd.lora import add_unet_lora
    from core.lora import peft_state

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd1.folder), subfolder="unet")
    unet.requires_grad_(False)
    add_unet_lora(unet, TrainConfig(lora_rank=4, lora_alpha=4))
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), "diffusers: add_adapter changed"
    assert set(peft_state(unet)) == {n.replace(".default", "") for n in trainable}


def test_peft_wraps_a_causal_lm_and_switches_the_adapter_off(tiny_llm_dir):
    from transformers import AutoModelForCausalLM

    from core.config import TrainConfig
    from core.train.text import add_lora

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    peft_model = add_lora(model, TrainConfig(task_type="text-generation", lora_rank=4, lora_alpha=8))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert not torch.allclose(adapted, base), "peft: the adapter changes nothing (get_peft_model changed)"
    assert torch.allclose(base, before, atol=1e-6), "peft: disable_adapter no longer gives the base model"


def test_gradio_builds_the_app_offline():
    from ui.app import build_app

    app = build_app()
    assert {"Dataset", "Caption", "Train", "Test", "Tools"} <= {
        getattr(block, "label", None) for block in app.blocks.values()}, "gradio: Blocks/Tab API changed"
