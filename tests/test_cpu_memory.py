"""A run on the CPU reuses the memory its last step freed instead of page-faulting it in again.

Each story runs in a fresh Python process: the allocator's settings belong to the whole process, and a test
process shares it with whatever ran before (an app test's run thread, a cached drawing)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core import cpu_memory

pytestmark = pytest.mark.skipif(cpu_memory._glibc() is None, reason="glibc's malloc settings only")

ROOT = Path(__file__).resolve().parent.parent
PAGES = 64 * 2**20 // 4096  # an activation-sized block (64 MiB), far over glibc's mmap threshold

FAULTS = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import torch
from core import cpu_memory

BLOCK = 64 * 2**20

def faults_of_steps(steps=6):
    # Minor page faults of steps that each fill a fresh block and free it, after one to warm up.
    torch.ones(BLOCK // 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        torch.ones(BLOCK // 4)  # allocated, every page written, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024

seen = {"default": faults_of_steps()}
with cpu_memory.keeping_freed_memory(enabled=False) as kept:
    seen["off the cpu kept"] = kept
    seen["off the cpu"] = faults_of_steps()
with cpu_memory.keeping_freed_memory() as kept:
    seen["kept"] = kept
    # The heap first grows by a few blocks: posix_memalign's leftovers keep a freed block from fitting the next.
    seen["settling"] = faults_of_steps(12)
    seen["during"] = faults_of_steps(12)
    with cpu_memory.keeping_freed_memory():
        pass
    seen["inner block ended"] = faults_of_steps(12)
    held = rss()
seen["given back"] = held - rss()
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def faults() -> dict:
    out = subprocess.run([sys.executable, "-c", FAULTS, str(ROOT)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_activations_are_reused_without_page_faults_while_a_cpu_run_lasts(faults):
    # glibc's default: each block is a fresh mmap, every page faulted in (and zeroed by the kernel) again.
    assert faults["default"] > 5 * PAGES
    # Kept: once the heap has grown (a few blocks' worth), the blocks are reused without a fault.
    assert faults["kept"] is True and faults["settling"] < faults["default"] * 2 and faults["during"] < PAGES // 2
    # The block ended: what it kept went back to the kernel (the freed block was resident until then).
    assert faults["given back"] > PAGES * 4096 // 2


def test_nested_blocks_keep_the_settings_until_the_last_one_ends(faults):
    assert faults["inner block ended"] < PAGES // 2


def test_a_run_off_the_cpu_leaves_the_allocator_alone(faults):
    assert faults["off the cpu kept"] is False and faults["off the cpu"] > 5 * PAGES
