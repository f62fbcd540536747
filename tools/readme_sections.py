"""Fill the generated sections of README.md between their <!-- name:start/end --> markers.

    python tools/readme_sections.py          # rewrite README.md in place
    python tools/readme_sections.py --check  # exit 1 when README.md is out of date

Sections: config-keys (from core/config.py). Hand-written sections from docs/*.md
(app, tools, presets) are pasted in as they are.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.atomic import atomic_write_text  # noqa: E402
from tools.config_doc import config_table  # noqa: E402


def sections() -> dict[str, str]:
    found = {"config-keys": config_table()}
    for name in ("app", "tools", "presets", "reliability", "benchmarks"):
        doc = ROOT / "docs" / f"{name}.md"
        if doc.is_file():
            # Links in docs/*.md are relative to docs/; in the README they start at the root.
            text = doc.read_text(encoding="utf-8").strip() + "\n"
            found[name] = re.sub(r"\]\((?!https?:|/|#)([^)]+)\)", r"](docs/\1)", text)
    return found


def render(readme: str) -> str:
    for name, body in sections().items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        readme = pattern.sub(lambda m, body=body: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), readme)
    return readme


def main(argv: list[str]) -> int:
    path = ROOT / "README.md"
    current = path.read_text(encoding="utf-8")
    wanted = render(current)
    if "--check" in argv:
        return 0 if wanted == current else 1
    if wanted != current:
        atomic_write_text(path, wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
