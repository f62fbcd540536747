"""One training loop for every task: image LoRAs of every model family, and text LoRAs.

The loop owns the flow that every run shares: the optimizer and schedule, resume from a
checkpoint at the same example, epochs of batches, gradient accumulation as groups of
micro-batches, the NaN check, loss.csv and progress events, stop (finish the step, save,
end), periodic checkpoints and previews, validation, and the final files. A task says
only what is its own, through `TrainTask`: its batches, one optimizer step's forward and
backward, its weights in a checkpoint, its previews and its outputs (the split OneTrainer
makes between its GenericTrainer and a model setup's predict / loss).

Faults are injected in tests through `runtime.check_finite`, which this loop calls through
the module on every step.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from collections.abc import Sequence

import torch

from core.config import TrainConfig
from core.events import RunContext
from core.train import checkpoints, ema as ema_mod, optim, run_log, runtime


class TrainTask(Protocol):
    """What a task gives the loop. `main` is the process that writes files and sends events."""

    cfg: TrainConfig
    ctx: RunContext
    out: Path

    @property
    def main(self) -> bool: ...

    def param_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters with their learning rates."""

    def prepare(self, optimizer: Any) -> Any:
        """Wrap models and optimizer for the devices (accelerate); returns the optimizer to step."""

    def plan(self, total: int) -> str:
        """One line on what the run will do (steps, batch, accumulation...)."""

    def epoch_batches(self, epoch: int) -> Sequence[Any]:
        """This process's micro-batches of `epoch`, in order (the same for the same seed and epoch)."""

    def train_step(self, group: Sequence[Any]) -> float:
        """Forward and backward of one optimizer step's micro-batches, gradients clipped.

        Returns the step's loss, averaged over every process.
        """

    def any_process(self, flag: bool) -> bool:
        """True when `flag` is true on any process (a stop pressed on the main one reaches all)."""

    def save_checkpoint(self, state: checkpoints.TrainState, optimizer: Any, scheduler: Any) -> Path | None:
        """Write a checkpoint (on the main process) and send its event; None on the others."""

    def restore(self, checkpoint: Path, optimizer: Any, scheduler: Any) -> checkpoints.TrainState:
        """Load a checkpoint's weights, optimizer, scheduler and RNG; returns its counters."""

    def make_samples(self, step: int) -> None:
        """Previews at `step` (the task sends the SampleEvent)."""

    def validate(self, step: int) -> float | None:
        """The validation loss at `step`, or None when the task has no validation data."""

    def finish(self, state: checkpoints.TrainState, result: LoopResult) -> dict[str, str]:
        """Write the final files, send DoneEvent; returns the output paths."""


@dataclass
class LoopResult:
    """How the loop ended: what `finish` needs beyond the counters."""

    stopped: bool
    checkpoint: Path | None
    validation_loss: float | None
    train_seconds: float


@contextlib.contextmanager
def keep_rng():
    """Saving, previews and validation must not draw from the training RNG, or a resumed run would differ."""
    state = checkpoints.rng_state()
    try:
        yield
    finally:
        checkpoints.set_rng_state(state)


def run_task(task: TrainTask, checkpoint: Path | None, batches_per_epoch: int) -> dict[str, str]:
    """Train `task` to the end (or to a stop); resume from `checkpoint` when given."""
    cfg, ctx = task.cfg, task.ctx
    optimizer = optim.build_optimizer(task.param_groups(), cfg, ctx if task.main else None)
    total, _ = optim.total_steps_for(cfg, batches_per_epoch)
    scheduler = optim.build_scheduler(optimizer, cfg, total)
    optimizer = task.prepare(optimizer)
    ema = ema_mod.maybe_ema(cfg, optimizer.param_groups)
    state = checkpoints.TrainState(total_steps=total, config=cfg.to_dict())
    if checkpoint is not None:
        state = task.restore(checkpoint, optimizer, scheduler)
        _restore_ema(task, ema, state)
        state.total_steps = total
        checkpoints.continue_at_same_example(state, cfg.batch_size)
        if task.main:
            ctx.log(f"Resumed from {checkpoint} at step {state.global_step} (epoch {state.epoch + 1}, "
                    f"lr {scheduler.get_last_lr()[0]:.3g})")
    if task.main:
        ctx.log(task.plan(total))
    result = _steps(task, state, optimizer, scheduler, ema)
    if ema is not None and cfg.ema_save_raw and callable(getattr(task, "write_weights_to", None)):
        with keep_rng():
            task.write_weights_to(task.out / "raw", state)  # the raw weights, before the EMA ones are put in
    with ema_mod.applied(ema):
        return task.finish(state, result)


def _restore_ema(task: TrainTask, ema: ema_mod.AdapterEMA | None, state: checkpoints.TrainState) -> None:
    """A checkpoint's files hold the EMA weights: its raw ones and the shadow come from ema.safetensors."""
    if ema is None:
        return
    if state.ema is None:
        if task.main:
            task.ctx.log("The checkpoint has no EMA (saved with ema off): the average starts from its weights.")
        ema.reset()
    else:
        ema.restore(state.ema)
    state.ema = None


