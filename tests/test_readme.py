"""The README tells the truth: every config key is documented, as the code defines it."""
from tools.readme_sections import ROOT, render

from core.config import FIELDS


def test_every_config_key_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in FIELDS:
        assert f"| `{name}` |" in readme, f"{name} is missing from the README's key table"


def test_generated_sections_are_up_to_date():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render(readme) == readme, "run: python tools/readme_sections.py"
