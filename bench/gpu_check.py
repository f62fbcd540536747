"""One script for the first hour on a GPU: speed per precision, each preset's real peak VRAM
beside the estimate, and an out-of-memory that recovers.

    python bench/gpu_check.py                # on a CUDA GPU: about 5-8 minutes
    python bench/gpu_check.py --toy          # tiny models on any machine (the tests run this)
    python bench/gpu_check.py --json out.json

What it does, all through the product's own path (`core.train.run_training` on configs, as
`train.py` does):

1. **Speed**: an SD 1.5-shaped model (published configs, random weights) and a FLUX-width
   transformer with few blocks train a few steps in each precision the device has
   (fp16 and bf16 on CUDA; fp32 on the CPU): seconds per step, steady state.
2. **Presets**: every SD 1.x preset, the FLUX presets and the Wan presets run 3 steps on those models
   (Wan: a 1.3B-width video transformer with 2 blocks and the real Wan VAE, on 3 clips and an image);
   the real peak (CUDA max allocated) is printed beside `core.memory`'s estimate for the
   same config and model. The FLUX model here has few blocks: its estimate is computed
   for the same cut-down model, read from its own files.
3. **Out of memory**: memory is filled until the SD 1.5 run with the richest preset no
   longer fits, with `auto_downshift: true`; the run must downshift and finish. On the
   CPU (where no real out-of-memory is safe to provoke) one step raises torch's own
   OutOfMemoryError instead, through the same hook the tests use.
4. **Sharded** (with 2 GPUs or more): the FLUX-width model trains on 2 GPUs with
   `distributed: ddp` and with `distributed: fsdp`, launched as the app launches them
   (core.launch): the main GPU's peak and seconds per step of each, side by side. Skipped
   with fewer GPUs (`LORA_CPU_PROCESSES=2 ... --toy` runs it on 2 CPU processes).

Each result is a line; `--json` also writes them to a file. Nothing is timed in tests.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.flux_speed import build_model as build_flux  # noqa: E402
from bench.image_speed import build_full_sd15  # noqa: E402

SD_PRESETS = ("sd15-4gb", "sd15-6gb", "sd15-8gb", "sd15-12gb", "sd15-24gb")
FLUX_PRESETS = ("flux-8gb", "flux-12gb", "flux-16gb", "flux-24gb")
WAN_PRESETS = ("wan-8gb", "wan-12gb", "wan-16gb", "wan-24gb")


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def precisions() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["no"]
    return ["fp16", "bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]


def build_models(work: Path, toy: bool) -> dict[str, Path]:
    """The SD 1.5-shaped and the FLUX-width models as diffusers folders, and a folder of images."""
    from core.families.sd.tiny import build_tiny_sd
    from core.families.tiny_parts import make_image_folder
    from core.families.wan.tiny import build_tiny_wan

    sd = build_tiny_sd(work / "sd", "sd1").folder if toy else build_full_sd15(work / "sd15")
    flux = build_flux(work / "flux", double=1, single=2, t5_layers=1, toy=toy)
    data = make_image_folder(work / "data", count=4, size=(64, 64) if toy else (512, 512))
    wan = build_tiny_wan(work / "wan").folder if toy else build_wan(work / "wan")
    return {"sd": Path(sd), "flux": Path(flux), "data": Path(data), "wan": Path(wan),
            "wan_data": make_clip_folder(work / "wan_data", 64 if toy else 512, 12 if toy else 40)}


def build_wan(folder: Path) -> Path:
    """Wan 2.1 1.3B's width (12 heads of 128, FFN 8960, UMT5's 4096-wide outputs) with 2 blocks, the real Wan VAE
    config, a 1-layer UMT5 at width 4096 over the tiny vocabulary; random weights, a diffusers folder."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from core.families.tiny_parts import T5_WORDS, tiny_t5_tokenizer

    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(T5_WORDS) + 3, d_model=4096, d_kv=64, d_ff=10240,
                                          num_layers=1, num_heads=64, feed_forward_proj="gated-gelu",
                                          pad_token_id=0, eos_token_id=1)).eval()
    pipe = WanPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=encoder, vae=AutoencoderKLWan(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=WanTransformer3DModel(num_attention_heads=12, ffn_dim=8960, num_layers=2))
    pipe.save_pretrained(folder)
    return folder


