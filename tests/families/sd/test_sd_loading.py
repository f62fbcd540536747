"""Loading Stable Diffusion base models the ways users have them: single files (SD 1.x / 2.x /
SDXL), diffusers folders, pickles only on request, and clear errors for the rest.
Also: a single-file SD 1.x and an SDXL model train and export."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.config import ConfigError, config_from_dict
from core.family_api.contract import ModelLoadError
from core.families.sd.load import load_sd_model, model_family
from tests.fixtures.tiny_sd import run_collect, tiny_run_config


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["tiny_sd1", "tiny_sd2", "tiny_sdxl"])
def test_a_single_file_checkpoint_is_recognised_and_loads_the_same_weights(name, request):
    tiny = request.getfixturevalue(name)
    assert model_family(str(tiny.single_file)) == tiny.family
    assert model_family(str(tiny.folder)) == tiny.family
    folder = load_sd_model(str(tiny.folder))
    single = load_sd_model(str(tiny.single_file), model_config=str(tiny.folder))
    assert single.family == folder.family == tiny.family and single.is_single_file
    assert _same_weights(single.unet, folder.unet) and _same_weights(single.vae, folder.vae)
    assert all(_same_weights(a, b) for a, b in zip(single.text_encoders, folder.text_encoders))
    assert len(single.tokenizers) == (2 if tiny.family == "sdxl" else 1)


def test_v_prediction_comes_from_the_scheduler_config_unless_set(tiny_sd2):
    assert load_sd_model(str(tiny_sd2.folder)).prediction_type == "v_prediction"
    assert load_sd_model(str(tiny_sd2.folder), prediction_type="epsilon").prediction_type == "epsilon"
    single = load_sd_model(str(tiny_sd2.single_file), model_config=str(tiny_sd2.folder))
    assert single.prediction_type == "v_prediction"


def test_a_ckpt_is_refused_without_allow_pickle_and_loads_with_it(tiny_sd1, sd_image_folder, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sd1.single_file))}, ckpt)
    with pytest.raises(ConfigError) as refused:
        config_from_dict({"base_model": str(ckpt), "train_data_dir": str(sd_image_folder)})
    assert "base_model" in refused.value.errors and "allow_pickle" in refused.value.errors["base_model"]
    with pytest.raises(ModelLoadError, match="pickle") as direct:
        load_sd_model(str(ckpt))
    assert "allow_pickle: true" in direct.value.advice
    model = load_sd_model(str(ckpt), allow_pickle=True, model_config=str(tiny_sd1.folder))
    assert model.family == "sd1"


def test_damaged_wrong_or_unreachable_models_get_a_clear_error(tiny_sd1, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(tiny_sd1.single_file.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="damaged"):
        load_sd_model(str(damaged))
    lora = tmp_path / "a_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(ModelLoadError, match="is a LoRA"):
        load_sd_model(str(lora))
    with pytest.raises(ModelLoadError, match="diffusers model folder"):
        load_sd_model(str(tmp_path))
    # Offline and no configs cached: say what to set instead of a hub traceback.
    with pytest.raises(ModelLoadError) as offline:
        load_sd_model(str(tiny_sd1.single_file))
    assert "base_model_config" in offline.value.advice
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_sd_model("nobody-here/no-such-model")


def test_a_single_file_sd1_checkpoint_trains_a_dora(tiny_sd1, sd_image_folder, tmp_path):
    raw = tiny_run_config(tiny_sd1.single_file, sd_image_folder, tmp_path / "out", max_train_steps=2,
                          base_model_config=str(tiny_sd1.folder), lora_variant="dora")
    outputs, events = run_collect(raw)
    assert [e.step for e in events if e.kind == "progress"] == [1, 2]
    assert any("single file" in e.message for e in events if e.kind == "log")
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert any(k.endswith(".dora_scale") for k in load_file(outputs["lora"]))


def test_sdxl_trains_with_text_encoder_lora_and_its_files_load_in_diffusers(tiny_sdxl, sd_image_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    out = tmp_path / "xl"
    raw = tiny_run_config(tiny_sdxl.folder, sd_image_folder, out, max_train_steps=2, train_text_encoder=True,
                          text_encoder_lr=5e-4, output_name="xl_lora", gradient_checkpointing=True,
                          loraplus_lr_ratio=16, lora_variant="rslora")
    outputs, events = run_collect(raw)
    assert [e.step for e in events if e.kind == "progress"] == [1, 2]
    with safe_open(outputs["lora"], "pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    assert meta["ss_base_model_version"].startswith("sdxl_")
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1") for k in keys), keys[:5]
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert not any("down_blocks" in k for k in keys)  # WebUI wants sgm names for SDXL

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl.folder))
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for source in (outputs["lora"], str(out)):  # the kohya file, then the diffusers folder
        pipe.load_lora_weights(source, adapter_name="test")
        assert any("lora" in k for k in pipe.unet.state_dict())
        pipe.delete_adapters("test")
    assert all(torch.equal(base[k], v) for k, v in pipe.unet.state_dict().items() if k in base)


def test_the_example_configs_are_valid():
    import yaml

    for name in ("image_example.yaml", "sdxl_example.yaml"):
        path = __import__("pathlib").Path(__file__).resolve().parents[3] / "configs" / name
        cfg = config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), check_paths=False)
        assert cfg.is_image and cfg.sample_prompts


def test_training_puts_the_unet_off_until_the_encoders_are_done_and_loads_the_same_weights(tiny_sd1):
    deferred = load_sd_model(str(tiny_sd1.folder), defer_unet=True)
    assert deferred.unet is None and deferred.family == "sd1"  # the family read from the UNet's config alone
    deferred.load_unet()
    assert _same_weights(deferred.unet, load_sd_model(str(tiny_sd1.folder)).unet)
