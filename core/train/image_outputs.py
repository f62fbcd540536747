"""What an image run writes and reads back: checkpoints (and resume from them), previews,
and the final LoRA files in the diffusers and kohya/WebUI formats. The run itself is
`core.train.image.ImageRun`; the loop that calls these is `core.train.loop`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.atomic import save_file_atomic
from core.devices import free_memory, torch_dtype
from core.events import CheckpointEvent, DoneEvent, SampleEvent
from core.sample import move
from core.train import checkpoints, distributed
from core.train.image_lora import PEFT_FILES, TE_NAMES, load_peft_state, peft_state, save_lora_outputs
from core.train.loop import LoopResult, keep_rng

if TYPE_CHECKING:
    from core.train.image import ImageRun


def _metadata(run: ImageRun, steps: int, epoch: int) -> dict[str, Any]:
    from core.data.buckets import bucket_info
    from core.export.metadata import kohya_metadata

    cfg = run.cfg
    info = bucket_info([(i.width, i.height) for i in run.items], run.buckets)
    return kohya_metadata(cfg, family=run.model.family, base_model_name=Path(cfg.base_model).name,
                          num_images=len(run.items), tag_frequency=run.dataset.tag_frequency(),
                          bucket_info=info, steps=steps, epochs=epoch, started_at=run.started_at,
                          dataset_dir=cfg.train_data_dir, prediction_type=run.model.prediction_type,
                          session_id=run.session_id,
                          conv_dims=(cfg.conv_rank, cfg.conv_alpha or cfg.conv_rank) if cfg.conv_rank else None)


def write_loras(run: ImageRun, folder: Path, steps: int, epoch: int) -> dict[str, str]:
    unet = run.accelerator.unwrap_model(run.train_unet)
    encoders = [run.accelerator.unwrap_model(e) for e in run.train_encoders]
    return save_lora_outputs(folder, run.cfg.name, family=run.model.family, unet=unet, encoders=encoders,
                             unet_config=run.unet_config, te_configs=run.te_configs,
                             metadata=_metadata(run, steps, epoch), save_dtype=torch_dtype(run.cfg.save_precision),
                             pissa_init=run.pissa_init)


def save_checkpoint(run: ImageRun, state: checkpoints.TrainState, optimizer: Any, scheduler: Any,
                    rng_by_rank: list[dict] | None = None) -> Path:
    """A checkpoint folder: exact PEFT weights for resume, both LoRA formats, optimizer/scheduler/RNG.

    `rng_by_rank`: every process's RNG state in a multi-process run (each draws its own noise).
    """
    def write_weights(folder: Path) -> None:
        unet = run.accelerator.unwrap_model(run.train_unet)
        save_file_atomic(peft_state(unet), folder / PEFT_FILES[0])
        for index, encoder in enumerate(run.train_encoders):
            save_file_atomic(peft_state(run.accelerator.unwrap_model(encoder)), folder / PEFT_FILES[1 + index])
        write_loras(run, folder, state.global_step, state.epoch)

    return checkpoints.save_checkpoint(run.cfg.output_dir, state, optimizer=optimizer, scheduler=scheduler,
                                   write_weights=write_weights, keep=run.cfg.keep_checkpoints,
                                   extra={"rng_by_rank": rng_by_rank} if rng_by_rank else None)


def restore_weights(run: ImageRun, folder: Path) -> None:
    from safetensors.torch import load_file

    load_peft_state(run.accelerator.unwrap_model(run.train_unet), load_file(str(folder / PEFT_FILES[0])), "UNet")
    for index, encoder in enumerate(run.train_encoders):
        path = folder / PEFT_FILES[1 + index]
        if not path.is_file():
            raise ValueError(f"{folder} has no text-encoder LoRA ({path.name}); it was saved by a run with "
                             "train_text_encoder off. Resume with the same settings.")
        load_peft_state(run.accelerator.unwrap_model(encoder), load_file(str(path)), TE_NAMES[index])


def make_samples(run: ImageRun, step: int) -> list[str]:
    """Previews with the UNet being trained; VAE/text encoders visit the device only meanwhile."""
    from core.sample import build_pipeline, run_pipeline, sample_size, save_image

    cfg, m = run.cfg, run.model
    unet = run.accelerator.unwrap_model(run.train_unet)
    # Frozen encoders were parked on the CPU only when their outputs were cached.
    moved = [e for e in m.text_encoders if e is not None] if run.text_cache is not None else []
    for encoder in moved:
        move(encoder, run.device, run.weight_dtype)
    move(m.vae, run.device, torch.float32)
    was_training = unet.training
    unet.eval()
    try:
        pipe = build_pipeline(m.family, unet=unet, vae=m.vae, text_encoders=m.text_encoders,
                              tokenizers=m.tokenizers, scheduler_config=m.scheduler_config,
                              prediction_type=m.prediction_type)
        pipe.set_progress_bar_config(disable=True)
        width, height = sample_size(m.family, cfg.resolution, m.vae_scale_factor)
        images = run_pipeline(pipe, cfg.sample_prompts, seed=cfg.sample_seed,
                              steps=cfg.sample_num_inference_steps, guidance=cfg.sample_guidance_scale,
                              negative_prompt=cfg.sample_negative_prompt, width=width, height=height)
        paths = [str(save_image(img, run.out / "samples" / f"step-{step:06d}-{i}.png")) for i, img in enumerate(images)]
    finally:
        unet.train(was_training)
        if run.latents is not None:
            move(m.vae, "cpu")
        for encoder in moved:
            move(encoder, "cpu")
        free_memory()
    return paths


def checkpoint(run: ImageRun, state: checkpoints.TrainState, optimizer: Any, scheduler: Any) -> Path | None:
    """Every process's RNG goes in; the main process writes the folder and sends its event."""
    folder = None
    ranks = distributed.gather_rng(run.accelerator)
    if run.main:
        folder = save_checkpoint(run, state, optimizer, scheduler, ranks)
        run.ctx.emit(CheckpointEvent(step=state.global_step, path=str(folder)))
    run.accelerator.wait_for_everyone()
    return folder


