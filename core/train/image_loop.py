"""The image training loop proper: steps, gradient accumulation, checkpoints and resume,
previews, stop, and the final LoRA files. Setup lives in `core.train.image`.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from core.atomic import save_file_atomic
from core.devices import free_memory, torch_dtype
from core.events import CheckpointEvent, DoneEvent, SampleEvent
from core.sample import move
from core.train import checkpoints, optim, run_log, runtime
from core.train.image_lora import PEFT_FILES, TE_NAMES, load_peft_state, peft_state, save_lora_outputs


def _metadata(run: Any, steps: int, epoch: int) -> dict[str, Any]:
    from core.data.buckets import bucket_info  # noqa: PLC0415
    from core.export.metadata import kohya_metadata  # noqa: PLC0415

    cfg = run.cfg
    info = bucket_info([(i.width, i.height) for i in run.items], run.buckets)
    return kohya_metadata(cfg, family=run.model.family, base_model_name=Path(cfg.base_model).name,
                          num_images=len(run.items), tag_frequency=run.dataset.tag_frequency(),
                          bucket_info=info, steps=steps, epochs=epoch, started_at=run.started_at,
                          dataset_dir=cfg.train_data_dir, prediction_type=run.model.prediction_type,
                          session_id=run.session_id,
                          conv_dims=(cfg.conv_rank, cfg.conv_alpha or cfg.conv_rank) if cfg.conv_rank else None)


def write_loras(run: Any, folder: Path, steps: int, epoch: int) -> dict[str, str]:
    unet = run.accelerator.unwrap_model(run.train_unet)
    encoders = [run.accelerator.unwrap_model(e) for e in run.train_encoders]
    return save_lora_outputs(folder, run.cfg.name, family=run.model.family, unet=unet, encoders=encoders,
                             unet_config=run.unet_config, te_configs=run.te_configs,
                             metadata=_metadata(run, steps, epoch), save_dtype=torch_dtype(run.cfg.save_precision),
                             pissa_init=run.pissa_init)


def save_checkpoint(run: Any, state: checkpoints.TrainState, optimizer: Any, scheduler: Any,
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


def restore_weights(run: Any, folder: Path) -> None:
    from safetensors.torch import load_file  # noqa: PLC0415

    load_peft_state(run.accelerator.unwrap_model(run.train_unet), load_file(str(folder / PEFT_FILES[0])), "UNet")
    for index, encoder in enumerate(run.train_encoders):
        path = folder / PEFT_FILES[1 + index]
        if not path.is_file():
            raise ValueError(f"{folder} has no text-encoder LoRA ({path.name}); it was saved by a run with "
                             "train_text_encoder off. Resume with the same settings.")
        load_peft_state(run.accelerator.unwrap_model(encoder), load_file(str(path)), TE_NAMES[index])


def make_samples(run: Any, step: int) -> list[str]:
    """Previews with the UNet being trained; VAE/text encoders visit the device only meanwhile."""
    from core.sample import build_pipeline, run_pipeline, sample_size, save_image  # noqa: PLC0415

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


def run_loop(run: Any) -> dict[str, str]:
    from core.data.buckets import BucketBatchSampler  # noqa: PLC0415

    cfg, ctx, acc = run.cfg, run.ctx, run.accelerator
    if run.main:
        checkpoints.prepare_output_dir(cfg)
    acc.wait_for_everyone()
    # Each process draws its own noise (seed + rank); one process: exactly `seed`.
    checkpoints.seed_everything(cfg.seed + acc.process_index)
    checkpoint, init_file = checkpoints.resolve_resume(cfg)
    if cfg.resume_from == "latest" and checkpoint is None:
        run.log("No checkpoint in the output folder yet: starting from the beginning.")
    run.load_data()
    run.load_model()
    run._vae_config = run.model.vae.config
    run.noise_scheduler = run.model.noise_scheduler()
    run.cache_latents()
    run.cache_text()
    run.free_encoders()
    run.add_lora(Path(init_file) if init_file else None)

    optimizer = optim.build_optimizer(run.param_groups(), cfg, ctx if run.main else None)
    sampler = BucketBatchSampler(run.buckets, cfg.batch_size, cfg.seed, cfg.repeats)
    world, rank = acc.num_processes, acc.process_index
    batches_per_epoch = math.ceil(len(sampler.batches_for_epoch(0)) / world)
    total, _ = optim.total_steps_for(cfg, batches_per_epoch)
    scheduler = optim.build_scheduler(optimizer, cfg, total)
    models = acc.prepare(run.model.unet, *run.trained_encoders, optimizer)
    run.train_unet, run.train_encoders, optimizer = models[0], list(models[1:-1]), models[-1]
    state = checkpoints.TrainState(total_steps=total, config=cfg.to_dict())
    if checkpoint is not None:
        restore_weights(run, checkpoint)
        state, extra = checkpoints.load_checkpoint_state(checkpoint, optimizer=optimizer, scheduler=scheduler)
        by_rank = extra.get("rng_by_rank") or []
        if world > 1 and len(by_rank) == world:
            checkpoints.set_rng_state(by_rank[rank])  # the file's top-level RNG is rank 0's
        state.total_steps = total
        checkpoints.continue_at_same_example(state, cfg.batch_size)
        run.log(f"Resumed from {checkpoint} at step {state.global_step} (epoch {state.epoch + 1}, "
                f"lr {scheduler.get_last_lr()[0]:.3g})")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    log = run_log.RunLog(cfg.output_dir, resume_step=state.global_step) if run.main else None
    meter = run_log.ProgressMeter(total, start_step=state.global_step)
    run.log(f"Training {total} steps: {len(run.items)} images x {cfg.repeats} repeats, batch {cfg.batch_size}"
            f"{f' x {world} processes' if world > 1 else ''}, accumulation {cfg.gradient_accumulation_steps}")
    stopped = False
    last_checkpoint: Path | None = None
    running_loss = 0.0
    try:
        while state.global_step < total and not stopped:
            batches = sampler.batches_for_epoch(state.epoch)[rank::world]
            for index in range(state.step_in_epoch, len(batches)):
                with acc.accumulate(run.train_unet, *run.train_encoders):
                    loss = run.batch_loss(batches[index])
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.step_in_epoch = index + 1
                running_loss += loss.detach().float() / cfg.gradient_accumulation_steps
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                state.global_step += 1
                loss_value = float(acc.gather(running_loss.reshape(1)).mean()) if world > 1 else float(running_loss)
                running_loss = 0.0
                runtime.check_finite(loss_value, state.global_step, cfg)
                lr = scheduler.get_last_lr()[0]
                if run.main:
                    run_log.record_step(cfg, ctx, log, meter, state, loss_value, lr)
                stopped = _any_process(acc, ctx.should_stop())
                done = state.global_step >= total
                if run_log.checkpoint_due(cfg, state.global_step, done=done, stopped=stopped):
                    last_checkpoint = _checkpoint(run, state, optimizer, scheduler)
                if run_log.sample_due(cfg, state.global_step, done=done):
                    _samples(run, state.global_step)
                if stopped or done:
                    break
            else:
                state.epoch += 1
                state.step_in_epoch = 0
    finally:
        if log is not None:
            log.close()
    if stopped or (cfg.save_steps and state.global_step % cfg.save_steps == 0):
        last_checkpoint = _checkpoint(run, state, optimizer, scheduler)
    return _finish(run, state, stopped, last_checkpoint)


def _any_process(acc: Any, flag: bool) -> bool:
    """A stop pressed on the main process (the one with the console / GUI) reaches every process."""
    if acc.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(value, reduction="sum").item() > 0)


@contextlib.contextmanager
def keep_rng():
    """Saving and previews must not draw from the training RNG, or a resumed run would differ."""
    state = checkpoints.rng_state()
    try:
        yield
    finally:
        checkpoints.set_rng_state(state)


def _checkpoint(run: Any, state: checkpoints.TrainState, optimizer: Any, scheduler: Any) -> Path | None:
    folder = None
    ranks = None
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object  # noqa: PLC0415

        ranks = gather_object([checkpoints.rng_state()])  # in rank order
    if run.main:
        with keep_rng():
            folder = save_checkpoint(run, state, optimizer, scheduler, ranks)
        run.ctx.emit(CheckpointEvent(step=state.global_step, path=str(folder)))
    run.accelerator.wait_for_everyone()
    return folder


def _samples(run: Any, step: int) -> None:
    if run.main and run.cfg.sample_prompts:
        run.log(f"Making {len(run.cfg.sample_prompts)} preview(s) at step {step}")
        with keep_rng():
            paths = make_samples(run, step)
        run.ctx.emit(SampleEvent(step=step, images=paths))
    run.accelerator.wait_for_everyone()


def _finish(run: Any, state: checkpoints.TrainState, stopped: bool, checkpoint: Path | None) -> dict[str, str]:
    cfg = run.cfg
    outputs: dict[str, str] = {}
    if run.main:
        paths = write_loras(run, run.out, state.global_step, state.epoch + (0 if stopped else 1))
        outputs = {"output_dir": str(run.out), "lora": paths["kohya"], "diffusers": paths.get("diffusers", ""),
                   "config": str(run.out / "config.yaml"), "loss_csv": str(run.out / "loss.csv")}
        if checkpoint is not None:
            outputs["checkpoint"] = str(checkpoint)
    if cfg.sample_prompts and not stopped:
        _samples(run, state.global_step)
    run.accelerator.wait_for_everyone()
    if run.main:
        if stopped:
            message = (f"Stopped at step {state.global_step} of {state.total_steps}. LoRA saved to {outputs['lora']}; "
                       f"continue with resume_from: latest (checkpoint {checkpoint}).")
        else:
            message = f"Done: {state.global_step} steps. LoRA saved to {outputs['lora']}."
        run.ctx.emit(DoneEvent(outputs=outputs, stopped=stopped, message=message))
    return outputs
