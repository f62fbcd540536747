"""Whole runs of the transformer families against diffusers' own training examples, each run for real in its own
process (ours: `python train.py`; theirs: the example in the reference venv, bench/reference_scripts.py).

    nice -n 10 python bench/families_vs_examples.py flux2-klein   # klein 4B width, 1 double + 2 single blocks
    nice -n 10 python bench/families_vs_examples.py krea2         # Krea 2 width, 2 blocks
    nice -n 10 python bench/families_vs_examples.py qwen-image    # Qwen-Image width, 2 blocks
    nice -n 10 python bench/families_vs_examples.py z-image       # Z-Image width, 2 layers
    nice -n 10 python bench/families_vs_examples.py sd3           # SD3.5 Medium width, 2 blocks
    python bench/families_vs_examples.py krea2 --only peer --steps 2

Same model (real transformer widths, few blocks, random weights, text encoders of the real hidden width with few
or narrow layers: bench/family_models.py, qwen_speed.py, zimage_speed.py, sd3_speed.py), same 4 images at 256 px,
batch 1, rank 16, the same steps, fp32, the same LoRA targets (the example gets ours through --lora_layers),
latents cached on both sides. The examples train DreamBooth-style (one --instance_prompt for every image, encoded
once); ours trains on the same images with that prompt as every caption (bench/real_scripts.one_caption_copy), so
both sides encode the same text.

Figures per side (bench/whole_run.py): whole run (process start to exit), peak RSS, CPU seconds, the load other
processes put on the machine; plus s/step: ours from the events file's step times, theirs from the elapsed time
the example's `Steps` bar (tqdm) prints at the first and last step (whole seconds). No ratio is printed when the load
was high.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.real_scripts import INSTANCE_PROMPT, bench_run, images_only, ours_command  # noqa: E402
from bench.reference_scripts import reference_python, reference_script  # noqa: E402
from bench.whole_run import run_timed  # noqa: E402

_FLUX2_TARGETS = ("attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,"
                  "attn.to_add_out,ff.linear_in,ff.linear_out,ff_context.linear_in,ff_context.linear_out,"
                  "attn.to_qkv_mlp_proj,single_transformer_blocks.0.attn.to_out,"
                  "single_transformer_blocks.1.attn.to_out")  # core/families/flux2/load.py DOUBLE + SINGLE
_KREA2_TARGETS = "attn.to_q,attn.to_k,attn.to_v,attn.to_gate,attn.to_out.0,ff.gate,ff.up,ff.down"  # BLOCK_TARGETS

_QWEN_TARGETS = ("attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,"
                 "attn.to_add_out,img_mlp.net.0.proj,img_mlp.net.2,txt_mlp.net.0.proj,txt_mlp.net.2")  # BLOCK_TARGETS
_ZIMAGE_TARGETS = ("attention.to_q,attention.to_k,attention.to_v,attention.to_out.0,feed_forward.w1,"
                   "feed_forward.w2,feed_forward.w3")  # core/families/zimage/load.py ATTENTION + MLP
_SD3_TARGETS = ("attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,"
                "attn.to_add_out,attn2.to_q,attn2.to_k,attn2.to_v,attn2.to_out.0,ff.net.0.proj,ff.net.2,"
                "ff_context.net.0.proj,ff_context.net.2")  # core/families/sd3/family.py LORA_TARGETS
_BUILD = "from bench.{module} import build_model as b; b(Path(sys.argv[1]), {args}, toy=False)"

FAMILIES = {
    "flux2-klein": dict(resolution=256, batch=1, rank=16, steps=4, images=4,
                        build="from bench.family_models import build_flux2_klein as b; b(Path(sys.argv[1]))",
                        script="examples/dreambooth/train_dreambooth_lora_flux2_klein.py",
                        instance_prompt=INSTANCE_PROMPT,
                        extra=["--text_encoder_out_layers", "9", "18", "27", "--lora_layers", _FLUX2_TARGETS]),
    "krea2": dict(resolution=256, batch=1, rank=16, steps=4, images=4,
                  build="from bench.family_models import build_krea2 as b; b(Path(sys.argv[1]))",
                  script="examples/dreambooth/train_dreambooth_lora_krea2.py",
                  instance_prompt=INSTANCE_PROMPT, extra=["--lora_layers", _KREA2_TARGETS]),
    # The in-process replays' models (bench/qwen_speed.py, zimage_speed.py, sd3_speed.py): real transformer widths,
    # 2 blocks, the real VAEs, text encoders of the real width with 2 layers (SD3: CLIP-G 4 of 32).
    "qwen-image": dict(resolution=256, batch=1, rank=16, steps=6, images=4,
                       build=_BUILD.format(module="qwen_speed", args="blocks=2, te_layers=2"),
                       script="examples/dreambooth/train_dreambooth_lora_qwen_image.py",
                       instance_prompt=INSTANCE_PROMPT, extra=["--lora_layers", _QWEN_TARGETS]),
    "z-image": dict(resolution=256, batch=1, rank=16, steps=6, images=4,
                    build=_BUILD.format(module="zimage_speed", args="layers=2, qwen_layers=2"),
                    script="examples/dreambooth/train_dreambooth_lora_z_image.py",
                    instance_prompt=INSTANCE_PROMPT, extra=["--lora_layers", _ZIMAGE_TARGETS]),
    "sd3": dict(resolution=256, batch=1, rank=16, steps=6, images=4,
                build=(_BUILD.format(module="sd3_speed", args="blocks=2, clip_g_layers=4, t5_layers=2") +
                       "; from bench.flux_speed import write_unigram_t5_tokenizer as w; "
                       "w(Path(sys.argv[1]) / 'tokenizer_3')"),
                script="examples/dreambooth/train_dreambooth_lora_sd3.py", alpha_flag=False,  # alpha = rank there
                max_sequence_length=256,  # T5's length in StableDiffusion3Pipeline and ours
                instance_prompt=INSTANCE_PROMPT, extra=["--lora_layers", _SD3_TARGETS]),
}


def peer_command(spec: dict, model: Path, data: Path, out: Path, script: Path) -> tuple[list[str], Path]:
    return ([str(reference_python()), str(script), "--pretrained_model_name_or_path", str(model),
             "--output_dir", str(out), "--seed", "1", "--resolution", str(spec["resolution"]),
             "--train_batch_size", str(spec["batch"]), "--max_train_steps", str(spec["steps"]),
             "--learning_rate", "1e-4", "--rank", str(spec["rank"]),
             *(["--lora_alpha", str(spec["rank"])] if spec.get("alpha_flag", True) else []),
             "--mixed_precision", "no", "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0",
             "--instance_data_dir", str(data), "--instance_prompt", spec["instance_prompt"], "--cache_latents",
             "--max_sequence_length", str(spec.get("max_sequence_length", 512)), *spec["extra"]],
            out / "pytorch_lora_weights.safetensors")


def our_step_seconds(events: Path) -> float | None:
    """Median seconds between step-progress events (the first step, which warms up, left out)."""
    times = [e["time"] for e in map(json.loads, events.read_text().splitlines()) if e.get("kind") == "progress"]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return round(statistics.median(gaps), 2) if gaps else None


def peer_step_seconds(log: Path) -> float | None:
    """(elapsed at the last step - elapsed at the first) / (steps between), from tqdm's `n/N [mm:ss<` fields."""
    seen: dict[int, int] = {}
    text = log.read_text(errors="replace")
    for n, minutes, seconds in re.findall(r"Steps:\s+\d+%\|[^|]*\|\s*(\d+)/\d+ \[(\d+):(\d+)<", text):
        seen.setdefault(int(n), int(minutes) * 60 + int(seconds))
    steps = sorted(k for k in seen if k >= 1)
    if len(steps) < 2:
        return None
    return round((seen[steps[-1]] - seen[steps[0]]) / (steps[-1] - steps[0]), 2)


