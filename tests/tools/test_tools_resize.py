"""Resizing a LoRA by SVD, and extracting one from two models."""
from __future__ import annotations

import pytest
import torch

from core.tools.convert import read_lora, write_kohya
from core.tools.modules import LoraModule, LoraToolError, factor_delta, rank_for_energy
from core.tools.resize import extract_modules, resize_modules
from tests.fixtures.tool_loras import make_sd_lora


def _random_modules(seed: int = 0) -> dict[str, LoraModule]:
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_unet_linear": LoraModule(torch.randn(8, 24, generator=g), torch.randn(16, 8, generator=g), 4.0),
        "lora_unet_conv": LoraModule(torch.randn(6, 8, 3, 3, generator=g), torch.randn(12, 6, 1, 1, generator=g), 6.0),
    }


def test_resizing_to_the_full_rank_gives_back_the_original_lora():
    modules = _random_modules()
    resized, report = resize_modules(modules, rank=64)  # more than any module has: each keeps its own rank
    for name, module in modules.items():
        assert resized[name].rank == module.rank
        torch.testing.assert_close(resized[name].delta(), module.delta(), rtol=1e-4, atol=1e-4)
        assert resized[name].scale == pytest.approx(module.scale)  # the user's LoRA weight keeps its meaning
    assert report.overall_error < 1e-5


def test_the_reported_error_is_the_real_relative_error_and_grows_as_the_rank_shrinks():
    modules = _random_modules(1)
    errors = []
    for rank in (6, 4, 2, 1):
        resized, report = resize_modules(modules, rank=rank)
        actual = {n: float((resized[n].delta() - m.delta()).norm() / m.delta().norm()) for n, m in modules.items()}
        for entry in report.modules:
            assert entry.error == pytest.approx(actual[entry.name], rel=1e-3, abs=1e-5)
            assert entry.new_rank == min(rank, modules[entry.name].rank)
        errors.append(report.overall_error)
    assert errors == sorted(errors) and errors[-1] > errors[0] > 0
    assert "relative error overall" in report.summary()


def test_an_energy_ratio_keeps_just_enough_singular_values():
    values = torch.tensor([4.0, 2.0, 1.0, 0.5])  # energies 16, 4, 1, 0.25 of 21.25
    assert rank_for_energy(values, 0.75) == 1
    assert rank_for_energy(values, 0.94) == 2  # 20 / 21.25 = 0.941
    assert rank_for_energy(values, 0.95) == 3
    assert rank_for_energy(values, 1.0) == 4
    with pytest.raises(LoraToolError, match=r"\(0, 1\]"):
        rank_for_energy(values, 1.5)
    modules = _random_modules(2)
    resized, report = resize_modules(modules, energy=0.9)
    for entry in report.modules:
        assert entry.error <= (1 - 0.9) ** 0.5 + 1e-6  # kept energy >= 90% means error <= sqrt(10%)
    with pytest.raises(LoraToolError, match="exactly one"):
        resize_modules(modules, rank=2, energy=0.9)


def test_a_resized_trained_lora_loads_in_diffusers_and_matches_at_full_rank(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    from tests.tools.test_tools_merge import unet_out

    made = make_sd_lora(tiny_sd1.folder, tmp_path / "lora", variant="lora", seed=2)
    lora = read_lora(made.kohya)
    full, _ = resize_modules(lora.modules, rank=4)
    small, small_report = resize_modules(lora.modules, rank=1)
    lora.modules = full
    path_full = write_kohya(lora, tmp_path / "full.safetensors", dtype=None)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1.folder), safety_checker=None)
    pipe.load_lora_weights(str(path_full), adapter_name="full")
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(made.model.unet), rtol=1e-4, atol=1e-4)
    assert small_report.overall_error > 0.1


def test_an_energy_resized_lora_with_a_rank_per_module_loads_in_diffusers_as_it_bakes(tiny_sd1, tmp_path):
    # diffusers' kohya loader mis-scales files whose alpha varies per module, so resizing keeps
    # each module's alpha (the factors absorb the new rank) instead of scaling alpha with it.
    from diffusers import StableDiffusionPipeline

    from core.tools.merge import bake_into_modules, open_base_weights
    from tests.tools.test_tools_merge import unet_out

    made = make_sd_lora(tiny_sd1.folder, tmp_path / "lora", variant="lora", rank=8, alpha=8, seed=3)
    lora = read_lora(made.kohya)
    lora.modules, _ = resize_modules(lora.modules, energy=0.8)
    assert len({m.rank for m in lora.modules.values() if not m.is_conv}) > 1
    path = write_kohya(lora, tmp_path / "dynamic.safetensors", dtype=None)
    baked = open_base_weights(str(tiny_sd1.folder))
    bake_into_modules(baked.components, read_lora(path), 1.0)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1.folder), safety_checker=None)
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(baked.components["unet"]), rtol=1e-4, atol=1e-4)


def test_extracting_a_lora_from_a_model_and_its_merged_copy_recovers_the_lora(tiny_sd1, tmp_path):
    from core.families.sd.load import load_sd_model
    from core.tools.merge import bake_into_sd

    made = make_sd_lora(tiny_sd1.folder, tmp_path / "lora", conv_rank=0, text_encoder=False, seed=4)
    merged, _ = bake_into_sd(str(tiny_sd1.folder), [(made.kohya, 1.0)], tmp_path / "merged.safetensors", dtype=None)
    base = load_sd_model(str(tiny_sd1.folder)).unet.state_dict()
    tuned = load_sd_model(str(merged), model_config=str(tiny_sd1.folder)).unet.state_dict()
    strip = lambda state: {k[: -len(".weight")]: v for k, v in state.items() if k.endswith(".weight")}  # noqa: E731
    modules, report = extract_modules(strip(base), strip(tuned), rank=4)
    lora = read_lora(made.kohya)
    expected = {name.split("lora_unet_", 1)[1]: m for name, m in lora.modules.items()}
    assert {k.replace(".", "_") for k in modules} == set(expected)
    for path, module in modules.items():
        torch.testing.assert_close(module.delta(), expected[path.replace(".", "_")].delta(), rtol=1e-3, atol=1e-5)
    assert report.overall_error < 1e-3
    assert report.skipped_same  # the untouched layers are listed, not turned into zero LoRAs


def test_extract_refuses_models_of_different_shapes():
    base = {"a": torch.zeros(4, 4)}
    with pytest.raises(LoraToolError, match="not the same architecture"):
        extract_modules(base, {"a": torch.zeros(4, 5)}, rank=2)


def test_factor_delta_puts_the_scale_into_alpha():
    delta = torch.randn(8, 5)
    module, error = factor_delta(delta, 5, alpha=2.0)
    assert module.alpha == 2.0 and error < 1e-5
    torch.testing.assert_close(module.delta(), delta, rtol=1e-4, atol=1e-5)
