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


def config_error(label: str, what: str, source: str, exc: Exception, hint: str) -> ModelLoadError:
    """A config (or tokenizer) that a single file needs could not be read from `source`."""
    where = f"'{source}'{' (offline)' if offline() else ''}"
    return ModelLoadError(f"The {label} {what} config could not be loaded from {where}: {exc}", hint)


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
