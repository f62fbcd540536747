"""Whether the Hugging Face hub may be asked: the one reading of the offline switches.

Every loader (image families, captioners, LLMs) passes `local_files_only=offline()` (or a local
path) so a machine without internet gets the loader's own clear error at once instead of a
network timeout. huggingface_hub reads HF_HUB_OFFLINE; transformers and diffusers also honour
their own older switches, so any of them counts.
"""
from __future__ import annotations

import os

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
_ON = {"1", "true", "yes", "on"}


def offline() -> bool:
    """True when any of the hub's offline switches is set to 1 / true / yes / on."""
    return any(os.environ.get(name, "").strip().lower() in _ON for name in OFFLINE_SWITCHES)
