"""Write the golden LoRA files of tests/families/golden/ with the code as it is now.

    python -m tests.families.make_golden                 # all seven families
    python -m tests.families.make_golden flux-dev sd1    # only these
    python -m tests.families.make_golden --check         # train again and compare, write nothing

Run it only when an output is MEANT to change (and say why in the commit): the point of the golden
files is that a refactor leaves them as they are. Also rewrites golden/ENVIRONMENT.json (torch
version, CPU capability, library versions) so the test knows when it can compare byte for byte.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from tests.families.golden_outputs import (
    DIFFUSERS_FILE, ENVIRONMENT_FILE, FAMILIES, GOLDEN_DIR, compare_files, current_environment, golden_files,
    kohya_file_name, offline_env, train_family,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help=f"any of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--check", action="store_true", help="train and compare with the golden files only")
    args = parser.parse_args(argv)
    offline_env()
    names = args.families or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}: name one of {', '.join(FAMILIES)}.")
    failed = False
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        for name in names:
            out = train_family(name, Path(tmp) / name)
            if args.check:
                for fresh, golden in zip((out / kohya_file_name(name), out / DIFFUSERS_FILE), golden_files(name)):
                    problems = compare_files(fresh, golden)
                    failed |= bool(problems)
                    print(f"{name}/{golden.name}: " + ("unchanged" if not problems else "; ".join(problems)))
                continue
            target = GOLDEN_DIR / name
            target.mkdir(parents=True, exist_ok=True)
            for fresh in (out / kohya_file_name(name), out / DIFFUSERS_FILE):
                shutil.copyfile(fresh, target / fresh.name)
                print(f"wrote {target / fresh.name} ({fresh.stat().st_size} bytes)")
    if not args.check:
        ENVIRONMENT_FILE.write_text(json.dumps(current_environment(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {ENVIRONMENT_FILE}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
