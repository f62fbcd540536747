"""LoRA modules as plain (down, up, alpha) triples: the common ground of the LoRA tools.

Every tool (resize, merge, extract, convert) works on `{name: LoraModule}`, whatever the
file format: the name is the kohya name (`lora_unet_..._to_q`) for image LoRAs and the PEFT
module path (`base_model.model.model.layers.0.self_attn.q_proj`) for text adapters. A
module's weight delta is `scale * up @ down` with `scale = alpha / rank` (kohya's rule; the
rsLoRA and PiSSA specifics are baked into alpha and the tensors before they get here).

Conv layers (LoCon) keep kohya's layout: down `[r, in, kh, kw]`, up `[out, r, 1, 1]`, so the
delta is `(up.flatten(1) @ down.flatten(1)).reshape(out, in, kh, kw)`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor

_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_PEFT_MAGNITUDE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$")


class LoraToolError(ValueError):
    """A LoRA tool cannot do what was asked; the message names the file or module and what to change."""


@dataclass
class LoraModule:
    """One adapted layer: `delta = alpha / rank * up @ down` (plus an optional DoRA magnitude)."""

    down: Tensor
    up: Tensor
    alpha: float
    dora_scale: Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the layer weight this module changes."""
        return (int(self.up.shape[0]),) + tuple(int(s) for s in self.down.shape[1:])

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full weight delta `scale * up @ down`, shaped like the layer's weight."""
        up = self.up.to(dtype).flatten(1)
        down = self.down.to(dtype).flatten(1)
        return (self.scale * (up @ down)).reshape(self.weight_shape)


@dataclass
class Svd:
    """A delta as u @ diag(s) @ vh (thin), and the weight shape it came from."""

    u: Tensor
    s: Tensor
    vh: Tensor
    shape: tuple[int, ...]


def svd_of_delta(delta: Tensor) -> Svd:
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1).double(), full_matrices=False)
    return Svd(u, s, vh, tuple(delta.shape))


def svd_of_module(module: LoraModule) -> Svd:
    """The SVD of `scale * up @ down` through QR of the thin factors: O((out + in) r^2), not O(out in min)."""
    up = module.up.flatten(1).double()
    down = module.down.flatten(1).double()
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(module.scale * r_up @ r_down.T)
    return Svd(q_up @ u, s, vh @ q_down.T, module.weight_shape)


def truncate(svd: Svd, rank: int, *, alpha: float | None = None) -> tuple[LoraModule, float]:
    """Best rank-`rank` LoRA of an SVD'd delta, and its relative Frobenius error.

    The singular values are split evenly (sqrt) between up and down so neither factor is tiny.
    `alpha` defaults to `rank` (scale 1); with another alpha the factors absorb rank / alpha.
    """
    rank = max(1, min(rank, svd.s.numel()))
    root = svd.s[:rank].sqrt()
    alpha = float(rank if alpha is None else alpha)
    correction = math.sqrt(rank / alpha)  # so that alpha / rank * up @ down == the truncated delta
    up = (svd.u[:, :rank] * root * correction).float()
    down = (root[:, None] * svd.vh[:rank] * correction).float()
    total = float(svd.s.pow(2).sum())
    # Sum what is dropped (not total - kept): no cancellation when the error is tiny.
    dropped = float(svd.s[rank:].pow(2).sum())
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    out = svd.shape[0]
    if len(svd.shape) == 4:
        down = down.reshape((rank,) + tuple(svd.shape[1:]))
        up = up.reshape(out, rank, 1, 1)
    return LoraModule(down.contiguous(), up.contiguous(), alpha), error


def factor_delta(delta: Tensor, rank: int, *, alpha: float | None = None) -> tuple[LoraModule, float]:
    """Best rank-`rank` LoRA of a full weight delta (see `truncate`)."""
    return truncate(svd_of_delta(delta), rank, alpha=alpha)


def rank_for_energy(singular_values: Tensor, ratio: float) -> int:
    """Smallest rank whose singular values keep `ratio` of the squared Frobenius norm (energy)."""
    if not 0.0 < ratio <= 1.0:
        raise LoraToolError(f"The kept-energy ratio must be in (0, 1]; got {ratio}.")
    energy = singular_values.float().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(energy, 0) / total
    # The tiny tolerance keeps ratio=1.0 from asking for rank beyond the last non-zero value.
    return int(torch.searchsorted(cumulative, torch.tensor(ratio - 1e-6)).item()) + 1


# --- kohya dicts --------------------------------------------------------------------------------

