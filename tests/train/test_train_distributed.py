"""core.train.distributed in one process (the app's case; two processes: tests/test_*multi_process.py)."""
from __future__ import annotations

from core.train import distributed


def test_runs_one_after_another_in_one_process_may_change_mixed_precision(monkeypatch):
    # The app trains an image LoRA in bf16, then a text LoRA (its own autocast: accelerate's "no").
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.make_accelerator("bf16").mixed_precision == "bf16"
    accelerator = distributed.make_accelerator("no")
    assert accelerator.mixed_precision == "no"
    assert accelerator.num_processes == 1


def test_in_one_process_the_collectives_are_the_local_values(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    accelerator = distributed.make_accelerator("no")
    assert distributed.any_process(accelerator, True) is True
    assert distributed.any_process(accelerator, False) is False
    assert distributed.sum_over_processes(accelerator, [1.5, 7.0]) == [1.5, 7.0]
    assert distributed.gather_rng(accelerator) is None


def test_a_shard_is_every_world_th_batch_and_all_processes_get_as_many():
    class Rank:
        def __init__(self, index: int, world: int):
            self.process_index, self.num_processes = index, world

    batches = list("abcde")
    assert [distributed.shard(Rank(r, 2), batches) for r in (0, 1)] == [["a", "c", "e"], ["b", "d", "a"]]
    assert [distributed.shard(Rank(r, 3), batches) for r in (0, 1, 2)] == [["a", "d"], ["b", "e"], ["c", "a"]]
    assert distributed.shard(Rank(0, 1), batches) == batches
