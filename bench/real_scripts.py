"""Whole runs against the REAL reference scripts: `python train.py` vs diffusers' own example (and, for SD 1.5,
kohya's sd-scripts `train_network.py`), each a process of its own started from the command line, on the same model
and the same images.

    nice -n 10 python bench/real_scripts.py sd15      # SD 1.5-shaped, 128 px, batch 4, rank 4, 20 steps
    nice -n 10 python bench/real_scripts.py flux      # FLUX-width, 256 px, batch 1, rank 16, 15 steps
    python bench/real_scripts.py sd15 --only ours     # one side (e.g. while profiling); --only peer / kohya

A whole run is what a user waits for: process start to exit, imports, loading, caching, the steps
and saving all in (the file each writes is checked; the time it was written is printed too). Peak
memory is each process's own peak RSS. The load other processes put on the machine is measured
during each side, and no ratio is printed when it was high (bench/whole_run.py: LOAD_LIMIT). The
ratio is taken against the faster of the peers that ran.

The peers' venvs and sources come from bench/reference_scripts.py (built once under
~/.cache/lora-scripts-bench; LORA_BENCH_DIFFUSERS_GIT=<git dir> reads the examples from a local
mirror; kohya's venv and tree from bench/kohya-lock.txt, LORA_BENCH_KOHYA_GIT). The model (random
weights, published configs) and the images are built once there too. This process imports no torch:
it only starts the others, so its own small peak is all it hands on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.reference_scripts import (WORK, pinned_venv, reference_python, reference_script,  # noqa: E402
                                     source_tree)
from bench.whole_run import ratio_line, run_timed  # noqa: E402

# The DreamBooth examples train every image on one prompt (--instance_prompt) and encode it once; ours then
# trains on a copy of the images whose captions all read the same (a family's spec names it), so both sides
# encode the same text (with one caption per image ours would encode 4 at 512 tokens where they encode 1).
INSTANCE_PROMPT = "a photo of a red thing"

FAMILIES = {
    "sd15": dict(resolution=128, batch=4, rank=4, steps=20, images=16,
                 build="from bench.image_speed import build_full_sd15 as b; b(Path(sys.argv[1]))",
                 script="examples/text_to_image/train_text_to_image_lora.py", kohya="train_network.py"),
    "flux": dict(resolution=256, batch=1, rank=16, steps=15, images=4,
                 build=("from bench.flux_speed import build_model as b; "
                        "b(Path(sys.argv[1]), double=1, single=2, t5_layers=2, toy=False)"),
                 script="examples/dreambooth/train_dreambooth_lora_flux.py", instance_prompt=INSTANCE_PROMPT),
}


def prepare(family: str, spec: dict) -> tuple[Path, Path, Path]:
    """The model folder, our image folder (metadata.csv) and the peer's (metadata.jsonl, same images)."""
    model = WORK / "models" / family
    if not (model / "model_index.json").is_file():
        print(f"building the {family} model with random weights in {model} (once) ...", flush=True)
        code = f"import sys; from pathlib import Path; sys.path.insert(0, {str(ROOT)!r}); {spec['build']}"
        subprocess.run([sys.executable, "-c", code, str(model)], check=True, cwd=ROOT)
    if family == "flux" and '"WordLevel"' in (model / "tokenizer_2" / "tokenizer.json").read_text():
        # A model built before the example's T5TokenizerFast was found to refuse a word-level tokenizer.
        code = (f"import sys; from pathlib import Path; sys.path.insert(0, {str(ROOT)!r}); "
                "from bench.flux_speed import write_unigram_t5_tokenizer as w; w(Path(sys.argv[1]))")
        subprocess.run([sys.executable, "-c", code, str(model / "tokenizer_2")], check=True, cwd=ROOT)
    data = WORK / "data" / f"{family}-{spec['images']}"
    if not (data / "metadata.csv").is_file():
        code = (f"import sys; from pathlib import Path; sys.path.insert(0, {str(ROOT)!r}); "
                "from core.families.tiny_parts import make_image_folder as m; "
                f"m(Path(sys.argv[1]), count={spec['images']}, size=(256, 256))")
        subprocess.run([sys.executable, "-c", code, str(data)], check=True, cwd=ROOT)
    if spec.get("instance_prompt"):
        data = one_caption_copy(data, spec["instance_prompt"])
    peer_data = data.with_name(data.name + "-imagefolder")
    if not (peer_data / "metadata.jsonl").is_file():
        peer_data.mkdir(parents=True, exist_ok=True)
        rows = [line.split(",", 1) for line in (data / "metadata.csv").read_text().splitlines()[1:]]
        for name, _ in rows:
            shutil.copyfile(data / name, peer_data / name)
        (peer_data / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": name, "text": text}) + "\n" for name, text in rows))
    return model, data, peer_data


def one_caption_copy(data: Path, caption: str) -> Path:
    """The images of `data` with `caption` as every image's caption (what --instance_prompt trains on)."""
    folder = data.with_name(data.name + "-instance")
    if not (folder / "metadata.csv").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rows = [line.split(",", 1)[0] for line in (data / "metadata.csv").read_text().splitlines()[1:]]
        for name in rows:
            shutil.copyfile(data / name, folder / name)
        (folder / "metadata.csv").write_text("filename,prompt\n" + "".join(f"{name},{caption}\n" for name in rows))
    return folder


def images_only(data: Path) -> Path:
    """The DreamBooth examples open every file of --instance_data_dir as an image: a folder of the images alone."""
    folder = data.with_name(data.name + "-images")
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for image in data.iterdir():
            if image.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                shutil.copyfile(image, folder / image.name)
    return folder


def ours_command(family: str, spec: dict, model: Path, data: Path, out: Path) -> tuple[list[str], Path]:
    config = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), output_name="lora",
                  resolution=spec["resolution"], batch_size=spec["batch"], max_train_steps=spec["steps"],
                  learning_rate=1e-4, lora_rank=spec["rank"], lora_alpha=spec["rank"], mixed_precision="no",
                  save_steps=0, seed=1, cache_latents_to_disk=False, gradient_checkpointing=False,
                  bucketing=False)
    if family == "flux":
        config.update(lora_blocks="all", save_precision="fp32")
    path = out.parent / "ours.json"  # JSON is YAML
    path.write_text(json.dumps(config, indent=1))
    return [sys.executable, str(ROOT / "train.py"), "--config", str(path), "--quiet",
            "--events_file", str(out.parent / "ours-events.jsonl")], out / "lora.safetensors"


