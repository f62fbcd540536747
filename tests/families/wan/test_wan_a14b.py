"""Wan 2.2 A14B: two experts (`transformer` for the noisy steps above boundary_ratio, `transformer_2` below),
trained one at a time or both in one run. A tiny A14B trains each expert from its diffusers folder and from ComfyUI's high_noise /
low_noise files; each expert sees only its own noise levels, the file says which model node it goes on, and
diffusers' loader puts it on that expert (`load_into_transformer_2` for the low-noise one)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_sd import run_collect, tiny_run_config


@pytest.fixture(scope="module")
def tiny_a14b(tmp_path_factory):
    from core.families.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("a14b"), a14b=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from core.families.tiny_parts import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("a14b_data") / "images", count=2)


def test_each_expert_draws_only_its_side_of_the_boundary():
    from types import SimpleNamespace

    from core.families.wan.loss import expert_sigma_range

    assert expert_sigma_range(SimpleNamespace(expert="high", boundary_ratio=0.875)) == (0.875, 1.0)
    assert expert_sigma_range(SimpleNamespace(expert="low", boundary_ratio=0.875)) == (0.0, 0.875)
    assert expert_sigma_range(SimpleNamespace(expert="")) == (0.0, 1.0)


@pytest.mark.parametrize("expert", ["high", "low"])
def test_an_expert_of_the_diffusers_folder_trains_and_its_files_load_onto_that_expert(tiny_a14b, data, tmp_path,
                                                                                    monkeypatch, expert):
    import core.families.wan.loss as wan_loss
    from diffusers import WanPipeline

    drawn: list[tuple[float, float]] = []
    real = wan_loss.wan_loss

    def spy(*args, **kwargs):
        drawn.append(kwargs["sigma_range"])
        return real(*args, **kwargs)

    monkeypatch.setattr(wan_loss, "wan_loss", spy)
    outputs, events = run_collect(tiny_run_config(tiny_a14b.folder, data, tmp_path / expert, batch_size=1,
                                                  max_train_steps=2, learning_rate=5e-2, wan_expert=expert,
                                                  sample_prompts=["a red thing"]))
    assert set(drawn) == {(0.875, 1.0) if expert == "high" else (0.0, 0.875)}
    assert Path(outputs["lora"]).name == f"{tmp_path.joinpath(expert).name}_{expert}_noise.safetensors"
    assert any(e.kind == "sample" for e in events)
    pipe = WanPipeline.from_pretrained(str(tiny_a14b.folder))
    pipe.load_lora_weights(outputs["diffusers"], adapter_name="t", load_into_transformer_2=expert == "low")
    pipe.load_lora_weights(outputs["lora"], adapter_name="k", load_into_transformer_2=expert == "low")
    trained, other = ((pipe.transformer, pipe.transformer_2) if expert == "high"
                      else (pipe.transformer_2, pipe.transformer))
    layers = [m for m in trained.modules() if "t" in getattr(m, "lora_A", {})]
    assert layers and not any("t" in getattr(m, "lora_A", {}) for m in other.modules())
    for layer in layers:
        torch.testing.assert_close(layer.get_delta_weight("k"), layer.get_delta_weight("t"), rtol=1e-3, atol=1e-5)


def test_comfyuis_low_noise_file_trains_the_low_expert_with_the_high_one_beside_it_for_previews(tiny_a14b, data,
                                                                                              tmp_path):
    from safetensors import safe_open

    low = tiny_a14b.comfy_transformer.with_name("wan2.2_t2v_low_noise_14B_fp16.safetensors")
    outputs, events = run_collect(tiny_run_config(low, data, tmp_path / "comfy", batch_size=1, max_train_steps=1,
                                                  base_model_config=str(tiny_a14b.folder),
                                                  sample_prompts=["a red thing"]))
    logs = [e.message for e in events if e.kind == "log"]
    assert any("training the low-noise expert (wan2.2_t2v_low_noise_14B_fp16.safetensors), boundary 0.875" in m
               for m in logs), logs
    with safe_open(outputs["lora"], "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_wan_expert"] == "low_noise" and meta["ss_base_model_version"] == "wan2.2_t2v_a14b"


def test_both_experts_train_in_one_run_each_on_its_own_steps_and_write_a_pair_that_loads_onto_each(
        tiny_a14b, data, tmp_path, monkeypatch):
    import core.families.wan.loss as wan_loss
    from diffusers import WanPipeline

    drawn: list[tuple[int, tuple[float, float]]] = []
    real = wan_loss.wan_loss

    def spy(network, *args, **kwargs):
        drawn.append((id(network), kwargs["sigma_range"]))
        assert any(p.requires_grad for n, p in network.named_parameters() if "lora_" in n)
        return real(network, *args, **kwargs)

    monkeypatch.setattr(wan_loss, "wan_loss", spy)
    outputs, events = run_collect(tiny_run_config(tiny_a14b.folder, data, tmp_path / "both", batch_size=1,
                                                  max_train_steps=6, learning_rate=5e-2, wan_expert="both",
                                                  sample_prompts=["a red thing"]))
    # Each of the two networks ran, each always on its own side of the boundary (the run's seed draws both).
    sides = dict(drawn)
    assert len(sides) == 2 and set(sides.values()) == {(0.875, 1.0), (0.0, 0.875)}, drawn
    assert len(set(drawn)) == 2
    assert Path(outputs["lora"]).name == "both_high_noise.safetensors"
    assert Path(outputs["lora_low_noise"]).name == "both_low_noise.safetensors"
    assert Path(outputs["diffusers"]).name == "pytorch_lora_weights_high_noise.safetensors"
    assert Path(outputs["diffusers_low_noise"]).name == "pytorch_lora_weights_low_noise.safetensors"
    assert any(e.kind == "sample" for e in events)
    pipe = WanPipeline.from_pretrained(str(tiny_a14b.folder))
    pipe.load_lora_weights(outputs["lora"], adapter_name="high")
    pipe.load_lora_weights(outputs["lora_low_noise"], adapter_name="low", load_into_transformer_2=True)
    pipe.load_lora_weights(outputs["diffusers_low_noise"], adapter_name="low_d", load_into_transformer_2=True)
    high = [m for m in pipe.transformer.modules() if "high" in getattr(m, "lora_A", {})]
    low = [m for m in pipe.transformer_2.modules() if "low" in getattr(m, "lora_A", {})]
    assert high and low
    assert any(float(m.get_delta_weight("high").abs().max()) > 0 for m in high)  # both LoRAs moved off zero
    assert any(float(m.get_delta_weight("low").abs().max()) > 0 for m in low)
    for layer in low:
        torch.testing.assert_close(layer.get_delta_weight("low"), layer.get_delta_weight("low_d"), rtol=1e-3,
                                   atol=1e-5)


def test_a_both_experts_run_stopped_and_resumed_equals_the_uninterrupted_run(tiny_a14b, data, tmp_path):
    from core.tools.convert import read_lora
    from tests.helpers import read_loss_csv

    def config(out: Path, **more) -> dict:
        return tiny_run_config(tiny_a14b.folder, data, out, batch_size=1, max_train_steps=4, save_steps=2,
                               wan_expert="both", timestep_sampling="uniform", learning_rate=5e-2, **more)

    first, _ = run_collect(config(tmp_path / "straight"))
    run_collect(config(tmp_path / "stopped"), stop_at=2)
    second, _ = run_collect(config(tmp_path / "stopped", resume_from="latest"))
    a, b = read_loss_csv(tmp_path / "straight"), read_loss_csv(tmp_path / "stopped")
    assert [r.loss for r in a] == pytest.approx([r.loss for r in b], rel=1e-5)
    for key in ("lora", "lora_low_noise"):
        x, y = read_lora(first[key], family="wan2.2-t2v-a14b"), read_lora(second[key], family="wan2.2-t2v-a14b")
        for name, module in x.modules.items():
            torch.testing.assert_close(y.modules[name].delta(), module.delta(), atol=1e-6, rtol=1e-5, msg=name)


def test_both_experts_load_from_comfyuis_pair_whichever_file_is_picked(tiny_a14b):
    from core.families.wan.load import load_model

    low = tiny_a14b.comfy_transformer.with_name("wan2.2_t2v_low_noise_14B_fp16.safetensors")
    model = load_model(str(low), config_source=str(tiny_a14b.folder), expert="both")
    assert model.expert == "both" and model.boundary_ratio == 0.875
    pipe_high = tiny_a14b.folder / "transformer" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    q = load_file(str(pipe_high))["blocks.0.attn1.to_q.weight"]
    torch.testing.assert_close(model.transformer.state_dict()["blocks.0.attn1.to_q.weight"], q)
    assert not torch.equal(model.other_expert.state_dict()["blocks.0.attn1.to_q.weight"], q)


def test_the_swap_keeps_only_the_called_experts_frozen_weights_on_the_gpu(monkeypatch):
    import core.families.wan.experts as experts

    moves: list[tuple[str, str]] = []
    high, low = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    names = {id(high): "high", id(low): "low"}
    monkeypatch.setattr(experts, "move_frozen", lambda m, device: moves.append((names[id(m)], str(device))))
    experts.swap_on_call([high, low], torch.device("cuda"))
    assert moves == [("low", "cpu")]
    high(torch.zeros(2))
    assert moves == [("low", "cpu")]  # already resident: no move
    low(torch.zeros(2))
    high(torch.zeros(2))
    assert moves[1:] == [("high", "cpu"), ("low", "cuda"), ("low", "cpu"), ("high", "cuda")]


def test_both_experts_train_with_the_inactive_one_waiting_in_cpu_memory(tiny_a14b, data, tmp_path, monkeypatch):
    """The offload path end to end on the CPU (where "the GPU" is the CPU too): the low expert is left where it
    was loaded, its frozen weights take the compute dtype there, the swap hooks run on every call."""
    import core.families.wan.experts as experts

    monkeypatch.setattr(experts, "offloading", lambda cfg: cfg.wan_offload_inactive_expert)
    moves: list[str] = []
    real_move = experts.move_frozen
    monkeypatch.setattr(experts, "move_frozen", lambda m, device: (moves.append(str(device)), real_move(m, device)))
    outputs, events = run_collect(tiny_run_config(tiny_a14b.folder, data, tmp_path / "swap", batch_size=1,
                                                  max_train_steps=6, wan_expert="both",
                                                  wan_offload_inactive_expert=True, sample_prompts=["a red thing"]))
    logs = [e.message for e in events if e.kind == "log"]
    assert any("inactive expert's frozen weights wait in CPU memory" in m for m in logs), logs
    assert moves and Path(outputs["lora_low_noise"]).is_file() and any(e.kind == "sample" for e in events)
