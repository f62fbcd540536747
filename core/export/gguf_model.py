"""A text LoRA baked into its base model, written as one GGUF file (f16 or q8_0) for llama.cpp/Ollama.

The LoRA is merged into the HF model with the project's merge (core/tools/merge.py), the
merged model is saved as an HF folder in a temporary folder, and that folder becomes GGUF
by one of two routes:

- `llama.cpp`: llama.cpp's own `convert_hf_to_gguf.py` (core/export/llama_cpp.py), when
  the converters are installed. It knows every architecture and tokenizer llama.cpp
  supports, but refuses tokenizers whose pre-tokenizer it has not catalogued.
- `gguf`: our writer with the `gguf` package, for Llama/Mistral and Qwen2/Qwen3 bases
  (Gemma's converter changes norms and the vocabulary: use the llama.cpp route there).
  For a GGUF base, the architecture parameters and the whole tokenizer
  (`tokenizer.ggml.*`) are copied from the base file, so llama.cpp tokenizes exactly as it
  does for the base; for an HF base they are built from config.json and tokenizer.json
  (BPE tokenizers only, with llama.cpp's default pre-tokenizer: the llama.cpp route is
  the better choice there). Tensors follow llama.cpp's converter: its names, the Llama
  q/k row permutation, 1-D tensors in F32, 2-D tensors in F16 or Q8_0 (Q8_0 quantized in
  numpy by `gguf.quants`, falling back to F16 for rows that are not a multiple of 32).

`auto` takes llama.cpp when it is installed and the base is an HF folder, else our writer
(also when llama.cpp's converter does not know the tokenizer's pre-tokenizer).
The chat template that the LoRA was trained with goes in as `tokenizer.chat_template`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import numpy as np

from core.atomic import atomic_path
from core.export.gguf_arch import GGUFExportError, from_hf_config, permute_rows

OUT_TYPES = ("f16", "q8_0")
ROUTES = ("auto", "llama.cpp", "gguf")
_OWN_ARCHES = ("llama", "qwen2", "qwen3")
# general.* keys worth keeping from a GGUF base (the rest describe the base file itself).
_GENERAL_KEEP = ("general.basename", "general.size_label", "general.license", "general.languages",
                 "general.organization")


@dataclass
class MergedExport:
    path: Path
    route: str             # which writer made the file: "llama.cpp" or "gguf"
    out_type: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    tokenizer: Any = None  # the merged model's tokenizer (for the Modelfile's chat template)

    def summary(self) -> str:
        size = self.path.stat().st_size / 1e6
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.out_type} GGUF by {self.route}, {size:.1f} MB in {self.seconds:.1f} s{extra}"


def _file_type(out_type: str) -> Any:
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]


def _encode(name: str, data: np.ndarray, out_type: str) -> tuple[np.ndarray, Any]:
    """The tensor as llama.cpp's converter stores it for `out_type`."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return data, kinds.F32
    if out_type == "q8_0":
        try:
            return gguf.quants.quantize(data, kinds.Q8_0), kinds.Q8_0
        except gguf.QuantError:  # row length not a multiple of the block size
            pass
    return data.astype(np.float16), kinds.F16


def _hf_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"No safetensors weights in {folder}.")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).float().numpy()


