"""What kind of base model a config points at, and how big it is, without loading it.

`preset: auto` and the memory estimate need the model's family (SD 1.x, SD 2.x, SDXL,
a transformer family of the table, or a causal LM) and its size before anything loads, and they run every time a config is
checked. So this module only reads headers: the JSON header of a .safetensors file,
the key/value header and tensor table of a GGUF file, a folder's config.json /
model_index.json. A hub id is never downloaded: its name is the only clue. The facts of
each image family (label, published sizes) come from `core.family_api.registry`.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from core.family_api.registry import (FALLBACK_FAMILY, FAMILIES, family_info, family_label, family_of_checkpoint,
                                    family_of_context_dim)

@dataclass(frozen=True)
class ModelInfo:
    """The base model as far as memory is concerned.

    `params` counts the network that is trained (the UNet, or the LM); the frozen
    helpers (text encoders, VAE) are in `extra_params`. For LLMs the shape fields feed
    the activation estimate; `width` is the UNet's first block width (320 for real SD), or
    a transformer's hidden width (3072 for the real FLUX.1).
    """

    family: str
    params: int
    source: str  # how it was found out, for the reason sentence
    extra_params: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    kv_dim: int = 0
    width: int = 320
    context_length: int = 0  # LLMs: the longest sequence the model was trained on (0: not known)

    @property
    def label(self) -> str:
        return f"{family_label(self.family)} ({format_count(self.params)} parameters)"

    @property
    def kind(self) -> str:
        """The registry's kind for image families ("unet", "flux", "dit"), "llm" or "unknown" otherwise."""
        info = FAMILIES.get(self.family)
        return info.kind if info else self.family


