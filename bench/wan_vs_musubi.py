"""Wan 2.1 14B's width (5120, 40 heads of 128, FFN 13824) with 2 blocks, 9 frames at 256 px: `python train.py`
against musubi-tuner's `wan_train_network.py`, each run for real in its own process and venv.

    nice -n 10 python bench/wan_vs_musubi.py            # 3 clips, batch 1, rank 16, 4 steps, fp32
    python bench/wan_vs_musubi.py --only musubi

The model (random weights; built once under ~/.cache/lora-scripts-bench/models/wan14-2): a diffusers folder for
ours and, from the same weights, the files musubi reads in Wan's native names: the DiT, the Wan 2.1 VAE and
UMT5 (Wan's own T5 names; real width 4096, 1 layer, the tests' small vocabulary). musubi needs its two cache
scripts first (wan_cache_latents.py, wan_cache_text_encoder_outputs.py) and a dataset .toml: its whole run is the
three processes one after the other, each timed (bench/whole_run.py), and its peak RSS the largest of the three.
bench/musubi_cpu.py says what is changed for musubi to run here (no NVIDIA driver; 2 blocks, not 40).
musubi-tuner's source is read from its git mirror at the commit bench/musubi-lock.txt names (never committed
here; LORA_BENCH_MUSUBI_GIT=<git dir>), its venv built from that lock file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.reference_scripts import WORK, pinned_venv, source_tree  # noqa: E402
from bench.whole_run import RunFigures, ratio_line, run_timed  # noqa: E402

LOCK = ROOT / "bench" / "musubi-lock.txt"
SPEC = dict(resolution=256, frames=9, batch=1, rank=16, steps=4, clips=3, blocks=2)
PROMPT_WORDS = "a red thing moves slowly"


def musubi_python() -> Path:
    """musubi's venv: its pins on top of the reference venv's torch (see bench/musubi-lock.txt)."""
    return pinned_venv("musubi", LOCK)


def musubi_source() -> Path:
    """musubi-tuner's tree at the lock file's commit, unpacked once."""
    return source_tree("musubi", LOCK, "/work/.mirror/kohya-ss+musubi-tuner/repo", ["src"])


BUILD = r'''
import re, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel
from core.families.tiny_parts import T5_WORDS, tiny_t5_tokenizer
from core.families.wan.tiny import native_transformer_state
from core.families.dit.video_vae import vae_to_comfy
root = Path(sys.argv[1]); blocks = int(sys.argv[2])
torch.manual_seed(0)
tokenizer = tiny_t5_tokenizer()
encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(T5_WORDS) + 3, d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                      num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=0,
                                      eos_token_id=1)).eval()
transformer = WanTransformer3DModel(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=blocks)
pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=AutoencoderKLWan(),
                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
pipe.save_pretrained(root / "diffusers")
native = root / "native"
native.mkdir(exist_ok=True)
c = lambda s: {k: v.contiguous() for k, v in s.items()}
save_file(c(native_transformer_state(transformer.state_dict())), native / "dit.safetensors")
save_file(c(vae_to_comfy(pipe.vae.state_dict(), num_res_blocks=2)), native / "vae.safetensors")
t5 = {}
for key, value in encoder.state_dict().items():  # Hugging Face UMT5 -> Wan's own T5 names
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        t5["token_embedding.weight"] = value; continue
    if key == "encoder.final_layer_norm.weight":
        t5["norm.weight"] = value; continue
    n, rest = re.match(r"encoder\.block\.(\d+)\.layer\.(.*)", key).groups()
    for hf, wan in (("0.layer_norm.", "norm1."), ("0.SelfAttention.relative_attention_bias.", "pos_embedding.embedding."),
                    ("0.SelfAttention.", "attn."), ("1.layer_norm.", "norm2."), ("1.DenseReluDense.wi_0.", "ffn.gate.0."),
                    ("1.DenseReluDense.wi_1.", "ffn.fc1."), ("1.DenseReluDense.wo.", "ffn.fc2.")):
        if rest.startswith(hf):
            t5[f"blocks.{n}.{wan}{rest[len(hf):]}"] = value; break
    else:
        raise KeyError(key)
save_file(c(t5), native / "t5.safetensors")
tokenizer.save_pretrained(native / "tokenizer")
config = native / "tokenizer" / "tokenizer_config.json"  # musubi's transformers 4.x reads no "TokenizersBackend"
config.write_text(config.read_text().replace('"TokenizersBackend"', '"T5TokenizerFast"'))
(native / "vocab").write_text(str(encoder.config.vocab_size))
'''

CLIPS = r'''
import sys
from pathlib import Path
from PIL import Image
from core.data.video_io import write_clip
folder = Path(sys.argv[1]); side, frames, count = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
folder.mkdir(parents=True, exist_ok=True)
rows = ["filename,prompt"]
for n in range(count):
    pictures = [Image.new("RGB", (side, side), (40 * n + 20 * i % 255, 90 + 10 * i, 160)) for i in range(frames)]
    write_clip(pictures, folder / f"clip_{n}.mp4", 16)
    caption = f"{sys.argv[5]} {n}"
    (folder / f"clip_{n}.txt").write_text(caption)
    rows.append(f"clip_{n}.mp4,{caption}")
(folder / "metadata.csv").write_text("\n".join(rows) + "\n")
'''


def prepare(spec: dict) -> tuple[Path, Path]:
    model = WORK / "models" / f"wan14-{spec['blocks']}"
    if not (model / "native" / "vocab").is_file():
        print(f"building the Wan 14B-width model with random weights in {model} (once) ...", flush=True)
        subprocess.run([sys.executable, "-c", BUILD, str(model), str(spec["blocks"])], check=True, cwd=ROOT)
    data = WORK / "data" / f"wan-clips-{spec['clips']}x{spec['frames']}"
    if not (data / "metadata.csv").is_file():
        subprocess.run([sys.executable, "-c", CLIPS, str(data), str(spec["resolution"]), str(spec["frames"]),
                        str(spec["clips"]), PROMPT_WORDS], check=True, cwd=ROOT)
    return model, data


def ours_command(spec: dict, model: Path, data: Path, out: Path) -> tuple[list[str], Path]:
    config = dict(base_model=str(model / "diffusers"), train_data_dir=str(data), output_dir=str(out),
                  output_name="lora", resolution=spec["resolution"], video_frames=spec["frames"],
                  batch_size=spec["batch"], max_train_steps=spec["steps"], learning_rate=1e-4,
                  lora_rank=spec["rank"], lora_alpha=spec["rank"], mixed_precision="no", save_steps=0, seed=1,
                  cache_latents_to_disk=False, gradient_checkpointing=False, bucketing=False,
                  save_precision="fp32")
    path = out.parent / "ours.json"
    path.write_text(json.dumps(config, indent=1))
    return [sys.executable, str(ROOT / "train.py"), "--config", str(path), "--quiet",
            "--events_file", str(out.parent / "ours-events.jsonl")], out / "lora.safetensors"


def musubi_commands(spec: dict, model: Path, data: Path, run: Path) -> list[tuple[list[str], Path]]:
    source = musubi_source()
    native = model / "native"
    cache = run / "musubi-cache"
    toml = run / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [{spec["resolution"]}, {spec["resolution"]}]\n'
                    f'caption_extension = ".txt"\nbatch_size = {spec["batch"]}\nenable_bucket = false\n\n'
                    f'[[datasets]]\nvideo_directory = "{data}"\ncache_directory = "{cache}"\n'
                    f'target_frames = [{spec["frames"]}]\nframe_extraction = "head"\n')
    head = [str(musubi_python()), str(ROOT / "bench" / "musubi_cpu.py"), str(spec["blocks"]), "1",
            (native / "vocab").read_text(), str(native / "tokenizer")]
    script = lambda name: str(source / "src" / "musubi_tuner" / name)  # noqa: E731
    out = run / "musubi"
    return [
        ([*head, script("wan_cache_latents.py"), "--dataset_config", str(toml), "--vae", str(native / "vae.safetensors"),
          "--device", "cpu", "--vae_dtype", "float32"],
         cache / f"clip_0_00000-{spec['frames']:03d}_{spec['resolution']:04d}x{spec['resolution']:04d}_wan.safetensors"),
        ([*head, script("wan_cache_text_encoder_outputs.py"), "--dataset_config", str(toml), "--t5",
          str(native / "t5.safetensors"), "--device", "cpu", "--batch_size", "4"],
         cache / "clip_0_wan_te.safetensors"),
        ([*head, script("wan_train_network.py"), "--task", "t2v-14B", "--dit", str(native / "dit.safetensors"),
          "--dataset_config", str(toml), "--sdpa", "--mixed_precision", "no",
          "--network_module", "networks.lora_wan", "--network_dim", str(spec["rank"]), "--network_alpha",
          str(spec["rank"]), "--optimizer_type", "adamw", "--learning_rate", "1e-4", "--max_train_steps",
          str(spec["steps"]), "--seed", "1", "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0",
          "--max_data_loader_n_workers", "0", "--output_dir", str(out), "--output_name", "lora"],
         out / "lora.safetensors"),
    ]


def step_seconds_from_tqdm(log: Path) -> float | None:
    import re
    seen: dict[int, int] = {}
    for n, minutes, seconds in re.findall(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/\d+ \[(\d+):(\d+)<",
                                          log.read_text(errors="replace")):
        seen.setdefault(int(n), int(minutes) * 60 + int(seconds))
    # musubi's bar shows step 1 at 00:00 (it counts the step before timing it), so start from step 2 where it can
    steps = sorted(k for k in seen if k >= (2 if len(seen) > 2 else 1))
    return round((seen[steps[-1]] - seen[steps[0]]) / (steps[-1] - steps[0]), 2) if len(steps) > 1 else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("ours", "musubi"))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", type=Path, help="an earlier run's folder: musubi's steps whose file is there are "
                        "not run again (their figures are in that run's output)")
    args = parser.parse_args(argv)
    spec = dict(SPEC, steps=args.steps or SPEC["steps"])
    model, data = prepare(spec)
    run = args.resume or WORK / "runs" / f"wan14-{time.strftime('%Y%m%d-%H%M%S')}"
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict = {"family": "wan2.1-14b-width", **spec, "threads": args.threads}
    figures: dict[str, RunFigures] = {}
    if args.only in (None, "ours"):
        command, output = ours_command(spec, model, data, run / "ours")
        figures["ours"] = run_timed(command, output=output, log=run / "ours.log", env=env, cwd=ROOT)
        from bench.families_vs_examples import our_step_seconds
        results["ours"] = {**figures["ours"].as_dict(), "s_per_step": our_step_seconds(run / "ours-events.jsonl")}
        print("ours", json.dumps(results["ours"]), flush=True)
    if args.only in (None, "musubi"):
        parts = []
        for n, (command, output) in enumerate(musubi_commands(spec, model, data, run)):
            if args.resume and output.is_file():
                print(f"musubi step {n}: {output.name} is there from the earlier run, not run again", flush=True)
                continue
            parts.append(run_timed(command, output=output, log=run / f"musubi-{n}.log", env=env, cwd=run))
            print(f"musubi step {n}", json.dumps(parts[-1].as_dict()), flush=True)
        before_last = sum(p.whole_run_s for p in parts[:-1])
        total = RunFigures(whole_run_s=sum(p.whole_run_s for p in parts),
                           file_written_s=before_last + parts[-1].file_written_s,
                           peak_rss_gib=max(p.peak_rss_gib for p in parts), cpu_s=sum(p.cpu_s for p in parts),
                           load_from_others=max(p.load_from_others for p in parts),
                           loadavg_mean=max(p.loadavg_mean for p in parts), returncode=0)
        figures["musubi"] = total
        results["musubi"] = {**total.as_dict(), "parts": [p.as_dict() for p in parts],
                             "s_per_step": step_seconds_from_tqdm(run / "musubi-2.log")}
        print("musubi", json.dumps(results["musubi"]), flush=True)
    if len(figures) == 2:
        results["verdict"] = ratio_line(figures["ours"], figures["musubi"], "musubi-tuner")
        print(results["verdict"])
    with open(WORK / "results.jsonl", "a") as log:
        log.write(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), **results}) + "\n")
    return results


if __name__ == "__main__":
    main()
