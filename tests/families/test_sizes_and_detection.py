"""Every family: the registry's sizes are its real network counted on the meta device; the family is told
from its diffusers folder, from ComfyUI's single file and from its hub name; GPU-only settings are refused
on a machine without CUDA in one sentence that says what to change, before a run scans or loads anything."""
from __future__ import annotations

import pytest
import torch

from tests.families.table import FAMILIES, TinyFamily


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_the_registry_size_is_the_real_network_built_on_the_meta_device(family: TinyFamily):
    from core.family_api.registry import family_info

    with torch.device("meta"):
        network = family.meta_network()
    assert sum(p.numel() for p in network.parameters()) == family_info(family.name).trained_params


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_the_family_is_told_from_its_folder_its_single_file_and_its_name(family: TinyFamily, built):
    from core.family_api.lookup import detect_image_family, family_for_model, family_impl
    from core.model_info import detect_model

    tiny = built(family)
    assert detect_image_family(str(tiny.folder)) == family.name
    assert detect_model(str(tiny.folder)).family == family.name
    assert family_for_model(str(tiny.folder)) is family_impl(family.name)
    assert detect_model(family.hub_name).family == family.name
    if tiny.single_file is not None:
        assert detect_image_family(str(tiny.single_file)) == family.name
        assert detect_model(str(tiny.single_file)).family == family.name
        assert family_for_model(str(tiny.single_file)) is family_impl(family.name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")
@pytest.mark.parametrize("family", [f for f in FAMILIES if f.gpu_only], ids=str)
def test_gpu_only_settings_are_refused_on_the_cpu_in_one_sentence(family: TinyFamily):
    from core.config import TrainConfig
    from core.family_api.lookup import family_impl

    impl = family_impl(family.name)
    for key, value in family.gpu_only.items():
        with pytest.raises(ValueError) as refused:
            impl.check(TrainConfig(base_model="x", train_data_dir="y", **{key: value}))
        message = str(refused.value)
        # one sentence: it names the GPU it needs and what to set instead
        assert "CUDA" in message and message.endswith(".") and ". " not in message, message
        assert any(word in message for word in ("set ", "use ")), message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")
@pytest.mark.parametrize("family", [f for f in FAMILIES if f.gpu_only], ids=str)
def test_a_run_with_a_gpu_only_setting_stops_before_scanning_or_loading_anything(family: TinyFamily, built,
                                                                                  tmp_path):
    from core.events import RunContext
    from core.families.tiny_parts import make_image_folder
    from core.presets import resolve_config
    from core.train import run_training
    from tests.fixtures.tiny_sd import tiny_run_config

    data = make_image_folder(tmp_path / "data", count=2)
    for key, value in family.gpu_only.items():
        events: list = []
        ctx = RunContext()
        ctx.listeners.append(events.append)
        with pytest.raises(ValueError, match="CUDA"):
            run_training(resolve_config(tiny_run_config(built(family).folder, data, tmp_path / key, **{key: value})),
                         ctx)
        logs = [e.message for e in events if e.kind == "log"]
        assert not any(m.startswith(("Scanning", "Loading model", "Model:")) for m in logs), logs
