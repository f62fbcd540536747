"""Merge LoRAs: bake them into a base model, or combine several into one LoRA.

Baking (SD): each module's delta `weight * alpha / rank * up @ down` (conv aware) is added to
the base layer, W += delta; a DoRA module becomes `W + weight * (m * (W + dW) / ||W + dW|| - W)`
(its full effect at weight 1, blended linearly, as ComfyUI does). The result is saved as a
single-file checkpoint in the original (LDM/SGM) layout WebUI and ComfyUI load.
Baking (LLM): PEFT's own `merge_and_unload` on a copy scaled by the weight, saved as an HF folder.

Combining: deltas add up, so concatenating ranks is exact: down = [d1; d2], up = [w1 s1 u1, w2 s2 u2]
with alpha = rank (scale 1). `rank=` then brings it back down by SVD (core.tools.resize).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

import torch
from torch import nn

from core.family_api.contract import BaseWeights
from core.family_api.registry import FAMILIES
from core.atomic import atomic_dir, save_file_atomic
from core.tools.convert import LoraFile, check_replaceable_folder, read_lora
from core.tools.modules import LoraModule, LoraToolError, modules_to_kohya
from core.tools.resize import ResizeReport, resize_modules


@dataclass
class MergeReport:
    merged: list[str] = field(default_factory=list)            # module names applied
    resize: ResizeReport | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{len(self.merged)} modules merged"
        if self.resize is not None:
            text += f"; {self.resize.summary()}"
        return text + "".join(f"\n  note: {n}" for n in self.notes)


def parse_lora_spec(text: str) -> tuple[str, float]:
    """`path[:weight]` -> (path, weight); a Windows drive letter or a path is never taken for a weight."""
    head, sep, tail = text.rpartition(":")
    if sep and head and tail and not tail.startswith(("\\", "/")):
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


# --- several LoRAs -> one -----------------------------------------------------------------------

def _split_scale(value: float) -> tuple[float, float]:
    """(factor for up, factor for down) whose product is `value`, balanced so neither is tiny."""
    root = math.sqrt(abs(value))
    return math.copysign(root, value), root


def combine_modules(items: Sequence[tuple[dict[str, LoraModule], float]], *, rank: int | None = None,
                    energy: float | None = None) -> tuple[dict[str, LoraModule], MergeReport]:
    """Sum several LoRAs at their weights into one, exactly (ranks concatenated); optionally SVD-resize."""
    if not items:
        raise LoraToolError("Give at least one LoRA to merge.")
    report = MergeReport()
    names: list[str] = []
    for modules, _ in items:
        names += [n for n in modules if n not in names]
    combined: dict[str, LoraModule] = {}
    for name in names:
        downs, ups = [], []
        shape = None
        for modules, weight in items:
            module = modules.get(name)
            if module is None or weight == 0:
                continue
            if module.dora_scale is not None:
                raise LoraToolError(f"'{name}' is a DoRA module: DoRA's normalisation is not additive, so DoRA "
                                    "LoRAs cannot be combined into one LoRA. Bake them into the base model instead.")
            if shape is not None and module.weight_shape != shape:
                raise LoraToolError(f"'{name}' changes a {shape} weight in one LoRA and a {module.weight_shape} "
                                    "weight in another: the LoRAs are for different base models.")
            if module.is_conv and downs and tuple(module.down.shape[1:]) != tuple(downs[0].shape[1:]):
                # Different kernel sizes (a 1x1 and a 3x3 down) cannot share one down; fall back to SVD of the sum.
                raise LoraToolError(f"'{name}': conv LoRAs with different kernel sizes; resize them to one kind first.")
            shape = module.weight_shape
            up_f, down_f = _split_scale(weight * module.scale)
            ups.append(module.up.float() * up_f)
            downs.append(module.down.float() * down_f)
        if not downs:
            continue
        down = torch.cat(downs, 0)
        up = torch.cat(ups, 1)
        combined[name] = LoraModule(down, up, float(down.shape[0]))
        report.merged.append(name)
    if rank is not None or energy is not None:
        combined, report.resize = resize_modules(combined, rank=rank, energy=energy, max_rank=rank)
    return combined, report


def combine_files(paths: Sequence[str | Path], weights: Sequence[float], *, rank: int | None = None,
                  energy: float | None = None, family: str | None = None,
                  allow_pickle: bool = False) -> tuple[LoraFile, MergeReport]:
    """Read several LoRA files of one family and combine them (see `combine_modules`)."""
    if len(paths) != len(weights):
        raise LoraToolError(f"{len(paths)} LoRAs but {len(weights)} weights: give one weight per LoRA.")
    loras = [read_lora(p, family=family, allow_pickle=allow_pickle) for p in paths]
    families = {lora.family for lora in loras}
    if len(families) > 1:
        listing = ", ".join(f"{Path(lora.path).name}: {lora.family}" for lora in loras)
        raise LoraToolError(f"The LoRAs are for different model families ({listing}); they cannot be merged.")
    modules, report = combine_modules([(lora.modules, w) for lora, w in zip(loras, weights)],
                                      rank=rank, energy=energy)
    first = loras[0]
    sources = [{"file": Path(lora.path).name, "weight": w} for lora, w in zip(loras, weights)]
    merged = LoraFile(first.format, first.family, modules, {"ss_merged_from": json.dumps(sources)},
                      dict(first.peft_config), first.path)
    return merged, report


# --- baking into a Stable Diffusion base model --------------------------------------------------

def effective_delta(base: torch.Tensor, module: LoraModule, name: str) -> torch.Tensor:
    """What `module` adds to the layer weight `base` (fp32); for DoRA this depends on `base`."""
    if tuple(base.shape) != module.weight_shape:
        raise LoraToolError(f"LoRA module '{name}' changes a weight of shape {module.weight_shape}, but the base "
                            f"model's layer is {tuple(base.shape)}: the LoRA is for another base model.")
    base = base.float()
    delta = module.delta()
    if module.dora_scale is None:
        return delta
    full = base + delta
    # PEFT / LyCORIS (wd_on_output): one norm per output channel, over everything else.
    norm = full.reshape(full.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (full.dim() - 1))
    magnitude = module.dora_scale.float().reshape(norm.shape)
    return magnitude * full / norm - base


def _bake_module(layer: nn.Module, module: LoraModule, weight: float, name: str) -> None:
    target = layer.weight
    with torch.no_grad():
        base = target.float()  # one fp32 copy, shared with effective_delta (a no-op .float() there)
        target.copy_((base + weight * effective_delta(base, module, name)).to(target.dtype))


def bake_into_modules(components: dict[str, nn.Module], lora: LoraFile, weight: float,
                      report: MergeReport | None = None) -> MergeReport:
    """Add `lora` at `weight` into the diffusers modules {"unet": ..., "text_encoder": ..., ...} in place."""
    report = report or MergeReport()
    for name, module, layer in paired_layers(components, lora):
        _bake_module(layer, module, weight, name)
        report.merged.append(name)
    return report


def paired_layers(components: dict[str, nn.Module], lora: LoraFile) -> list[tuple[str, LoraModule, nn.Module]]:
    """(kohya name, module, the base model's layer it changes) for every module of an image LoRA."""
    from core.export.kohya import TEXT_ENCODER_NAMES, kohya_to_peft

    pairs = []
    unet, tes, _ = kohya_to_peft(modules_to_kohya(lora.modules), lora.family)
    # kohya_to_peft tells us the diffusers path of every kohya name; pair them up by tensor identity.
    by_down = {id(m.down): (n, m) for n, m in lora.modules.items()}
    for component, state in [("unet", unet)] + list(zip(TEXT_ENCODER_NAMES, tes)):
        if not state:
            continue
        model = components.get(component)
        if model is None:
            raise LoraToolError(f"The LoRA has {component} weights but the base model has no {component}.")
        wrapped = any(n == "text_model" for n, _ in model.named_children())
        for key, tensor in state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            path = key[: -len(".lora_A.weight")]
            if component != "unet":
                path = path if wrapped else path.removeprefix("text_model.")
            name, module = by_down[id(tensor)]
            try:
                layer = model.get_submodule(path)
            except AttributeError as exc:
                raise LoraToolError(f"LoRA module '{name}' has no layer '{path}' in the base model's {component}: "
                                    "the LoRA was trained for another model family or architecture.") from exc
            pairs.append((name, module, layer))
    return pairs


def open_base_weights(base_model: str, *, allow_pickle: bool = False, model_config: str = "") -> BaseWeights:
    """The modules a LoRA can change in `base_model`, through its family; refused for a family whose
    checkpoints the tools do not rewrite (its LoRAs load beside the model)."""
    from core.family_api.lookup import family_for_model
    from core.model_info import detect_model

    family = family_for_model(str(base_model))
    if family.open_base_weights is None:
        info = detect_model(str(base_model))
        raise LoraToolError(f"'{Path(str(base_model)).name}' is {info.label}: LoRAs are baked into and extracted "
                            "from Stable Diffusion checkpoints only. Load its LoRA beside the model (ComfyUI, Forge, "
                            "diffusers) instead.")
    return family.open_base_weights(base_model, allow_pickle=allow_pickle, model_config=model_config)


def read_image_lora_for(path: str | Path, family: str, *, allow_pickle: bool = False) -> LoraFile:
    """Read an image LoRA meant for a `family` base model; a text adapter or another family is refused."""
    lora = read_lora(path, allow_pickle=allow_pickle)
    if not lora.is_image:
        raise LoraToolError(f"'{path}' is a text (LLM) adapter; it cannot be used with a Stable Diffusion model.")
    if lora.format == "diffusers" and lora.family != family:
        # diffusers names do not depend on the family; the guess from shapes may be off for small models.
        lora = read_lora(path, family=family, allow_pickle=allow_pickle)
    if lora.family != family and not _same_layout(lora.family, family):
        raise LoraToolError(f"'{Path(path).name}' is an {lora.family} LoRA but the base model is {family}.")
    return lora


def read_lycoris_file(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor] | None:
    """The tensors of a LoKr / LoHa (LyCORIS) file; None for any other LoRA."""
    from core.export.lycoris import is_lycoris_state
    from core.tools.convert import _load_tensors

    file = Path(path)
    if not file.is_file():
        return None
    if file.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:  # the keys only: most files are plain LoRAs
            if not is_lycoris_state(dict.fromkeys(handle.keys())):
                return None
    tensors, _ = _load_tensors(file, allow_pickle)
    return tensors if is_lycoris_state(tensors) else None


def bake_lycoris_into_modules(components: dict[str, nn.Module], tensors: dict[str, torch.Tensor], family: str,
                              weight: float, report: MergeReport, source: str,
                              saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> MergeReport:
    """Add a LoKr / LoHa file at `weight` into the diffusers modules in place: W += weight * delta
    (core.export.lycoris.module_delta, the loaders' own reconstruction).

    `saved`: (weight, its CPU copy) is appended for each weight before its first change, to put it back.
    """
    from core.export.lycoris import group_file, kohya_name_to_module_path, module_delta

    modules = group_file(tensors)
    covered = sum(len(parts) for parts in modules.values())
    if covered != len(tensors):
        raise LoraToolError(f"'{source}' mixes LoKr/LoHa modules with other kinds (plain LoRA, Tucker...); "
                            "only files of LoKr or LoHa modules alone are baked.")
    for name, parts in modules.items():
        component, path = kohya_name_to_module_path(name, family)
        model = components.get(component)
        if model is None:
            raise LoraToolError(f"'{source}' has {component} weights but the base model has no {component}.")
        if component != "unet" and not any(n == "text_model" for n, _ in model.named_children()):
            path = path.removeprefix("text_model.")
        try:
            layer = model.get_submodule(path)
        except AttributeError as exc:
            raise LoraToolError(f"'{source}': module '{name}' has no layer '{path}' in the base model's {component}: "
                                "it was trained for another model family.") from exc
        target = layer.weight
        try:
            delta = module_delta(parts, target.shape)
        except RuntimeError as exc:
            raise LoraToolError(f"'{source}': module '{name}' does not fit the base model's layer of shape "
                                f"{tuple(target.shape)}: it was trained for another base model.") from exc
        if saved is not None and not any(param is target for param, _ in saved):
            saved.append((target, target.detach().to("cpu", copy=True)))
        with torch.no_grad():
            target.copy_((target.float() + weight * delta.to(target.device)).to(target.dtype))
        report.merged.append(name)
    return report


def bake_into_sd(base_model: str, loras: Sequence[tuple[str | Path, float]], output: str | Path, *,
                 dtype: torch.dtype | None = torch.float16, allow_pickle: bool = False,
                 model_config: str = "") -> tuple[Path, MergeReport]:
    """Bake LoRAs at their weights into an SD base model; save a single-file checkpoint (original layout)."""
    base = open_base_weights(base_model, allow_pickle=allow_pickle, model_config=model_config)
    report = MergeReport()
    sources = []
    for path, weight in loras:
        lycoris = read_lycoris_file(path, allow_pickle=allow_pickle)
        if lycoris is not None:
            bake_lycoris_into_modules(base.components, lycoris, base.family, weight, report, Path(path).name)
        else:
            lora = read_image_lora_for(path, base.family, allow_pickle=allow_pickle)
            bake_into_modules(base.components, lora, weight, report)
        sources.append({"file": Path(path).name, "weight": weight})
    state = base.to_single_file(dtype)
    metadata = {"format": "pt", "merged_loras": json.dumps(sources), "base_model": Path(str(base_model)).name}
    return save_file_atomic(state, output, metadata=metadata), report


# --- baking into an LLM -------------------------------------------------------------------------

def scale_peft_adapter(model: nn.Module, weight: float, adapter_name: str = "default") -> None:
    """Multiply every LoRA layer's scale by `weight` (PEFT has no per-merge weight for one adapter)."""
    found = False
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter_name in scaling:
            scaling[adapter_name] *= weight
            found = True
    if not found:
        raise LoraToolError(f"The model has no LoRA layers of adapter '{adapter_name}'.")


def bake_into_llm(base_model: str, adapter: str | Path, output: str | Path, *, weight: float = 1.0,
                  dtype: torch.dtype | None = None, gguf_file: str = "", allow_pickle: bool = False) -> Path:
    """Merge a PEFT adapter into its causal LM at `weight` and save an HF folder (model + tokenizer)."""
    from peft import PeftModel

    from core.models.llm import load_llm

    check_replaceable_folder(output, ("config.json",))
    model, tokenizer, _ = load_llm(base_model, gguf_file=gguf_file, allow_pickle=allow_pickle)
    adapter_path = Path(adapter)
    if not (adapter_path / "adapter_config.json").is_file():
        raise LoraToolError(f"'{adapter}' is not a PEFT adapter folder (no adapter_config.json).")
    peft_model = PeftModel.from_pretrained(model, str(adapter_path))
    if weight != 1.0:
        scale_peft_adapter(peft_model, weight)
    merged = peft_model.merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)
    with atomic_dir(output) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(output)


def _same_layout(a: str, b: str) -> bool:
    """UNet families whose LoRA files have the same names (SD 1.x and 2.x): a file guessed as one from its
    shapes merges into the other."""
    if a not in FAMILIES or b not in FAMILIES:
        return False
    x, y = FAMILIES[a], FAMILIES[b]
    return x.kind == y.kind == "unet" and x.kohya_te_prefixes == y.kohya_te_prefixes \
        and x.sgm_unet_names == y.sgm_unet_names
