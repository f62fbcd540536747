"""Several LoRAs at once in the Test tab: each at its own weight, the way WebUI adds them, swept one at a
time in the compare grid, fused into the weights for speed, and the base model untouched after."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.tool_loras import make_sd_lora

SETTINGS = dict(seed=3, steps=2, guidance=5.0, width=64, height=64)
PROMPT = ["a red thing"]


@pytest.fixture(scope="module")
def two_loras(tiny_sd1, tmp_path_factory):
    """Two different LoRAs for the tiny SD 1.x model (UNet with LoCon conv layers + text encoder), kohya files."""
    root = tmp_path_factory.mktemp("multi_lora")
    first = make_sd_lora(tiny_sd1.folder, root / "a", seed=3, name="style_a")
    second = make_sd_lora(tiny_sd1.folder, root / "b", seed=11, name="style_b")
    yield first.kohya, second.kohya
    from core.sample import clear_pipeline_cache

    clear_pipeline_cache()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def weights_of(pipe) -> dict[str, torch.Tensor]:
    """The UNet's and text encoder's weights by name, copied."""
    return {f"{part}.{key}": value.detach().clone() for part in ("unet", "text_encoder")
            for key, value in getattr(pipe, part).state_dict().items()}


def same_weights(before: dict[str, torch.Tensor], pipe) -> bool:
    now = weights_of(pipe)
    return before.keys() == now.keys() and all(torch.equal(before[k], now[k]) for k in before)


def test_two_loras_at_0_8_and_0_5_give_the_image_of_both_baked_in_as_webui_does(tiny_sd1, two_loras, tmp_path):
    """WebUI adds 0.8·ΔA + 0.5·ΔB to each weight. The reference bakes both kohya files into the checkpoint
    with the LoRA tools' own reader (core.tools.merge, not diffusers); fused and unfused must both match it."""
    from core.sample import generate_images
    from core.tools.merge import bake_into_sd

    a, b = two_loras
    folder = str(tiny_sd1.folder)
    baked, report = bake_into_sd(folder, [(a, 0.8), (b, 0.5)], tmp_path / "baked.safetensors", dtype=None)
    assert report.merged
    reference = generate_images(str(baked), None, PROMPT, model_config=folder, **SETTINGS)[0]
    both = [(a, 0.8), (b, 0.5)]
    fused = generate_images(folder, None, PROMPT, loras=both, fuse=True, **SETTINGS)[0]
    unfused = generate_images(folder, None, PROMPT, loras=both, fuse=False, **SETTINGS)[0]
    base = generate_images(folder, None, PROMPT, **SETTINGS)[0]
    only_a = generate_images(folder, a, PROMPT, weight=0.8, **SETTINGS)[0]  # the single-LoRA form still works
    # fp32 all along: the sums differ only in their rounding order, a level of 8-bit colour at most.
    assert max_diff(fused, reference) <= 1 and max_diff(unfused, reference) <= 1
    # ...and the comparison is not vacuous: each LoRA changes the picture by far more.
    assert max_diff(fused, base) >= 8 and max_diff(fused, only_a) >= 4
    # The Test tab's own choice (unfused on the CPU, where fusing an SD-sized model costs more than it saves).
    assert generate_images(folder, None, PROMPT, loras=both, **SETTINGS)[0].tobytes() == unfused.tobytes()
    with pytest.raises(ValueError, match="not both"):
        generate_images(folder, a, PROMPT, loras=both, **SETTINGS)


def test_all_weights_at_zero_give_the_base_image_and_the_base_is_untouched_after(tiny_sd1, two_loras):
    from core.sample import generate_images, load_pipeline

    a, b = two_loras
    folder = str(tiny_sd1.folder)
    base = generate_images(folder, None, PROMPT, **SETTINGS)[0]
    pipe, _, _ = load_pipeline(folder)
    before = weights_of(pipe)
    zero = generate_images(folder, None, PROMPT, loras=[(a, 0.0), (b, 0.0)], **SETTINGS)[0]
    assert zero.tobytes() == base.tobytes()
    for fuse in (True, False):
        with_loras = generate_images(folder, None, PROMPT, loras=[(a, 0.8), (b, 0.5)], fuse=fuse, **SETTINGS)[0]
        assert with_loras.tobytes() != base.tobytes()
        # The same names, the same values: no adapter, no PEFT wrapper, no rounding left behind.
        assert same_weights(before, pipe)
        assert pipe.get_list_adapters() == {} or not any(pipe.get_list_adapters().values())
    again = generate_images(folder, None, PROMPT, **SETTINGS)[0]
    assert again.tobytes() == base.tobytes()


