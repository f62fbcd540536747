"""A training adapter: a LoRA merged into the base for training, left out of the output and the previews.

Distilled models (Z-Image Turbo, FLUX.1 schnell) drift off their distillation when a LoRA is
trained on them directly. ai-toolkit trains them against a "training adapter", a LoRA that undoes
the distillation: it is merged into the frozen base for the run, so the run's own LoRA learns only
the subject, and is dropped at use, where the distilled model's speed-up is intact. Here it is
merged once into the network's Linear weights (fp32, before the weights take the run's dtype, so
training runs at the base's speed), never becomes part of the PEFT state (the files hold the run's
own LoRA only), and previews subtract its output again with forward hooks on the merged layers
(exact to float rounding, and the merged weights never change back and forth).

The file is read by the family's own LoRA reader (`lora_files.to_peft`: any of its file forms,
fused modules split exactly), so every transformer family with its own file layout takes one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class MergedAdapter:
    """What was merged: per Linear, its LoRA factors and scale (to take it out of previews)."""

    name: str
    layers: list[tuple[nn.Linear, torch.Tensor, torch.Tensor, float]] = field(default_factory=list)

    @contextmanager
    def left_out(self) -> Iterator[None]:
        """Inside the block the merged layers compute W x without the adapter: out - scale * B A x."""
        def hook_for(down: torch.Tensor, up: torch.Tensor, scale: float) -> Callable:
            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
                x = args[0]
                a, b = down.to(x.device, x.dtype), up.to(x.device, x.dtype)
                return out - scale * nn.functional.linear(nn.functional.linear(x, a), b).to(out.dtype)
            return hook

        handles = [layer.register_forward_hook(hook_for(down, up, scale)) for layer, down, up, scale in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def adapter_modules(peft: dict[str, torch.Tensor], alphas: dict[str, float]
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (down, up, scale alpha / rank)} of a plain LoRA PEFT state."""
    out = {}
    for key, down in peft.items():
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            up = peft.get(f"{path}.lora_B.weight")
            if up is None:
                raise ValueError(f"the training adapter has no lora_B for '{path}'.")
            rank = int(down.shape[0])
            alpha = float(alphas.get(path, alphas.get(f"transformer.{path}", rank)))
            out[path.removeprefix("transformer.")] = (down, up, alpha / rank)
    return out


@torch.no_grad()
def merge_training_adapter(network: nn.Module, path: str | Path,
                           read: Callable[[Path], tuple[dict[str, torch.Tensor], dict[str, float]]],
                           label: str) -> MergedAdapter:
    """Add the adapter file's update (scale * B @ A, in fp32) into `network`'s Linear weights.

    `read`: the family's reader (file -> diffusers-named PEFT state, alpha per module). A file that
    is not a LoRA of this network, or LoKr / LoHa, is refused in one sentence.
    """
    path = Path(path)
    try:
        peft, alphas = read(path)
    except Exception as exc:
        raise ValueError(f"training_adapter '{path.name}' is not a readable {label} LoRA file: {exc}") from exc
    if any(".lokr_" in k or ".hada_" in k for k in peft):
        raise ValueError(f"training_adapter '{path.name}' is a LoKr / LoHa file; a training adapter must be a LoRA.")
    modules = adapter_modules(peft, alphas)
    named = dict(network.named_modules())
    foreign = sorted(p for p in modules if not isinstance(named.get(p), nn.Linear))
    if not modules or foreign:
        raise ValueError(f"training_adapter '{path.name}' does not fit this {label} model "
                         f"({', '.join(foreign[:3]) or 'no LoRA modules'}): use the training adapter made for it.")
    merged = MergedAdapter(path.name)
    for module_path, (down, up, scale) in modules.items():
        layer = named[module_path]
        weight = layer.weight
        if tuple(weight.shape) != (up.shape[0], down.shape[1]):
            raise ValueError(f"training_adapter '{path.name}' has the wrong shape for {module_path} "
                             f"({tuple(up.shape[:1]) + tuple(down.shape[1:])} vs {tuple(weight.shape)}).")
        delta = (up.float() @ down.float()) * scale
        weight.data = (weight.data.float() + delta.to(weight.device)).to(weight.dtype)
        merged.layers.append((layer, down.float().cpu(), up.float().cpu(), scale))
    return merged
