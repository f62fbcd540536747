"""What the flow-matching transformer families check and
set up the same way: the settings they refuse or ignore, the dtype and NF4 config they load with, the
LoraConfig of a LoRA file a run continues from, and the one text encoder file a single file needs.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from core.config import TrainConfig

# Settings of the UNet families that mean nothing to a transformer family, with their defaults.
UNET_ONLY = {"conv_rank": 0, "noise_offset": 0.0, "snr_gamma": 0.0, "prediction_type": "auto",
             "train_text_encoder": False}
UNSUPPORTED_VARIANTS = ("dora", "pissa")  # LoKr / LoHa: core.export.lycoris_transformer


def check_transformer(cfg: TrainConfig, family: str, *, targets: str, ignored_for: str, encoders: str) -> list[str]:
    """Refuse GPU-only switches without CUDA and LoRA kinds the family's files cannot hold; warn on ignored keys.

    `family` names the family in the refusals, `targets` says what it trains instead of `target_modules`,
    `ignored_for` ends the sentence on ignored keys, `encoders` is the note when the config asks not to
    cache the text encoders' outputs (these families always do).
    """
    from core.families.dit.low_memory import nf4_config

    if cfg.base_quantization == "nf4":
        nf4_config()  # says in one sentence what is missing (CUDA, bitsandbytes)
    if cfg.blocks_to_swap > 0 and not torch.cuda.is_available():
        raise ValueError("blocks_to_swap needs a CUDA GPU (it moves blocks between CPU and GPU memory); "
                         "set blocks_to_swap: 0 on this machine.")
    if cfg.lora_variant in UNSUPPORTED_VARIANTS:
        raise ValueError(f"lora_variant: {cfg.lora_variant} is not available for {family}; use lora, rslora, lokr "
                         "or loha.")
    warnings = []
    ignored = [k for k, default in UNET_ONLY.items() if getattr(cfg, k) != default]
    if cfg.target_modules:
        ignored.append(f"target_modules ({targets})")
    if ignored:
        warnings.append(f"{', '.join(ignored)} {ignored_for}")
    if not cfg.cache_text_encoder_outputs:
        warnings.append(encoders)
    return warnings


def load_dtype_and_quantization(cfg: TrainConfig) -> tuple[torch.dtype, Any]:
    """(dtype, NF4 config or None) to load the model with: the run's weight dtype (bf16, or fp16 on CUDA) when
    mixed precision is on, fp32 when it is off; `base_quantization: nf4` loads in the compute dtype (bf16 when
    mixed precision is off)."""
    from core.devices import torch_dtype
    from core.families.dit.low_memory import nf4_config

    if cfg.base_quantization != "nf4":
        return weight_dtype_to_load(cfg), None
    dtype = torch_dtype(cfg.mixed_precision) if cfg.mixed_precision != "no" else torch.bfloat16
    return dtype, nf4_config(dtype)


def weight_dtype_to_load(cfg: TrainConfig) -> torch.dtype:
    """The dtype the frozen weights will train in, to load them in straight away.

    The run casts the frozen transformer and text encoders to its weight dtype before training (and keeps the
    AE in fp32), so loading them in fp32 first only doubled the CPU memory of the load: FLUX.1's 12B
    transformer took 48 GB of RAM in fp32 against 24 GB in bf16, more than most 32 GB machines have. The
    released files hold bf16 weights, so nothing is lost. fp16 without CUDA trains in fp32 (the run says so).
    """
    from core.devices import run_precision, torch_dtype

    return torch_dtype(run_precision(cfg.mixed_precision))


def first_text_encoder_file(cfg: TrainConfig) -> str:
    """The first file of `text_encoder_files` (the families with one text encoder), "" when none is given."""
    return next((f.strip() for f in cfg.text_encoder_files.split(",") if f.strip()), "")


def config_from_lora_file(peft: dict[str, torch.Tensor], alphas: dict[str, float]) -> Any:
    """A LoraConfig for exactly the modules (ranks, alphas) of a LoRA file a run continues from."""
    from peft import LoraConfig

    ranks = {k.removesuffix(".lora_A.weight"): int(v.shape[0]) for k, v in peft.items()
             if k.endswith(".lora_A.weight")}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas[m] for m in ranks).most_common(1)[0][0]
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(ranks),
                      rank_pattern={f"^{m}$": r for m, r in ranks.items() if r != rank},
                      alpha_pattern={f"^{m}$": alphas[m] for m in ranks if alphas[m] != alpha})
