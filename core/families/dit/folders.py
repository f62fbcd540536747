"""Diffusers folders and hub ids as the transformer families load them: their configs, their parts, and one
message per way loading fails (what was missing, what to give instead)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.family_api.contract import ModelLoadError
from core.hub import offline


def quantized(quantization_config: Any) -> dict[str, Any]:
    """`from_pretrained`'s keyword for a quantization config (none: no keyword, as diffusers wants)."""
    return {"quantization_config": quantization_config} if quantization_config is not None else {}


def part_error(label: str, what: str, source: str, exc: Exception, hint: str) -> ModelLoadError:
    """A part (a config, the tokenizer) that a single file needs could not be read from `source`."""
    where = f"'{source}'{' (offline)' if offline() else ''}"
    return ModelLoadError(f"The {label} {what} could not be loaded from {where}: {exc}", hint)


def config_error(label: str, what: str, source: str, exc: Exception, hint: str) -> ModelLoadError:
    """A config (or tokenizer) that a single file needs could not be read from `source`."""
    return part_error(label, f"{what} config", source, exc, hint)


def config_source_hint(label: str, hub_id: str = "") -> str:
    """What a single file's `base_model_config` must be: a diffusers folder of the family, or its hub id."""
    return (f"A single-file {label} needs base_model_config: a diffusers {label} folder (model_index.json and the "
            "transformer/, text_encoder/, tokenizer/, vae/, scheduler/ configs; the weights are not needed), or the "
            f"hub id{f' ({hub_id})' if hub_id else ''} downloaded once with internet access.")


def scheduler_config(source: str, fallback: dict[str, Any]) -> dict[str, Any]:
    """The FlowMatchEulerDiscreteScheduler settings of a folder or hub id; `fallback` (the model's own) without."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from core.families.dit.weights import local_only

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler",
                                                                local_files_only=local_only(source)))
    except (OSError, ValueError):
        return dict(fallback)


def tokenizer_of(source: str, failed: Callable[[str, str, Exception], ModelLoadError]) -> Any:
    """The tokenizer of a folder or hub id; `failed(what, source, exc)` is the family's message."""
    from transformers import AutoTokenizer

    from core.families.dit.weights import local_only

    try:
        return AutoTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only(source))
    except (OSError, ValueError) as exc:
        raise failed("tokenizer", source, exc) from exc


def read_pipeline_configs(source: str, transformer_class: Any, label: str, layout: str
                          ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(model_index.json, the transformer's config, `from_pretrained` keywords) of a diffusers folder or hub
    id; a folder that is not one is refused naming `layout` (the subfolders a `label` folder has)."""
    from diffusers import DiffusionPipeline

    kw = {"local_files_only": Path(source).is_dir() or offline()}
    try:
        index = dict(DiffusionPipeline.load_config(source, **kw))
        t_config = dict(transformer_class.load_config(source, subfolder="transformer", **kw))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{source}' is not a loadable {label} diffusers folder or hub id: {exc}", layout) from exc
    return index, t_config, kw


def not_this_family(source: str, index: dict[str, Any], label: str) -> ModelLoadError:
    return ModelLoadError(f"'{source}' is a {index.get('_class_name', 'diffusers')} folder, not {label}.",
                          "Choose the family that matches the model.")


@contextmanager
def loading_parts(source: str) -> Iterator[None]:
    """Loading a folder's parts: one that fails means the download is incomplete."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"A part of '{source}' could not be loaded: {exc}",
                             "The folder is incomplete: download the model again.") from exc


@contextmanager
def fitting(name: str, config_failed: Callable[[Exception], ModelLoadError], misfit: str, hint: str
            ) -> Iterator[None]:
    """Building a part from a single file `name` with a config from elsewhere: a config that cannot be read
    (`config_failed`), or tensors that do not fit it (`misfit`: what the file is not; `hint`: what to use)."""
    try:
        yield
    except ModelLoadError:
        raise
    except OSError as exc:
        raise config_failed(exc) from exc
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"'{name}' {misfit}: {exc}", hint) from exc


def source_loader(load_folder: Callable[..., Any], single_file: str) -> Callable[..., Any]:
    """A family's `load_model`: any source, a single .safetensors (ComfyUI layout: `single_file`, the module with
    its `load_single_file` and `load_vae_file`), or a diffusers folder or hub id (`load_folder`) with an AE file
    (`vae`) in place of its own."""

    def load_model(base_model: str, *, config_source: str = "", text_encoder: str = "", vae: str = "",
                   dtype: Any = None, quantization_config: Any = None, text_dtype: Any = None) -> Any:
        import importlib

        import torch

        dtype = torch.float32 if dtype is None else dtype
        # `text_dtype`: the text encoder's own (a family whose encoder is too large to load in fp32 first)
        extra = {} if text_dtype is None else {"text_dtype": text_dtype}
        files = importlib.import_module(single_file)
        if Path(base_model).is_file():
            return files.load_single_file(base_model, config_source=config_source, text_encoder=text_encoder, vae=vae,
                                          dtype=dtype, quantization_config=quantization_config, **extra)
        model = load_folder(base_model, dtype=dtype, quantization_config=quantization_config, **extra)
        if vae:
            model.vae = files.load_vae_file(vae, config_source=base_model, dtype=dtype)
            model.notes.append(f"VAE: {Path(vae).name}")
        return model

    return load_model


def load_parts(source: str, label: str, *, dtype: Any, quantization_config: Any, transformer: Any, text_encoder: Any,
               vae: Any, check: Callable[[Any], None] | None = None) -> tuple[Any, Any, Any]:
    """(transformer, text encoder, AE) of a diffusers folder or hub id, on the CPU: the transformer quantized where
    asked (`check` may refuse it), the text encoder in eval mode; a part that fails to load means it is not a
    `label` folder."""
    from core.families.dit.weights import local_only

    kw = {"local_files_only": local_only(source)}
    try:
        model = transformer.from_pretrained(source, subfolder="transformer", torch_dtype=dtype, **kw,
                                            **quantized(quantization_config))
        if check is not None:
            check(model)
        encoder = text_encoder.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw).eval()
        autoencoder = vae.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{source}' is not a loadable {label} diffusers folder or hub id: {exc}",
                             f"A diffusers {label} folder has model_index.json and transformer/, text_encoder/, "
                             "tokenizer/, vae/ and scheduler/.") from exc
    return model, encoder, autoencoder
