"""Resize a LoRA by SVD (to a rank or a kept-energy ratio) and extract one from two models.

Resizing works on each module's full delta `alpha / rank * up @ down`: the best rank-k
approximation (Eckart-Young) is the truncated SVD, and the relative Frobenius error
`||delta - approx|| / ||delta||` says what was lost. The resized module keeps its alpha (the
factors absorb the new alpha / rank), so the delta and a user's usual LoRA weight mean the same.

`extract_modules` builds a LoRA from the difference of two weight sets (a fine-tuned model
minus its base) the same way, module by module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from core.tools.modules import LoraModule, LoraToolError, rank_for_energy, svd_of_delta, svd_of_module, truncate


@dataclass
class ModuleResize:
    name: str
    old_rank: int
    new_rank: int
    error: float          # relative Frobenius error of this module's delta
    norm: float           # ||delta||_F, to weigh the overall error


@dataclass
class ResizeReport:
    modules: list[ModuleResize] = field(default_factory=list)

    @property
    def overall_error(self) -> float:
        """Relative Frobenius error over all modules together: sqrt(sum err^2 norm^2 / sum norm^2)."""
        total = sum(m.norm ** 2 for m in self.modules)
        lost = sum((m.error * m.norm) ** 2 for m in self.modules)
        return math.sqrt(lost / total) if total > 0 else 0.0

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)

    def summary(self) -> str:
        ranks = sorted({m.new_rank for m in self.modules})
        shown = ", ".join(map(str, ranks[:8])) + (" ..." if len(ranks) > 8 else "")
        return (f"{len(self.modules)} modules, new rank(s) {shown}; relative error overall "
                f"{self.overall_error:.4%}, worst module {self.max_error:.4%}")


def _check_target(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise LoraToolError("Give exactly one of a target rank or a kept-energy ratio (e.g. rank 8 or energy 0.95).")
    if rank is not None and rank < 1:
        raise LoraToolError(f"The target rank must be at least 1; got {rank}.")


def resize_module(module: LoraModule, *, rank: int | None = None, energy: float | None = None,
                  max_rank: int | None = None) -> tuple[LoraModule, float, float]:
    """(resized module, relative error, ||delta||) for one module; never grows the rank."""
    _check_target(rank, energy)
    svd = svd_of_module(module)
    norm = float(svd.s.pow(2).sum().sqrt())
    target = rank_for_energy(svd.s, energy) if energy is not None else int(rank)
    target = min(target, module.rank, max_rank or module.rank)
    # The factors absorb any alpha, so the delta (and what "weight 0.8" means) is the same either
    # way. Keeping the module's own alpha keeps it uniform across modules: diffusers' kohya loader
    # mis-scales files whose alpha varies per module (as it would with per-module ranks here).
    resized, error = truncate(svd, target, alpha=module.alpha)
    if module.dora_scale is not None:
        # The magnitude is per output channel and independent of the rank; the direction
        # changes by the truncation error, which the report already states.
        resized.dora_scale = module.dora_scale
    resized.down = resized.down.to(module.down.dtype)
    resized.up = resized.up.to(module.up.dtype)
    return resized, error, norm


def resize_modules(modules: dict[str, LoraModule], *, rank: int | None = None, energy: float | None = None,
                   max_rank: int | None = None) -> tuple[dict[str, LoraModule], ResizeReport]:
    """Resize every module to `rank` (or the smallest rank keeping `energy`, at most `max_rank`)."""
    _check_target(rank, energy)
    out: dict[str, LoraModule] = {}
    report = ResizeReport()
    for name, module in modules.items():
        resized, error, norm = resize_module(module, rank=rank, energy=energy, max_rank=max_rank)
        out[name] = resized
        report.modules.append(ModuleResize(name, module.rank, resized.rank, error, norm))
    return out, report


# --- extract ------------------------------------------------------------------------------------

@dataclass
class ExtractReport(ResizeReport):
    skipped_same: list[str] = field(default_factory=list)


def extract_modules(base: dict[str, Tensor], tuned: dict[str, Tensor], *, rank: int,
                    conv_rank: int | None = None, energy: float | None = None,
                    min_diff: float = 1e-6) -> tuple[dict[str, LoraModule], ExtractReport]:
    """A LoRA of `tuned - base` for every weight present in both (2-d linears, 4-d convs with conv_rank).

    Keys are the module paths (`...to_q`, without `.weight`). Weights whose largest difference is
    below `min_diff` are skipped (the fine-tune did not touch them). With `energy`, each module gets
    the smallest rank keeping that share of its delta's energy, capped at `rank` (`conv_rank`).
    """
    if rank < 1:
        raise LoraToolError(f"The extract rank must be at least 1; got {rank}.")
    modules: dict[str, LoraModule] = {}
    report = ExtractReport()
    for name, before in base.items():
        after = tuned.get(name)
        if after is None or before.dim() not in (2, 4):
            continue
        if after.shape != before.shape:
            raise LoraToolError(f"'{name}' has shape {tuple(before.shape)} in the base model but "
                                f"{tuple(after.shape)} in the tuned one: the two models are not the same architecture.")
        limit = rank if before.dim() == 2 else conv_rank
        if not limit:
            continue
        delta = after.float() - before.float()
        if float(delta.abs().max()) < min_diff:
            report.skipped_same.append(name)
            continue
        svd = svd_of_delta(delta)
        target = limit if energy is None else min(limit, rank_for_energy(svd.s, energy))
        module, error = truncate(svd, target, alpha=float(limit))  # one alpha per kind (see resize_module)
        modules[name] = module
        report.modules.append(ModuleResize(name, int(min(delta.shape[0], delta[0].numel())), module.rank,
                                           error, float(delta.norm())))
    return modules, report
