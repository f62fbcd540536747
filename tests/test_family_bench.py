"""The FLUX.2 / Krea 2 / Wan benches read the peers' step times from their progress bars, give the examples
exactly our LoRA targets, and read musubi's source commit from their own lock file."""
import torch

from bench.families_vs_examples import (_FLUX2_TARGETS, _KREA2_TARGETS, _QWEN_TARGETS, _SD3_TARGETS,
                                        _ZIMAGE_TARGETS, peer_step_seconds)
from bench.wan_vs_musubi import LOCK, step_seconds_from_tqdm


def test_the_examples_step_time_comes_from_the_steps_bar_not_the_caching_bar(tmp_path):
    log = tmp_path / "peer.log"
    log.write_text("Caching latents:  50%|##   | 2/4 [00:20<00:20, 10.4s/it]\r"
                   "Steps:  25%|##   | 1/4 [00:41<02:04, 41.5s/it]\rSteps:  25%|##   | 1/4 [00:41<02:04, 41.5s/it, loss=1]"
                   "\rSteps: 100%|#####| 4/4 [03:11<00:00, 50.0s/it, loss=1]")
    assert peer_step_seconds(log) == 50.0  # (191 - 41) / 3


def test_musubis_step_time_comes_from_its_steps_bar(tmp_path):
    log = tmp_path / "musubi.log"
    log.write_text("steps:  25%|#  | 1/4 [00:00<00:00, 2508it/s, avr_loss=1]\rsteps:  50%|#  | 2/4 [00:31<00:31, 15.9s/it]"
                   "\rsteps: 100%|##| 4/4 [01:31<00:00, 30s/it]")
    assert step_seconds_from_tqdm(log) == 30.0  # (91 - 31) / 2: its step 1 shows at 00:00


def peft_match(model: torch.nn.Module, targets: str) -> list[str]:
    """PEFT's rule for a list of target_modules: the whole name or a "."-suffix of it."""
    wanted = targets.split(",")
    return sorted(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                  and any(name == t or name.endswith("." + t) for t in wanted))


def test_qwen_image_z_image_and_sd3_examples_get_the_same_lora_targets_as_ours():
    from core.families.qwen_image.load import lora_targets as qwen_targets
    from core.families.qwen_image.tiny import tiny_qwen_transformer
    from core.families.sd3.family import lora_targets as sd3_targets
    from core.families.sd3.tiny import tiny_sd3_transformer
    from core.families.zimage.load import lora_targets as zimage_targets
    from core.families.zimage.tiny import tiny_zimage_transformer

    # The SD3 one with the dual attention (attn2) of SD3.5 Medium's first block.
    for transformer, ours, targets in [(tiny_qwen_transformer(), qwen_targets, _QWEN_TARGETS),
                                       (tiny_zimage_transformer(), zimage_targets, _ZIMAGE_TARGETS),
                                       (tiny_sd3_transformer("sd3"), sd3_targets, _SD3_TARGETS)]:
        assert peft_match(transformer, targets) == sorted(ours(transformer))


def test_the_examples_get_the_same_lora_targets_as_ours():
    from core.families.flux2.load import DOUBLE, SINGLE
    from core.families.flux2.tiny import tiny_flux2_transformer
    from core.families.flux2.load import lora_targets as flux2_targets
    from core.families.krea2.load import BLOCK_TARGETS
    from core.families.krea2.load import lora_targets as krea2_targets
    from core.families.krea2.tiny import tiny_krea2_transformer

    flux2 = tiny_flux2_transformer()  # 1 double + 2 single blocks, as the bench's model
    assert set(DOUBLE) | {"attn.to_qkv_mlp_proj"} <= set(_FLUX2_TARGETS.split(",")) and SINGLE
    assert peft_match(flux2, _FLUX2_TARGETS) == sorted(flux2_targets(flux2))
    krea2 = tiny_krea2_transformer()
    assert _KREA2_TARGETS.split(",") == sorted(BLOCK_TARGETS, key=_KREA2_TARGETS.split(",").index)
    assert peft_match(krea2, _KREA2_TARGETS) == sorted(krea2_targets(krea2))


def test_the_musubi_lock_names_the_commit_its_source_is_read_at():
    sources = [line.split() for line in LOCK.read_text().splitlines() if line.startswith("# source ")]
    assert len(sources) == 1 and sources[0][2] == "kohya-ss/musubi-tuner" and len(sources[0][3]) == 40


def test_the_kohya_lock_names_the_commit_its_source_is_read_at():
    from bench.real_scripts import KOHYA_LOCK

    sources = [line.split() for line in KOHYA_LOCK.read_text().splitlines() if line.startswith("# source ")]
    assert len(sources) == 1 and sources[0][2] == "kohya-ss/sd-scripts" and len(sources[0][3]) == 40


def test_ours_trains_on_the_examples_instance_prompt_when_they_take_one(tmp_path):
    from bench.real_scripts import one_caption_copy
    from core.families.tiny_parts import make_image_folder

    data = make_image_folder(tmp_path / "data", count=3)
    copy = one_caption_copy(data, "a photo of a red thing")
    rows = copy.joinpath("metadata.csv").read_text().splitlines()
    assert rows == ["filename,prompt"] + [f"img_{i:02d}.png,a photo of a red thing" for i in range(3)]
    assert all((copy / f"img_{i:02d}.png").read_bytes() == (data / f"img_{i:02d}.png").read_bytes() for i in range(3))
