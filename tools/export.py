#!/usr/bin/env python3
"""Inspect, convert, merge, resize and extract LoRA files (the engine of the GUI's Tools tab).

    python tools/export.py inspect my_lora.safetensors [--modules] [--metadata] [--json]
    python tools/export.py convert pytorch_lora_weights.safetensors my_lora.safetensors --to kohya
    python tools/export.py convert my_lora.safetensors out_dir --to diffusers --precision fp32
    python tools/export.py convert output/chat/adapter chat_lora.safetensors --to peft-single --precision fp16
    python tools/export.py convert my_dora.safetensors my_plain.safetensors --to plain --base v1-5.safetensors
    python tools/export.py merge --base v1-5.safetensors --lora style.safetensors:0.8 --output v1-5-style.safetensors
    python tools/export.py convert output/chat/adapter chat_lora.gguf --to gguf [--base SmolLM2.gguf]
    python tools/export.py merge --base SmolLM2 --lora output/chat/adapter --output merged_model/
    python tools/export.py merge --base SmolLM2.gguf --lora output/chat/adapter --output chat.gguf --type q8_0
    python tools/export.py merge --lora a.safetensors:0.7 --lora b.safetensors:0.5 --output ab.safetensors [--rank 16]
    python tools/export.py resize my_lora.safetensors --rank 8 --output my_lora_r8.safetensors
    python tools/export.py resize my_lora.safetensors --energy 0.95 --output my_lora_small.safetensors
    python tools/export.py extract --base v1-5.safetensors --tuned finetune.safetensors --rank 32 --output diff.safetensors

Formats are recognised from the keys: kohya/WebUI (`lora_unet_...`), diffusers
(`unet.` / `text_encoder.`), PEFT (an adapter folder). GGUF outputs (for llama.cpp, Ollama,
LM Studio) get an Ollama `Modelfile` beside them. Every output is written to a temporary
name and renamed into place. Pickled files (.ckpt/.pt/.bin) are refused unless --allow-pickle.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.family_api.registry import FAMILIES  # noqa: E402 - standard library only, after the path

# Kept here so `--help` answers without importing torch.
DTYPES = ("fp16", "bf16", "fp32", "keep")


def parse_dtype(name: str | None):
    from core.tools.convert import parse_dtype as parse

    return parse(name)

PRECISION_HELP = "precision of the written tensors: fp16 (default for SD files, like kohya_ss), bf16, fp32, keep"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LoRA file tools: inspect, convert, merge, resize, extract.")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read pickled .ckpt/.pt/.bin files (they can run code: only files you trust)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="format, model family, rank/alpha per module, metadata, NaN check")
    p.add_argument("file", help="a LoRA .safetensors, a diffusers LoRA folder or a PEFT adapter folder")
    p.add_argument("--modules", action="store_true", help="list every module with its rank and alpha")
    p.add_argument("--metadata", action="store_true", help="print every metadata value in full")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")

    p = sub.add_parser("convert", help="diffusers <-> kohya/WebUI; PEFT adapter folder <-> one .safetensors")
    p.add_argument("source", help="the LoRA file or adapter folder to convert")
    p.add_argument("output", help="the file (kohya, peft-single) or folder (diffusers, peft) to write")
    p.add_argument("--to", required=True, choices=["kohya", "diffusers", "peft", "peft-single", "plain", "gguf"],
                   help="kohya: WebUI/ComfyUI file; diffusers: folder with pytorch_lora_weights.safetensors; "
                        "peft-single: one .safetensors from a PEFT adapter folder; peft: back to a folder; "
                        "plain: a DoRA image LoRA as a plain kohya LoRA that WebUI, ComfyUI and diffusers all "
                        "apply the same way (needs --base, the model it was trained on); "
                        "gguf: a text adapter as a GGUF LoRA for llama.cpp / Ollama / LM Studio, plus a Modelfile")
    p.add_argument("--base", help="--to plain: the base model the DoRA LoRA was trained on; --to gguf: the base "
                                  "model (default: the one the adapter names)")
    p.add_argument("--rank", type=int, help="--to plain: rank of the plain modules (default: the DoRA's own)")
    p.add_argument("--model-config", default="", help="--to plain: diffusers config folder for a single-file base")
    p.add_argument("--family", choices=list(FAMILIES), help="model family when the file cannot tell (e.g. chroma "
                   "for a diffusers FLUX file, which does not say)")
    p.add_argument("--pissa-init", metavar="INITIAL",
                   help="PiSSA: the adapter saved right after initialisation; writes the equivalent plain LoRA "
                        "for the ORIGINAL base model (twice the rank)")
    p.add_argument("--precision", choices=list(DTYPES), default="keep", help=PRECISION_HELP.replace(
        "fp16 (default for SD files, like kohya_ss)", "fp16") + " (default keep; --to gguf: fp32 or fp16)")
    _gguf_options(p)

    p = sub.add_parser("merge", help="bake LoRAs into a base model, or combine several LoRAs into one")
    p.add_argument("--base", help="base model: SD single file / diffusers folder, or an LLM folder / .gguf. "
                                  "Without --base the LoRAs are combined into one LoRA.")
    p.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]",
                   help="a LoRA and its weight (default 1.0); repeat for several")
    p.add_argument("--output", "-o", required=True,
                   help="SD: a .safetensors checkpoint; LLM: a folder; combined LoRA: a file (or folder for PEFT)")
    p.add_argument("--precision", choices=list(DTYPES), default=None, help=PRECISION_HELP +
                   " (LLM merge and combined LoRAs default to keep)")
    p.add_argument("--model-config", default="", help="diffusers folder with the configs of a single-file SD base "
                                                      "(needed offline; same as base_model_config)")
    p.add_argument("--type", choices=["f16", "q8_0"], default="f16",
                   help="--output *.gguf: the merged model's GGUF type (default f16; Q4_K_M needs llama.cpp's "
                        "llama-quantize on the f16 file)")
    p.add_argument("--route", choices=["auto", "llama.cpp", "gguf"], default="auto",
                   help="--output *.gguf: llama.cpp's convert_hf_to_gguf.py, or our writer (default auto: ours "
                        "for GGUF bases, llama.cpp's for HF bases when installed)")
    _gguf_options(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int, help="combined LoRA: SVD back down to this rank (default: exact, "
                                                "ranks added up)")
    group.add_argument("--energy", type=float, help="combined LoRA: smallest rank keeping this share of energy")

    p = sub.add_parser("resize", help="reduce a LoRA's rank by SVD; reports the error")
    p.add_argument("file", help="the LoRA to resize (kohya, diffusers or PEFT)")
    p.add_argument("--output", "-o", required=True, help="where to write the smaller LoRA (same format)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="target rank (modules of a lower rank stay as they are)")
    group.add_argument("--energy", type=float, help="keep this share (0-1] of each module's squared singular values")
    p.add_argument("--max-rank", type=int, help="with --energy: never more than this rank")
    p.add_argument("--precision", choices=list(DTYPES), default="fp16", help=PRECISION_HELP)
    p.add_argument("--verbose", "-v", action="store_true", help="print the error of every module")

    p = sub.add_parser("extract", help="make a LoRA from the difference of two models (tuned - base)")
    p.add_argument("--base", required=True, help="the original model")
    p.add_argument("--tuned", required=True, help="the fine-tuned model (same architecture)")
    p.add_argument("--output", "-o", required=True, help="SD: a kohya .safetensors; LLM: a PEFT adapter folder")
    p.add_argument("--rank", type=int, default=32, help="rank of the Linear layers (default 32)")
    p.add_argument("--conv-rank", type=int, default=0, help="SD: also extract 3x3 convolutions at this rank (LoCon)")
    p.add_argument("--energy", type=float, help="per module: smallest rank keeping this share, at most --rank")
    p.add_argument("--llm", action="store_true", help="the models are causal LMs (default: Stable Diffusion)")
    p.add_argument("--model-config", default="", help="diffusers config folder for single-file SD models")
    p.add_argument("--precision", choices=list(DTYPES), default=None, help=PRECISION_HELP)
    return parser


def _gguf_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", default=None,
                   help="GGUF: the chat template the LoRA was trained with (chatml, alpaca, ... or Jinja); default: "
                        "the training run's config.yaml, else the tokenizer's own")
    p.add_argument("--no-modelfile", action="store_true", help="GGUF: do not write an Ollama Modelfile beside it")


def _is_text_adapter(path: str) -> bool:
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from core.export.inspect import inspect_lora
    from core.tools.describe import describe_info, info_as_dict

    info = inspect_lora(args.file)
    if args.json:
        print(json.dumps(info_as_dict(info), indent=2, ensure_ascii=False))
    else:
        print(describe_info(info, all_modules=args.modules, all_metadata=args.metadata))
    return 1 if info.nonfinite else 0  # a broken file fails scripts that check it


def cmd_convert(args: argparse.Namespace) -> int:
    from core.tools.convert import convert_lora

    if args.to == "plain":
        from core.tools.undora import dora_to_lora

        if not args.base:
            raise SystemExit("--to plain needs --base: the model the DoRA LoRA was trained on.")
        precision = "fp16" if args.precision == "keep" else args.precision
        out, report = dora_to_lora(args.base, args.source, args.output, rank=args.rank, dtype=parse_dtype(precision),
                                   model_config=args.model_config, allow_pickle=args.allow_pickle)
        print(f"DoRA modules made plain: {report.summary()}")
        print(f"Wrote {out}")
        return 0
    if args.to == "gguf":
        from core.export.gguf_out import adapter_to_gguf

        if args.precision not in ("keep", "fp32", "fp16"):
            raise SystemExit("--to gguf writes fp32 (default) or fp16 adapters.")
        result = adapter_to_gguf(args.source, args.output, base=args.base or "",
                                 out_type="f16" if args.precision == "fp16" else "f32",
                                 chat_template=args.chat_template, modelfile=not args.no_modelfile)
        print(result.report())
        return 0
    out = convert_lora(args.source, args.output, args.to, family=args.family, dtype=parse_dtype(args.precision),
                       allow_pickle=args.allow_pickle, pissa_initial=args.pissa_init)
    print(f"Wrote {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from core.tools.merge import parse_lora_spec

    loras = [parse_lora_spec(item) for item in args.lora]
    if args.base is None:
        from core.tools.convert import write_like
        from core.tools.merge import combine_files

        merged, report = combine_files([p for p, _ in loras], [w for _, w in loras], rank=args.rank,
                                       energy=args.energy, allow_pickle=args.allow_pickle)
        out = write_like(merged, args.output, dtype=parse_dtype(args.precision or "keep"),
                         metadata=merged.metadata)
        print(f"Combined {len(loras)} LoRAs into {out}: {report.summary()}")
        return 0
    if args.rank or args.energy:
        raise SystemExit("--rank / --energy apply to combining LoRAs (without --base), not to baking into a model.")
    if all(_is_text_adapter(p) for p, _ in loras):
        from core.tools.merge import bake_into_llm

        if len(loras) != 1:
            raise SystemExit("Bake one text adapter at a time (combine several first: merge without --base).")
        path, weight = loras[0]
        if args.output.lower().endswith(".gguf"):
            from core.export.gguf_out import merged_to_gguf

            result = merged_to_gguf(args.base, path, args.output, out_type=args.type, route=args.route, weight=weight,
                                    chat_template=args.chat_template, modelfile=not args.no_modelfile,
                                    allow_pickle=args.allow_pickle)
            print(result.report())
            return 0
        out = bake_into_llm(args.base, path, args.output, weight=weight, dtype=parse_dtype(args.precision or "keep"),
                            allow_pickle=args.allow_pickle)
        print(f"Wrote the merged model to {out} (adapter at weight {weight:g})")
        return 0
    from core.tools.merge import bake_into_sd

    out, report = bake_into_sd(args.base, loras, args.output, dtype=parse_dtype(args.precision or "fp16"),
                               allow_pickle=args.allow_pickle, model_config=args.model_config)
    print(f"Wrote {out}: {report.summary()}")
    return 0


def _print_report(report, verbose: bool) -> None:
    if verbose:
        for entry in report.modules:
            print(f"  {entry.name}: rank {entry.old_rank} -> {entry.new_rank}, error {entry.error:.4%}")
    print(report.summary())


def cmd_resize(args: argparse.Namespace) -> int:
    from core.tools.extract import resize_file

    if args.max_rank and args.rank:
        raise SystemExit("--max-rank goes with --energy; with --rank the rank is already fixed.")
    out, report = resize_file(args.file, args.output, rank=args.rank, energy=args.energy, max_rank=args.max_rank,
                              dtype=parse_dtype(args.precision), allow_pickle=args.allow_pickle)
    _print_report(report, args.verbose)
    print(f"Wrote {out}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from core.tools.extract import extract_llm, extract_sd

    if args.llm:
        out, report = extract_llm(args.base, args.tuned, args.output, rank=args.rank, energy=args.energy,
                                  dtype=parse_dtype(args.precision or "keep"), allow_pickle=args.allow_pickle)
    else:
        out, report = extract_sd(args.base, args.tuned, args.output, rank=args.rank, conv_rank=args.conv_rank,
                                 energy=args.energy, dtype=parse_dtype(args.precision or "fp16"),
                                 model_config=args.model_config, allow_pickle=args.allow_pickle)
    _print_report(report, False)
    if report.skipped_same:
        print(f"{len(report.skipped_same)} layers are the same in both models and were left out.")
    print(f"Wrote {out}")
    return 0


COMMANDS = {"inspect": cmd_inspect, "convert": cmd_convert, "merge": cmd_merge, "resize": cmd_resize,
            "extract": cmd_extract}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as exc:  # our errors are ValueErrors that say what to change
        print(f"error: {exc}", file=sys.stderr)
        advice = getattr(exc, "advice", "")
        if advice:
            print(f"  {advice}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
