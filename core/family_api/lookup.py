"""Finding a family's behaviour: by registry name, or by a base model's files.

Each registry row names the module holding its `FAMILY` (`impl`); this module imports that module
by name (importlib), so the engine, the tools and the app reach every family through the
contract and never import a family package themselves.
"""
from __future__ import annotations

import importlib

from core.family_api.contract import ImageFamily
from core.family_api.registry import FAMILIES, IMAGE_FAMILIES, family_info


def family_impl(name: str) -> ImageFamily:
    """The behaviour of registry family `name` ("sd1", "sdxl", "flux-dev", "chroma", ...)."""
    return importlib.import_module(family_info(name).impl).FAMILY


def _detectors() -> list[ImageFamily]:
    """The families that recognise their own files, once each, in table order (SD is the fallback)."""
    modules = dict.fromkeys(info.impl for info in FAMILIES.values() if info.kind != "unet")
    return [importlib.import_module(m).FAMILY for m in modules]


def transformer_family_of(base_model: str) -> str | None:
    """The registry family of `base_model` when a non-UNet family recognises it; else None."""
    for family in _detectors():
        if family.detect is not None:
            name = family.detect(base_model)
            if name is not None:
                return name
    return None


def family_for_model(base_model: str) -> ImageFamily:
    """The behaviour that serves `base_model`, from its headers / configs only (nothing is loaded).

    Which SD family (1.x, 2.x, XL) is settled when the SD loader reads the file, so a pickled
    checkpoint is not read twice.
    """
    name = transformer_family_of(base_model)
    return family_impl(name if name is not None else IMAGE_FAMILIES[0])


def detect_image_family(base_model: str, *, allow_pickle: bool = False) -> str:
    """The registry family name of `base_model` (file, diffusers folder or hub id).

    The transformer families first (each family's `detect`), then the fallback family's `identify`
    (SD's, which reads a whole pickled checkpoint: prefer `family_for_model` to train).
    """
    name = transformer_family_of(base_model)
    if name is not None:
        return name
    fallback = family_impl(IMAGE_FAMILIES[0])
    assert fallback.identify is not None, "the first registry row's family must name any model it serves"
    return fallback.identify(base_model, allow_pickle)
