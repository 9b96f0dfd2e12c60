"""How much freed memory the process keeps: glibc's mmap threshold, fixed at its initial value.

glibc serves a block of at least the *mmap threshold* (initially 128 KiB) with its own ``mmap``
and returns it to the kernel when it is freed. By default the threshold is dynamic: each time
such a block is freed the threshold rises to its size (up to 32 MiB), so from then on blocks of
up to 32 MiB come from the heap, where freed space is kept for reuse and left fragmented. The
embedded engine's prefill frees many such tensors (activations of a wave of rows: tens of MiB
each) and every decode step reallocates each layer's KV cache one token longer, and the process
kept the freed blocks: prefilling 60 rows of 236 tokens held 1.55 GiB resident, of which
0.53 GiB was freed memory (``malloc_trim`` gave it back), and five decode steps after the trim
kept 0.41 GiB again; the default 16-demonstration job peaked at 2.06 GiB (docs/benchmarks.md, issue 15).

:func:`bound_heap_retention` sets the threshold to 128 KiB with ``mallopt``, which also turns
the dynamic adjustment off: every block of 128 KiB or more is mapped and unmapped on its own, so
a freed tensor leaves the process's resident memory at once. The price is page faults: each
large tensor is fresh memory the kernel zeroes, so a step spends more system CPU time
(docs/benchmarks.md has both figures for the default job).

Invariant: this changes only where the allocator puts memory, never what is computed: the
same kernels run on the same inputs, so every log-probability, and every token a seeded job
draws, is bitwise the same (``tests/engines/test_engine_heap.py`` runs one job both ways). The
setting is process-wide and one-way (it stays for the process's life); it is a no-op where the
C library is not glibc, and when the user set ``MALLOC_MMAP_THRESHOLD_`` (glibc then already
uses that fixed value, which is left alone).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["MMAP_THRESHOLD", "bound_heap_retention"]

MMAP_THRESHOLD = 128 * 1024
"""Bytes from which glibc maps a block on its own (its initial value: glibc's default
behaviour until the first large block is freed)."""

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_ENV = "MALLOC_MMAP_THRESHOLD_"


def bound_heap_retention() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (see the module docstring).
    Returns True when it was set, False when nothing was changed (not glibc, or the user's
    ``MALLOC_MMAP_THRESHOLD_`` is in force)."""
    if not sys.platform.startswith("linux") or os.environ.get(_ENV):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  # glibc only (musl has mallopt as a stub)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