def peer_command(family: str, spec: dict, model: Path, data: Path, out: Path,
                 script: Path) -> tuple[list[str], Path]:
    common = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(out), "--seed", "1",
              "--resolution", str(spec["resolution"]), "--train_batch_size", str(spec["batch"]),
              "--max_train_steps", str(spec["steps"]), "--learning_rate", "1e-4", "--rank", str(spec["rank"]),
              "--mixed_precision", "no", "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0"]
    if family == "sd15":
        extra = ["--train_data_dir", str(data), "--center_crop", "--caption_column", "text"]
    else:
        extra = ["--instance_data_dir", str(images_only(data)), "--instance_prompt", spec["instance_prompt"],
                 "--cache_latents", "--guidance_scale", "1", "--max_sequence_length", "512"]
    return ([str(reference_python()), str(script), *common, *extra],
            out / "pytorch_lora_weights.safetensors")


KOHYA_LOCK = ROOT / "bench" / "kohya-lock.txt"


def kohya_command(spec: dict, model: Path, data: Path, out: Path) -> tuple[list[str], Path, Path]:
    """kohya's `train_network.py` (sd-scripts at kohya-lock.txt's commit) on the same model and images, as its
    docs train a LoRA: latents cached, the UNet's LoRA alone (`--network_train_unet_only`), AdamW, SDPA.
    Returns the command, the file it writes and the folder to run it in (its source tree)."""
    tree = source_tree("kohya", KOHYA_LOCK, "/work/.mirror/kohya-ss+sd-scripts/repo",
                       ["train_network.py", "library", "networks"])
    images = data.with_name(data.name + "-kohya") / "1_img"  # its layout: <repeats>_<name>/, .txt captions
    if not images.is_dir():
        images.mkdir(parents=True)
        for line in (data / "metadata.csv").read_text().splitlines()[1:]:
            name, text = line.split(",", 1)
            shutil.copyfile(data / name, images / name)
            (images / name).with_suffix(".txt").write_text(text.strip('"'))
    # It asks the hub for openai/clip-vit-large-patch14's tokenizer unless its cache folder has one: the model's,
    # with the vocab.json and merges.txt its transformers 4 (slow) CLIPTokenizer reads beside tokenizer.json.
    tokenizers = out.parent / "kohya-tokenizers"
    clip = tokenizers / "openai_clip-vit-large-patch14"
    shutil.copytree(model / "tokenizer", clip, dirs_exist_ok=True)
    bpe = json.loads((clip / "tokenizer.json").read_text())["model"]
    (clip / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    (clip / "merges.txt").write_text("#version: 0.2\n" + "".join(
        (m if isinstance(m, str) else " ".join(m)) + "\n" for m in bpe.get("merges", [])))
    command = [str(pinned_venv("kohya", KOHYA_LOCK)), str(tree / spec["kohya"]),
               "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(images.parent),
               "--output_dir", str(out), "--output_name", "lora", "--save_model_as", "safetensors",
               "--resolution", str(spec["resolution"]), "--train_batch_size", str(spec["batch"]),
               "--max_train_steps", str(spec["steps"]), "--learning_rate", "1e-4", "--lr_scheduler", "constant",
               "--network_module", "networks.lora", "--network_dim", str(spec["rank"]),
               "--network_alpha", str(spec["rank"]), "--network_train_unet_only", "--cache_latents",
               "--mixed_precision", "no", "--save_precision", "float", "--optimizer_type", "AdamW", "--sdpa",
               "--seed", "1", "--max_data_loader_n_workers", "0", "--caption_extension", ".txt",
               "--tokenizer_cache_dir", str(tokenizers)]
    return command, out / "lora.safetensors", tree


def our_stages(events: Path, started: float) -> dict:
    """Seconds from process start to each stage of ours (the events file's log lines), for the profile."""
    stages, steps = {}, []
    for line in events.read_text().splitlines():
        event = json.loads(line)
        if event.get("kind") == "progress":
            steps.append(event["time"])
        elif event.get("kind") == "log":
            stages.setdefault(event.get("message", "")[:60], round(event["time"] - started, 1))
    if steps:
        stages["first step done"] = round(steps[0] - started, 1)
        stages["last step done"] = round(steps[-1] - started, 1)
    return stages


@dataclasses.dataclass
class BenchRun:
    """One whole-run comparison: the command line's choices, the family's spec, the shared model and images, the
    run's folder and environment, and the results gathered so far."""

    args: argparse.Namespace
    spec: dict
    model: Path
    data: Path
    peer_data: Path
    run_dir: Path
    env: dict
    results: dict
    figures: dict = dataclasses.field(default_factory=dict)

    def wants(self, side: str) -> bool:
        return self.args.only in (None, side)

    def finish(self, what: str, names: dict[str, str] | None = None) -> dict:
        """The ratio line against the faster peer that ran (`what`, or its entry in `names` by side) when ours ran
        too (or the refusal), the results appended to the log."""
        args, spec = self.args, self.spec
        names = {"peer": what, **(names or {})}
        peers = [side for side in self.figures if side != "ours"]
        if "ours" in self.figures and peers:
            fastest = min(peers, key=lambda side: self.figures[side].whole_run_s)
            self.results["verdict"] = ratio_line(self.figures["ours"], self.figures[fastest], names[fastest])
            print(self.results["verdict"], f"({args.family}: {spec['resolution']} px, batch {spec['batch']}, rank "
                  f"{spec['rank']}, {spec['steps']} steps, {args.threads} threads; the faster of "
                  f"{', '.join(names[p] for p in peers)})")
        with open(WORK / "results.jsonl", "a") as log:
            log.write(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), **self.results}) + "\n")
        return self.results


