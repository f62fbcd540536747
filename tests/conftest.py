"""Shared test setup: no test may reach the network, and tiny models come from fixtures."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Each area keeps its tiny-model fixtures in its own module under tests/fixtures/.
pytest_plugins = [
    f"tests.fixtures.{p.stem}" for p in sorted((ROOT / "tests" / "fixtures").glob("*.py"))
    if p.stem != "__init__"
]