def modules_from_kohya(tensors: dict[str, Tensor], source: str = "the LoRA") -> dict[str, LoraModule]:
    """`{kohya name: LoraModule}` from a kohya state dict (a missing alpha means alpha = rank)."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        if part.startswith("lokr_"):
            raise LoraToolError(
                f"{source} is a LoKr file: a Kronecker product has no rank to cut, so it cannot be resized "
                "(its size is set by lokr_factor when training); nor converted or combined with LoRAs. "
                "merge --base bakes it into a Stable Diffusion checkpoint.")
        if part.startswith("hada_"):
            raise LoraToolError(
                f"{source} is a LoHa file: a Hadamard product of two low-rank pairs has no single rank to "
                "cut, so it cannot be resized, converted or combined with LoRAs. merge --base bakes it "
                "into a Stable Diffusion checkpoint.")
        if part not in _KOHYA_PARTS:
            raise LoraToolError(
                f"{source}: '{key}' is not a plain LoRA key (lora_down / lora_up / alpha / dora_scale). "
                "LoHa, LoKr and Tucker (lora_mid) files cannot be merged or resized here.")
        parts.setdefault(name, {})[part] = value
    modules: dict[str, LoraModule] = {}
    for name, found in parts.items():
        if "lora_down.weight" not in found or "lora_up.weight" not in found:
            raise LoraToolError(f"{source}: module '{name}' lacks lora_down or lora_up.")
        down, up = found["lora_down.weight"], found["lora_up.weight"]
        if down.shape[0] != up.shape[1]:
            raise LoraToolError(f"{source}: module '{name}' has lora_down rank {down.shape[0]} "
                                f"but lora_up rank {up.shape[1]}.")
        alpha = found.get("alpha")
        modules[name] = LoraModule(down, up, float(alpha.item()) if alpha is not None else float(down.shape[0]),
                                   found.get("dora_scale"))
    return modules


def modules_to_kohya(modules: dict[str, LoraModule]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, module in modules.items():
        out[f"{name}.lora_down.weight"] = module.down
        out[f"{name}.lora_up.weight"] = module.up
        out[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
        if module.dora_scale is not None:
            out[f"{name}.dora_scale"] = module.dora_scale
    return out


# --- PEFT adapter dicts -------------------------------------------------------------------------

def peft_alpha(config: dict, module: str, rank: int) -> float:
    """The kohya-style alpha (scale * rank) of a PEFT module, from an adapter_config.json dict.

    PEFT's rank_pattern / alpha_pattern keys match the END of a module path (or are regexes);
    with use_rslora the scale is alpha / sqrt(rank).
    """
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if _pattern_matches(pattern, module):
            alpha = float(value)
            break
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return scale * rank


def _pattern_matches(pattern: str, module: str) -> bool:
    if module == pattern or module.endswith("." + pattern):
        return True
    try:
        return re.match(rf"(.*\.)?({pattern})$", module) is not None
    except re.error:
        return False


def modules_from_peft(state: dict[str, Tensor], config: dict, source: str = "the adapter") -> dict[str, LoraModule]:
    """`{module path: LoraModule}` from a PEFT adapter's tensors and its adapter_config.json dict."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraToolError(f"{source} is a {config.get('peft_type')} adapter; only LoRA adapters are supported.")
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m:
            grouped.setdefault(m["module"], {})[m["part"]] = value
            continue
        m = _PEFT_MAGNITUDE.match(key)
        if m:
            grouped.setdefault(m["module"], {})["magnitude"] = value
            continue
        raise LoraToolError(f"{source}: '{key}' is not a LoRA weight (lora_A / lora_B / lora_magnitude_vector); "
                            "adapters with modules_to_save or LoRA biases are not supported by this tool.")
    modules: dict[str, LoraModule] = {}
    for name, parts in grouped.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise LoraToolError(f"{source}: module '{name}' lacks lora_A or lora_B.")
        down, up = parts["lora_A"], parts["lora_B"]
        magnitude = parts.get("magnitude")
        dora = magnitude.reshape((up.shape[0],) + (1,) * (up.dim() - 1)) if magnitude is not None else None
        modules[name] = LoraModule(down, up, peft_alpha(config, name, down.shape[0]), dora)
    return modules


def modules_to_peft(modules: dict[str, LoraModule], base_config: dict) -> tuple[dict[str, Tensor], dict]:
    """PEFT tensors + adapter_config dict (plain alpha/rank scale, rank/alpha patterns per module)."""
    state: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, module in modules.items():
        state[f"{name}.lora_A.weight"] = module.down
        state[f"{name}.lora_B.weight"] = module.up
        if module.dora_scale is not None:
            state[f"{name}.lora_magnitude_vector"] = module.dora_scale.reshape(-1)
        ranks[name] = module.rank
        alphas[name] = float(module.alpha)
    common_rank = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 8
    common_alpha = max(set(alphas.values()), key=list(alphas.values()).count) if alphas else 8.0
    config = dict(base_config)
    config.update({
        "r": common_rank, "lora_alpha": common_alpha, "use_rslora": False,
        # Full, anchored module paths so a pattern never catches another layer.
        "rank_pattern": {_anchor(n): r for n, r in ranks.items() if r != common_rank},
        "alpha_pattern": {_anchor(n): a for n, a in alphas.items() if a != common_alpha},
        "use_dora": any(m.dora_scale is not None for m in modules.values()),
        "init_lora_weights": True,
    })
    targets = sorted({n.rsplit(".", 1)[-1] for n in modules})
    if targets:
        config["target_modules"] = targets
    return state, config


def _anchor(name: str) -> str:
    # PEFT matches patterns as regexes against the path without "base_model.model.".
    return re.escape(name.removeprefix("base_model.model."))


def cast_modules(modules: dict[str, LoraModule], dtype: torch.dtype | None) -> dict[str, LoraModule]:
    if dtype is None:
        return modules
    return {n: replace(m, down=m.down.to(dtype), up=m.up.to(dtype),
                       dora_scale=None if m.dora_scale is None else m.dora_scale.to(dtype))
            for n, m in modules.items()}
