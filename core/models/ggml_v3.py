"""Reading llama.cpp's pre-GGUF GGML files (the `ggjt` v3 format of mid-2023).

A GGML v3 file is raw little-endian binary, nothing in it is pickled:

    uint32 magic 0x67676a74 ("ggjt", so b"tjgg" on disk), uint32 version 3
    7 x uint32 hparams: n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype
    n_vocab x (uint32 length, token bytes, float32 score)
    tensor records up to the end of the file:
        uint32 n_dims, uint32 name length, uint32 ggml type, n_dims x uint32 ne (innermost first),
        the name, zero padding to the next multiple of 32 bytes, then the data

The ggml type numbers and block layouts are the ones GGUF kept (llama.cpp's
convert_llama_ggml_to_gguf.py copies the tensor bytes over unchanged), so the blocks are
dequantized with the `gguf` package. The older `ggml` (unversioned), `ggmf` v1 and `ggjt` v1/v2
files used other quantization layouts (v2 -> v3 changed the q4/q8 block scales to fp16) and are
recognised only to say so.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GGJT_V3 = ("ggjt", 3)
# The magic is a little-endian uint32, so the bytes on disk read backwards.
_MAGICS = {b"tjgg": "ggjt", b"fmgg": "ggmf", b"lmgg": "ggml"}
_SWAPPED = {b"ggjt", b"ggmf", b"ggml"}  # the same magics in big-endian order
_ALIGNMENT = 32
CONVERT_ADVICE = ("Convert it with llama.cpp: `python convert_llama_ggml_to_gguf.py --input OLD.bin --output NEW.gguf` "
                  "(convert-llama-ggml-to-gguf.py in 2023 checkouts), or download the model's .gguf version, "
                  "then set base_model to the .gguf file.")

# ggml type number -> name. 4 and 5 (q4_2, q4_3) were removed before v3; 9 (q8_1) and 15 (q8_K)
# only ever held activations, never weights in a file.
TYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0",
              10: "q2_K", 11: "q3_K", 12: "q4_K", 13: "q5_K", 14: "q6_K"}
# llama_ftype (the file's declared "mostly" type) -> name, for the log and the messages.
FTYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 4: "q4_1 (some f16)", 7: "q8_0", 8: "q5_0", 9: "q5_1",
               10: "q2_K", 11: "q3_K_S", 12: "q3_K_M", 13: "q3_K_L", 14: "q4_K_S", 15: "q4_K_M",
               16: "q5_K_S", 17: "q5_K_M", 18: "q6_K"}


class GGMLFormatError(ValueError):
    """The file is GGML but cannot be read; `advice` says what to do instead."""

    def __init__(self, message: str, advice: str = CONVERT_ADVICE):
        super().__init__(message)
        self.advice = advice


@dataclass(frozen=True)
class GGMLHParams:
    n_vocab: int
    n_embd: int
    n_mult: int
    n_head: int
    n_layer: int
    n_rot: int
    ftype: int

    @property
    def ftype_name(self) -> str:
        return FTYPE_NAMES.get(self.ftype, f"ftype {self.ftype}")


@dataclass(frozen=True)
class GGMLTensor:
    """Where one tensor's data lies; `shape` is in numpy/torch order (outermost first)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.ggml_type]


@dataclass
class GGMLFile:
    path: Path
    hparams: GGMLHParams
    tokens: list[bytes]
    scores: list[float]
    tensors: dict[str, GGMLTensor] = field(default_factory=dict)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
        return counts


