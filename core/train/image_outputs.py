"""What an image run writes and reads back: checkpoints (and resume from them), previews,
and the final LoRA files in the diffusers and kohya/WebUI formats. The run itself is
`core.train.image.ImageRun`; the loop that calls these is `core.train.loop`.

In a sharded run (distributed: fsdp) the LoRA is gathered whole in every process before the
main one writes it, and every process runs the previews' forward passes (core.train.sharding).
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.atomic import save_file_atomic
from core.devices import free_memory, torch_dtype
from core.events import CheckpointEvent, DoneEvent, SampleEvent
from core.family_api.contract import Adapted, RunFacts
from core.sample import move
from core.train import checkpoints, distributed, sharding
from core.lora import load_peft_state, peft_state
from core.train.loop import LoopResult, keep_rng

if TYPE_CHECKING:
    from core.train.image import ImageRun


def _facts(run: ImageRun, steps: int, epoch: int) -> RunFacts:
    from core.data.buckets import bucket_info

    return RunFacts(base_model_name=Path(run.cfg.base_model).name, num_images=len(run.items),
                    tag_frequency=run.dataset.tag_frequency(),
                    bucket_info=bucket_info([(i.width, i.height) for i in run.items], run.buckets),
                    steps=steps, epochs=epoch, started_at=run.started_at, session_id=run.session_id)


def _unwrapped(run: ImageRun) -> Adapted:
    """The run's adapted modules as they are under accelerate's wrappers."""
    acc = run.accelerator
    modules = [acc.unwrap_model(m) for m in (run.train_network, *run.train_encoders)]
    return dataclasses.replace(run.adapted, modules=modules)


def peft_file(name: str) -> str:
    """The checkpoint file of one adapted module's exact PEFT weights (for a bit-exact resume)."""
    return f"{name}_peft.safetensors"


def write_loras(run: ImageRun, folder: Path, steps: int, epoch: int) -> dict[str, str]:
    return run.family.write_loras(folder, run.cfg, run.model, _unwrapped(run), _facts(run, steps, epoch),
                                  torch_dtype(run.cfg.save_precision))


def save_checkpoint(run: ImageRun, state: checkpoints.TrainState, optimizer: Any, scheduler: Any,
                    rng_by_rank: list[dict] | None = None) -> Path:
    """A checkpoint folder: exact PEFT weights for resume, both LoRA formats, optimizer/scheduler/RNG.

    `rng_by_rank`: every process's RNG state in a multi-process run (each draws its own noise).
    """
    def write_weights(folder: Path) -> None:
        adapted = _unwrapped(run)
        for module, name in zip(adapted.modules, adapted.names):
            save_file_atomic(peft_state(module), folder / peft_file(name))
        write_loras(run, folder, state.global_step, state.epoch)

    return checkpoints.save_checkpoint(run.cfg.output_dir, state, optimizer=optimizer, scheduler=scheduler,
                                   write_weights=write_weights, keep=run.cfg.keep_checkpoints,
                                   extra={"rng_by_rank": rng_by_rank} if rng_by_rank else None)


def restore_weights(run: ImageRun, folder: Path) -> None:
    from safetensors.torch import load_file

    adapted = _unwrapped(run)
    for index, (module, name) in enumerate(zip(adapted.modules, adapted.names)):
        path = folder / peft_file(name)
        if index > 0 and not path.is_file():
            raise ValueError(f"{folder} has no {name} LoRA ({path.name}); it was saved by a run that trained fewer "
                             "modules (train_text_encoder off, or one expert of a two-expert model). Resume with the "
                             "same settings.")
        if not path.is_file():
            raise ValueError(f"{folder} has no {name} LoRA ({path.name}); it was saved for another model family.")
        load_peft_state(module, load_file(str(path)), name)


def _whole_lora(run: ImageRun) -> Any:
    """In a sharded run: the LoRA gathered whole in every process (a collective); else nothing to do."""
    if sharding.is_sharded(run.accelerator):
        return sharding.whole_lora(run.train_network)
    return contextlib.nullcontext()


def make_samples(run: ImageRun, step: int, save: bool = True) -> list[str]:
    """Previews with the network being trained; the VAE (and parked encoders) visit the device only meanwhile.

    `save`: write the images (a sharded run's other processes only take part in the forward passes)."""
    from core.sample import save_image

    network = run.accelerator.unwrap_model(run.train_network)
    if run.cfg.sample_base:
        return _sample_base_previews(run, step, save)
    move(run.model.vae, run.device, torch.float32)
    was_training = network.training
    network.eval()
    without_adapter = run.training_adapter.left_out() if run.training_adapter else contextlib.nullcontext()
    try:
        with without_adapter:  # previews show the distilled use: the training adapter is not part of it
            images = run.family.previews(run.model, network, run.cfg, run.device, run.weight_dtype, run.text_cache)
        paths = [str(save_image(img, run.out / "samples" / f"step-{step:06d}-{i}.png"))
                 for i, img in enumerate(images)] if save else []
    finally:
        network.train(was_training)
        if run.latents is not None:
            move(run.model.vae, "cpu")
        free_memory()
    return paths


