"""A run on the CPU reuses the memory its last step freed instead of page-faulting it in again."""
from __future__ import annotations

import resource

import pytest
import torch

from core import cpu_memory

pytestmark = pytest.mark.skipif(cpu_memory._glibc() is None, reason="glibc's malloc settings only")

BLOCK = 64 * 2**20  # an activation-sized block, far over glibc's mmap threshold
PAGES = BLOCK // 4096


def _faults_of_steps(steps: int = 6) -> int:
    """Minor page faults of `steps` "steps" that each fill a fresh block and free it, after one to warm up."""
    torch.ones(BLOCK // 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        torch.ones(BLOCK // 4)  # allocated, every page written, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_activations_are_reused_without_page_faults_while_a_cpu_run_lasts():
    # glibc's default: each block is a fresh mmap, every page faulted in (and zeroed by the kernel) again.
    assert _faults_of_steps() > 4 * PAGES
    with cpu_memory.keeping_freed_memory() as kept:
        assert kept
        assert _faults_of_steps() < PAGES // 2
    # The block ended: glibc's defaults are back, and the kept memory went back to the kernel.
    assert _faults_of_steps() > 4 * PAGES


def test_nested_blocks_keep_the_settings_until_the_last_one_ends():
    with cpu_memory.keeping_freed_memory():
        with cpu_memory.keeping_freed_memory():
            pass
        assert _faults_of_steps() < PAGES // 2
    assert _faults_of_steps() > 4 * PAGES


def test_a_run_off_the_cpu_leaves_the_allocator_alone():
    with cpu_memory.keeping_freed_memory(enabled=False) as kept:
        assert not kept
        assert _faults_of_steps() > 4 * PAGES
