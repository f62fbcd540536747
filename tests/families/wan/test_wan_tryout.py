"""The Test tab with Wan: an image-to-video model draws a clip from the start image given (and asks for one when
none is), a text-to-video model refuses one; on a Wan 2.2 A14B model a low-noise expert's file goes onto
`transformer_2` and a high-noise one onto `transformer`, and picking a run's high-noise file brings its pair."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    from core.families.wan.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tryout_i2v"), a14b=True, i2v=True)


def _expert_file(model_folder: Path, subfolder: str, path: Path, expert: str) -> Path:
    """A LoRA file (random, nonzero) of one expert, written as a run writes it."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from core.families.wan.load import lora_targets
    from core.families.wan.lora_files import write_kohya_file
    from core.lora import peft_state

    network = WanTransformer3DModel.from_pretrained(str(model_folder), subfolder=subfolder)
    network.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=lora_targets(network), init_lora_weights=False))
    return write_kohya_file(peft_state(network), path, variant="wan2.2-i2v-a14b", alpha=2.0,
                            metadata={"ss_wan_expert": f"{expert}_noise"})


def test_an_i2v_model_draws_a_clip_from_the_start_image_and_asks_for_one_when_none_is_given(tiny_i2v, tmp_path):
    from core.sample import CLIP_FRAMES, clear_pipeline_cache, generate_images

    start = tmp_path / "start.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(start)
    try:
        clip = generate_images(str(tiny_i2v.folder), None, ["a red thing"], steps=2, guidance=1.0, width=32,
                               height=32, start_image=str(start))[0]
        assert len(clip.info[CLIP_FRAMES]) == 17
        with pytest.raises(ValueError, match="start image: choose one"):
            generate_images(str(tiny_i2v.folder), None, ["a red thing"], steps=1, guidance=1.0, width=32, height=32)
    finally:
        clear_pipeline_cache()


def test_a_text_to_video_model_refuses_a_start_image():
    from core.sample import start_image_argument

    with pytest.raises(ValueError, match="takes no start image"):
        start_image_argument("wan2.1-t2v-1.3b", "start.png")
    assert start_image_argument("wan2.1-t2v-1.3b", None) == {}


def test_each_expert_file_goes_on_its_own_expert_and_a_runs_high_noise_file_brings_its_pair(tiny_i2v, tmp_path,
                                                                                           monkeypatch):
    from diffusers import WanImageToVideoPipeline

    from core.lora_stack import applied, expert_target
    from ui import state, tryout_tab

    high = _expert_file(tiny_i2v.folder, "transformer", tmp_path / "run_high_noise.safetensors", "high")
    low = _expert_file(tiny_i2v.folder, "transformer_2", tmp_path / "run_low_noise.safetensors", "low")
    renamed = low.with_name("renamed.safetensors")  # its metadata still says low_noise
    renamed.write_bytes(low.read_bytes())
    pipe = WanImageToVideoPipeline.from_pretrained(str(tiny_i2v.folder))
    assert expert_target(pipe, str(low)) == {"load_into_transformer_2": True}
    assert expert_target(pipe, str(renamed)) == {"load_into_transformer_2": True}
    assert expert_target(pipe, str(high)) == {}
    before = pipe.transformer_2.blocks[0].attn1.to_q.weight.detach().clone()
    with applied(pipe, [(str(high), 1.0), (str(low), 0.5)], fuse=False):
        adapters = {name: set(adapters) for name, adapters in pipe.get_list_adapters().items()}
        assert adapters == {"transformer": {"tryout_0"}, "transformer_2": {"tryout_1"}}
        layer = pipe.transformer_2.blocks[0].attn1.to_q
        assert layer.scaling["tryout_1"] == pytest.approx(0.5)
    assert torch.equal(pipe.transformer_2.blocks[0].attn1.to_q.weight, before)
    assert not any(pipe.get_list_adapters().values())

    monkeypatch.setattr(state, "resolve_user_path", lambda text: Path(text))
    monkeypatch.setattr(tryout_tab, "two_experts", lambda base: True)
    assert tryout_tab.with_expert_pairs([(str(high), 0.8)], "base") == [(str(high), 0.8), (str(low), 0.8)]
    assert tryout_tab.with_expert_pairs([(str(high), 0.8), (str(low), 0.3)], "base") == [(str(high), 0.8),
                                                                                            (str(low), 0.3)]
    assert tryout_tab.split_more(("a", 0.5, "", 0.8, "start.png")) == (("a", 0.5, "", 0.8), "start.png")
    assert tryout_tab.split_more(("a", 0.5)) == (("a", 0.5), None)
