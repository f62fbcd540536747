"""What every task needs to train in several processes (Accelerate DDP or FSDP2): the
Accelerator, gradient sync only on a step's last micro-batch, a flag or a sum over every
process, and every process's RNG in a checkpoint so a resume continues exactly.

With `distributed: fsdp` the frozen base is sharded over the processes (FSDP2 through
Accelerate's FSDP plugin); the sharded-run helpers are in core.train.sharding.

In one process each helper is the plain single-process behaviour (no communication).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from core.train import checkpoints


def make_accelerator(mixed_precision: str = "no", shard: bool = False) -> Any:
    """The run's Accelerator; a CPU-only multi-process launch joins one gloo group.

    Launched as several processes on a machine without CUDA, accelerate only joins them into
    one group when told it is on the CPU; otherwise each would train alone into the same
    output folder. Gradient accumulation is the loop's (groups of micro-batches), not accelerate's.
    `shard` (distributed: fsdp) in several processes: FSDP2 through Accelerate's FSDP plugin;
    in one process there is nothing to shard over and the run is the plain one.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from core.train.recovery import distributed

    several = distributed()
    if not several:
        # Accelerate keeps its settings process-wide and refuses a second Accelerator with another
        # mixed precision; the app trains run after run in one process (an image run in bf16, then a
        # text run), so a single-process run starts from fresh settings (the device state stays).
        AcceleratorState._reset_state()  # noqa: SLF001
    cpu = several and not torch.cuda.is_available()
    if not (shard and several):
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    from core.train import sharding

    return sharding.make_sharded_accelerator(mixed_precision, cpu=cpu)


def shard(accelerator: Any, batches: list[Any]) -> list[Any]:
    """This process's share of an epoch's batches: every world-th from its rank, in the global order.

    Each process gets as many (the list is filled up from its start, as torch's
    DistributedSampler does), so all reach every step's gradient sync together.
    """
    world = accelerator.num_processes
    if world == 1:
        return batches
    filled = batches + batches[:(-len(batches)) % world]
    return filled[accelerator.process_index::world]


def sync_on_last(accelerator: Any | None, models: Sequence[Any], index: int, count: int) -> contextlib.ExitStack:
    """A context for micro-batch `index` of `count`: DDP syncs gradients only on the last one.

    Without an accelerator (a task built for one process) there is nothing to sync.
    """
    stack = contextlib.ExitStack()
    if accelerator is not None and index < count - 1:
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
    return stack


def any_process(accelerator: Any, flag: bool) -> bool:
    """True when `flag` is true on any process (a stop pressed on the main one reaches all)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def sum_over_processes(accelerator: Any, values: Sequence[float]) -> list[float]:
    """Each of `values` summed over every process (float64, so counts stay exact); as given in one process."""
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def gather_rng(accelerator: Any) -> list[dict] | None:
    """Every process's RNG state in rank order (a collective: call it on all processes); None in one."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object

    return gather_object([checkpoints.rng_state()])


def restore_rng(accelerator: Any, by_rank: list[dict] | None) -> None:
    """Set this process's RNG from a checkpoint's per-rank states.

    The checkpoint's top-level RNG (set by load_checkpoint_state) is rank 0's; this sets the
    others' own. Without a state for every rank (another process count) the top-level one stays.
    """
    world = accelerator.num_processes
    if world > 1 and by_rank and len(by_rank) == world:
        checkpoints.set_rng_state(by_rank[accelerator.process_index])
