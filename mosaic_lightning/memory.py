"""Freed memory handed back to the operating system between blocks.

glibc's allocator keeps what a process frees for its own reuse. Pruning frees a block's temporary tensors (inputs
recorded for the statistics, cached outputs, copies: a few MB to a few hundred MB each) when the block is done,
but the heap they came from fragments, so the process's resident memory creeps up block after block instead of
returning to the same level (measured on SmolLM2, true-sequential Wanda on 32 x 512 tokens: +260 MB over 30
blocks; bench/RESULTS.md). ``malloc_trim(0)`` returns the free pages. Where the C library is not glibc (macOS,
musl, Windows) there is no such call and nothing is done: those allocators give large blocks back by themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


def release_freed_memory() -> None:
    """Return the heap's free pages to the operating system (glibc's ``malloc_trim``; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # no C library by that name, or one without malloc_trim
        return None