def _gguf_tensors(config: dict[str, Any], folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, array) for every weight of the HF folder."""
    import gguf

    arch = from_hf_config(config, str(folder))
    names = gguf.get_tensor_name_map({n: a for a, n in gguf.MODEL_ARCH_NAMES.items()}[arch.arch], arch.n_layers)
    tied = bool(config.get("tie_word_embeddings", False))
    for name, data in _hf_tensors(folder):
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reads the output head from token_embd
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise GGUFExportError(f"llama.cpp has no '{arch.arch}' tensor for {name}.")
        if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_rows(data, arch.n_head)
        elif arch.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_rows(data, arch.n_head_kv)
        yield target, data


def _copy_field(writer: Any, reader_field: Any) -> None:
    import gguf

    types = reader_field.types
    value = reader_field.contents()
    if types[0] == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(reader_field.name, value, types[0], sub_type=types[-1])
    else:
        writer.add_key_value(reader_field.name, value, types[0])


def _hparams_from_config(writer: Any, config: dict[str, Any]) -> None:
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))


def _tokenizer_from_hf(writer: Any, folder: Path) -> list[str]:
    """tokenizer.ggml.* from tokenizer.json (BPE); returns notes for the report."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json; our GGUF writer reads BPE tokenizers only.",
                              "Install llama.cpp's converters (see core/export/llama_cpp.py) and use route llama.cpp.")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "BPE":
        raise GGUFExportError(f"The tokenizer is {data.get('model', {}).get('type')}, not BPE.",
                              "Use route llama.cpp (llama.cpp's convert_hf_to_gguf.py reads SentencePiece too).")
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    size = max(int(config.get("vocab_size", 0)), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for content, index in vocab.items():
        tokens[index] = content
        token = added.get(content)
        types[index] = (gguf.TokenType.NORMAL if token is None else
                        gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=size)
    special.chat_template = None  # written by the caller, from the tokenizer the LoRA was trained with
    special.add_to_gguf(writer, quiet=True)
    return ["tokenizer built from tokenizer.json with llama.cpp's default pre-tokenizer"]


def write_model_gguf(hf_dir: str | Path, output: str | Path, *, out_type: str = "f16",
                     base_gguf: str | Path | None = None, name: str = "") -> list[str]:
    """Our writer: the HF folder `hf_dir` as a GGUF model file; returns notes for the report.

    With `base_gguf`, the architecture parameters and the tokenizer are copied from it.
    """
    import gguf

    folder = Path(hf_dir)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = from_hf_config(config, str(folder))
    if arch.arch not in _OWN_ARCHES:
        raise GGUFExportError(f"Our GGUF writer does not write '{arch.arch}' models.",
                              "Install llama.cpp's converters (see core/export/llama_cpp.py) and use route llama.cpp.")
    notes: list[str] = []
    base_fields: dict[str, Any] = {}
    if base_gguf is not None:
        reader = gguf.GGUFReader(str(base_gguf))
        if reader.fields["general.architecture"].contents() != arch.arch:
            raise GGUFExportError(f"{base_gguf} is not a '{arch.arch}' model.")
        base_fields = dict(reader.fields)
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(str(folder)).chat_template
    with atomic_path(output) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or Path(output).stem)
        if base_fields:
            for key, value in base_fields.items():
                if key.startswith((f"{arch.arch}.", "tokenizer.ggml.")) or key in _GENERAL_KEEP:
                    _copy_field(writer, value)
        else:
            _hparams_from_config(writer, config)
            notes += _tokenizer_from_hf(writer, folder)
        if template:
            writer.add_chat_template(template)
        writer.add_file_type(_file_type(out_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for target, data in _gguf_tensors(config, folder):
            encoded, kind = _encode(target, data, out_type)
            writer.add_tensor(target, encoded, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return notes


def convert_with_llama_cpp(hf_dir: str | Path, output: str | Path, *, out_type: str = "f16") -> None:
    """llama.cpp's convert_hf_to_gguf.py on the HF folder, written atomically."""
    from core.export.llama_cpp import run_converter

    with atomic_path(output) as tmp:
        run_converter("convert_hf_to_gguf.py", ["--outtype", out_type, "--outfile", str(tmp), str(hf_dir)])


def _final_tokenizer(folder: Path, chat_template: str) -> Any:
    """The merged folder's tokenizer, saved again with `chat_template` (the one the LoRA was trained with)."""
    from transformers import AutoTokenizer

    from core.data.chat_templates import apply_template

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if chat_template:
        apply_template(tokenizer, chat_template)
        tokenizer.save_pretrained(str(folder))
    return tokenizer


def export_merged_gguf(base: str, adapter: str | Path, output: str | Path, *, out_type: str = "f16",
                       route: str = "auto", weight: float = 1.0, chat_template: str = "",
                       allow_pickle: bool = False) -> MergedExport:
    """Bake `adapter` into `base` and write one GGUF model file at `output`."""
    from core.export.llama_cpp import ConverterFailed, find_llama_cpp
    from core.models.llm import resolve_source
    from core.tools.merge import bake_into_llm

    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"The GGUF type must be one of {', '.join(OUT_TYPES)}, not {out_type!r}.",
                              "K-quants such as Q4_K_M need llama.cpp's llama-quantize on the f16 file.")
    if route not in ROUTES:
        raise GGUFExportError(f"route must be one of {', '.join(ROUTES)}, not {route!r}.")
    started = time.perf_counter()
    source = resolve_source(base)
    base_gguf = Path(source.display) if source.is_gguf else None
    chosen_automatically = route == "auto"
    if chosen_automatically:
        route = "llama.cpp" if base_gguf is None and find_llama_cpp() is not None else "gguf"
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        hf_dir = bake_into_llm(base, adapter, work / "merged", weight=weight, allow_pickle=allow_pickle)
        tokenizer = _final_tokenizer(hf_dir, chat_template)
        notes: list[str] = []
        if route == "llama.cpp":
            try:
                convert_with_llama_cpp(hf_dir, target, out_type=out_type)
            except ConverterFailed as exc:
                # llama.cpp knows tokenizers by a hash of their pre-tokenizer; a tokenizer it has not
                # catalogued stops its converter. Under `auto`, our writer takes over and says so.
                if not chosen_automatically or "pre-tokenizer was not recognized" not in str(exc):
                    raise
                route = "gguf"
                notes = ["llama.cpp's converter did not recognise the tokenizer's pre-tokenizer"]
        if route == "gguf":
            notes += write_model_gguf(hf_dir, target, out_type=out_type, base_gguf=base_gguf)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return MergedExport(path=target, route=route, out_type=out_type, seconds=time.perf_counter() - started,
                        notes=notes, tokenizer=tokenizer)
