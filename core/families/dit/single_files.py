"""A transformer family's single files in ComfyUI's layout: the transformer file in native or diffusers names
(models/diffusion_models), its text encoder and AE found beside it (models/text_encoders, models/vae) or given,
each part built on the meta device from a config of `base_model_config` or the hub, and one message per way
that fails (what the file is not, what to use instead).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from core.families.dit.weights import config_subfolder, file_has_fp8, fp8_note, local_only, read_upcast
from core.family_api.contract import ModelLoadError

# What single files put before a transformer's own names.
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_model_prefix(key: str) -> str:
    """A transformer file's tensor name without its `model.diffusion_model.` / `diffusion_model.` prefix."""
    for prefix in MODEL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def has_marker(keys: Iterable[str], markers: Sequence[str]) -> bool:
    """Whether the tensor names (any prefix) hold one of the `markers`, names only one model has."""
    names = {strip_model_prefix(k) for k in keys}
    return any(m in names for m in markers)


def diffusers_named(state: dict[str, torch.Tensor], is_native: Callable[[dict[str, torch.Tensor]], bool],
                    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A transformer file's state in diffusers' names, any prefix: native names (`is_native`) through diffusers'
    `convert`; diffusers-named files pass as they are."""
    state = {strip_model_prefix(k): v for k, v in state.items()}
    return convert(state) if is_native(state) else state


def refuse_file(path: Path, *, fits: bool, label: str, use: str, quantization_config: Any) -> None:
    """A file that is not the family's transformer (`use`: which file to give), or NF4 asked of a single file."""
    if not fits:
        raise ModelLoadError(f"'{path.name}' is not a {label} transformer.", use)
    if quantization_config is not None:
        raise ModelLoadError(f"base_quantization: nf4 needs a diffusers {label} folder or hub id.",
                             "Give base_model as a diffusers folder, or use fp8_base with the single file.")


def with_fp8_note(model: Any, path: Path, dtype: torch.dtype) -> Any:
    """The loaded model, noting an fp8 file's upcast."""
    if file_has_fp8(path):
        model.notes.append(fp8_note(path, dtype))
    return model


def find_comfy_part(models_root: Path | None, part: str, explicit: str = "", *, folders: Sequence[str],
                    words: Sequence[str], needs: str, first: tuple[str, ...] = (),
                    rank: Callable[[Path], int] | None = None) -> Path:
    """The `part` file ("text_encoder", "vae"): `explicit` (it must exist), or the first .safetensors under
    `models_root`'s `folders` whose name holds one of `words` (names starting with `first` before the others,
    or in the order of `rank`); none found: `needs` (who needs which file where) in the message."""
    if explicit:
        if not Path(explicit).is_file():
            raise ModelLoadError(f"The {part} file '{explicit}' does not exist.", f"Check the {part} path.")
        return Path(explicit)
    found: list[Path] = []
    for sub in folders if models_root else ():
        if (models_root / sub).is_dir():
            found += sorted(p for p in (models_root / sub).rglob("*.safetensors")
                            if any(w in p.name.lower() for w in words))
    found.sort(key=rank or (lambda p: 0 if p.name.lower().startswith(first) else 1))
    if not found:
        raise ModelLoadError(f"{needs}, and none was found.",
                             f"Put the file there, or give its path in the "
                             f"{'text_encoder_files' if part == 'text_encoder' else part} setting.")
    return found[0]


def part_config(model_class: Any, config_source: str, part: str,
                load_error: Callable[[str, str, Exception], ModelLoadError]) -> dict[str, Any]:
    """The config of the pipeline's `part` ("transformer", "vae": its subfolder, or the folder itself) from
    `config_source`; `load_error(what, source, exc)` where it cannot be read."""
    try:
        return dict(model_class.load_config(config_source, subfolder=config_subfolder(config_source, part),
                                            local_files_only=local_only(config_source)))
    except (OSError, ValueError) as exc:
        raise load_error(f"{part} config", config_source, exc) from exc


def transformer_from_state(model_class: Any, state: dict[str, torch.Tensor], name: str, *, config_source: str,
                           dtype: torch.dtype, label: str, load_error: Callable[[str, str, Exception], ModelLoadError],
                           hint: str,
                           shapes: Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, Any]] = lambda s, c: {}
                           ) -> Any:
    """`model_class` (a diffusers transformer) holding the file `name`'s diffusers-named `state`: its config from
    `config_source` (`load_error(what, source, exc)` where it cannot be read) with the file's own
    `shapes(state, config)` over it, built on the meta device; a state that does not fit the `label` config is
    refused (`hint`: what to use)."""
    config = part_config(model_class, config_source, "transformer", load_error)
    config.update(shapes(state, config))
    try:
        with torch.device("meta"):
            model = model_class.from_config(config)
        model.load_state_dict(state, strict=True, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"'{name}' does not fit the {label} config from '{config_source}': {exc}", hint) from exc
    return model.to(dtype).eval()


def text_encoder_config(config_source: str, load_error: Callable[[str, str, Exception], ModelLoadError]) -> Any:
    """The pipeline's text_encoder/ config (transformers' AutoConfig) from `config_source`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(config_source, subfolder="text_encoder",
                                          local_files_only=local_only(config_source))
    except (OSError, ValueError) as exc:
        raise load_error("text encoder config", config_source, exc) from exc


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, misfit: str, hint: str
                 ) -> torch.nn.Module:
    """`model` (built on the meta device) holding the file `name`'s tensors as its own (no second copy); tensors
    that do not fit it are refused: `misfit` (what it does not fit), `hint` (which file does)."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"'{name}' {misfit}: {exc}", hint) from exc
    return model


def text_model_from_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32, label: str,
                         load_error: Callable[[str, str, Exception], ModelLoadError], kind: str, use: str,
                         hint: str, language_model: bool = False) -> Any:
    """A text encoder's base model (`AutoModel` of the config's text_encoder/) from a file in causal-LM names
    (a prefix such as `model.` before them; the LM head dropped). Not one (`kind`: the model it should be,
    `use`: which file) or one that does not fit the `label` config (`hint`: which one does) is refused.
    `language_model`: the config is a multimodal one (Mistral3) and only its text model is built."""
    from transformers import AutoModel

    config = text_encoder_config(config_source, load_error)
    if language_model:
        config = config.get_text_config()
    state = read_upcast(path, dtype)
    marker = "embed_tokens.weight"
    first = next((k for k in state if k.endswith(marker)), None)
    if first is None:
        raise ModelLoadError(f"'{Path(path).name}' is not a {kind} text encoder (no {marker}).", use)
    prefix = first[: -len(marker)]
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    assign_state(model, state, Path(path).name, f"does not fit {label}'s text encoder config", hint)
    # Non-persistent buffers (the rotary frequencies) are not in the file: build them for real.
    if hasattr(model, "rotary_emb"):
        model.rotary_emb = type(model.rotary_emb)(config=config)
    return model.to(dtype).eval()