def format_count(count: int) -> str:
    """A parameter count in words: '11.9B', '135M', '4.9M', '48K' for a tiny test model (never '0M'), '512'."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            value = count / scale
            return f"{value:.1f}{suffix}" if suffix == "B" or value < 10 else f"{value:.0f}{suffix}"
    return str(int(count))


def family_defaults(family: str, source: str = "") -> ModelInfo:
    """The published sizes of an image family, for when only the family is known (hub id, file size)."""
    info = family_info(family)
    return ModelInfo(family, info.trained_params, source, extra_params=info.frozen_params, width=info.width)


# The text task's default model: SmolLM2-135M-Instruct (launch.py puts its GGUF into models/llm/).
SMOLLM2_135M = ModelInfo("llm", 134_515_008, "the bundled SmolLM2-135M", hidden_size=576, num_layers=30,
                         intermediate_size=1536, vocab_size=49152, kv_dim=192, context_length=8192)


def llm_params(h: int, layers: int, inter: int, vocab: int, kv_dim: int, tied: bool = True) -> int:
    """Parameters of a Llama-style decoder from its shape."""
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * inter + 2 * h
    return vocab * h * (1 if tied else 2) + layers * per_layer + h


def llm_from_shape(params: int, source: str, h: int, layers: int, inter: int, vocab: int,
                   kv_dim: int) -> ModelInfo:
    return ModelInfo("llm", params, source, hidden_size=h, num_layers=layers, intermediate_size=inter,
                     vocab_size=vocab, kv_dim=kv_dim or h)


# Shapes of well-known models, by size: used when only a parameter count is known.
_KNOWN_SHAPES = [  # (up to params, hidden, layers, intermediate, vocab, kv_dim)
    (2.0e8, 576, 30, 1536, 49152, 192),        # SmolLM2-135M
    (6.0e8, 896, 24, 4864, 151936, 128),       # Qwen2.5-0.5B
    (1.5e9, 2048, 16, 8192, 128256, 512),      # Llama-3.2-1B
    (4.0e9, 3072, 28, 8192, 128256, 1024),     # Llama-3.2-3B
    (9.0e9, 4096, 32, 14336, 128256, 1024),    # Llama-3.1-8B
    (1.6e10, 5120, 40, 13824, 32000, 5120),    # Llama-2-13B
    (float("inf"), 8192, 80, 28672, 128256, 1024),  # Llama-3-70B
]


def guess_llm_shape(params: int, source: str) -> ModelInfo:
    """The shape of a well-known model of about this size (when only the size is known)."""
    _, h, layers, inter, vocab, kv_dim = next(row for row in _KNOWN_SHAPES if params <= row[0])
    return llm_from_shape(params, source, h, layers, inter, vocab, kv_dim)


# --- safetensors --------------------------------------------------------------------------

def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (names, dtypes, shapes): no tensor is read."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        if size > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes).")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


# Where a transformer's own tensors start in a single file: under ComfyUI's prefixes, or bare.
_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


def _dit_from_shapes(shapes: dict[str, list[int]], source: str, path: Path | None) -> ModelInfo | None:
    """A transformer family of the table from its `single_file_markers` (the first row that matches);
    the family's own `detect` names the variant. The first marker's first dimension is the hidden width."""
    for info in FAMILIES.values():
        if not info.is_flow_matching or not info.single_file_markers:
            continue
        prefix = next((p for p in _DIT_PREFIXES if any(p + m in shapes for m in info.single_file_markers)), None)
        if prefix is None:
            continue
        own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
        from core.family_api.lookup import family_impl  # torch: imported only for these files

        family = family_impl(info.name)
        if family.variant_from_keys is not None:
            name = family.variant_from_keys(own) or info.name
        else:
            name = (family.detect(str(path)) if family.detect and path is not None else None) or info.name
        marker = next((own[m] for m in info.single_file_markers if m in own), None)
        base = family_defaults(name)
        rest = sum(_numel(v) for k, v in shapes.items() if not k.startswith(prefix)) if prefix else 0
        return replace(base, params=sum(_numel(v) for v in own.values()), source=source,
                       width=int(marker[0]) // info.marker_width_ratio if marker else base.width,
                       extra_params=rest or base.extra_params)
    return None


def _from_tensor_table(shapes: dict[str, list[int]], source: str, path: Path | None = None) -> ModelInfo | None:
    """Family and size from tensor names/shapes (single-file SD / FLUX / DiT checkpoints, LLM files)."""
    dit = _dit_from_shapes(shapes, source, path)
    if dit:
        return dit
    keys = shapes.keys()
    family = family_of_checkpoint(keys)
    if family:
        unet = sum(_numel(s) for k, s in shapes.items() if k.startswith("model.diffusion_model."))
        rest = sum(_numel(s) for k, s in shapes.items() if not k.startswith("model.diffusion_model."))
        base = family_defaults(family)
        return replace(base, params=unet or base.params, extra_params=rest or base.extra_params, source=source)
    if any(k.startswith("down_blocks.") for k in keys):  # a diffusers UNet on its own
        cross = [s[-1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")]
        family = (family_of_context_dim(cross[0]) if cross else None) or FALLBACK_FAMILY
        width = [s[0] for k, s in shapes.items() if k == "conv_in.weight"]
        return replace(family_defaults(family), params=sum(_numel(s) for s in shapes.values()), source=source,
                       width=width[0] if width else 320)
    return _llm_from_names(shapes, source)


def _llm_from_names(shapes: dict[str, list[int]], source: str) -> ModelInfo | None:
    def first(pattern: str) -> list[int] | None:
        regex = re.compile(pattern)
        return next((s for k, s in shapes.items() if regex.search(k)), None)

    embed = first(r"(embed_tokens|token_embd|wte)\.weight$")
    layer_ids = {int(m.group(2)) for k in shapes if (m := re.search(r"(layers|blk|h)\.(\d+)\.", k))}
    if not embed or not layer_ids:
        return None
    vocab, h = (embed[0], embed[1]) if embed[0] > embed[1] else (embed[1], embed[0])
    gate = first(r"(gate_proj|ffn_gate|mlp\.c_fc)\.weight$") or first(r"(up_proj|ffn_up)\.weight$")
    kv = first(r"(k_proj|attn_k)\.weight$")
    inter = max(gate) if gate else 4 * h
    kv_dim = (kv[0] if kv[1] == h else kv[1]) if kv else h
    return llm_from_shape(sum(_numel(s) for s in shapes.values()), source, h, max(layer_ids) + 1, inter,
                          vocab, kv_dim)


# --- GGUF -----------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_value(handle: BinaryIO, kind: int, keep: bool) -> Any:
    if kind == 8:  # string
        size = struct.unpack("<Q", handle.read(8))[0]
        data = handle.read(size)
        return data.decode("utf-8", "replace") if keep else None
    if kind == 9:  # array: skipped item by item (token lists are long, we need only their length)
        item_kind, count = struct.unpack("<IQ", handle.read(12))
        if item_kind in _GGUF_SCALARS:
            handle.seek(struct.calcsize("<" + _GGUF_SCALARS[item_kind]) * count, 1)
        else:
            for _ in range(count):
                _gguf_value(handle, item_kind, False)
        return count
    fmt = "<" + _GGUF_SCALARS[kind]
    return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]


def gguf_info(path: str | Path) -> ModelInfo:
    """Shape and size of a GGUF model from its header and tensor table (no weights read)."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file.")
        _version, n_tensors, n_kv = struct.unpack("<IQQ", handle.read(20))
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            size = struct.unpack("<Q", handle.read(8))[0]
            key = handle.read(size).decode("utf-8", "replace")
            kind = struct.unpack("<I", handle.read(4))[0]
            meta[key] = _gguf_value(handle, kind, keep=True)
        shapes: dict[str, list[int]] = {}
        for _ in range(n_tensors):
            size = struct.unpack("<Q", handle.read(8))[0]
            name = handle.read(size).decode("utf-8", "replace")
            n_dims = struct.unpack("<I", handle.read(4))[0]
            shapes[name] = list(struct.unpack(f"<{n_dims}Q", handle.read(8 * n_dims)))
            handle.seek(12, 1)  # type (u32) and data offset (u64)
    arch = meta.get("general.architecture", "llama")
    params = sum(_numel(s) for s in shapes.values())
    h = int(meta.get(f"{arch}.embedding_length") or 0)
    if not h:
        return _llm_from_names(shapes, f"the GGUF header of {Path(path).name}") or guess_llm_shape(params, "")
    heads = int(meta.get(f"{arch}.attention.head_count") or 1)
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv") or heads)
    vocab = int(meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens") or 32000)
    info = llm_from_shape(params, f"the GGUF header of {Path(path).name}", h,
                          int(meta.get(f"{arch}.block_count") or 1),
                          int(meta.get(f"{arch}.feed_forward_length") or 4 * h), vocab, h * kv_heads // heads)
    return replace(info, context_length=int(meta.get(f"{arch}.context_length") or 0))


def is_ggml_v3_file(path: str | Path) -> bool:
    """A GGML v3 llama file by its first 8 bytes (light: for catalogs and estimates, no core.models import)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == b"tjgg" + struct.pack("<I", 3)  # the ggjt magic, little-endian, version 3
    except OSError:
        return False


def ggml_info(path: str | Path) -> ModelInfo:
    """Shape and size of a GGML v3 llama file from its header and tensor table (no weights read)."""
    from core.models.ggml_v3 import read_ggml  # imported here: core.models pulls in torch and diffusers

    ggml = read_ggml(path)
    hp, shapes = ggml.hparams, {name: list(t.shape) for name, t in ggml.tensors.items()}
    # The file counts quantized weights; training holds them dequantized, so the count is what matters.
    params = sum(_numel(s) for s in shapes.values())
    ffn = shapes.get("layers.0.feed_forward.w1.weight") or [4 * hp.n_embd]
    keys = shapes.get("layers.0.attention.wk.weight") or [hp.n_embd]  # GQA (70B) shows in its rows
    return llm_from_shape(params, f"the GGML v3 header of {Path(path).name}", hp.n_embd, hp.n_layer, ffn[0],
                          hp.n_vocab, keys[0])


# --- folders and hub ids ----------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _folder_params(folder: Path) -> int:
    total = 0
    for file in folder.glob("*.safetensors"):
        try:
            total += sum(_numel(v["shape"]) for v in safetensors_header(file).values())
        except (OSError, ValueError, KeyError):
            continue
    return total


def _dit_folder(folder: Path, index: dict[str, Any]) -> ModelInfo | None:
    """A diffusers folder of a transformer family of the table, by its `_class_name`s (the first row
    that names one); the family's own `detect` names the variant."""
    transformer_cfg = _read_json(folder / "transformer" / "config.json")
    names = {str(d.get("_class_name", "")) for d in (index, transformer_cfg)}
    info = next((i for i in FAMILIES.values() if i.is_flow_matching and names & set(i.diffusers_class_names)), None)
    if info is None:
        return None
    from core.family_api.lookup import family_impl  # torch: imported only for these folders

    detect = family_impl(info.name).detect
    base = family_defaults((detect(str(folder)) if detect else None) or info.name)
    cfg = transformer_cfg
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    width = int(heads) * int(head_dim) if heads and head_dim else int(cfg.get("dim") or cfg.get("hidden_size")
                                                                      or base.width)
    params = _folder_params(folder / "transformer")
    extra = sum(_folder_params(p) for p in folder.iterdir() if p.is_dir() and p.name.startswith(("text_encoder",
                                                                                              "vae")))
    return replace(base, params=params or base.params, extra_params=extra or base.extra_params, width=width,
                   source=f"the diffusers folder {folder.name}")


def _diffusers_folder(folder: Path) -> ModelInfo:
    index = _read_json(folder / "model_index.json")
    dit = _dit_folder(folder, index)
    if dit:
        return dit
    unet_cfg = _read_json(folder / "unet" / "config.json")
    named = next((i.name for i in FAMILIES.values() if index.get("_class_name") in i.diffusers_class_names
                  or any(unet_cfg.get(k) == v for k, v in i.unet_config_markers)), None)
    family = named or family_of_context_dim(int(unet_cfg.get("cross_attention_dim") or 0)) or FALLBACK_FAMILY
    base = family_defaults(family)
    unet = _folder_params(folder / "unet")
    extra = sum(_folder_params(folder / part) for part in ("text_encoder", "text_encoder_2", "vae"))
    width = (unet_cfg.get("block_out_channels") or [320])[0]
    return replace(base, params=unet or base.params, extra_params=extra or base.extra_params, width=width,
                   source=f"the diffusers folder {folder.name}")


def _hf_llm_folder(folder: Path, config: dict[str, Any]) -> ModelInfo:
    config = config.get("text_config", config)
    h = int(config.get("hidden_size") or config.get("n_embd") or 0)
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    if not h or not layers:
        params = _folder_params(folder)
        return guess_llm_shape(params or 1_000_000_000, f"the folder {folder.name}")
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or h // heads)
    kv_dim = int(config.get("num_key_value_heads") or heads) * head_dim
    inter = int(config.get("intermediate_size") or 4 * h)
    vocab = int(config.get("vocab_size") or 32000)
    params = _folder_params(folder) or llm_params(h, layers, inter, vocab, kv_dim,
                                                  bool(config.get("tie_word_embeddings", True)))
    info = llm_from_shape(params, f"the config.json of {folder.name}", h, layers, inter, vocab, kv_dim)
    return replace(info, context_length=int(config.get("max_position_embeddings") or config.get("n_positions") or 0))


def _from_name(name: str, task_type: str) -> ModelInfo:
    """Hub ids are never downloaded here: guess from the name, and say so."""
    lower = name.lower()
    if task_type != "text-generation":
        # The family whose longest name word is in the name ("flux" -> FLUX.1-dev, "schnell" -> -schnell,
        # "xl" -> SDXL); SD 1.x, the first row, when none is.
        words = [(len(w), i.name) for i in FAMILIES.values() for w in i.name_words if w in lower]
        return family_defaults(max(words)[1] if words else FALLBACK_FAMILY, f"the name '{name}'")
    match = re.search(r"(\d+(?:\.\d+)?)\s*([bm])\b", lower.replace("_", "-"))
    if match:
        params = int(float(match.group(1)) * (1e9 if match.group(2) == "b" else 1e6))
        return guess_llm_shape(params, f"the name '{name}'")
    return guess_llm_shape(1_000_000_000, f"a guess (the size of '{name}' is not in its name)")


def detect_model(base_model: str, task_type: str = "image-generation", gguf_file: str = "") -> ModelInfo:
    """Family and size of `base_model` from headers only; never loads weights, never downloads."""
    if not base_model:
        return SMOLLM2_135M if task_type == "text-generation" else replace(
            family_defaults(FALLBACK_FAMILY), source=f"no base_model (assumed {family_label(FALLBACK_FAMILY)})")
    path = Path(base_model)
    try:
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".gguf":
                return gguf_info(path)
            if task_type == "text-generation" and is_ggml_v3_file(path):
                return ggml_info(path)
            if suffix == ".safetensors":
                shapes = {k: v["shape"] for k, v in safetensors_header(path).items()}
                info = _from_tensor_table(shapes, f"the header of {path.name}", path)
                if info:
                    return info
            size = path.stat().st_size
            if task_type == "text-generation":
                return guess_llm_shape(size // 2, f"the file size of {path.name}")
            # Unreadable headers (a pickled checkpoint): a full SDXL file is over 5 GB even in fp16, SD 1.x/2.x under.
            largest = max((i for i in FAMILIES.values() if i.checkpoint_prefixes), key=lambda i: i.trained_params)
            family = largest.name if size > 5e9 else FALLBACK_FAMILY
            return replace(family_defaults(family), source=f"the file size of {path.name}")
        if path.is_dir():
            if gguf_file and (path / gguf_file).is_file():
                return gguf_info(path / gguf_file)
            if (path / "model_index.json").is_file() or (path / "unet").is_dir():
                return _diffusers_folder(path)
            config = _read_json(path / "config.json")
            if config:
                return _hf_llm_folder(path, config)
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return gguf_info(ggufs[0])
    except (OSError, ValueError, struct.error, KeyError) as exc:
        source = f"a guess ({path.name} could not be read: {exc})"
        return replace(_from_name(base_model, task_type), source=source)
    return _from_name(base_model, task_type)
