"""Every family, trained for two steps on its tiny model through the public path (core.train.run_training):
it writes both files; each loads key for key in the family's diffusers pipeline (`load_lora_weights`) and
gives the same LoRA; every module of the kohya file is a key of ComfyUI's map; the LoRA tools round-trip
it (inspect, convert both ways, resize, merge); and the Test tab draws with it (weight 0 is the base)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.families.comfy_keys import comfy_lora_key_map
from tests.families.table import FAMILIES, Built, TinyFamily
from tests.fixtures.tiny_sd import run_collect, tiny_run_config

ADAPTER = "c"


@dataclass
class Trained:
    family: TinyFamily
    tiny: Built
    kohya: Path
    diffusers: Path
    losses: list[float]


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> Path:
    from core.families.tiny_parts import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data") / "images", count=2)


@pytest.fixture(scope="module", params=FAMILIES, ids=str)
def trained(request, built, two_images, tmp_path_factory) -> Trained:
    family: TinyFamily = request.param
    tiny = built(family)
    out = tmp_path_factory.mktemp(f"run_{family.name}")
    # A large learning rate: two steps move the LoRA far enough for the Test tab to see it.
    outputs, events = run_collect(tiny_run_config(tiny.folder, two_images, out, batch_size=1, max_train_steps=2,
                                                  learning_rate=5e-2, output_name="conf"))
    losses = [e.loss for e in events if e.kind == "progress"]
    return Trained(family, tiny, Path(outputs["lora"]), Path(outputs["diffusers"]), losses)


def _pipeline(trained: Trained):
    import diffusers

    pipe = getattr(diffusers, trained.family.pipeline).from_pretrained(str(trained.tiny.folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora_components(pipe, family: TinyFamily) -> dict[str, torch.nn.Module]:
    from core.family_api.registry import family_info

    names = [family.network, *family_info(family.name).text_encoders]
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def _loaded_deltas(trained: Trained, path: Path) -> dict[str, torch.Tensor]:
    """Load `path` with the pipeline's own loader; the dW of every module that got the adapter."""
    pipe = _pipeline(trained)
    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    handler = Catch(logging.WARNING)
    for logger in loggers:
        logger.addHandler(handler)
    try:
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    # peft names the keys of a file no layer took ("unexpected keys ... not found in the model")
    left = [m for m in records if re.search(r"unexpected keys|not found in the model|were not used", m, re.I)]
    assert not left, left
    deltas = {}
    for component, module in _lora_components(pipe, trained.family).items():
        for name, layer in module.named_modules():
            if ADAPTER in getattr(layer, "lora_A", {}):
                deltas[f"{component}.{name}"] = layer.get_delta_weight(ADAPTER).detach().float()
    return deltas


