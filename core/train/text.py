"""Text LoRA training: an LLM (HF folder, hub id or GGUF) learns from dialogues or text.

load the model (GGUF dequantized, or in 4 bits with base_quantization: nf4) -> read and
tokenize the data (chat template, loss on the answers only) -> add LoRA through PEFT -> the
one training loop over packed batches (no Trainer: it refuses GGUF-loaded models, and packing
needs no padding) -> checkpoints, previews (answers with the adapter on and off), validation
loss -> the PEFT adapter folder and, on request, a merged model.

Several processes (accelerate launch / torchrun) train one run with Accelerate DDP, as image
runs do (core.train.distributed): each takes every world-th batch of the same global epoch
order, gradients sync on a step's last micro-batch, and each process divides its summed token
losses by (labelled tokens over all processes / processes), so DDP's gradient average is the
token-weighted mean over the global batch. The main process alone writes files, makes
previews and computes the validation loss (every process holds the same weights).

`ctx.should_stop()` is checked after every step: the run then saves a checkpoint and the
adapter and ends with DoneEvent(stopped=True).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from core.atomic import atomic_write_text
from core.config import TrainConfig
from core.data import text as text_data
from core.data.chat_templates import apply_template
from core.devices import pick_device
from core.model_info import format_count
from core.events import CheckpointEvent, DoneEvent, RunContext, SampleEvent
from core.export import peft_text
from core.models.llm import load_llm, weight_dtype
from core.models.llm_quant import prepare_nf4_model
from core.train import checkpoints, distributed, optim, runtime, sharding
from core.train.loop import LoopResult, keep_rng, run_task
from core.train.text_batches import MAX_PACKED_TOKENS, TextBatch, epoch_batches, make_batch
from core.train.text_step import AnswerModel, batch_loss_sum, validation_loss


@dataclass
class TextData:
    train: list[text_data.TokenizedExample]
    validation: list[text_data.TokenizedExample] = field(default_factory=list)

    def describe(self) -> str:
        tokens = sum(len(e) for e in self.train)
        trained = sum(e.trained_tokens for e in self.train)
        return (f"{len(self.train)} training examples ({tokens} tokens, {trained} with loss)"
                + (f", {len(self.validation)} for validation" if self.validation else ""))


def _precision(cfg: TrainConfig, device: torch.device, ctx: RunContext) -> str:
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        ctx.warn("fp16 needs a CUDA GPU; training in fp32 on the CPU.", "Use mixed_precision: no or bf16.")
        return "no"
    return cfg.mixed_precision


def prepare_data(cfg: TrainConfig, tokenizer: Any, ctx: RunContext) -> TextData:
    """Read, split and tokenize the data; warn about cut examples."""
    examples = text_data.load_examples(cfg.train_data_dir)
    if cfg.validation_file:
        train, held = examples, text_data.load_examples(cfg.validation_file)
    else:
        train, held = text_data.split_validation(examples, cfg.validation_split, cfg.seed)
    train_set = text_data.tokenize_examples(tokenizer, train, cfg.max_seq_length)
    val_set = text_data.tokenize_examples(tokenizer, held, cfg.max_seq_length)
    warn_cut(cfg, ctx, train_set.truncated + val_set.truncated, train_set.dropped + val_set.dropped)
    if not train_set.examples:
        raise text_data.TextDataError(f"{cfg.train_data_dir}: no usable training examples remain.")
    return TextData(train_set.examples, val_set.examples)


def warn_cut(cfg: TrainConfig, ctx: RunContext, cut: list[str], dropped: list[str]) -> None:
    """Warn about examples cut at max_seq_length and those skipped for having no answer left."""
    if cut:
        ctx.warn(f"{len(cut)} example(s) are longer than max_seq_length ({cfg.max_seq_length} tokens) and were "
                 f"cut: {text_data.describe_sources(cut)}.",
                 "Raise max_seq_length (more memory) or shorten these examples.")
    if dropped:
        ctx.warn(f"{len(dropped)} example(s) have no answer left after cutting and are skipped: "
                 f"{text_data.describe_sources(dropped)}.", "Raise max_seq_length or shorten their prompts.")


def add_lora(model: Any, cfg: TrainConfig) -> Any:
    """Wrap `model` with a PEFT LoRA (attention + MLP projections unless target_modules says)."""
    from peft import get_peft_model

    from core.lora import LLM_MODULES, make_lora_config

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in LLM_MODULES if m in names] or ["all-linear"]
    lora_config = make_lora_config(cfg, targets, task_type="CAUSAL_LM")
    if targets == ["all-linear"] and not cfg.target_modules:
        lora_config.target_modules = "all-linear"
    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial adapter (also on resume)
    return get_peft_model(model, lora_config)


def load_adapter_weights(peft_model: Any, source: Path) -> None:
    """Load LoRA weights from an adapter folder or its .safetensors file into `peft_model`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = source / "adapter_model.safetensors" if source.is_dir() else source
    if not file.is_file():
        raise ValueError(f"{source}: no adapter_model.safetensors here. Point at a text LoRA adapter folder.")
    result = set_peft_model_state_dict(peft_model, load_file(str(file)))
    unexpected = getattr(result, "unexpected_keys", []) or []
    lora_unexpected = [k for k in unexpected if "lora_" in k]
    if lora_unexpected:
        raise ValueError(f"{file.name} does not fit this model ({len(lora_unexpected)} weights have no place, "
                         f"e.g. {lora_unexpected[0]}). Was it trained on another base model or rank?")


