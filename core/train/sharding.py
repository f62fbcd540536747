"""Sharded runs (`distributed: fsdp`): FSDP2 through Accelerate's FSDP plugin.

The frozen base is split over the processes (each holds 1/N of it and gathers one block at a
time while it runs); the LoRA parameters train as in a DDP run: their gradients are averaged
over the processes, each step's loss is the same global-batch mean. What a sharded run does
differently, and what lives here:

- the Accelerator with the FSDP2 plugin (one wrapping unit per transformer / UNet block, taken
  from the model's own `_no_split_modules`); mixed precision stays the autocast of a DDP run, so
  the frozen base is gathered in its stored dtype and the LoRA trains in fp32;
- every process runs every forward (previews and validation too): a block's weights exist only
  while all processes gather it;
- the LoRA weights are gathered whole (a collective) before the main process writes them, and
  written back into the shards on resume; the optimizer state goes into checkpoints as a full,
  name-keyed state dict, so a resume on another process count loads it too.

Accelerate switches its FSDP plugin on only for accelerator devices; on the CPU (gloo: the
tests on this machine) the same code path is switched on by hand, torch's `fully_shard` itself
runs on gloo.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def make_sharded_accelerator(mixed_precision: str, *, cpu: bool) -> Any:
    """An Accelerator whose `prepare(model, optimizer)` shards the model with FSDP2."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False, activation_checkpointing=False)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, fsdp_plugin=plugin)
    if cpu:
        # As accelerate does for a GPU launch: the process-wide state says FSDP too (every later
        # AcceleratorState() copies the distributed type from it).
        from accelerate.state import PartialState

        state = accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # noqa: SLF001
    # No casting by FSDP: the base is gathered in the dtype it is stored in (bf16 / fp16), the LoRA
    # stays fp32 with fp32 gradient reduction, and the compute is the run's autocast (as in DDP).
    plugin.mixed_precision_policy = MixedPrecisionPolicy()
    return accelerator


def is_sharded(accelerator: Any | None) -> bool:
    return accelerator is not None and bool(getattr(accelerator, "is_fsdp2", False))


def _wrap_classes(model: torch.nn.Module) -> list[str]:
    """The block classes to shard one by one: the `_no_split_modules` of the model or any submodule
    (the UNet / transformer / causal LM inside a PEFT or loss wrapper)."""
    names: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or []:
            if name not in names:
                names.append(name)
    present = {type(m).__name__ for m in model.modules()}
    return [n for n in names if n in present]


