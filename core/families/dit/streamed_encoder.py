"""A text encoder too large for the card, run one layer at a time: its decoder layers stay in CPU memory and each
is copied to the device of its input just before it runs; the small rest (token embedding, final norm, rotary
tables) moves to that device on the first call. Layers stay on the card while it has `RESERVE` free after them;
the others' copies are dropped right after they run. FLUX.2 dev's Mistral-Small (23B weights, 46 GB in bf16)
encodes every caption once this way on a 24 GB card, at the cost of one pass of its streamed layers over the bus
per batch of captions.

Such an encoder says so (`streams_layers`): the trainer and the Test tab leave its placement to it
(core.families.dit.default.text_encoders skips it), so no `.to(device)` ever moves it whole.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.devices import GIB

RESERVE = 6 * GIB  # left free on the card by the layers kept there (activations, the transformer after)


def _device_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def stream_layers(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """`model` with `layers` run from CPU memory one at a time on the device of their input (a no-op on the CPU);
    frozen (it only encodes)."""
    model.requires_grad_(False)
    # A layer's own (CPU) tensors while a device copy stands in for them; read at each call, so a cast of the
    # module between calls (the Test tab's dtype) is what streams.
    parked: dict[nn.Module, list[tuple[nn.Parameter, torch.Tensor]]] = {}
    resident: set[nn.Module] = set()

    def to_input_device(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        device = _device_of(args, kwargs)
        if device is None:
            return
        for child in module.children():
            if child is not layers:
                child.to(device)

    def load_layer(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        device = _device_of(args, kwargs)
        if device is None or device.type == "cpu" or layer in resident:
            return
        parked[layer] = [(p, p.data) for p in layer.parameters()]
        for param, data in parked[layer]:
            param.data = data.to(device, non_blocking=True)
        if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] > RESERVE:
            resident.add(layer)
            del parked[layer]

    def drop_layer(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        for param, data in parked.pop(layer, ()):
            param.data = data

    model.register_forward_pre_hook(to_input_device, with_kwargs=True)
    for layer in layers:
        layer.register_forward_pre_hook(load_layer, with_kwargs=True)
        layer.register_forward_hook(drop_layer, with_kwargs=True)
    model.streams_layers = True
    return model


def streams_layers(module: Any) -> bool:
    return bool(getattr(module, "streams_layers", False))