@dataclass
class TextRun:
    """A text LoRA run: everything built once, and the task the training loop drives."""

    cfg: TrainConfig
    ctx: RunContext
    out: Path
    device: torch.device
    precision: str
    model: Any  # the PeftModel
    tokenizer: Any
    data: TextData
    base_model_display: str
    pissa_init: Path | None = None
    accelerator: Any = None  # None: one process, no accelerate (what direct callers and old tests build)
    base_answers: list[str] | None = None
    tokens_trained: int = 0  # over every process
    params: list[torch.nn.Parameter] = field(default_factory=list)
    trained: Any = None  # the AnswerModel as accelerate prepared it (DDP-wrapped in several processes)
    evaluation: Any = None  # core.text_eval.suite.EvalSuite when eval_file / eval_tasks are set

    @property
    def main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def causal_lm(self) -> Any:
        # self.model is the unwrapped PeftModel (accelerate wraps the AnswerModel around it).
        return self.model.get_base_model()

    def shard(self, batches: list[Any]) -> list[Any]:
        """This process's share of the epoch's batches (core.train.distributed.shard)."""
        return batches if self.accelerator is None else distributed.shard(self.accelerator, batches)

    def batches(self, epoch: int) -> list[TextBatch]:
        lengths = [len(e) for e in self.data.train]
        longest = max(lengths) * self.cfg.batch_size
        grouped = lengths if longest > MAX_PACKED_TOKENS else None
        order = self.shard(epoch_batches(len(lengths), self.cfg.batch_size, self.cfg.seed, epoch, grouped))
        pad_id = self.tokenizer.pad_token_id or 0
        return [make_batch([self.data.train[i] for i in indices], pad_id) for indices in order]

    def validation_batches(self) -> list[TextBatch]:
        pad_id = self.tokenizer.pad_token_id or 0
        items = self.data.validation
        size = self.cfg.batch_size
        return [make_batch(items[i:i + size], pad_id) for i in range(0, len(items), size)]

    # --- the training loop's task (core.train.loop.TrainTask) ---------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        return optim.lora_param_groups(self.model.named_parameters(), self.cfg.learning_rate,
                                         self.cfg.loraplus_lr_ratio)

    def prepare(self, optimizer: Any) -> Any:
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.model.train()
        self.trained = self.loss_module()
        if sharding.is_sharded(self.accelerator):  # distributed: fsdp: the base split over the processes
            self.trained, optimizer = sharding.prepare(self.accelerator, self.trained, optimizer)
            self.params = [p for group in optimizer.param_groups for p in group["params"]]
        elif self.accelerator is not None:
            # Every process loads the same frozen base from the same file: DDP needs to broadcast
            # and sync only the LoRA weights (not gigabytes of base, nor 4-bit ones it cannot copy).
            frozen = [name for name, p in self.trained.named_parameters() if not p.requires_grad]
            frozen += [name for name, _ in self.trained.named_buffers()]
            # (torch's own static helper for this; DDP reads the list when accelerate wraps the model)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.trained, frozen)  # noqa: SLF001
            # The model is already on this process's device; the optimizer is the loop's own.
            self.trained = self.accelerator.prepare(self.trained, device_placement=[False])
        return optimizer

    def plan(self, total: int) -> str:
        cfg, world = self.cfg, self.world
        return (f"Training {total} steps: batch {cfg.batch_size}{f' x {world} processes' if world > 1 else ''}, "
                f"accumulation {cfg.gradient_accumulation_steps}, lr {cfg.learning_rate:g}, on {self.device.type}")

    epoch_batches = batches

    def step_divisor(self, group_weight: float) -> float:
        """The divisor of a step's summed losses that makes its gradient the mean over every process's items.

        Each process sums its own token (or comparison) losses; DDP then averages the gradients
        over the processes. Dividing by (items over all processes / processes) makes that average
        the token-weighted mean over the whole global batch, exactly what one process training on
        all of it would get. In one process it is the group's own count, as before.
        """
        if self.world == 1:
            return max(1, group_weight)
        total = distributed.sum_over_processes(self.accelerator, [group_weight])[0]
        return max(1.0, total) / self.world

    def step_loss(self, loss_sum: float, tokens: int, divisor: float, *extra: float) -> tuple[float, list[float]]:
        """(the step's loss over every process, `extra` summed over every process); counts the tokens trained.

        The loss is the global batch's token-weighted mean (divisor x processes = all labelled items).
        """
        if self.world == 1:
            self.tokens_trained += tokens
            return loss_sum / divisor, list(extra)
        loss_sum, tokens_all, *summed = distributed.sum_over_processes(self.accelerator, [loss_sum, tokens, *extra])
        self.tokens_trained += int(tokens_all)
        return loss_sum / (divisor * self.world), summed

    def train_step(self, group: Sequence[TextBatch]) -> float:
        """Each micro-batch's summed token loss, over the tokens with loss in the whole group (all processes)."""
        divisor = self.step_divisor(sum(b.trained_tokens for b in group))
        loss_total = 0.0
        tokens = 0
        for index, batch in enumerate(group):
            with distributed.sync_on_last(self.accelerator, [self.trained], index, len(group)):
                loss = self.batch_loss(batch)
                (loss / divisor).backward()
            loss_total += float(loss.detach())
            tokens += batch.tokens
        if self.cfg.max_grad_norm > 0 and self.sharded:
            self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)  # the norm over every shard
        elif self.cfg.max_grad_norm > 0:
            # After the sync every process holds the same gradients, so each clips the same way.
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        return self.step_loss(loss_total, tokens, divisor)[0]

    def loss_module(self) -> torch.nn.Module:
        """The module that accelerate / DDP wraps: its forward gives what `batch_loss` reduces."""
        return AnswerModel(self.model, self.device, self.precision)

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """The summed token loss of one micro-batch through `self.trained`."""
        return batch_loss_sum(self.trained, batch, self.device, self.precision)

    def adapter_files(self) -> dict[str, str]:
        """Files written beside the final adapter (name -> text); a VLM run adds its captioner.json."""
        return {}

    @property
    def sharded(self) -> bool:
        return sharding.is_sharded(self.accelerator)

    def whole_lora(self) -> Any:
        """In a sharded run the adapter gathered whole in every process (a collective); else nothing to do."""
        if self.sharded:
            return sharding.whole_lora(self.trained)
        return contextlib.nullcontext()

    def any_process(self, flag: bool) -> bool:
        return flag if self.accelerator is None else distributed.any_process(self.accelerator, flag)

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def save_checkpoint(self, state: checkpoints.TrainState, optimizer: Any, scheduler: Any) -> Path | None:
        """The main process writes the folder, with every process's RNG state (each draws its own dropout)."""
        ranks = None if self.accelerator is None else distributed.gather_rng(self.accelerator)
        folder = None
        if self.sharded:
            optimizer = sharding.FullOptimizerState.gather(self.trained, optimizer)
        with self.whole_lora():
            folder = self._write_checkpoint(state, optimizer, scheduler, ranks)
        self.barrier()
        return folder

    def _write_checkpoint(self, state: checkpoints.TrainState, optimizer: Any, scheduler: Any,
                          ranks: list[dict] | None) -> Path | None:
        folder = None
        if self.main:
            def write_weights(folder: Path) -> None:
                # Checkpoints keep the adapter exactly as trained (no PiSSA conversion) for resume.
                self.model.save_pretrained(str(folder / peft_text.ADAPTER_DIR), safe_serialization=True,
                                           save_embedding_layers=False)

            extra: dict[str, Any] = {"tokens_trained": self.tokens_trained}
            if ranks:
                extra["rng_by_rank"] = ranks
            folder = checkpoints.save_checkpoint(self.out, state, optimizer=optimizer, scheduler=scheduler,
                                                 write_weights=write_weights, keep=self.cfg.keep_checkpoints,
                                                 extra=extra)
            self.ctx.emit(CheckpointEvent(step=state.global_step, path=str(folder)))
        return folder

    def restore(self, checkpoint: Path, optimizer: Any, scheduler: Any) -> checkpoints.TrainState:
        with sharding.loading_into_shards(self.model) if self.sharded else contextlib.nullcontext():
            load_adapter_weights(self.model, checkpoint / peft_text.ADAPTER_DIR)
        if self.accelerator is not None:  # a sharded run's whole, name-keyed state loads on any process count
            optimizer = sharding.FullOptimizerState(self.accelerator.unwrap_model(self.trained), optimizer,
                                                    sharded=self.sharded)
        state, extra = checkpoints.load_checkpoint_state(checkpoint, optimizer=optimizer, scheduler=scheduler)
        if self.accelerator is not None:
            distributed.restore_rng(self.accelerator, extra.get("rng_by_rank"))
            state.step_in_epoch = sharding.continue_on_processes(state.step_in_epoch, sharding.processes_in(extra),
                                                                 self.world)
        self.tokens_trained = int(extra.get("tokens_trained", 0))
        return state

    def make_samples(self, step: int) -> None:
        """Previews on the main process only (the others wait: nothing of theirs changes meanwhile; in a
        sharded run they take part in every forward pass)."""
        if self.main:
            self.answer_samples(step)
        elif self.sharded:
            self.answers()
        self.barrier()

    def answers(self) -> list[dict]:
        """The LoRA's (and once the base model's) answers to the sample prompts."""
        from core.sample_text import compare_with_model

        results = compare_with_model(self.model, self.tokenizer, list(self.cfg.sample_prompts),
                                     self.cfg.sample_max_new_tokens, base_answers=self.base_answers)
        # The base model does not change: its answers are computed once.
        self.base_answers = [r["base"] for r in results]
        return results

    def answer_samples(self, step: int) -> None:
        self.ctx.log(f"Answering {len(self.cfg.sample_prompts)} sample prompt(s) at step {step}")
        results = self.answers()
        path = self.out / "samples" / f"step-{step:06d}.json"
        atomic_write_text(path, json.dumps(results, indent=1, ensure_ascii=False))
        lines = [f"## {r['prompt']}\nLoRA: {r['lora']}\nBase: {r['base']}\n" for r in results]
        atomic_write_text(path.with_suffix(".txt"), "\n".join(lines))
        self.ctx.emit(SampleEvent(step=step, texts=results))

    def evaluate(self, step: int) -> None:
        """The LoRA scored on eval_file / eval_tasks (core.text_eval), on the main process; the others wait."""
        if self.evaluation is not None and self.main:
            self.evaluation.measure_lora(self.model, self.tokenizer, step)
        self.barrier()

    def validate(self, step: int) -> float | None:
        """The held-out loss, computed on the main process alone (the others return None at once).

        Every process holds the same weights, so the main one's number is the run's; no
        collective is needed and it equals what one process would compute. In a sharded run
        every process runs the forward passes (each holds only part of the base).
        """
        if not self.data.validation or not (self.main or self.sharded):
            return None
        return validation_loss(self.causal_lm, self.validation_batches(), self.device, self.precision)

    def finish(self, state: checkpoints.TrainState, result: LoopResult) -> dict[str, str]:
        return _finish(self, state, result)

    def write_weights_to(self, folder: Path, state: checkpoints.TrainState) -> None:
        """The adapter as the weights are now (ema_save_raw: the raw one, beside the EMA adapter)."""
        if self.main:
            peft_text.save_adapter(self.model, folder / peft_text.ADAPTER_DIR, base_model=self.base_model_display,
                                   save_precision="fp32", pissa_init=self.pissa_init,
                                   extra_files=self.adapter_files())
        self.barrier()

    def summary_extra(self) -> dict[str, Any]:
        """What train_summary.json holds beyond the counters every text run has."""
        return {}