def _steps(task: TrainTask, state: checkpoints.TrainState, optimizer: Any, scheduler: Any,
           ema: ema_mod.AdapterEMA | None = None) -> LoopResult:
    cfg, ctx = task.cfg, task.ctx
    total = state.total_steps
    accumulation = max(1, cfg.gradient_accumulation_steps)
    log = run_log.RunLog(cfg.output_dir, resume_step=state.global_step) if task.main else None
    meter = run_log.ProgressMeter(total, start_step=state.global_step)
    stopped = False
    checkpoint: Path | None = None
    seconds = 0.0
    validation: float | None = None
    try:
        while state.global_step < total and not stopped:
            batches = task.epoch_batches(state.epoch)
            while state.step_in_epoch < len(batches):
                started = time.perf_counter()
                group = batches[state.step_in_epoch:state.step_in_epoch + accumulation]
                loss = task.train_step(group)
                state.step_in_epoch += len(group)
                runtime.check_finite(loss, state.global_step + 1, cfg)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update()
                state.global_step += 1
                seconds += time.perf_counter() - started
                done = state.global_step >= total
                measured = None
                if _validation_due(cfg, state.global_step, epoch_done=state.step_in_epoch >= len(batches),
                                   last=done):
                    measured = validation = _validate(task, state.global_step)
                if task.main:
                    run_log.record_step(cfg, ctx, log, meter, state, loss, scheduler.get_last_lr()[0],
                                        _step_scalars(task), validation=measured)
                # After the step's event: a stop pressed while it was reported ends the run here.
                stopped = task.any_process(ctx.should_stop())
                if run_log.checkpoint_due(cfg, state.global_step, done=done, stopped=stopped):
                    checkpoint = _checkpoint(task, state, optimizer, scheduler, ema)
                if run_log.sample_due(cfg, state.global_step, done=done):
                    with ema_mod.applied(ema):
                        _samples(task, state.global_step)
                if _evaluation_due(task, state.global_step, done=done or stopped):
                    # Measured on what the files hold: the EMA weights when the run keeps an average.
                    with keep_rng(), torch.no_grad(), ema_mod.applied(ema):
                        task.evaluate(state.global_step)  # type: ignore[attr-defined]
                if stopped or done:
                    break
            else:
                state.epoch += 1
                state.step_in_epoch = 0
    finally:
        if log is not None:
            log.close()
    if stopped or (cfg.save_steps and state.global_step % cfg.save_steps == 0):
        checkpoint = _checkpoint(task, state, optimizer, scheduler, ema)
    return LoopResult(stopped=stopped, checkpoint=checkpoint, validation_loss=validation, train_seconds=seconds)


def _validation_due(cfg: TrainConfig, step: int, *, epoch_done: bool, last: bool) -> bool:
    """Every `validation_steps` when set, else at each epoch's end; always at the last step (a stop
    ends without one: it should be quick, and the last measured value stands)."""
    if last:
        return True
    return step % cfg.validation_steps == 0 if cfg.validation_steps > 0 else epoch_done


def _evaluation_due(task: TrainTask, step: int, *, done: bool) -> bool:
    # Optional: a text task scores its LoRA every `eval_steps` (core.text_eval); the last step's
    # score is the task's own, written with its final files.
    every = getattr(task.cfg, "eval_steps", 0)
    return bool(every) and not done and step % every == 0 and callable(getattr(task, "evaluate", None))


def _step_scalars(task: TrainTask) -> dict[str, float] | None:
    # Optional: a task may report more than its loss for TensorBoard (preference tuning's margins);
    # loss.csv keeps its step,loss,lr,val_loss columns.
    scalars = getattr(task, "step_scalars", None)
    return scalars() if callable(scalars) else None


def _checkpoint(task: TrainTask, state: checkpoints.TrainState, optimizer: Any, scheduler: Any,
                ema: ema_mod.AdapterEMA | None = None) -> Path | None:
    with keep_rng():
        if ema is None:
            return task.save_checkpoint(state, optimizer, scheduler)
        # The checkpoint's files hold the EMA weights; the raw ones (to resume from) go in ema.safetensors.
        state.ema = ema.state()
        try:
            with ema.applied():
                return task.save_checkpoint(state, optimizer, scheduler)
        finally:
            state.ema = None


def _samples(task: TrainTask, step: int) -> None:
    if task.cfg.sample_prompts:
        with keep_rng():
            task.make_samples(step)


def _validate(task: TrainTask, step: int) -> float | None:
    """The task's validation loss (None: it has none); logged to loss.csv with the step by the caller."""
    with keep_rng(), torch.no_grad():
        loss = task.validate(step)
    if loss is not None and task.main:
        task.ctx.log(f"Validation loss at step {step}: {loss:.4f}")
    return loss
