"""Out of memory and NaN during training: the run stops with the settings to change, or
downshifts to the next smaller preset and finishes from its last checkpoint.

Faults are injected the way a real run meets them: through `core.train.runtime.check_finite`,
which the training loop calls each step. The unit tests drive the real loop (core.train.loop)
over a tiny Linear task; `test_recovery_e2e.py` does the same with the real text task.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import core.devices
from core.config import TrainConfig
from core.events import ProgressEvent, RunContext, WarningEvent
from core.job import Job
from core.train import checkpoints, recovery, runtime
from core.train.loop import run_task
from core.train.recovery import OutOfMemoryAdvice, is_out_of_memory, train_with_recovery
from tests.helpers import read_loss_csv

RTX_3060 = core.devices.DeviceInfo("cuda", "NVIDIA GeForce RTX 3060", 11.7, 11.3, bf16=True, bitsandbytes=True)


@pytest.fixture
def gpu_12gb(monkeypatch):
    """This machine looks like a 12 GB RTX 3060 (only the detection call is mocked)."""
    monkeypatch.setattr(core.devices, "detect_device", lambda index=0: RTX_3060)
    return RTX_3060


@dataclasses.dataclass
class LinearTask:
    """The smallest real task for the real training loop: a Linear learns y = 1 from noise."""

    cfg: TrainConfig
    ctx: RunContext
    out: Path
    model: torch.nn.Linear = dataclasses.field(default_factory=lambda: torch.nn.Linear(4, 1))
    main = True

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": self.cfg.learning_rate}]

    def prepare(self, optimizer):
        return optimizer

    def plan(self, total: int) -> str:
        return f"Training {total} steps"

    def epoch_batches(self, epoch: int) -> list[int]:
        return list(range(64))

    def train_step(self, group) -> float:
        total = 0.0
        for _ in group:
            loss = ((self.model(torch.randn(self.cfg.batch_size, 4)) - 1.0) ** 2).mean() / len(group)
            loss.backward()
            total += loss.item()
        return total

    def any_process(self, flag: bool) -> bool:
        return flag

    def _weights(self, folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(folder / "weights.safetensors"))

    def save_checkpoint(self, state, optimizer, scheduler) -> Path:
        return checkpoints.save_checkpoint(self.out, state, optimizer=optimizer, scheduler=scheduler,
                                       write_weights=self._weights)

    def restore(self, checkpoint: Path, optimizer, scheduler):
        self.model.load_state_dict(load_file(checkpoint / "weights.safetensors"))
        state, _ = checkpoints.load_checkpoint_state(checkpoint, optimizer=optimizer, scheduler=scheduler)
        return state

    def make_samples(self, step: int) -> None:
        pass

    def validate(self, step: int) -> None:
        return None

    def finish(self, state, result) -> dict[str, str]:
        self._weights(self.out)
        return {"weights": str(self.out / "weights.safetensors")}


def small_loop(record: list[tuple[int, int, int]]):
    """A training function on the real loop (core.train.loop): resume, check_finite, loss.csv, checkpoints."""

    def train(cfg: TrainConfig, ctx: RunContext) -> dict[str, str]:
        def count(event) -> None:  # (step, batch, accumulation) of every step that finished
            if isinstance(event, ProgressEvent):
                record.append((event.step, cfg.batch_size, cfg.gradient_accumulation_steps))

        out = checkpoints.prepare_output_dir(cfg)
        checkpoints.seed_everything(cfg.seed)
        checkpoint, _ = checkpoints.resolve_resume(cfg)
        ctx.listeners.append(count)
        try:
            return run_task(LinearTask(cfg, ctx, out), checkpoint, batches_per_epoch=64)
        finally:
            ctx.listeners.remove(count)

    return train


def inject(monkeypatch, at_step: int, error: BaseException | None = None, *, times: int = 1) -> list[int]:
    """Make check_finite raise `error` (default: CUDA OOM) at `at_step`, `times` times; NaN when error is None."""
    real = runtime.check_finite
    hits: list[int] = []

    def faulty(loss: float, step: int, cfg: TrainConfig) -> None:
        if step == at_step and len(hits) < times:
            hits.append(step)
            if error is None:
                return real(float("nan"), step, cfg)
            raise error
        return real(loss, step, cfg)

    monkeypatch.setattr(runtime, "check_finite", faulty)
    return hits


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 11.70 GiB total "
                                  "capacity; 9.80 GiB already allocated)")


def text_config(tmp_path: Path, **overrides) -> TrainConfig:
    """A text run on the llm-12gb preset (batch 2 x 4), 8 steps, a checkpoint every 2."""
    values = dict(task_type="text-generation", train_data_dir=str(tmp_path), output_dir=str(tmp_path / "out"),
                  preset="llm-12gb", batch_size=2, gradient_accumulation_steps=4, max_seq_length=1024,
                  gradient_checkpointing=True, mixed_precision="bf16", max_train_steps=8, save_steps=2,
                  learning_rate=1e-2)
    values.update(overrides)
    return TrainConfig(**values)


def events_of(ctx_events: list, kind: type) -> list:
    return [e for e in ctx_events if isinstance(e, kind)]


def test_out_of_memory_with_auto_downshift_resumes_from_the_last_checkpoint_with_the_next_smaller_preset(
        tmp_path, monkeypatch, gpu_12gb):
    record: list[tuple[int, int, int]] = []
    hits = inject(monkeypatch, at_step=5, error=oom())
    events: list = []
    cfg = text_config(tmp_path, auto_downshift=True)

    result = train_with_recovery(small_loop(record), cfg, RunContext(listeners=[events.append]))

    assert hits == [5]
    assert Path(result["weights"]).is_file()
    # Steps 1-4 ran at batch 2; the retry resumed after the checkpoint at step 4 with llm-8gb's batch 1,
    # accumulating 8 so the effective batch (and the schedule) stays 8.
    assert record == [(1, 2, 4), (2, 2, 4), (3, 2, 4), (4, 2, 4), (5, 1, 8), (6, 1, 8), (7, 1, 8), (8, 1, 8)]
    warning = next(e for e in events_of(events, WarningEvent) if "Out of memory" in e.message)
    assert "at step 5" in warning.message and "from the last checkpoint" in warning.message
    assert "batch_size 2 -> 1" in warning.message and "gradient_accumulation_steps 4 -> 8" in warning.message
    assert "llm-8gb" in warning.message
    # Nothing lost: loss.csv has every step exactly once, and config.yaml says what finished the run.
    steps = [r.step for r in read_loss_csv(tmp_path / "out")]
    assert steps == list(range(1, 9))
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "batch_size: 1" in saved and "preset: llm-8gb" in saved and "resume_from: latest" in saved


def test_out_of_memory_without_auto_downshift_stops_with_the_exact_settings_to_change(
        tmp_path, monkeypatch, gpu_12gb):
    record: list[tuple[int, int, int]] = []
    inject(monkeypatch, at_step=5, error=oom())

    with pytest.raises(OutOfMemoryAdvice) as caught:
        train_with_recovery(small_loop(record), text_config(tmp_path), RunContext())

    error = caught.value
    assert "at step 5" in str(error) and "RTX 3060" in str(error) and "step-000004" in str(error)
    assert "batch_size 2 -> 1, gradient_accumulation_steps 4 -> 8 (preset llm-8gb)" in error.advice
    assert "resume_from: latest" in error.advice and "auto_downshift: true" in error.advice
    assert error.changes["batch_size"] == 1
    assert checkpoints.latest_checkpoint(tmp_path / "out").name == "step-000004"  # what was done is kept


def test_out_of_memory_before_the_first_checkpoint_restarts_from_the_start_with_smaller_settings(
        tmp_path, monkeypatch, gpu_12gb):
    record: list[tuple[int, int, int]] = []
    inject(monkeypatch, at_step=1, error=RuntimeError("CUDA error: out of memory"))
    events: list = []

    train_with_recovery(small_loop(record), text_config(tmp_path, auto_downshift=True),
                        RunContext(listeners=[events.append]))

    assert [r[0] for r in record] == list(range(1, 9)) and {r[1] for r in record} == {1}
    warning = next(e for e in events_of(events, WarningEvent) if "Out of memory" in e.message)
    assert "before the first step finished" in warning.message and "from where it started" in warning.message


def test_repeated_out_of_memory_walks_down_every_smaller_preset_then_stops_with_advice(
        tmp_path, monkeypatch, gpu_12gb):
    inject(monkeypatch, at_step=3, error=oom(), times=100)
    events: list = []

    with pytest.raises(OutOfMemoryAdvice) as caught:
        train_with_recovery(small_loop([]), text_config(tmp_path, auto_downshift=True),
                            RunContext(listeners=[events.append]))

    downshifts = [e.message for e in events_of(events, WarningEvent) if "Out of memory" in e.message]
    assert "llm-8gb" in downshifts[0] and "llm-4gb" in downshifts[1]
    assert len(downshifts) <= recovery.MAX_DOWNSHIFTS
    assert caught.value.advice  # the last word still says what to change


def test_other_errors_pass_through_untouched(tmp_path, monkeypatch, gpu_12gb):
    inject(monkeypatch, at_step=2, error=ValueError("a broken caption file"))
    with pytest.raises(ValueError, match="broken caption"):
        train_with_recovery(small_loop([]), text_config(tmp_path, auto_downshift=True), RunContext())


@pytest.mark.parametrize("error, expected", [
    (torch.OutOfMemoryError("CUDA out of memory."), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 17 GB)"), True),
    (MemoryError(), True),
    (RuntimeError("expected scalar type Half but found Float"), False),
    (ValueError("out of range"), False),
])
def test_out_of_memory_is_recognised_in_its_cuda_mps_and_cpu_forms(error, expected):
    assert is_out_of_memory(error) is expected


def test_out_of_memory_wrapped_in_another_error_is_recognised():
    try:
        try:
            raise oom()
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("the training step failed") from inner
    except RuntimeError as outer:
        assert is_out_of_memory(outer)


def test_a_nan_loss_stops_the_job_with_an_error_event_that_says_what_to_change(tmp_path, monkeypatch, gpu_12gb):
    import core.train

    record: list[tuple[int, int, int]] = []
    inject(monkeypatch, at_step=3, error=None)  # the loss becomes NaN at step 3
    monkeypatch.setattr(core.train, "train_task", small_loop(record))
    job = Job()
    job.start(text_config(tmp_path, auto_downshift=True, mixed_precision="fp16"))
    snap = job.wait(60)

    assert snap.state == "failed"
    assert [r[0] for r in record] == [1, 2]  # nothing trained on the NaN
    assert snap.error is not None and snap.error.error_type == "NonFiniteLossError"
    assert "NaN" in snap.error.message and "step 3" in snap.error.message
    assert "Lower learning_rate" in snap.error.advice and "bf16" in snap.error.advice


def test_an_out_of_memory_job_ends_with_an_error_event_naming_the_smaller_settings(
        tmp_path, monkeypatch, gpu_12gb):
    import core.train

    inject(monkeypatch, at_step=2, error=oom())
    monkeypatch.setattr(core.train, "train_task", small_loop([]))
    job = Job()
    job.start(text_config(tmp_path))
    snap = job.wait(60)

    assert snap.state == "failed" and snap.error.error_type == "OutOfMemoryAdvice"
    assert "batch_size 2 -> 1" in snap.error.advice


def test_training_on_the_cpu_starts_with_a_clear_notice(tmp_path, monkeypatch):
    monkeypatch.setattr(core.devices, "detect_device",
                        lambda index=0: core.devices.DeviceInfo("cpu", "CPU", 16.0, 12.0))
    events: list = []
    train_with_recovery(small_loop([]), text_config(tmp_path, max_train_steps=2, preset="cpu"),
                        RunContext(listeners=[events.append]))
    notice = [e for e in events_of(events, WarningEvent) if "CPU" in e.message]
    assert notice and "slowly" in notice[0].message


def test_a_run_predicted_not_to_fit_is_warned_about_before_it_starts(tmp_path, monkeypatch):
    small_gpu = core.devices.DeviceInfo("cuda", "GTX 1650", 3.8, 3.4, bf16=False, bitsandbytes=False)
    monkeypatch.setattr(core.devices, "detect_device", lambda index=0: small_gpu)
    events: list = []
    cfg = text_config(tmp_path, max_train_steps=2, base_model="meta-llama/Llama-3.2-3B", preset="",
                      gradient_checkpointing=False)
    train_with_recovery(small_loop([]), cfg, RunContext(listeners=[events.append]))
    warning = next(e for e in events_of(events, WarningEvent) if "Predicted peak" in e.message)
    assert "GTX 1650" in warning.message and "probably run out of memory" in warning.message
    assert "gradient_checkpointing off -> on" in warning.advice or "smaller base model" in warning.advice


def test_downshift_keeps_the_lora_shape_and_optimizer_so_the_checkpoint_still_loads(gpu_12gb):
    from core import presets
    from core.model_info import detect_model

    cfg = dataclasses.replace(TrainConfig(), preset="sdxl-24gb", resolution=1024, batch_size=2,
                              gradient_accumulation_steps=2, lora_rank=32, optimizer="adamw",
                              mixed_precision="bf16", gradient_checkpointing=False)
    name, changes = presets.next_smaller_preset(cfg, detect_model("stabilityai/sdxl-base"), gpu_12gb)
    assert name == "sdxl-16gb"
    assert changes["gradient_checkpointing"] is True
    assert not {"lora_rank", "lora_alpha", "optimizer", "train_text_encoder"} & set(changes)
    assert changes.get("batch_size", 2) * changes.get("gradient_accumulation_steps", 2) == 4


def test_a_multi_gpu_run_never_downshifts_alone_but_stops_every_process_with_advice(
        tmp_path, monkeypatch, gpu_12gb):
    monkeypatch.setenv("WORLD_SIZE", "2")
    inject(monkeypatch, at_step=3, error=oom())
    with pytest.raises(OutOfMemoryAdvice) as caught:
        train_with_recovery(small_loop([]), text_config(tmp_path, auto_downshift=True), RunContext())
    assert "multi-GPU" in str(caught.value) and "start all processes again" in caught.value.advice
