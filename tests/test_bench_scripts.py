"""The GPU check and the FLUX benchmark run on this machine at toy sizes, so the first time a GPU is
there they work: every check reports, and the provoked out-of-memory recovers."""
import pytest

pytestmark = pytest.mark.slow  # a dozen short training runs


def test_gpu_check_runs_every_check_on_the_cpu_at_toy_sizes(tmp_path, monkeypatch):
    import json

    from bench import gpu_check

    monkeypatch.delenv("LORA_CPU_PROCESSES", raising=False)
    report = gpu_check.main(["--toy", "--json", str(tmp_path / "report.json")])
    checks = {r["check"] for r in report}
    assert checks == {"speed", "preset", "out_of_memory", "sharded"}
    assert next(r for r in report if r["check"] == "sharded")["skipped"] == "needs 2 GPUs"
    presets = [r for r in report if r["check"] == "preset"]
    assert {r["preset"] for r in presets} == set(gpu_check.SD_PRESETS + gpu_check.FLUX_PRESETS + gpu_check.WAN_PRESETS)
    assert all(r["estimate_gb"] > 0 for r in presets)
    oom = next(r for r in report if r["check"] == "out_of_memory")
    assert oom["recovered"] and "Out of memory at step 2" in oom["downshifts"][0]
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_gpu_check_compares_ddp_and_fsdp_on_two_processes(monkeypatch):
    from bench import gpu_check

    monkeypatch.setenv("LORA_CPU_PROCESSES", "2")  # two CPU processes over gloo stand in for two GPUs
    report = gpu_check.main(["--toy", "--skip", "speed", "presets", "oom"])
    assert [(r["distributed"], r["processes"]) for r in report] == [("ddp", 2), ("fsdp", 2)]
    assert all(r["s_per_step"] > 0 for r in report)


def test_the_flux_benchmark_runs_both_sides_at_toy_sizes():
    from bench import flux_speed

    results = flux_speed.main(["--toy", "--steps", "3", "--resolution", "64", "--threads", "1"])
    assert set(results) == {"ours", "peer", "ratios"}
    assert all(results[side]["s_per_step"] > 0 for side in ("ours", "peer"))


def test_the_lora_overhead_benchmark_times_all_three_ways_and_restores_the_base():
    from bench import lora_overhead

    result = lora_overhead.main(["--steps", "3", "--rounds", "1", "--loras", "2", "--rank", "4", "--threads", "1"])
    assert all(result["s_per_it"][mode] > 0 for mode in ("base", "unfused", "fused"))
    assert result["base_weights_restored_bit_for_bit"] and result["base_image_after_equal"]
    # Fused and unfused agree far more closely than the LoRAs move the latents.
    assert result["fused_vs_unfused_max_abs"] < 0.01 * result["lora_vs_base_max_abs"]


def test_the_qwen_image_benchmark_runs_both_sides_at_toy_sizes():
    from bench import qwen_speed

    results = qwen_speed.main(["--toy", "--steps", "3", "--resolution", "64", "--threads", "1"])
    assert set(results) == {"ours", "peer", "ratios"}
    assert all(results[side]["s_per_step"] > 0 for side in ("ours", "peer"))


def test_the_lycoris_speed_benchmark_times_lora_lokr_and_loha_on_copies_of_one_model(tmp_path):
    import copy
    import dataclasses

    from bench import lycoris_speed
    from core.config import TrainConfig

    base, add, batch = lycoris_speed.flux_case(width=128)
    models = {}
    for variant in lycoris_speed.VARIANTS:
        models[variant] = copy.deepcopy(base)
        add(models[variant], dataclasses.replace(TrainConfig(), lora_variant=variant, lora_rank=4, lokr_factor=4))
    seconds = lycoris_speed.measure(models, batch, steps=1)
    assert set(seconds) == set(lycoris_speed.VARIANTS) and all(s > 0 for s in seconds.values())
    sizes = {v: lycoris_speed.file_megabytes(m, tmp_path, v) for v, m in models.items()}
    assert sizes["lokr"] < sizes["lora"] < sizes["loha"]