def ggml_kind(path: str | Path) -> tuple[str, int] | None:
    """`(magic, version)` of a GGML file (version 0 for the unversioned `ggml`), else None.

    Byte-swapped magics come back as `("<magic> big-endian", 0)`.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return None
    if head[:4] in _SWAPPED:
        return (f"{head[:4].decode()} big-endian", 0)
    magic = _MAGICS.get(head[:4])
    if magic is None:
        return None
    if magic == "ggml" or len(head) < 8:
        return (magic, 0)
    return (magic, struct.unpack("<I", head[4:8])[0])


def is_ggml_v3(path: str | Path) -> bool:
    return ggml_kind(path) == GGJT_V3


def unsupported_message(path: str | Path, kind: tuple[str, int]) -> str:
    magic, version = kind
    spelled = magic if magic == "ggml" or "big-endian" in magic else f"{magic} v{version}"
    return (f"'{Path(path).name}' is an old GGML file ({spelled}). Only GGML v3 (ggjt v3, mid-2023) llama files "
            "load directly; earlier GGML versions used other quantization layouts, and GGML was replaced by "
            "GGUF in August 2023.")


class _Cursor:
    """Sequential little-endian reads with a clear error on a cut-off file."""

    def __init__(self, data: np.memmap | bytes, start: int = 0):
        self.data, self.pos = data, start

    def take(self, count: int) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise GGMLFormatError(f"the file ends early (wanted {count} bytes at offset {self.pos}); it may be "
                                  "truncated by an interrupted download.", "Download the file again.")
        chunk = bytes(self.data[self.pos:end])
        self.pos = end
        return chunk

    def u32s(self, count: int) -> tuple[int, ...]:
        return struct.unpack(f"<{count}I", self.take(4 * count))


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor: whole blocks along the innermost dimension."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if shape[-1] % block:
        raise GGMLFormatError(f"a {TYPE_NAMES[ggml_type]} row of {shape[-1]} values is not whole blocks of {block}.")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def read_ggml(path: str | Path) -> GGMLFile:
    """Parse a GGML v3 file's header, vocabulary and tensor table (the weights stay on disk)."""
    file = Path(path)
    kind = ggml_kind(file)
    if kind is None:
        raise GGMLFormatError(f"'{file.name}' is not a GGML file (no ggml/ggmf/ggjt magic).",
                              "Use a .gguf file, an HF folder, or a GGML v3 .bin.")
    if kind != GGJT_V3:
        raise GGMLFormatError(unsupported_message(file, kind))
    data = np.memmap(file, dtype=np.uint8, mode="r")
    cursor = _Cursor(data, 8)
    hparams = GGMLHParams(*cursor.u32s(7))
    # Other ggml example models stored a quantization version as ftype // 1000; llama's ggjt did not,
    # but tolerate it rather than misname the type.
    hparams = GGMLHParams(**{**hparams.__dict__, "ftype": hparams.ftype % 1000})
    if not (0 < hparams.n_vocab < 1_000_000 and 0 < hparams.n_head <= hparams.n_embd):
        raise GGMLFormatError(f"'{file.name}' has implausible hparams {hparams}; it is not a llama GGML v3 file.")
    tokens: list[bytes] = []
    scores: list[float] = []
    for _ in range(hparams.n_vocab):
        (length,) = cursor.u32s(1)
        tokens.append(cursor.take(length))
        scores.append(struct.unpack("<f", cursor.take(4))[0])
    result = GGMLFile(file, hparams, tokens, scores)
    while cursor.pos < len(data):
        n_dims, name_length, ggml_type = cursor.u32s(3)
        if not 1 <= n_dims <= 4 or ggml_type not in TYPE_NAMES:
            what = f"type {ggml_type}" if ggml_type not in TYPE_NAMES else f"{n_dims} dimensions"
            raise GGMLFormatError(f"'{file.name}' has a tensor record with {what} at offset {cursor.pos - 12}; "
                                  f"the types GGML v3 llama files hold are {', '.join(TYPE_NAMES.values())}.")
        ne = cursor.u32s(n_dims)
        name = cursor.take(name_length).decode("utf-8", errors="replace")
        cursor.pos = (cursor.pos + _ALIGNMENT - 1) & -_ALIGNMENT
        shape = tuple(reversed(ne))  # ggml lists the innermost dimension first
        nbytes = tensor_nbytes(ggml_type, shape)
        result.tensors[name] = GGMLTensor(name, ggml_type, shape, cursor.pos, nbytes)
        cursor.pos += nbytes
        if cursor.pos > len(data):
            raise GGMLFormatError(f"'{file.name}' ends inside the data of tensor '{name}'; it is truncated.",
                                  "Download the file again.")
    return result


def dequantize(ggml: GGMLFile, tensor: GGMLTensor) -> np.ndarray:
    """The tensor as float32 in its numpy shape (read from disk on each call)."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    raw = np.memmap(ggml.path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(tensor.nbytes,))
    if tensor.ggml_type == 0:
        return np.frombuffer(raw, dtype="<f4").reshape(tensor.shape).copy()
    if tensor.ggml_type == 1:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(tensor.shape)
    rows = raw.reshape(-1, tensor.nbytes // int(np.prod(tensor.shape[:-1], dtype=np.int64)))
    values = quants.dequantize(np.asarray(rows), GGMLQuantizationType(tensor.ggml_type))
    return values.astype(np.float32, copy=False).reshape(tensor.shape)
