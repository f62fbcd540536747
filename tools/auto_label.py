#!/usr/bin/env python3
"""Caption a folder of training images: metadata.csv (`filename,prompt`) and/or kohya .txt files.

    python tools/auto_label.py --input data/style_train --output data/style_train/metadata.csv --model blip-base
    python tools/auto_label.py --input data/chars --txt --trigger-word "mychar" --model florence-2-base
    python tools/auto_label.py --input data/named --model filename        # words from the file names
    python tools/auto_label.py --list-models

The same engine as the GUI's Caption tab (`core.caption.caption_folder`). An existing
metadata.csv is backed up before it is replaced and its other rows are kept. Images that
already have a caption are kept unless --overwrite. Ctrl+C stops after the current batch
and keeps what was written.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.caption import (CAPTIONERS, CaptionerLoadError, CaptionerNotFoundError,  # noqa: E402
                          CaptionJobError, CaptionOptions, caption_folder, captioner_status)
from core.devices import is_out_of_memory  # noqa: E402
from core.events import Event, LogEvent, ProgressEvent, RunContext, WarningEvent  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Caption every image of a folder with BLIP, GIT, Florence-2, a vision-language model, "
                    "or from the file names.",
        epilog="Offline: put a model's files in models/captioners/<name>/ (e.g. models/captioners/blip-base/).")
    parser.add_argument("--input", "-i", help="folder of images")
    parser.add_argument("--output", "-o", help="metadata.csv to write (default: <input>/metadata.csv); "
                                               "a folder means <folder>/metadata.csv")
    parser.add_argument("--model", "-m", default="blip-base",
                        help="short name (see --list-models), a local model folder, a hub id, or the run "
                             "folder of a VLM LoRA trained with text_method: vlm (default: blip-base)")
    parser.add_argument("--list-models", action="store_true", help="print the captioners and exit")
    parser.add_argument("--prefix", "--trigger-word", dest="prefix", default="",
                        help="text put before every caption, e.g. a trigger word")
    parser.add_argument("--suffix", default="", help="text put after every caption")
    parser.add_argument("--max-length", type=int, default=None,
                        help="most tokens per caption (default: 40 for BLIP/GIT, 256 for Florence-2/VLMs)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--skip-existing", dest="existing", action="store_const", const="skip",
                      help="keep captions images already have (default)")
    mode.add_argument("--overwrite", dest="existing", action="store_const", const="overwrite",
                      help="caption every image again (old metadata.csv / .txt are backed up)")
    parser.set_defaults(existing="skip")
    parser.add_argument("--csv", action="store_true", help="write metadata.csv (the default)")
    parser.add_argument("--txt", action="store_true", help="write a .txt caption beside each image "
                                                           "(with --csv or --output: both)")
    parser.add_argument("--txt-extension", default=".txt", help="extension of caption files (default .txt)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = greedy, fastest)")
    parser.add_argument("--prompt", default=None,
                        help="instruction for vision-language models, or a Florence-2 task token "
                             "(default: 'Describe this image in detail.' / <DETAILED_CAPTION>)")
    parser.add_argument("--recursive", "-r", action=argparse.BooleanOptionalAction, default=True,
                        help="also caption images in sub-folders, as training reads them (default: yes)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow models that ship their own Python code (e.g. microsoft/Florence-2-base)")
    return parser


def list_models() -> str:
    lines = ["Captioners (--model NAME; offline: put the files in models/captioners/NAME/):"]
    for spec in CAPTIONERS.values():
        source = f" ({spec.model_id})" if spec.model_id else ""
        lines.append(f"  {spec.name:<17}{spec.description}{source}\n  {'':<17}-> {captioner_status(spec.name)}")
    lines.append("Any local model folder or hub id of a BLIP, GIT, Florence-2 or vision-language model works too.")
    return "\n".join(lines)


def options_from_args(args: argparse.Namespace) -> CaptionOptions:
    write_txt = args.txt
    write_csv = args.csv or args.output is not None or not args.txt
    return CaptionOptions(input_dir=args.input, model=args.model, output_csv=args.output, write_csv=write_csv,
                          write_txt=write_txt, txt_extension=args.txt_extension, prefix=args.prefix,
                          suffix=args.suffix, max_length=args.max_length, batch_size=args.batch_size,
                          existing=args.existing, device=args.device, recursive=args.recursive,
                          num_beams=args.num_beams, prompt=args.prompt, trust_remote_code=args.trust_remote_code)


class _TqdmListener:
    """Draws a progress bar from ProgressEvents and prints warnings above it."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, ProgressEvent):
            if self.bar is None:
                self.bar = self._tqdm(total=event.total, unit="img", dynamic_ncols=True)
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix_str(event.message[:60], refresh=False)
        elif isinstance(event, WarningEvent):
            self._tqdm.write(f"warning: {event.message}", file=sys.stderr)
        elif isinstance(event, LogEvent):
            self._tqdm.write(event.message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_models:
        print(list_models())
        return 0
    if not args.input:
        build_parser().error("--input is required (the folder of images)")
    listener = _TqdmListener()
    ctx = RunContext(listeners=[listener])

    def request_stop(signum: int, frame: object) -> None:  # first Ctrl+C: stop cleanly after this batch
        if ctx.should_stop():
            raise KeyboardInterrupt
        ctx.stop_flag.set()
        print("\nStopping after this batch (Ctrl+C again to abort)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        result = caption_folder(options_from_args(args), ctx)
    except (CaptionJobError, CaptionerNotFoundError, CaptionerLoadError) as exc:
        listener.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        listener.close()
        print(f"error: out of memory loading or running {args.model} ({exc}). Use a smaller captioner, "
              "a smaller --batch-size, or --device cpu. Captions written so far are kept.", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    listener.close()
    print(result.summary())
    if result.failed:
        print("Files skipped:", file=sys.stderr)
        for reason in result.failed.values():
            print(f"  {reason}", file=sys.stderr)
    nothing_written = not result.captions and not result.kept
    return 1 if nothing_written and (result.failed or result.empty) else 0


if __name__ == "__main__":
    sys.exit(main())