def bench_run(families: dict, argv: list[str] | None, description: str) -> BenchRun:
    """Parse the command line shared by the whole-run benches, build (or reuse) the family's model and images,
    and make the run's folder and the environment both sides run in."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("family", choices=sorted(families))
    parser.add_argument("--only", choices=("ours", "peer", "kohya"), help="run one side (peer: the diffusers "
                        "example or the family's other peer; kohya: sd-scripts, where the family has it)")
    parser.add_argument("--steps", type=int, help="training steps (default: the family's)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for both sides")
    args = parser.parse_args(argv)
    spec = dict(families[args.family])
    spec["steps"] = args.steps or spec["steps"]
    model, data, peer_data = prepare(args.family, spec)
    run_dir = WORK / "runs" / f"{args.family}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(run_dir / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}
    results: dict = {"family": args.family, **{k: spec[k] for k in ("resolution", "batch", "rank", "steps")},
                     "threads": args.threads}
    return BenchRun(args, spec, model, data, peer_data, run_dir, env, results)


def main(argv: list[str] | None = None) -> dict:
    run = bench_run(FAMILIES, argv, __doc__.split("\n\n")[0])
    family, run_dir = run.args.family, run.run_dir
    if run.wants("ours"):
        command, output = ours_command(family, run.spec, run.model, run.data, run_dir / "ours")
        started = time.time()
        run.figures["ours"] = run_timed(command, output=output, log=run_dir / "ours.log", env=run.env, cwd=ROOT)
        run.results["ours"] = run.figures["ours"].as_dict()
        run.results["ours_stages"] = our_stages(run_dir / "ours-events.jsonl", started)
        print("ours", json.dumps(run.results["ours"]), "\n  stages", json.dumps(run.results["ours_stages"]),
              flush=True)
    if run.wants("peer"):
        script = reference_script("diffusers", FAMILIES[family]["script"], run_dir / "scripts")
        command, output = peer_command(family, run.spec, run.model, run.peer_data, run_dir / "peer", script)
        run.figures["peer"] = run_timed(command, output=output, log=run_dir / "peer.log", env=run.env, cwd=run_dir)
        run.results["peer"] = run.figures["peer"].as_dict()
        print(f"diffusers {Path(script).name}", json.dumps(run.results["peer"]), flush=True)
    if run.wants("kohya") and "kohya" in run.spec:
        command, output, tree = kohya_command(run.spec, run.model, run.data, run_dir / "kohya")
        run.figures["kohya"] = run_timed(command, output=output, log=run_dir / "kohya.log", env=run.env, cwd=tree)
        run.results["kohya"] = run.figures["kohya"].as_dict()
        print(f"kohya {run.spec['kohya']}", json.dumps(run.results["kohya"]), flush=True)
    return run.finish("the diffusers example", {"kohya": "kohya's sd-scripts"})

if __name__ == "__main__":
    main()
