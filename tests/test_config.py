"""A user's YAML: the seed's keys work as written, mistakes are refused with the key named."""
import dataclasses

import pytest

from core.config import ConfigError, TrainConfig, config_from_dict, load_config, save_config

SEED_YAML = """\
train_data_dir: "{data}"
metadata_path: "{data}/metadata.csv"
base_model: "{model}"
task_type: "image-generation"
lora_rank: 8
lora_alpha: 16
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "{out}"
save_steps: 100
resolution: 512
mixed_precision: "fp16"
gradient_accumulation_steps: 2
"""


@pytest.fixture
def seed_files(tmp_path):
    data = tmp_path / "style_train"
    data.mkdir()
    (data / "metadata.csv").write_text("filename,prompt\n", encoding="utf-8")
    model = tmp_path / "v1-5-pruned.safetensors"
    model.write_bytes(b"x")
    return data, model, tmp_path / "out"


def test_the_seed_config_loads_with_2e_4_as_a_number(tmp_path, seed_files):
    data, model, out = seed_files
    path = tmp_path / "cfg.yaml"
    path.write_text(SEED_YAML.format(data=data, model=model, out=out), encoding="utf-8")
    cfg = load_config(path)
    assert cfg.learning_rate == pytest.approx(2e-4)
    assert isinstance(cfg.learning_rate, float)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.batch_size, cfg.gradient_accumulation_steps) == (8, 16.0, 4, 2)
    assert cfg.name == "out"


def test_saved_yaml_runs_unchanged(tmp_path, seed_files):
    data, model, out = seed_files
    cfg = config_from_dict({"train_data_dir": str(data), "base_model": str(model), "output_dir": str(out),
                            "sample_prompts": ["a cat, 可爱", "a dog"], "trigger_word": "sks"})
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_a_typo_is_refused_with_a_suggestion(seed_files):
    data, model, out = seed_files
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train_data_dir": str(data), "base_model": str(model), "lerning_rate": 1e-4})
    assert "lerning_rate" in err.value.errors
    assert "learning_rate" in err.value.errors["lerning_rate"]


def test_wrong_types_and_impossible_values_name_every_key(seed_files):
    data, model, out = seed_files
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train_data_dir": str(data), "base_model": str(model), "lora_rank": "eight",
                          "batch_size": 0, "resolution": 500, "mixed_precision": "fp8", "epochs": -1})
    errors = err.value.errors
    assert set(errors) >= {"lora_rank", "batch_size", "resolution", "mixed_precision", "epochs"}
    assert "448" in errors["resolution"] and "512" in errors["resolution"]
    assert "bf16" in errors["mixed_precision"]
    assert "eight" in str(err.value)


def test_missing_paths_and_pickles_are_refused_before_loading(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train_data_dir": str(tmp_path / "nope"), "base_model": str(ckpt)})
    assert "does not exist" in err.value.errors["train_data_dir"]
    assert "allow_pickle" in err.value.errors["base_model"]
    cfg = config_from_dict({"train_data_dir": str(tmp_path), "base_model": str(ckpt), "allow_pickle": True})
    assert cfg.allow_pickle


def test_old_ggml_file_gets_the_gguf_message(tmp_path):
    ggml = tmp_path / "llama-2-7b-chat.ggmlv3.q4_0.bin"
    ggml.write_bytes(b"lmgg")
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train_data_dir": str(tmp_path), "base_model": str(ggml),
                          "task_type": "text-generation"})
    assert "GGUF" in err.value.errors["base_model"]


def test_yaml_with_tabs_says_so(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("lora_rank: 8\n\tbatch_size: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "tabs" in str(err.value) and "line 2" in str(err.value)


def test_hub_ids_are_accepted_without_a_download(tmp_path):
    cfg = config_from_dict({"train_data_dir": str(tmp_path), "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5"})
    assert cfg.base_model.endswith("stable-diffusion-v1-5")


def test_the_defaults_ask_only_for_the_data_and_the_model_and_come_back_unchanged_from_yaml(tmp_path):
    # An empty config names just what nobody can guess for the user: the data and, for images, the model.
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, check_paths=False)
    assert set(err.value.errors) == {"train_data_dir", "base_model"}
    with pytest.raises(ConfigError) as err:
        config_from_dict({"task_type": "text-generation"}, check_paths=False)
    assert set(err.value.errors) == {"train_data_dir"}  # text: empty base_model is the bundled SmolLM2
    # Given those, every other default passes as it is, and the saved config.yaml reads back the same.
    defaults = TrainConfig()  # constructing never raises; validation is separate
    for given in ({"base_model": "org/model"}, {"task_type": "text-generation"}):
        cfg = config_from_dict({"train_data_dir": str(tmp_path), **given})
        assert cfg == dataclasses.replace(defaults, train_data_dir=str(tmp_path), **given)
        assert load_config(save_config(cfg, tmp_path / "config.yaml")) == cfg


def test_pissa_with_conv_layers_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train_data_dir": str(tmp_path), "base_model": "org/model", "lora_variant": "pissa",
                          "conv_rank": 4})
    assert "conv_rank" in err.value.errors and "PiSSA" in err.value.errors["conv_rank"]


def test_a_saved_config_with_the_retired_num_workers_key_still_loads(tmp_path):
    # Every run's config.yaml used to carry num_workers, which nothing read.
    cfg = config_from_dict({"train_data_dir": str(tmp_path), "base_model": "org/model", "num_workers": 4})
    assert "num_workers" not in cfg.to_dict()
