"""Process settings for a worker that runs tile-years.

A tile-year allocates and frees buffers of 10-300 MB at every stage (frame
stacks, the chips' float32 tensor, encoder activations). glibc serves any
allocation above its mmap threshold (at most 32 MiB by default) with fresh
pages that the kernel faults in and zeroes on first touch, and returns them on
free, so every stage pays for that again, and on virtual machines a page fault
is expensive. So the process keeps freed memory for reuse.

Retention alone is not enough when the buffers are made on other threads.
zarr allocates every array a read returns on its event-loop thread, and glibc
gives such a thread its own arena, whose heaps hold at most 64 MB: a 128 MB
frame stack read back is then a fresh mapping each time (faulted in as huge
pages, since numpy asks for them, and unmapped when freed). So the process
uses a single arena; its lock is then shared by a few threads, which the
encoder alone in a loop can feel but a tile-year's sequence of stages did not.

``bench/bench_pipeline.py`` measures a tile-year with this setting and, with
``--system-malloc``, without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import weakref
from typing import Any

from agrifm_pipeline.errors import SettingsError
from agrifm_pipeline.settings import env_flag

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# Allocations up to this size come from the heap and are reused; freed heap
# memory above this much is handed back to the OS.
RETAIN_BYTES = 1 << 30
OPT_OUT = "AGRIFM_PIPELINE_SYSTEM_MALLOC"
_GLIBC_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
)
_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Let glibc keep and reuse freed buffers of up to 1 GiB in one arena (once per process).

    Call it early, before the process starts threads: a thread that has already
    allocated keeps the arena it has.

    Changes nothing, and returns False, when the C library is not glibc, when
    ``AGRIFM_PIPELINE_SYSTEM_MALLOC`` says yes (1, true, yes, on; 0, false, no,
    off or unset keep the tuning; any other value raises SettingsError), or when
    the environment already tunes glibc's allocator (``MALLOC_*`` or
    ``GLIBC_TUNABLES``): the operator's choice wins. The cost is a resident size that stays at the process's high
    water mark (up to 1 GiB above what is in use) instead of shrinking between
    stages.
    """
    global _applied
    if _applied is not None:
        return _applied
    try:
        opted_out = env_flag(OPT_OUT)
    except SettingsError as exc:  # one line naming the variable, its value and the words
        raise SettingsError(
            f"{exc} (yes keeps the C library's allocator as it is; no, or unset, lets "
            "this process keep freed buffers for reuse)"
        ) from None
    _applied = False
    if opted_out or any(k in os.environ for k in _GLIBC_ENV):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(RETAIN_BYTES)) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(RETAIN_BYTES)) == 1 and ok
        ok = libc.mallopt(M_ARENA_MAX, ctypes.c_int(1)) == 1 and ok
    except (OSError, AttributeError):
        return False
    _applied = ok
    return ok


def allocator_status() -> str:
    """How this process's allocator is set, for run metadata and benchmark reports."""
    if _applied:
        return f"glibc, one arena, freed buffers up to {RETAIN_BYTES >> 30} GiB retained"
    return "system default"


# -- the cyclic garbage collector ---------------------------------------------------------
_frozen_for: dict[int, weakref.ref[Any]] = {}  # id -> the owner (engines are unhashable)


def freeze_long_lived(owner: Any) -> bool:
    """Take every object alive now out of the cyclic collector's reach (``gc.freeze``),
    once per ``owner`` (an engine just loaded: what exists then lives as long as it).

    A worker holds hundreds of thousands of objects after it has loaded Dagster,
    xarray and the model, and every full collection walks all of them; frozen,
    they are skipped. Reference counting still frees them; only
    reference cycles among them that become garbage later are never collected, which
    for the modules, the model and the definitions of a process is nothing. Returns
    whether this call froze.
    """
    seen = _frozen_for.get(id(owner))
    if seen is not None and seen() is owner:
        return False
    gc.collect()  # what is garbage already is freed, not frozen
    gc.freeze()
    _frozen_for[id(owner)] = weakref.ref(owner)
    return True
