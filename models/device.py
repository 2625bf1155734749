"""Where batched models run: CUDA when present, else CPU; `BATCHRTC_DEVICE` overrides.
Also the process-wide glibc heap settings: a CPU detector keeps freed memory for its next batch
(`keep_freed_memory`); voice servers give large freed blocks back (`release_freed_memory`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_heap_kept: bool | None = None
_heap_released: bool | None = None
_MMAP_THRESHOLD_DEFAULT = 128 * 1024  # glibc's initial M_MMAP_THRESHOLD


def _mallopt():  # glibc's mallopt, or None (not Linux, not glibc: e.g. musl has none)
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


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
        mallopt = _mallopt() if os.environ.get("BATCHRTC_KEEP_HEAP", "1") != "0" else None
        if mallopt is not None:
            _heap_kept = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(
                mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _heap_kept


def release_freed_memory() -> bool:
    """Pin glibc's mmap threshold at its initial 128 KiB, so blocks above it are mapped on
    allocation and unmapped on free.

    By default glibc raises the threshold (up to 32 MB) each time a mapped block is freed. A
    voice server frees many: VAD batch tensors, utterances, reply audio. After the first few,
    every later one comes from the heap, whose freed memory stays resident and fragments, and
    RSS grows with the largest bursts: 946 -> 376 KiB per session 3 s into 100 streaming
    sessions (`benchmarks/memory_per_session.py`). A process that already keeps freed memory
    (`keep_freed_memory`: a CPU detector, whose large batches want the opposite) is left as it
    is, and a detector made later takes over. ``BATCHRTC_KEEP_HEAP=0`` leaves glibc's defaults
    here too. Returns whether the setting is in force (glibc on Linux only)."""
    global _heap_released
    if _heap_kept:
        return False
    if _heap_released is None:
        _heap_released = False
        mallopt = _mallopt() if os.environ.get("BATCHRTC_KEEP_HEAP", "1") != "0" else None
        if mallopt is not None:
            _heap_released = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_DEFAULT))
    return _heap_released
