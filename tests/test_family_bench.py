"""The FLUX.2 / Krea 2 / Wan benches read the peers' step times from their progress bars, give the examples
exactly our LoRA targets, and read musubi's source commit from their own lock file."""
import torch

from bench.families_vs_examples import _FLUX2_TARGETS, _KREA2_TARGETS, peer_step_seconds
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


def test_the_examples_get_the_same_lora_targets_as_ours():
    from core.families.flux2.load import DOUBLE, SINGLE
    from core.families.flux2.tiny import tiny_flux2_transformer
    from core.families.flux2.load import lora_targets as flux2_targets
    from core.families.krea2.load import BLOCK_TARGETS
    from core.families.krea2.load import lora_targets as krea2_targets
    from core.families.krea2.tiny import tiny_krea2_transformer

    def peft_match(model: torch.nn.Module, targets: str) -> list[str]:  # PEFT's rule: the name or a "."-suffix
        wanted = targets.split(",")
        return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                and any(name == t or name.endswith("." + t) for t in wanted)]

    flux2 = tiny_flux2_transformer()  # 1 double + 2 single blocks, as the bench's model
    assert set(DOUBLE) | {"attn.to_qkv_mlp_proj"} <= set(_FLUX2_TARGETS.split(",")) and SINGLE
    assert sorted(peft_match(flux2, _FLUX2_TARGETS)) == sorted(flux2_targets(flux2))
    krea2 = tiny_krea2_transformer()
    assert _KREA2_TARGETS.split(",") == sorted(BLOCK_TARGETS, key=_KREA2_TARGETS.split(",").index)
    assert sorted(peft_match(krea2, _KREA2_TARGETS)) == sorted(krea2_targets(krea2))


def test_the_musubi_lock_names_the_commit_its_source_is_read_at():
    sources = [line.split() for line in LOCK.read_text().splitlines() if line.startswith("# source ")]
    assert len(sources) == 1 and sources[0][2] == "kohya-ss/musubi-tuner" and len(sources[0][3]) == 40
