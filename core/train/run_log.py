"""What a run reports as it goes: loss.csv + TensorBoard, the progress meter (smoothed
loss, ETA, peak memory) and when the next checkpoint or preview is due.
"""
from __future__ import annotations

import time
from pathlib import Path

from core.atomic import atomic_write_text
from core.config import TrainConfig
from core.devices import peak_vram_gb
from core.events import ProgressEvent, RunContext
from core.train.checkpoints import TrainState


LOSS_CSV_HEADER = "step,loss,lr,val_loss"


class RunLog:
    """loss.csv (step, loss, lr, val_loss) and TensorBoard scalars under output_dir/logs.

    loss.csv is append-only; on resume the rows after the resumed step are dropped so
    the curve has no duplicates. `val_loss` is empty on the steps without a validation.
    """

    def __init__(self, output_dir: str | Path, resume_step: int = 0):
        self.csv_path = Path(output_dir) / "loss.csv"
        kept = [LOSS_CSV_HEADER + "\n"]
        if resume_step > 0 and self.csv_path.is_file():
            for line in self.csv_path.read_text(encoding="utf-8").splitlines()[1:]:
                head = line.split(",", 1)[0]
                if head.isdigit() and int(head) <= resume_step:
                    # A run started by an older version wrote three columns: pad them.
                    kept.append(line + ("," if line.count(",") == 2 else "") + "\n")
        atomic_write_text(self.csv_path, "".join(kept))
        self._csv = open(self.csv_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "logs"), purge_step=resume_step or None)
        except Exception:  # noqa: BLE001 - TensorBoard is optional for the run itself
            self._tb = None

    def log(self, step: int, loss: float, lr: float, extra: dict[str, float] | None = None,
            validation: float | None = None) -> None:
        self._csv.write(f"{step},{loss:.6g},{lr:.6g},{'' if validation is None else f'{validation:.6g}'}\n")
        self._csv.flush()
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, step)
            self._tb.add_scalar("train/lr", lr, step)
            if validation is not None:
                self._tb.add_scalar("val/loss", validation, step)
            for key, value in (extra or {}).items():
                self._tb.add_scalar(key, value, step)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._csv.close()
        if self._tb is not None:
            self._tb.close()


class ProgressMeter:
    """Smoothed loss, seconds per step and ETA, turned into ProgressEvents."""

    def __init__(self, total: int, start_step: int = 0, beta: float = 0.9):
        self.total = total
        self.beta = beta
        self.smoothed: float | None = None
        self._count = 0
        self._times: list[float] = []
        self._last = time.perf_counter()
        self.start_step = start_step

    def update(self, step: int, epoch: int, loss: float, lr: float,
               validation: float | None = None) -> ProgressEvent:
        now = time.perf_counter()
        self._times.append(now - self._last)
        self._times = self._times[-20:]
        self._last = now
        self._count += 1
        # Bias-corrected EMA so the first values are not pulled towards 0.
        self.smoothed = loss if self.smoothed is None else self.beta * self.smoothed + (1 - self.beta) * loss
        # The first step carries warm-up costs; leave it out of the rate once there are others.
        times = self._times[1:] if len(self._times) > 2 else self._times
        per_step = sum(times) / len(times)
        return ProgressEvent(step=step, total=self.total, epoch=epoch, loss=loss,
                             smoothed_loss=self.smoothed, lr=lr, seconds_per_step=per_step,
                             eta_seconds=per_step * max(0, self.total - step), vram_gb=peak_vram_gb(),
                             validation_loss=validation)


def record_step(cfg: TrainConfig, ctx: RunContext, log: RunLog, meter: ProgressMeter, state: TrainState,
                loss: float, lr: float, extra: dict[str, float] | None = None, *,
                validation: float | None = None) -> None:
    """After an optimizer step: loss.csv / TensorBoard every `logging_steps` (and on every step with a
    validation loss; the task's `extra` TensorBoard scalars too), and a ProgressEvent."""
    if state.global_step % cfg.logging_steps == 0 or validation is not None:
        log.log(state.global_step, loss, lr, extra, validation)
    event = meter.update(state.global_step, state.epoch + 1, loss, lr, validation)
    if extra:
        event.scalars = dict(extra)  # the live plot draws GRPO's mean reward beside the loss
    ctx.emit(event)


def checkpoint_due(cfg: TrainConfig, step: int, *, done: bool, stopped: bool) -> bool:
    """A periodic checkpoint; the last step and a stop save theirs after the loop."""
    return bool(cfg.save_steps) and step % cfg.save_steps == 0 and not done and not stopped


def sample_due(cfg: TrainConfig, step: int, *, done: bool) -> bool:
    """Previews every `sample_steps`; the end makes its own."""
    return bool(cfg.sample_prompts) and cfg.sample_steps > 0 and step % cfg.sample_steps == 0 and not done