def main(argv: list[str] | None = None) -> dict:
    run = bench_run(FAMILIES, argv, __doc__.split("\n\n")[0])
    family, run_dir = run.args.family, run.run_dir
    if run.wants("ours"):
        command, output = ours_command(family, run.spec, run.model, run.data, run_dir / "ours")
        run.figures["ours"] = run_timed(command, output=output, log=run_dir / "ours.log", env=run.env, cwd=ROOT)
        run.results["ours"] = {**run.figures["ours"].as_dict(),
                               "s_per_step": our_step_seconds(run_dir / "ours-events.jsonl")}
        print("ours", json.dumps(run.results["ours"]), flush=True)
    if run.wants("peer"):
        script = reference_script("diffusers", run.spec["script"], run_dir / "scripts")
        command, output = peer_command(run.spec, run.model, images_only(run.peer_data), run_dir / "peer", script)
        run.figures["peer"] = run_timed(command, output=output, log=run_dir / "peer.log", env=run.env, cwd=run_dir)
        run.results["peer"] = {**run.figures["peer"].as_dict(), "s_per_step": peer_step_seconds(run_dir / "peer.log")}
        print(f"diffusers {script.name}", json.dumps(run.results["peer"]), flush=True)
    return run.finish("the diffusers example")

if __name__ == "__main__":
    main()
