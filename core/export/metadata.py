"""The `ss_*` (sd-scripts) and `modelspec.*` (SAI ModelSpec) metadata of a kohya LoRA file.

WebUI reads: `ss_base_model_version` (starts with `sdxl_` -> SDXL) or `ss_v2 == "True"` (SD 2.x)
to decide which checkpoints a LoRA is shown for, `ss_output_name` as its name,
`sshs_model_hash` (added by `save_kohya_lora`), and shows `ss_tag_frequency`,
`ss_bucket_info`, `ss_dataset_dirs`, `ss_sd_model_name`, `ss_resolution`, ... in its info
panel. Every value is a string; nested values are JSON strings, as sd-scripts writes them.
"""
from __future__ import annotations

import datetime
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from core.config import TrainConfig
from core.family_api.registry import family_info

MODELSPEC_VERSION = "1.0.1"  # what sd-scripts' library/sai_model_spec.py writes today


def base_model_version(family: str, v_prediction: bool = False) -> str:
    """`ss_base_model_version` as sd-scripts names it (`sd_v2_v` for a v-prediction SD 2.x)."""
    info = family_info(family)
    version = info.ss_base_model_version
    return version + "_v" if v_prediction and info.v_prediction_suffix else version


def modelspec_architecture(family: str, v_prediction: bool = False) -> str:
    info = family_info(family)
    arch = info.modelspec_architecture_v if v_prediction and info.modelspec_architecture_v else \
        info.modelspec_architecture
    return arch + "/lora"


def _is_v_prediction(cfg: TrainConfig, prediction_type: str | None) -> bool:
    kind = prediction_type or cfg.prediction_type
    return kind in ("v_prediction", "v")


