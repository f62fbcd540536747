"""Golden LoRA files: what each image family writes today for one fixed tiny run, and how a new run is
compared with them (issue 21: the family packages move, the files they write must not change).

One table names the seven families and the tiny model each trains on; `train_family` runs the fixed
config through the public engine path (`core.train.run_training` on a resolved config, as a user's
train.py run does), never a family-internal function, so this survives the family modules moving.
`compare_files` reads both safetensors headers and data: the tensor entries (names, order, dtype,
shape, offsets) and the data bytes must be identical, and so must the `__metadata__` except for the
values listed in `VOLATILE_METADATA`, which differ on every run by construction.

When the machine differs from the one that wrote the golden files (CPU capability or a library
version in golden/ENVIRONMENT.json), float reductions may round differently: the tensors are then
compared with `torch.testing.assert_close` instead of byte for byte, and the caller is told so.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
ENVIRONMENT_FILE = GOLDEN_DIR / "ENVIRONMENT.json"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PLACEHOLDER = "<volatile>"

# Metadata values that differ between two runs of the same config and seed, so they are replaced by
# PLACEHOLDER on both sides before comparing. Everything else in __metadata__ must be equal.
VOLATILE_METADATA: dict[str, str] = {
    "ss_training_started_at": "the wall-clock time (time.time()) the run started",
    "ss_training_finished_at": "the wall-clock time the file was written",
    "ss_session_id": "kohya's session id, drawn per run from an unseeded RNG (never the training one)",
    "modelspec.date": "the start time as an ISO date",
    # sd-scripts' legacy hash covers the serialized file (header included) from 1 MiB on, and that
    # header holds the session id and the two times above.
    "sshs_legacy_hash": "hashes header bytes that hold the session id and the run times",
}
# Only when the tensors are compared by value (another CPU or library versions): the tensor bytes
# may differ in the last bits, and so does the hash of them; peft writes its own version.
VOLATILE_WHEN_NOT_EXACT: dict[str, str] = {
    "sshs_model_hash": "SHA-256 of the tensor bytes, which may differ in the last bits on another CPU",
}
PEFT_VERSION_SUFFIX = ".peft_version"  # inside the diffusers file's lora_adapter_metadata JSON

# The tiny training run: 2 steps, batch 1, fp32, 64 px, 2 images, fixed seed, no previews, no checkpoints.
RUN = dict(resolution=64, batch_size=1, max_train_steps=2, save_steps=0, learning_rate=1e-3, lora_rank=4,
           lora_alpha=4, mixed_precision="no", save_precision="fp32", seed=7, min_bucket_reso=64,
           max_bucket_reso=128)


@dataclass(frozen=True)
class GoldenFamily:
    name: str                           # folder name under golden/ and the run's output_name
    label: str                          # how a person calls it
    build: Callable[[Path], Path]       # writes the tiny model under a folder, returns what base_model names


def _sd(variant: str) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        from core.families.sd.tiny import build_tiny_sd

        return build_tiny_sd(root, variant).folder
    return build


def _flux(variant: str) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        from core.families.flux.tiny import build_tiny_flux

        return build_tiny_flux(root, variant, comfy=False).folder
    return build


def _sd3(root: Path) -> Path:
    from core.families.sd3.tiny import build_tiny_sd3

    return build_tiny_sd3(root, "sd3", comfy=False).folder


def _zimage(root: Path) -> Path:
    from core.families.zimage.tiny import build_tiny_zimage

    return build_tiny_zimage(root).folder


def _qwen(root: Path) -> Path:
    from core.families.qwen_image.tiny import build_tiny_qwen

    return build_tiny_qwen(root, "qwen-image", comfy=False).folder


def _flux2(root: Path) -> Path:
    from core.families.flux2.tiny import build_tiny_flux2

    return build_tiny_flux2(root).folder


def _wan(root: Path) -> Path:
    from core.families.wan.tiny import build_tiny_wan

    return build_tiny_wan(root).folder


def _krea2(root: Path) -> Path:
    from core.families.krea2.tiny import build_tiny_krea2

    return build_tiny_krea2(root).folder


FAMILIES: dict[str, GoldenFamily] = {f.name: f for f in (
    GoldenFamily("sd1", "SD 1.5", _sd("sd1")),
    GoldenFamily("sdxl", "SDXL", _sd("sdxl")),
    GoldenFamily("flux-dev", "FLUX.1-dev", _flux("flux-dev")),
    GoldenFamily("chroma", "Chroma", _flux("chroma")),
    GoldenFamily("sd3", "SD 3.5 medium", _sd3),
    GoldenFamily("z-image", "Z-Image-Turbo", _zimage),
    GoldenFamily("qwen-image", "Qwen-Image", _qwen),
    GoldenFamily("flux2-klein-4b", "FLUX.2 klein 4B", _flux2),
    GoldenFamily("krea2", "Krea 2", _krea2),
    GoldenFamily("wan2.1-t2v-1.3b", "Wan 2.1 T2V 1.3B", _wan),
)}


def kohya_file_name(family: str) -> str:
    return f"{family}.safetensors"


def train_family(family: str, workdir: Path) -> Path:
    """Build `family`'s tiny model under `workdir`, train the fixed run, return the output folder
    (it holds `<family>.safetensors` and pytorch_lora_weights.safetensors). One torch thread."""
    import torch

    from tests.fixtures.tiny_sd import make_image_folder, run_collect, tiny_run_config

    torch.set_num_threads(1)  # float reductions in one fixed order: the same bytes on every run
    workdir = Path(workdir)
    model = FAMILIES[family].build(workdir / "model")
    data = make_image_folder(workdir / "data", count=2)  # "data": the folder name lands in the metadata
    out = workdir / "out"
    outputs, _ = run_collect(tiny_run_config(model, data, out, output_name=family, **RUN))
    assert Path(outputs["lora"]) == out / kohya_file_name(family), outputs
    assert Path(outputs["diffusers"]) == out / DIFFUSERS_FILE, outputs
    return out


# ---------------------------------------------------------------------------------------------
# The environment the golden files were written in
# ---------------------------------------------------------------------------------------------

def current_environment() -> dict[str, str]:
    """What decides the exact float bytes: the torch build, the CPU kernels it picks, the libraries."""
    from importlib.metadata import version

    import torch

    env = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for package in ("diffusers", "transformers", "peft", "safetensors", "accelerate"):
        env[package] = version(package)
    return env


def recorded_environment() -> dict[str, str]:
    return json.loads(ENVIRONMENT_FILE.read_text(encoding="utf-8"))


def environment_differences() -> list[str]:
    """'name: recorded -> here' for each difference from golden/ENVIRONMENT.json (empty: same)."""
    recorded, here = recorded_environment(), current_environment()
    return [f"{k}: {recorded.get(k)} -> {here.get(k)}" for k in sorted(set(recorded) | set(here))
            if recorded.get(k) != here.get(k)]


# ---------------------------------------------------------------------------------------------
# Reading and comparing safetensors files
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SafetensorsParts:
    tensors: list[tuple[str, dict]]     # header entries in file order: (name, {dtype, shape, data_offsets})
    metadata: dict[str, str]            # __metadata__ (its order is a hash map's in safetensors: not compared)
    data: bytes                         # everything after the header


def read_parts(path: Path) -> SafetensorsParts:
    raw = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8:8 + length], object_pairs_hook=list)
    metadata = dict(next((v for k, v in entries if k == "__metadata__"), []))
    tensors = [(k, dict(v)) for k, v in entries if k != "__metadata__"]
    return SafetensorsParts(tensors, metadata, raw[8 + length:])


def normalized_metadata(metadata: dict[str, str], *, exact: bool) -> dict[str, str]:
    """`metadata` with the volatile values replaced by PLACEHOLDER."""
    volatile = set(VOLATILE_METADATA) | (set() if exact else set(VOLATILE_WHEN_NOT_EXACT))
    out = {k: (PLACEHOLDER if k in volatile else v) for k, v in metadata.items()}
    if not exact and "lora_adapter_metadata" in out:
        adapter = json.loads(out["lora_adapter_metadata"])
        adapter = {k: (PLACEHOLDER if k.endswith(PEFT_VERSION_SUFFIX) else v) for k, v in adapter.items()}
        out["lora_adapter_metadata"] = json.dumps(adapter, sort_keys=True)
    return out


def compare_files(actual: Path, golden: Path, *, exact: bool = True) -> list[str]:
    """The differences between a freshly written file and its golden copy, one line each (empty: equal).

    exact: data bytes identical; otherwise each tensor within rtol 1e-5 / atol 1e-6 of the golden one."""
    a, g = read_parts(actual), read_parts(golden)
    problems: list[str] = []
    if [n for n, _ in a.tensors] != [n for n, _ in g.tensors]:
        missing = sorted({n for n, _ in g.tensors} - {n for n, _ in a.tensors})
        extra = sorted({n for n, _ in a.tensors} - {n for n, _ in g.tensors})
        problems.append(f"tensor names or order differ (missing {missing[:5]}, new {extra[:5]})")
    else:
        for (name, entry), (_, want) in zip(a.tensors, g.tensors):
            if entry != want:
                problems.append(f"{name}: header entry {entry} != golden {want}")
    am, gm = normalized_metadata(a.metadata, exact=exact), normalized_metadata(g.metadata, exact=exact)
    for key in sorted(set(am) | set(gm)):
        if am.get(key) != gm.get(key):
            problems.append(f"metadata {key!r}: {_short(am.get(key))} != golden {_short(gm.get(key))}")
    if problems:
        return problems
    if exact:
        if a.data != g.data:
            first = next(i for i, (x, y) in enumerate(zip(a.data, g.data)) if x != y) if len(a.data) == len(g.data) \
                else min(len(a.data), len(g.data))
            owner = next((n for n, e in a.tensors if e["data_offsets"][0] <= first < e["data_offsets"][1]), "?")
            problems.append(f"data bytes differ, first at byte {first} (tensor {owner})")
        return problems
    return _compare_values(actual, golden)


def _compare_values(actual: Path, golden: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    a, g = load_file(str(actual)), load_file(str(golden))
    problems = []
    for name, want in g.items():
        try:
            torch.testing.assert_close(a[name], want, rtol=1e-5, atol=1e-6)
        except AssertionError as error:
            problems.append(f"{name}: {str(error).splitlines()[0]}")
    return problems


def _short(value: str | None, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def golden_files(family: str) -> tuple[Path, Path]:
    folder = GOLDEN_DIR / family
    return folder / kohya_file_name(family), folder / DIFFUSERS_FILE


def offline_env() -> None:
    """No test reaches the network (the tiny models are built in code)."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
        os.environ.setdefault(key, value)