def prepare(accelerator: Any, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
    """Shard `model` (its frozen base and its LoRA) and point `optimizer` at the shards.

    The forward runs under the accelerator's autocast, as accelerate does for a DDP model (its
    FSDP2 path leaves mixed precision to FSDP's casting, which would cast the LoRA too).
    """
    import torch.distributed as dist

    # Rank 0's initial LoRA for every process, as DDP broadcasts it when it wraps a model (each
    # process drew its own: seed + rank); the frozen base is the same file everywhere.
    with torch.no_grad():
        for _, _, param in _trainable(model):
            sent = param.data.to(accelerator.device)  # NCCL sends from the GPU; the model may be in CPU memory
            dist.broadcast(sent, src=0)
            param.data.copy_(sent)
    _shard_embeddings(model)
    plugin = accelerator.state.fsdp_plugin
    plugin.transformer_cls_names_to_wrap = _wrap_classes(model) or None
    if plugin.transformer_cls_names_to_wrap is None:
        plugin.auto_wrap_policy = None  # nothing to split on: one unit, sharded at rest
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.native_amp:
        from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

        forward = model.forward
        model.forward = convert_outputs_to_fp32(
            get_mixed_precision_context_manager(True, accelerator.autocast_handler)(forward))
    return model, optimizer


def _shard_embeddings(model: torch.nn.Module) -> None:
    """A causal LM's embeddings and its final norm + head as units of their own.

    Accelerate does this for a transformers model it is given; a text run gives it the module
    that computes the loss (the LM inside it), and previews and validation call the LM directly,
    so none of its weights may be left to the outer unit.
    """
    from torch.distributed.fsdp import fully_shard
    from transformers import PreTrainedModel

    lm = next((m for m in model.modules() if isinstance(m, PreTrainedModel)
               and callable(getattr(m, "get_output_embeddings", None)) and m.get_output_embeddings() is not None),
              None)
    if lm is None:
        return
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    inner = getattr(lm, "model", None)
    norm = getattr(inner, "norm", None) if isinstance(getattr(inner, "norm", None), torch.nn.Module) else None
    tied = embed is not None and embed.weight is head.weight
    if embed is not None and not tied:
        fully_shard(embed)
    fully_shard([m for m in ((embed,) if tied else ()) + (norm, head) if m is not None], reshard_after_forward=False)


def _trainable(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    """(owning module, attribute name, parameter) of each trainable parameter, in a fixed order."""
    found = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                found.append((module, name, param))
    return found


@contextlib.contextmanager
def whole_lora(model: torch.nn.Module) -> Iterator[None]:
    """While inside, the model's trainable (LoRA) parameters are whole tensors in every process.

    A collective: every process enters. The LoRA files are then written by the main process
    through the usual module code (PEFT's state dicts). The base stays sharded: gathering only
    the LoRA costs its size, not the model's. Nothing may run the model meanwhile.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # every unit in its sharded state: its attributes are the shards, and
            # its state-dict hook (which re-shards an unsharded unit) leaves the whole tensors alone
    swapped = []
    for module, name, param in _trainable(model):
        if isinstance(param, DTensor):
            module._parameters[name] = torch.nn.Parameter(param.full_tensor().detach(), requires_grad=False)  # noqa: SLF001
            swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param  # noqa: SLF001 (FSDP swaps these attributes itself the same way)


@contextlib.contextmanager
def loading_into_shards(module: torch.nn.Module) -> Iterator[None]:
    """While inside, `module.load_state_dict(...)` (what PEFT's loaders call with the whole LoRA tensors
    of a file) puts each whole tensor's piece into this process's shard of it.

    A collective: every process loads the same file. FSDP's own load hooks expect sharded tensors,
    so the module's `load_state_dict` is replaced here for the time of the load.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.nn.modules.module import _IncompatibleKeys

    def load(state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        params = dict(module.named_parameters())
        known = set(module.state_dict())
        with torch.no_grad():
            for key, value in state_dict.items():
                param = params.get(key)
                if param is None:
                    continue
                if isinstance(value, DTensor):
                    value = value.full_tensor()
                value = value.to(param.device, param.dtype)
                if isinstance(param, DTensor):
                    value = distribute_tensor(value, param.device_mesh, param.placements).to_local()
                    param = param.to_local()
                param.copy_(value)
        return _IncompatibleKeys(sorted(known - set(state_dict)), sorted(set(state_dict) - known))

    module.load_state_dict = load  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.load_state_dict


class FullOptimizerState:
    """The optimizer as a checkpoint sees it in a sharded run, and on resume from one.

    `state_dict()` is the whole, name-keyed state (gathered before, on every process: the main
    one alone writes it); `load_state_dict` takes a whole, name-keyed state (from a sharded run)
    and spreads it over this run's shards or plain parameters, so a sharded checkpoint resumes on
    any process count, sharded or not. The per-parameter-number state of a DDP run loads into a
    plain run as before, and into a sharded one keyed by the names of this run's parameters.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, gathered: dict | None = None, *,
                 sharded: bool = True):
        self.model, self.optimizer, self.gathered, self.sharded = model, _inner(optimizer), gathered, sharded

    @classmethod
    def gather(cls, model: torch.nn.Module, optimizer: Any) -> FullOptimizerState:
        """A collective: every process calls it; the whole state is kept on the CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        inner = _inner(optimizer)
        state = get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
        return cls(model, inner, state)

    def state_dict(self) -> dict:
        return self.gathered or {}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not _name_keyed(state):
            if not self.sharded:
                self.optimizer.load_state_dict(state)
                return
            state = self._named(state)
        set_optimizer_state_dict(self.model, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


    def _named(self, state: dict) -> dict:
        """A DDP run's state (parameters by number, in the optimizer's order, the same order this run
        builds its groups in) keyed by parameter name, as a sharded run loads it."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        order = [names.get(id(p)) for group in self.optimizer.param_groups for p in group["params"]]
        saved = [i for group in state.get("param_groups", []) for i in group.get("params", [])]
        if None in order or len(saved) != len(order):
            raise ValueError(f"This checkpoint's optimizer holds {len(saved)} LoRA tensors and this run trains "
                             f"{len(order)}: resume with the settings it was saved with (lora_rank, target_modules, "
                             "train_text_encoder), or start from its LoRA file.")
        by_number = dict(zip(saved, order))
        return {"state": {by_number[i]: value for i, value in state.get("state", {}).items()},
                "param_groups": [{**group, "params": [by_number[i] for i in group["params"]]}
                                 for group in state["param_groups"]]}


def _name_keyed(state: dict) -> bool:
    """A whole optimizer state keyed by parameter names (torch.distributed.checkpoint's), not numbers."""
    params = [p for group in state.get("param_groups", []) for p in group.get("params", [])]
    return bool(params) and all(isinstance(p, str) for p in params)


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def processes_in(extra: dict[str, Any]) -> int:
    """How many processes wrote a checkpoint (its per-rank RNG states; one without them)."""
    ranks = extra.get("rng_by_rank")
    return len(ranks) if ranks else 1


def continue_on_processes(step_in_epoch: int, saved: int, now: int) -> int:
    """A resumed epoch position, counted in this process's batches, on another process count.

    Every process takes every n-th batch of the same global epoch order, so `step_in_epoch`
    batches on `saved` processes are step_in_epoch x saved global batches: this run starts
    after as many (rounded down: at most a few batches are seen twice, none skipped).
    """
    return step_in_epoch * saved // now if saved != now else step_in_epoch
