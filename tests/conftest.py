"""Shared test setup: no test may reach the network, and tiny models come from fixtures."""
import os
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every test computes on one torch thread: tiny models run faster so on two shared, busy cores
    (no OpenMP threads spinning against each other), and a test's numbers do not depend on which
    other tests ran in the same process. Runs that are compared step by step stay bit for bit equal."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The files that hold slow stories (browser, several processes, kill -9) run first: with a worker per core
    (launch.py --test) they then start early instead of ending the run on one worker while the other idles.
    A stable sort by file: every file's tests stay together and in their order."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