def test_the_compare_grid_sweeps_the_first_lora_while_the_second_stays_at_0_5(tiny_sd1, two_loras, tmp_path):
    from core.events import RunContext
    from core.sample import generate_images
    from core.tryout import compare_target, generate_target

    a, b = two_loras
    folder = str(tiny_sd1.folder)
    target = compare_target(folder, [str(a)], PROMPT[0], tmp_path / "grid.png", weights=(0.0, 1.0),
                            others=[(str(b), 0.5)], **SETTINGS)
    result = target(RunContext())
    assert result.message.startswith("Grid of 2 images") and not result.stopped
    with Image.open(result.paths[0]) as grid:
        column = grid.width // 2  # one row, two equal columns, each at least as wide as its caption
        assert grid.height == 64 + 18 and column >= 64
        cells = [grid.crop((x + (column - 64) // 2, 18, x + (column - 64) // 2 + 64, 82)).convert("RGB")
                 for x in (0, column)]
    # Weight 0 of the first LoRA is the second one alone at 0.5; weight 1 is both.
    assert cells[0].tobytes() == generate_images(folder, None, PROMPT, loras=[(b, 0.5)], **SETTINGS)[0].tobytes()
    both = generate_images(folder, None, PROMPT, loras=[(a, 1.0), (b, 0.5)], **SETTINGS)[0]
    assert cells[1].tobytes() == both.tobytes() != cells[0].tobytes()

    # Generating with both as a Test-tab job: the message names both, the image is the direct one.
    out = tmp_path / "gen.png"
    options = {k: v for k, v in SETTINGS.items() if k != "seed"}
    done = generate_target(folder, [(str(a), 1.0), (str(b), 0.5)], PROMPT[0], [out], seed=3, **options)(RunContext())
    assert "with LoRAs style_a at 1 and style_b at 0.5" in done.message
    with Image.open(out) as written:
        assert written.convert("RGB").tobytes() == both.tobytes()


def test_fused_generation_equals_unfused_within_tolerance_and_restores_the_base_weights(tiny_sd1, two_loras):
    from core.lora_stack import applied, lora_layers
    from core.sample import generate_images, load_pipeline

    a, b = two_loras
    folder = str(tiny_sd1.folder)
    both = [(a, 0.8), (b, 0.5)]
    pipe, _, _ = load_pipeline(folder)
    before = weights_of(pipe)
    with applied(pipe, both, fuse=True) as fused:
        assert fused
        layers = lora_layers(pipe, ["tryout_0", "tryout_1"])
        assert layers and all(layer.merged for layer in layers)
        inside = weights_of(pipe)  # the wrapped layers' weights are named "<layer>.base_layer.weight" now
        moved = [k for k, v in inside.items()
                 if ".base_layer." in k and not torch.equal(v, before[k.replace(".base_layer", "")])]
        assert moved  # the deltas really are in the weights
    assert same_weights(before, pipe)
    fused_image = generate_images(folder, None, PROMPT, loras=both, fuse=True, **SETTINGS)[0]
    unfused_image = generate_images(folder, None, PROMPT, loras=both, fuse=False, **SETTINGS)[0]
    assert max_diff(fused_image, unfused_image) <= 1
    assert same_weights(before, pipe)


def test_a_quantized_or_fp8_layer_is_never_fused():
    from torch import nn

    from core.lora_stack import fusable

    class Wrapped(nn.Module):
        def __init__(self, weight: torch.Tensor):
            super().__init__()
            self.base = nn.Linear(4, 4, bias=False)
            self.base.weight = nn.Parameter(weight, requires_grad=False)

        def get_base_layer(self) -> nn.Module:
            return self.base

    assert fusable([Wrapped(torch.zeros(4, 4)), Wrapped(torch.zeros(4, 4, dtype=torch.bfloat16))])
    assert not fusable([Wrapped(torch.zeros(4, 4)), Wrapped(torch.zeros(4, 4, dtype=torch.int8))])
    assert not fusable([Wrapped(torch.zeros(4, 4).to(torch.float8_e4m3fn))])


def test_a_missing_second_lora_file_leaves_no_lora_behind(tiny_sd1, two_loras, tmp_path):
    from core.sample import generate_images, load_pipeline

    a, _ = two_loras
    folder = str(tiny_sd1.folder)
    pipe, _, _ = load_pipeline(folder)
    before = weights_of(pipe)
    with pytest.raises((OSError, ValueError)):
        generate_images(folder, None, PROMPT, loras=[(a, 0.8), (tmp_path / "nope.safetensors", 0.5)], **SETTINGS)
    assert same_weights(before, pipe)  # the first one, already loaded, was taken off again


def test_a_generate_job_of_three_images_loads_each_lora_once_and_draws_what_single_generates_draw(
        tiny_sd1, two_loras, tmp_path, monkeypatch):
    from core.events import RunContext
    from core.sample import generate_images, load_pipeline
    from core.tryout import generate_target

    a, b = two_loras
    folder = str(tiny_sd1.folder)
    both = [(str(a), 0.8), (str(b), 0.5)]
    options = {k: v for k, v in SETTINGS.items() if k != "seed"}
    expected = [generate_images(folder, None, PROMPT, loras=both, seed=seed, **options)[0] for seed in (3, 4, 5)]
    pipe, _, _ = load_pipeline(folder)  # the cached pipeline the job uses
    before = weights_of(pipe)
    loads = []
    real_load = pipe.load_lora_weights
    monkeypatch.setattr(pipe, "load_lora_weights", lambda *args, **kw: loads.append(args[0]) or real_load(*args, **kw))
    outs = [tmp_path / f"gen-{index}.png" for index in range(3)]
    done = generate_target(folder, both, PROMPT[0], outs, seed=3, **options)(RunContext())
    assert done.message.startswith("Generated 3 of 3 image(s) with LoRAs style_a at 0.8 and style_b at 0.5")
    assert loads == [str(a), str(b)]  # once per job, not once per image
    for out, want in zip(outs, expected):
        with Image.open(out) as written:
            assert written.convert("RGB").tobytes() == want.tobytes()
    assert same_weights(before, pipe)  # and taken off after the job


def test_a_stop_during_a_slow_image_ends_it_at_the_next_step_and_saves_nothing(tiny_sd1, two_loras, tmp_path):
    # On a slow CPU one image can take minutes: Stop must not wait for its last denoising step.
    from core.events import RunContext
    from core.sample import load_pipeline
    from core.tryout import compare_target, generate_target

    folder = str(tiny_sd1.folder)
    pipe = load_pipeline(folder)[0]
    calls, stop_at = [], [3]

    def count_and_stop(*_):
        calls.append(1)
        if len(calls) == stop_at[0]:
            ctx.stop_flag.set()  # the user presses Stop during the third step of the first image

    options = {"steps": 40, "guidance": 1.0, "width": 64, "height": 64}
    hook = pipe.unet.register_forward_hook(count_and_stop)
    try:
        ctx = RunContext()
        out = tmp_path / "slow.png"
        result = generate_target(folder, [], PROMPT[0], [out, tmp_path / "next.png"], seed=1, **options)(ctx)
        assert result.stopped and result.paths == [] and not out.exists()
        assert result.message.startswith("Stopped: Generated 0 of 2")
        assert len(calls) == 3  # the step in progress finishes, the other 37 are skipped
        assert not getattr(pipe, "_interrupt", False)  # the next job draws normally

        # The compare grid the same: stopped in its first cell, no grid with holes.
        calls.clear()
        ctx = RunContext()
        grid = tmp_path / "grid.png"
        result = compare_target(folder, [str(two_loras[0])], PROMPT[0], grid, weights=(0.0, 1.0), **options)(ctx)
        assert result.stopped and not grid.exists() and len(calls) == 3

        calls.clear()
        stop_at[0] = 0  # nobody presses Stop
        ctx = RunContext()
        done = generate_target(folder, [], PROMPT[0], [out], seed=1, **options)(ctx)
        assert not done.stopped and out.exists() and len(calls) == 40
    finally:
        hook.remove()
