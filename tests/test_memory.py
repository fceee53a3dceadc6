"""Freed memory handed back between blocks: on glibc, free pages inside the heap leave the resident set."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from mosaic_lightning.memory import release_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_pages_leave_the_resident_set():
    """Many small tensors (below glibc's mmap threshold, so they come from the heap) are filled and freed, all but
    the last, which keeps the heap's top in use: glibc keeps the freed pages resident until they are trimmed."""
    tensors = [torch.ones(4096) for _ in range(16_384)]  # 16 KB each, 256 MB in all
    last = tensors[-1]
    del tensors
    before = _resident_bytes()
    release_freed_memory()
    after = _resident_bytes()
    assert before - after > 128 * 2**20, (before, after)
    assert last.sum() == 4096  # still alive: the trim frees only free pages


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:  # pages: size, resident, ...
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