def _preference_module(cfg: TrainConfig) -> Any:
    """The module of a text_method other than sft (imported here: each builds on this module), else None:
    core.train.preference (dpo, orpo), core.train.kto or core.train.grpo. Each has read_data,
    prepare_data and RUN_CLASS."""
    if cfg.text_method in ("sft", "vlm"):
        return None
    import importlib

    name = {"kto": "kto", "grpo": "grpo"}.get(cfg.text_method, "preference")
    return importlib.import_module(f"core.train.{name}")


def _build_run(cfg: TrainConfig, ctx: RunContext, init_file: Path | None, accelerator: Any) -> TextRun:
    if cfg.text_method == "vlm":  # its own model, processor and data (imported here: it builds on this module)
        from core.train.vlm import build_vlm_run

        return build_vlm_run(cfg, ctx, init_file, accelerator)
    preference = _preference_module(cfg)
    if preference is not None:
        # Read before the model loads, so data without chosen/rejected columns fails at once.
        comparisons = preference.read_data(cfg)
    # Several processes: each its own GPU (or the CPU); one: CUDA or the CPU, as ever (never MPS).
    device = accelerator.device if accelerator.num_processes > 1 else pick_device(mps=False)
    precision = _precision(cfg, device, ctx)
    ctx.log(f"Loading the text model {cfg.base_model or '(default: SmolLM2-135M-Instruct GGUF)'}")
    started = time.perf_counter()
    quantized = cfg.base_quantization == "nf4"
    model, tokenizer, source = load_llm(cfg.base_model, gguf_file=cfg.gguf_file, allow_pickle=cfg.allow_pickle,
                                        dtype=weight_dtype(precision), log=ctx.log,
                                        quantization=cfg.base_quantization, mixed_precision=precision, device=device)
    ctx.log(f"Model loaded in {time.perf_counter() - started:.1f} s ({source.display}"
            f"{', 4-bit NF4 (QLoRA)' if quantized else ''})")
    if quantized:
        model = prepare_nf4_model(model)
    template = apply_template(tokenizer, cfg.chat_template, ctx.log)
    ctx.log(f"Chat template: {template}")
    if preference is not None:
        data: Any = preference.prepare_data(cfg, comparisons, tokenizer, ctx)
    else:
        data = prepare_data(cfg, tokenizer, ctx)
    ctx.log(f"Data: {data.describe()}")
    if cfg.gradient_checkpointing:
        runtime.enable_activation_checkpointing(model, use_reentrant=False)
    model.config.use_cache = False
    peft_model = add_lora(model, cfg)  # seeds torch with cfg.seed: the same initial adapter on every process
    if accelerator.process_index > 0:
        # ...then each other process its own dropout; the main one (and a one-process run) as ever.
        torch.manual_seed(cfg.seed + accelerator.process_index)
    if not quantized and not sharding.is_sharded(accelerator):  # a 4-bit base is already on its GPU
        # (device_map at load); a sharded one stays in CPU memory until FSDP moves each process's share
        peft_model = peft_model.to(device)
    out = Path(cfg.output_dir)
    pissa_init = None
    if cfg.lora_variant == "pissa" and accelerator.is_main_process:  # only the main process writes files
        pissa_init = peft_text.save_pissa_init(peft_model, out / checkpoints.CHECKPOINT_DIR / peft_text.PISSA_INIT_DIR)
    if init_file is not None:
        load_adapter_weights(peft_model, init_file)
        ctx.log(f"Starting from the LoRA weights in {init_file}")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    ctx.log(f"LoRA ({cfg.lora_variant}) rank {cfg.lora_rank}: {format_count(trainable)} trainable parameters")
    run_class = preference.RUN_CLASS if preference is not None else TextRun
    return run_class(cfg, ctx, out, device, precision, peft_model, tokenizer, data, source.display, pissa_init,
                     accelerator)


