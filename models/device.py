"""Where batched models run: CUDA when present, else CPU; `BATCHRTC_DEVICE` overrides.
Also the process-wide CPU heap setting that CPU inference wants (`keep_freed_memory`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_heap_kept: bool | None = None


def default_device() -> torch.device:
    forced = os.environ.get("BATCHRTC_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def keep_freed_memory() -> bool:
    """Let glibc keep freed large blocks for reuse instead of returning them to the OS.

    A CPU batch allocates and frees tens of large tensors (pyramid levels, activations; up to
    ~100 MB each). glibc serves blocks above its mmap threshold (at most 32 MB) with ``mmap``
    and unmaps them on free, and trims the heap top past 128 KB, so every batch faults its
    memory in again, zeroed by the kernel: ~60,000 page faults per batch of 32 frames, and
    20-35 % of the detector's wall time on a 2-core VM. Raising both thresholds makes the heap
    behave like torch's CUDA caching allocator: the process keeps its peak footprint (RSS
    does not shrink after a large batch). Called by CPU models; ``BATCHRTC_KEEP_HEAP=0``
    leaves glibc's defaults. Returns whether the setting is in force (glibc on Linux only).
    """
    global _heap_kept
    if _heap_kept is None:
        _heap_kept = False
        if sys.platform.startswith("linux") and os.environ.get("BATCHRTC_KEEP_HEAP", "1") != "0":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
                return False
            _heap_kept = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(
                mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _heap_kept