def network_args(cfg: TrainConfig, conv_dims: tuple[int, float] | None) -> dict[str, str]:
    """`ss_network_args`: values are strings, as sd-scripts parses them from `key=value`."""
    args: dict[str, str] = {}
    if conv_dims:
        args["conv_dim"] = str(int(conv_dims[0]))
        args["conv_alpha"] = num_text(conv_dims[1])
    if cfg.lora_variant == "dora":
        # The file's dora_scale is per output channel: LyCORIS' wd_on_output=True layout.
        args.update({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    elif cfg.lora_variant == "lokr":
        # LyCORIS' own network args, so kohya tools and civitai read the file as LoKr.
        args.update({"algo": "lokr", "factor": str(cfg.lokr_factor), "decompose_both": str(cfg.lokr_decompose_both),
                     "full_matrix": str(cfg.lokr_full_matrix)})
    elif cfg.lora_variant == "loha":
        args["algo"] = "loha"
    elif cfg.lora_variant in ("rslora", "pissa"):
        args["peft_variant"] = cfg.lora_variant
    return args


def num_text(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _bucket_info_json(bucket_info: dict | None) -> str | None:
    if bucket_info is None:
        return None
    if "buckets" in bucket_info:
        return json.dumps(bucket_info)
    # Also accept a plain {(w, h) or "WxH": count} mapping.
    buckets = {}
    for index, (reso, count) in enumerate(sorted(bucket_info.items(), key=lambda kv: str(kv[0]))):
        if isinstance(reso, str) and "x" in reso:
            reso = tuple(int(p) for p in reso.split("x"))
        buckets[str(index)] = {"resolution": list(reso), "count": int(count)}
    return json.dumps({"buckets": buckets})


def kohya_metadata(cfg: TrainConfig, *, family: str, base_model_name: str, num_images: int,
                   tag_frequency: dict[str, int], bucket_info: dict | None, steps: int, epochs: int,
                   started_at: float, dataset_dir: str, conv_dims: tuple[int, float] | None = None,
                   prediction_type: str | None = None, finished_at: float | None = None,
                   session_id: int | None = None) -> dict[str, str]:
    """All metadata of a kohya LoRA file for a finished (or checkpointed) image run.

    `num_images` counts distinct images (repeats are applied here, like sd-scripts'
    `ss_num_train_images`); `tag_frequency` is {tag: count} of the one data folder;
    `prediction_type` is the model's real one when the config says "auto".
    """
    v_pred = _is_v_prediction(cfg, prediction_type)
    dir_name = Path(dataset_dir).name or str(dataset_dir)
    finished = time.time() if finished_at is None else finished_at
    rank, alpha = cfg.lora_rank, float(cfg.lora_alpha)
    if cfg.lora_variant == "rslora":
        alpha *= math.sqrt(rank)  # the file stores the alpha that gives PEFT's alpha/sqrt(rank) under alpha/rank
    elif cfg.lora_variant == "pissa":
        # A PiSSA run is written as the rank-2r LoRA s(BA - B0A0) for the unmodified base model.
        rank, alpha = 2 * rank, 2 * alpha
    batch = cfg.batch_size * cfg.gradient_accumulation_steps
    ss: dict[str, Any] = {
        "ss_session_id": session_id if session_id is not None else random.randint(0, 2**32 - 1),
        "ss_training_started_at": started_at,
        "ss_training_finished_at": finished,
        "ss_output_name": cfg.name,
        "ss_base_model_version": base_model_version(family, v_pred),
        "ss_v2": family_info(family).ss_base_model_version == "sd_v2",
        "ss_sd_model_name": Path(base_model_name).name if base_model_name else "",
        "ss_network_module": ("lycoris.kohya" if cfg.lora_variant in ("dora", "lokr", "loha")
                                else "networks.lora"),
        "ss_network_dim": rank,
        "ss_network_alpha": num_text(alpha),
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.learning_rate,
        "ss_text_encoder_lr": (cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else 0.0,
        "ss_num_train_images": num_images * cfg.repeats,
        "ss_num_reg_images": 0,
        "ss_num_epochs": epochs,
        "ss_epoch": epochs,
        "ss_steps": steps,
        "ss_max_train_steps": cfg.max_train_steps or steps,
        "ss_batch_size_per_device": cfg.batch_size,
        "ss_total_batch_size": batch,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_optimizer": cfg.optimizer,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": cfg.seed,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_enable_bucket": cfg.bucketing,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_flip_aug": cfg.random_flip,
        "ss_random_crop": not cfg.center_crop,
        "ss_cache_latents": cfg.cache_latents,
        "ss_caption_dropout_rate": cfg.caption_dropout,
        "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.snr_gamma,
        "ss_clip_skip": None,
        "ss_tag_frequency": json.dumps({dir_name: dict(tag_frequency)}, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps({dir_name: {"n_repeats": cfg.repeats, "img_count": num_images}},
                                      ensure_ascii=False),
        "ss_bucket_info": _bucket_info_json(bucket_info),
    }
    net_args = network_args(cfg, conv_dims)
    if net_args:
        ss["ss_network_args"] = json.dumps(net_args)
    if cfg.vae:
        ss["ss_vae_name"] = Path(cfg.vae).name
    if cfg.trigger_word:
        ss["ss_training_comment"] = f"trigger word: {cfg.trigger_word}"
    meta = {k: _to_str(v) for k, v in ss.items() if v is not None}
    meta.update(modelspec_metadata(cfg, family=family, started_at=started_at, v_prediction=v_pred))
    return meta


def modelspec_metadata(cfg: TrainConfig, *, family: str, started_at: float, v_prediction: bool = False
                       ) -> dict[str, str]:
    """SAI ModelSpec keys as sd-scripts' `sai_model_spec.build_metadata` fills them for a LoRA."""
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(family, v_prediction),
        # sd-scripts: SDXL LoRAs are on the SAI implementation (sgm names), SD 1/2 on diffusers names.
        "modelspec.implementation": family_info(family).modelspec_implementation,
        "modelspec.title": cfg.name,
        "modelspec.date": datetime.datetime.fromtimestamp(int(started_at)).isoformat(),
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.implementation_version": "lora-scripts",
    }
    if cfg.trigger_word:
        spec["modelspec.trigger_phrase"] = cfg.trigger_word
    return spec


def _to_str(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