def train_text(cfg: TrainConfig, ctx: RunContext) -> dict[str, str]:
    """Train a text LoRA as `cfg` says; returns the output paths (also sent in DoneEvent)."""
    # Mixed precision stays the text step's own autocast (core.train.text_step), as in one process.
    accelerator = distributed.make_accelerator("no", shard=cfg.distributed == "fsdp")
    main = accelerator.is_main_process
    if main:
        checkpoints.prepare_output_dir(cfg)
    accelerator.wait_for_everyone()
    # Each process its own random stream (seed + rank); one process: exactly `seed`.
    checkpoints.seed_everything(cfg.seed + accelerator.process_index)
    checkpoint, init_file = checkpoints.resolve_resume(cfg)
    if cfg.resume_from == "latest" and checkpoint is None and main:
        ctx.log("No checkpoint in the output folder yet: starting from the beginning.")
    try:
        evaluation = _evaluation(cfg, ctx)  # before the model loads: a missing file or task data fails at once
        run = _build_run(cfg, ctx, init_file, accelerator)
        if evaluation is not None:
            run.evaluation = evaluation
            if run.main:
                with keep_rng():
                    evaluation.before(run.model, run.tokenizer)
            run.barrier()
        batches = math.ceil(len(run.data.train) / cfg.batch_size)
        return run_task(run, checkpoint, math.ceil(batches / accelerator.num_processes))
    finally:
        accelerator.free_memory()