def _file_modules(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
    # module names: PEFT's (lora_A / lora_B [.adapter]), diffusers' old (lora.down / lora.up), kohya's
    return {re.sub(r"\.(lora[._](?:A|B|down|up)(?:\.\w+)?\.weight|alpha)$", "", k) for k in keys}


def test_a_run_writes_both_files_and_each_loads_key_for_key_in_the_diffusers_pipeline(trained: Trained):
    assert len(trained.losses) == 2 and all(np.isfinite(trained.losses))
    assert trained.kohya.is_file() and trained.diffusers.is_file()
    from_diffusers = _loaded_deltas(trained, trained.diffusers)
    # every module of the diffusers file became a LoRA layer of the pipeline, and nothing else did
    assert len(from_diffusers) == len(_file_modules(trained.diffusers)) > 0
    assert any(torch.count_nonzero(d) for d in from_diffusers.values())
    kohya = trained.kohya
    if not trained.family.kohya_in_pipeline:  # through our converter (diffusers' assumes the real widths)
        from core.tools.convert import convert_lora

        kohya = convert_lora(kohya, trained.kohya.parent / "from_kohya", "diffusers", family=trained.family.name)
    from_kohya = _loaded_deltas(trained, kohya)
    assert set(from_kohya) == set(from_diffusers)
    for name, delta in from_diffusers.items():
        torch.testing.assert_close(from_kohya[name], delta, atol=1e-5, rtol=1e-3, msg=name)


def test_every_module_of_the_kohya_file_is_a_key_of_comfyuis_map(trained: Trained):
    from core.family_api.registry import family_info

    if trained.tiny.single_file is None:
        pytest.skip("no ComfyUI single file for this family")
    pipe = _pipeline(trained)
    info = family_info(trained.family.name)
    encoders = {prefix: getattr(pipe, name).state_dict()
                for prefix, name in zip(info.kohya_te_prefixes, info.text_encoders) if getattr(pipe, name, None)}
    key_map = comfy_lora_key_map(trained.tiny.single_file, getattr(pipe, trained.family.network).state_dict(),
                                 encoders)
    modules = _file_modules(trained.kohya)
    assert modules and modules <= set(key_map), sorted(modules - set(key_map))[:5]


def test_the_lora_tools_round_trip_the_file(trained: Trained, tmp_path):
    from core.export.inspect import inspect_lora
    from core.family_api.registry import family_info
    from core.tools.convert import convert_lora, read_lora, write_like
    from core.tools.extract import resize_file
    from core.tools.merge import combine_files

    name = trained.family.name
    info = inspect_lora(trained.kohya)
    assert (info.format, info.family) == (trained.family.main_format, name) and info.ranks == [4]

    def deltas(path) -> dict[str, torch.Tensor]:
        return {k: m.delta().float() for k, m in read_lora(path, family=name).modules.items()}

    before = deltas(trained.kohya)
    # (a diffusers file without our metadata does not say its family: the tools are told it)
    written = convert_lora(trained.kohya, tmp_path / "diffusers", "diffusers", family=name)
    back = convert_lora(written, tmp_path / "back.safetensors", "kohya", family=name)
    after = deltas(back)
    assert read_lora(back, family=name).metadata["ss_base_model_version"] == family_info(name).ss_base_model_version
    assert after.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-3, atol=1e-5, msg=key)

    rank = max(m.rank for m in read_lora(trained.kohya, family=name).modules.values())  # fused modules: more
    full, report = resize_file(trained.kohya, tmp_path / "full.safetensors", rank=rank, dtype=None)
    assert report.max_error < 1e-4 and inspect_lora(full).family == name
    small, _ = resize_file(trained.kohya, tmp_path / "r2.safetensors", rank=2, dtype=None)
    resized = read_lora(small, family=name)
    assert {m.rank for m in resized.modules.values()} <= {1, 2} and inspect_lora(small).family == name
    assert resized.metadata["ss_resized_from"] == trained.kohya.name

    merged, _ = combine_files([trained.kohya, trained.kohya], [1.0, 0.5], family=name)
    for key, module in merged.modules.items():
        torch.testing.assert_close(module.delta().float(), 1.5 * before[key], rtol=1e-3, atol=1e-5, msg=key)
    assert inspect_lora(write_like(merged, tmp_path / "merged.safetensors", dtype=None)).family == name


def test_the_test_tab_draws_with_both_files_and_weight_0_is_the_base(trained: Trained, tmp_path):
    from core.events import RunContext
    from core.sample import clear_pipeline_cache, generate_images
    from core.tryout import generate_target

    model = str(trained.tiny.folder)
    kwargs = dict(seed=3, steps=2, width=32, height=32)
    try:
        base = np.asarray(generate_images(model, None, ["a red thing"], **kwargs)[0])
        zero = np.asarray(generate_images(model, trained.diffusers, ["a red thing"], weight=0.0, **kwargs)[0])
        full = np.asarray(generate_images(model, trained.diffusers, ["a red thing"], weight=1.0, **kwargs)[0])
        second = trained.kohya if trained.family.kohya_in_pipeline else trained.diffusers
        kohya = np.asarray(generate_images(model, second, ["a red thing"], weight=1.0, **kwargs)[0])
        out = tmp_path / "tryout.png"
        generate_target(model, [(second, 1.0)], "a red thing", [out], **kwargs)(RunContext())
    finally:
        clear_pipeline_cache()
    assert base.shape == (32, 32, 3) and np.array_equal(zero, base)
    assert not np.array_equal(full, base)
    assert np.abs(full.astype(int) - kohya.astype(int)).max() <= 1  # the same LoRA from either file
    assert out.is_file()