def sample_model_regime(cfg: Any) -> tuple[int, float]:
    """(steps, guidance) of previews on `sample_base`: the sample model's own (its registry row: Turbo's few steps
    without CFG) where the config leaves them at their defaults, the config's where it sets them."""
    from core.config import TrainConfig
    from core.family_api.lookup import transformer_family_of
    from core.family_api.registry import FAMILIES

    try:
        info = FAMILIES.get(transformer_family_of(cfg.sample_base) or "")
    except Exception:  # noqa: BLE001 - a model it cannot name keeps the config's settings
        info = None
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    steps, guidance = cfg.sample_num_inference_steps, cfg.sample_guidance_scale
    if info is not None and info.preview_steps and steps == defaults["sample_num_inference_steps"]:
        steps = info.preview_steps
    if info is not None and info.preview_guidance >= 0 and guidance == defaults["sample_guidance_scale"]:
        guidance = info.preview_guidance
    return steps, guidance


def _sample_base_previews(run: ImageRun, step: int, save: bool) -> list[str]:
    """Previews on `sample_base` (e.g. the Turbo model while the base trains): the LoRA as it is now,
    written to a scratch folder and applied by the Test tab's code (core.sample), at the sample model's
    own steps and guidance; the training adapter is never part of it."""
    import tempfile

    from core.sample import generate_images, save_image

    cfg = run.cfg
    with tempfile.TemporaryDirectory(prefix="sample_base_") as scratch:
        files = write_loras(run, Path(scratch), step, 0)
        steps, guidance = sample_model_regime(cfg)
        images = generate_images(cfg.sample_base, files["kohya"], cfg.sample_prompts, weight=1.0,
                                 seed=cfg.sample_seed, steps=steps,
                                 guidance=guidance, negative_prompt=cfg.sample_negative_prompt,
                                 # a single-file sample model (ComfyUI's Turbo beside Raw) reads the run's configs
                                 model_config=cfg.base_model_config,
                                 width=cfg.resolution, height=cfg.resolution, device=run.device)
    return [str(save_image(img, run.out / "samples" / f"step-{step:06d}-{i}.png"))
            for i, img in enumerate(images)] if save else []


def checkpoint(run: ImageRun, state: checkpoints.TrainState, optimizer: Any, scheduler: Any) -> Path | None:
    """Every process's RNG goes in; the main process writes the folder and sends its event."""
    folder = None
    ranks = distributed.gather_rng(run.accelerator)
    if sharding.is_sharded(run.accelerator):
        optimizer = sharding.FullOptimizerState.gather(run.train_network, optimizer)
    with _whole_lora(run):
        if run.main:
            folder = save_checkpoint(run, state, optimizer, scheduler, ranks)
            run.ctx.emit(CheckpointEvent(step=state.global_step, path=str(folder)))
    run.accelerator.wait_for_everyone()
    return folder


def restore(run: ImageRun, folder: Path, optimizer: Any, scheduler: Any) -> checkpoints.TrainState:
    """The LoRA weights, optimizer, scheduler and this process's RNG from a checkpoint.

    A sharded run reads the whole LoRA in every process and keeps its own shard; its optimizer
    state is whole and name-keyed, so it loads on another process count (the epoch position is
    carried over in global batches)."""
    acc = run.accelerator
    sharded = sharding.is_sharded(acc)
    with sharding.loading_into_shards(run.train_network) if sharded else contextlib.nullcontext():
        restore_weights(run, folder)
    optimizer = sharding.FullOptimizerState(acc.unwrap_model(run.train_network), optimizer, sharded=sharded)
    state, extra = checkpoints.load_checkpoint_state(folder, optimizer=optimizer, scheduler=scheduler)
    distributed.restore_rng(acc, extra.get("rng_by_rank"))
    state.step_in_epoch = sharding.continue_on_processes(state.step_in_epoch, sharding.processes_in(extra),
                                                         acc.num_processes)
    return state


def samples(run: ImageRun, step: int) -> None:
    if run.main:
        run.log(f"Making {len(run.cfg.sample_prompts)} preview(s) at step {step}")
        run.ctx.emit(SampleEvent(step=step, images=make_samples(run, step)))
    elif sharding.is_sharded(run.accelerator):
        make_samples(run, step, save=False)  # the sharded network runs only with every process
    run.accelerator.wait_for_everyone()


def finish(run: ImageRun, state: checkpoints.TrainState, result: LoopResult) -> dict[str, str]:
    """The final LoRA files, the last previews and the DoneEvent."""
    cfg = run.cfg
    stopped, checkpoint = result.stopped, result.checkpoint
    outputs: dict[str, str] = {}
    with _whole_lora(run):
        paths = write_loras(run, run.out, state.global_step, state.epoch + (0 if stopped else 1)) if run.main else {}
    if run.main:
        outputs = {"output_dir": str(run.out), "lora": paths["kohya"], "diffusers": paths.get("diffusers", ""),
                   "config": str(run.out / "config.yaml"), "loss_csv": str(run.out / "loss.csv")}
        # A family's further files (a Wan 2.2 A14B run of both experts: the low-noise pair), under their own keys.
        outputs.update({k: v for k, v in paths.items() if k not in ("kohya", "diffusers")})
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