def make_clip_folder(folder: Path, side: int, frames: int) -> Path:
    """3 clips (PyAV) and an image, with captions."""
    from PIL import Image

    from core.data.video_io import write_clip

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["filename,prompt"]
    for n in range(3):
        pictures = [Image.new("RGB", (side, side), (40 * n + 8 * i % 255, 90, 160)) for i in range(frames)]
        write_clip(pictures, folder / f"clip_{n}.mp4", 16)
        rows.append(f"clip_{n}.mp4,a moving thing number {n}")
    Image.new("RGB", (side, side), (200, 40, 40)).save(folder / "still.png")
    rows.append("still.png,a still thing")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def run(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Train `raw` (preset merged) and return (outputs, events); resets the CUDA peak first."""
    import torch

    from core.events import RunContext
    from core.presets import resolve_config
    from core.train import run_training

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    events: list[Any] = []
    outputs = run_training(resolve_config(raw, check_paths=True), RunContext(listeners=[events.append]))
    return outputs, events


def seconds_per_step(events: list[Any]) -> float:
    steps = [e for e in events if e.kind == "progress"]
    return steps[-1].seconds_per_step if steps else float("nan")


def peak_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def base_config(model: Path, data: Path, out: Path, toy: bool, **overrides: Any) -> dict[str, Any]:
    raw = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), max_train_steps=3,
               save_steps=0, learning_rate=1e-4, seed=0, save_precision="fp16", mixed_precision="no")
    if toy:
        raw.update(resolution=64, min_bucket_reso=64, max_bucket_reso=128, batch_size=1)
    raw.update(overrides)
    return raw


def speed(models: dict[str, Path], work: Path, toy: bool, report: list[dict]) -> None:
    for name in ("sd", "flux"):
        for precision in precisions():
            overrides = {"mixed_precision": precision, "max_train_steps": 4}
            if not toy:
                overrides.update(resolution=512 if name == "sd" else 256, batch_size=1)
            _, events = run(base_config(models[name], models["data"], work / f"speed-{name}-{precision}", toy,
                                        **overrides))
            report.append({"check": "speed", "model": name, "precision": precision,
                           "s_per_step": round(seconds_per_step(events), 3), "peak_gb": peak_gb()})
            print(f"speed  {name:5s} {precision:4s} {seconds_per_step(events):8.3f} s/step  peak {peak_gb()}",
                  flush=True)


def presets(models: dict[str, Path], work: Path, toy: bool, report: list[dict]) -> None:
    from core.config import config_from_dict
    from core.memory import estimate_memory
    from core.presets import load_preset

    for name, names in (("sd", SD_PRESETS), ("flux", FLUX_PRESETS), ("wan", WAN_PRESETS)):
        data = models["wan_data"] if name == "wan" else models["data"]
        for preset in names:
            values = load_preset(preset)
            if not cuda():
                # The CPU cannot run fp16, fp8 storage, NF4 or offload: the check here is that the run goes.
                values.update(mixed_precision="no", fp8_base=False, base_quantization="none", blocks_to_swap=0,
                              optimizer="adamw")
            if toy:
                values.update(resolution=64, batch_size=1, gradient_accumulation_steps=1)
                if name == "wan":
                    values.update(video_frames=9)
            raw = base_config(models[name], data, work / f"preset-{preset}", toy, **values)
            estimate = estimate_memory(config_from_dict(raw, check_paths=False))
            run(raw)
            real = peak_gb()
            report.append({"check": "preset", "preset": preset, "estimate_gb": round(estimate.total_gb, 6),
                           "peak_gb": None if real is None else round(real, 2)})
            print(f"preset {preset:10s} estimate {estimate.total_gb:6.2f} GB   real peak "
                  f"{'-' if real is None else f'{real:6.2f} GB'}", flush=True)


@contextlib.contextmanager
def memory_squeezed(leave_gb: float):
    """Hold all but `leave_gb` of the GPU's free memory in one tensor for the duration."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    hold = max(0, int(free - leave_gb * 2**30))
    block = torch.empty(hold, dtype=torch.uint8, device="cuda")
    try:
        yield
    finally:
        del block
        torch.cuda.empty_cache()


@contextlib.contextmanager
def one_oom_at(step: int):
    """CPU stand-in for a real out-of-memory: torch's own error, once, at `step` (the tests' hook)."""
    import torch

    from core.train import runtime

    real = runtime.check_finite
    fired: list[int] = []

    def check(loss: float, at: int, cfg: Any) -> None:
        if at == step and not fired:
            fired.append(at)
            raise torch.OutOfMemoryError("CUDA out of memory (provoked by bench/gpu_check.py)")
        real(loss, at, cfg)

    runtime.check_finite = check
    try:
        yield fired
    finally:
        runtime.check_finite = real


def out_of_memory(models: dict[str, Path], work: Path, toy: bool, report: list[dict]) -> None:
    raw = base_config(models["sd"], models["data"], work / "oom", toy, preset="sd15-24gb", auto_downshift=True,
                      max_train_steps=4, save_steps=1)
    if toy or not cuda():
        raw.update(mixed_precision="no", optimizer="adamw")
        if toy:
            raw.update(resolution=64, batch_size=2, gradient_accumulation_steps=1)
    started = time.perf_counter()
    if cuda():
        with memory_squeezed(leave_gb=3.0):
            outputs, events = run(raw)
    else:
        with one_oom_at(2):
            outputs, events = run(raw)
    downshifts = [e.message for e in events if e.kind == "warning" and "Out of memory" in e.message]
    done = [e for e in events if e.kind == "done"]
    ok = bool(downshifts) and bool(done) and Path(outputs.get("lora", "")).is_file()
    report.append({"check": "out_of_memory", "recovered": ok, "downshifts": downshifts,
                   "seconds": round(time.perf_counter() - started, 1)})
    print(f"oom    recovered={ok}: {downshifts[0] if downshifts else 'no downshift happened'}", flush=True)


def sharded(models: dict[str, Path], work: Path, toy: bool, report: list[dict]) -> None:
    """DDP vs FSDP at 2 processes: the main process's peak (per GPU) and s/step, through core.launch."""
    from core import launch
    from core.events import RunContext
    from core.presets import resolve_config

    found = launch.devices()
    if len(found) < 2:
        report.append({"check": "sharded", "skipped": "needs 2 GPUs"})
        print("sharded skipped: needs 2 GPUs", flush=True)
        return
    plan = launch.LaunchPlan(tuple(found[:2]))
    precision = "no" if plan.on_cpu else precisions()[-1]
    for mode in ("ddp", "fsdp"):
        overrides = {"mixed_precision": precision, "max_train_steps": 4, "distributed": mode}
        if not toy:
            overrides.update(resolution=256, batch_size=1)
        cfg = resolve_config(base_config(models["flux"], models["data"], work / f"sharded-{mode}", toy, **overrides))
        events: list[Any] = []
        launch.run_launched(cfg, RunContext(listeners=[events.append]), plan)
        steps = [e for e in events if e.kind == "progress"]
        peak = steps[-1].vram_gb if steps else None
        report.append({"check": "sharded", "model": "flux", "distributed": mode, "processes": 2,
                       "s_per_step": round(seconds_per_step(events), 3), "peak_gb_per_gpu": peak})
        print(f"sharded flux {mode:4s} x2 {seconds_per_step(events):8.3f} s/step  peak per GPU {peak}", flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", help="tiny models: any machine, a minute or two")
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "presets", "oom", "sharded"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    models = build_models(work, args.toy)
    report: list[dict] = []
    for name, check in (("speed", speed), ("presets", presets), ("oom", out_of_memory), ("sharded", sharded)):
        if name not in args.skip:
            check(models, work, args.toy, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
