"""What the owner of a process sets for the units it runs: torch's thread count, whether freed memory stays, and
which libraries stay quiet.

`torch_threads(n)` sets torch's intra-op thread count for a block and restores it afterwards (`run_local`, each
metric task); a Ray actor owns its process and sets it once. The rest keeps freed memory in the process while
units run (glibc's malloc; a no-op elsewhere).

A CPU forward allocates and frees the same large activations batch after batch. By default glibc serves blocks
above its mmap threshold (at most 32 MB) with fresh mmaps and trims the heap's free top, so every batch can fault
its activations in again (hundreds of thousands of page faults per SD-1.5 forward on a CPU; the CPU time and peak
memory this saves and costs are measured by benchmarks/bench_extract.py).

`hold_freed_memory()` turns both off for this process (large blocks come from the heap, the heap is not trimmed);
`release_freed_memory()` turns both back on and hands free memory back. What owns the process calls them
after the model is loaded (the load's own temporaries are still handed back): `extract.run_local` around its
units, the Ray actor for its life. Where memory comes from changes no value: the store-identity tests pass with it.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# The environment that keeps library notices and weight-loading bars out of a run without -v: set by the CLI, and
# handed to Ray actors, so a joined cluster's workers are as quiet as the driver.
QUIET_LIBRARIES: dict[str, str] = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                                   "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_libraries() -> None:
    """`QUIET_LIBRARIES` in this process's environment (values already set are kept), so in its children too."""
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# After release: where glibc's dynamic thresholds end up once large blocks have been freed (mmap threshold at its
# 32 MiB maximum, trim threshold twice that); mallopt cannot turn the dynamic adjustment back on.
_RELEASED_MMAP_THRESHOLD = 32 * 1024 * 1024
_RELEASED_TRIM_THRESHOLD = 2 * _RELEASED_MMAP_THRESHOLD
_DEFAULT_MMAP_MAX = 65536
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: a free heap top this large (2 GiB) is never left behind here


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's intra-op thread count is `threads` inside the block (None: left as it is), restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # int mallopt(int param, int value)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None
    return libc


def hold_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it, so freed activations are reused without page
    faults. Returns whether it took effect (False: not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    if not ok:
        log.debug("mallopt refused: freed memory is handed back as usual")
    return ok


def release_freed_memory() -> None:
    """Large blocks from mmap and trimming again (at glibc's warmed-up thresholds), free memory handed back now."""
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_MMAP_THRESHOLD, _RELEASED_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _RELEASED_TRIM_THRESHOLD)
    libc.malloc_trim(0)