def _evaluation(cfg: TrainConfig, ctx: RunContext) -> Any:
    """The run's EvalSuite (core.text_eval), or None when it asks for no evaluation."""
    if not cfg.eval_file and not cfg.eval_tasks:
        return None
    from core.text_eval.suite import EvalSuite

    return EvalSuite.from_config(cfg, ctx)


def _finish(run: TextRun, state: checkpoints.TrainState, result: LoopResult) -> dict[str, str]:
    """The main process writes the adapter, previews, summary and merged model; the others wait."""
    outputs: dict[str, str] = {}
    if run.sharded:
        # Every process takes part in the last previews' forward passes and in gathering the adapter.
        if run.cfg.sample_prompts and not result.stopped:
            with keep_rng():
                run.make_samples(state.global_step)
        with run.whole_lora():
            outputs = _write_outputs(run, state, result, samples=False) if run.main else {}
    elif run.main:
        outputs = _write_outputs(run, state, result)
    run.barrier()
    return outputs


def _write_outputs(run: TextRun, state: checkpoints.TrainState, result: LoopResult, samples: bool = True
                   ) -> dict[str, str]:
    cfg = run.cfg
    adapter = peft_text.save_adapter(run.model, run.out / peft_text.ADAPTER_DIR, base_model=run.base_model_display,
                                     save_precision="fp32", pissa_init=run.pissa_init,
                                     extra_files=run.adapter_files())
    outputs = {"output_dir": str(run.out), "adapter": str(adapter), "config": str(run.out / "config.yaml"),
               "loss_csv": str(run.out / "loss.csv")}
    stopped, checkpoint, val_loss = result.stopped, result.checkpoint, result.validation_loss
    if checkpoint is not None:
        outputs["checkpoint"] = str(checkpoint)
    if cfg.sample_prompts and not stopped and samples:
        with keep_rng():
            run.answer_samples(state.global_step)
    if run.evaluation is not None and not stopped:
        with keep_rng():
            run.evaluation.measure_lora(run.model, run.tokenizer, state.global_step)
        outputs["eval"] = str(run.out / "eval" / "results.json")
    rate = run.tokens_trained / result.train_seconds if result.train_seconds else 0.0
    summary = {"steps": state.global_step, "tokens_trained": run.tokens_trained,
               "train_seconds": round(result.train_seconds, 2), "tokens_per_second": round(rate, 1),
               "validation_loss": val_loss, **run.summary_extra(),
               **(run.evaluation.summary() if run.evaluation is not None else {})}
    atomic_write_text(run.out / "train_summary.json", json.dumps(summary, indent=1))
    outputs["summary"] = str(run.out / "train_summary.json")
    if cfg.save_merged_model and not stopped and cfg.base_quantization == "nf4":
        # Merged into 4-bit weights the LoRA would be rounded away; the full-precision base is needed.
        run.ctx.warn("No merged model: the base was loaded in 4 bits (QLoRA).",
                     "Merge the adapter into the full-precision base with the LoRA tools (merge).")
    elif cfg.save_merged_model and not stopped:
        run.ctx.log("Merging the LoRA into the base model for serving")
        outputs["merged"] = str(peft_text.save_merged(run.model, run.tokenizer, run.out / peft_text.MERGED_DIR))
    if stopped:
        message = (f"Stopped at step {state.global_step} of {state.total_steps}. Adapter saved to {adapter}; "
                   f"continue with resume_from: latest (checkpoint {checkpoint}).")
    else:
        message = (f"Done: {state.global_step} steps, {rate:.0f} tokens/s. Adapter saved to {adapter}"
                   + (f"; validation loss {val_loss:.4f}." if val_loss is not None else "."))
    run.ctx.emit(DoneEvent(outputs=outputs, stopped=stopped, message=message))
    return outputs