def restore(run: ImageRun, folder: Path, optimizer: Any, scheduler: Any) -> checkpoints.TrainState:
    """The LoRA weights, optimizer, scheduler and this process's RNG from a checkpoint."""
    restore_weights(run, folder)
    state, extra = checkpoints.load_checkpoint_state(folder, optimizer=optimizer, scheduler=scheduler)
    distributed.restore_rng(run.accelerator, extra.get("rng_by_rank"))
    return state


def samples(run: ImageRun, step: int) -> None:
    if run.main:
        run.log(f"Making {len(run.cfg.sample_prompts)} preview(s) at step {step}")
        run.ctx.emit(SampleEvent(step=step, images=make_samples(run, step)))
    run.accelerator.wait_for_everyone()


def finish(run: ImageRun, state: checkpoints.TrainState, result: LoopResult) -> dict[str, str]:
    """The final LoRA files, the last previews and the DoneEvent."""
    cfg = run.cfg
    stopped, checkpoint = result.stopped, result.checkpoint
    outputs: dict[str, str] = {}
    if run.main:
        paths = write_loras(run, run.out, state.global_step, state.epoch + (0 if stopped else 1))
        outputs = {"output_dir": str(run.out), "lora": paths["kohya"], "diffusers": paths.get("diffusers", ""),
                   "config": str(run.out / "config.yaml"), "loss_csv": str(run.out / "loss.csv")}
        if checkpoint is not None:
            outputs["checkpoint"] = str(checkpoint)
    if cfg.sample_prompts and not stopped:
        with keep_rng():
            samples(run, state.global_step)
    run.accelerator.wait_for_everyone()
    if run.main:
        if stopped:
            message = (f"Stopped at step {state.global_step} of {state.total_steps}. LoRA saved to {outputs['lora']}; "
                       f"continue with resume_from: latest (checkpoint {checkpoint}).")
        else:
            message = f"Done: {state.global_step} steps. LoRA saved to {outputs['lora']}."
        run.ctx.emit(DoneEvent(outputs=outputs, stopped=stopped, message=message))
    return outputs
