"""Payload blocks in shared memory for a process that sends work to another (the engine).

The sending side owns an `ShmArena`: segments it creates, carves into blocks of power-of-two
size classes (4 KiB and up) and reuses; it is the only one that allocates or frees, so no
cross-process lock is needed. It writes a payload into a block once and sends the block's
`(segment, offset, nbytes)` on a control channel; the receiving side maps segments by name
with `ShmViews` and reads (or writes a result back into) the block in place. Nothing big is
pickled and each payload is copied once, into the block.

Names are `f"{SHM_PREFIX}{creator pid}_{token}_{n}"`, so whoever outlives a creator that was
killed can find and unlink what it left (`unlink_prefix`, `sweep_dead`).
"""

from __future__ import annotations

import os
import secrets
import threading
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any, NamedTuple

import numpy as np

from .errors import QueueFullError
from .process import SHM_PREFIX, _check_shm_room, _drop, _view

__all__ = ["Block", "ShmArena", "ShmViews", "unlink_prefix", "sweep_dead", "pid_alive"]

_MIN_CLASS = 12  # 4 KiB
SHM_DIR = "/dev/shm"


class Block(NamedTuple):
    segment: str
    offset: int
    size: int


class ShmArena:
    """Blocks for outgoing payloads, in segments this process creates and unlinks.

    `max_bytes` bounds the whole arena: past it `alloc` raises `QueueFullError` (the engine is
    behind; the caller's session gets a clear error rather than an unbounded queue).
    Thread-safe.
    """

    def __init__(self, *, max_bytes: int = 1 << 30, segment_bytes: int = 16 << 20) -> None:
        self.prefix = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(3)}_"
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._segments: dict[str, SharedMemory] = {}
        self._free: dict[int, list[Block]] = {}
        self._bump: tuple[str, int, int] | None = None  # (segment, next offset, end)
        self._seq = 0
        self.mapped = 0  # bytes of segments created
        self.in_use = 0  # bytes of blocks handed out

    def alloc(self, nbytes: int) -> Block:
        cls = max(_MIN_CLASS, max(nbytes - 1, 0).bit_length())
        size = 1 << cls
        with self._lock:
            free = self._free.get(cls)
            if free:
                block = free.pop()
            else:
                block = self._carve(size)
            self.in_use += size
            return block

    def free(self, block: Block) -> None:
        with self._lock:
            if block.segment not in self._segments:
                return  # the arena was closed meanwhile
            self._free.setdefault(block.size.bit_length() - 1, []).append(block)
            self.in_use -= block.size

    def view(self, block: Block, shape: Any, dtype: Any) -> np.ndarray:
        return _view(self._segments[block.segment].buf, shape, dtype, block.offset)

    def write(self, array: np.ndarray) -> Block:
        """Copy `array` into a new block (the one copy a payload makes)."""
        block = self.alloc(array.nbytes)
        try:
            self.view(block, array.shape, array.dtype)[...] = array
        except BaseException:
            self.free(block)
            raise
        return block

    def close(self) -> None:
        """Unlink every segment (blocks still handed out become invalid)."""
        with self._lock:
            segments, self._segments = self._segments, {}
            self._free.clear()
            self._bump = None
            self.mapped = self.in_use = 0
        for shm in segments.values():
            _drop(shm, unlink=True)

    def _carve(self, size: int) -> Block:
        if self._bump is not None:
            name, off, end = self._bump
            if off + size <= end:
                self._bump = (name, off + size, end)
                return Block(name, off, size)
            # the tail of the old segment is left unused: it is smaller than `size`
        seg_size = max(self.segment_bytes, size)
        if self.mapped + seg_size > self.max_bytes:
            raise QueueFullError(
                f"shared memory arena full ({self.mapped >> 20} MiB of {self.max_bytes >> 20} MiB "
                "in use): the engine is not keeping up"
            )
        _check_shm_room(seg_size)
        self._seq += 1
        shm = SharedMemory(name=f"{self.prefix}{self._seq}", create=True, size=seg_size)
        self._segments[shm.name] = shm
        self.mapped += seg_size
        self._bump = (shm.name, size, seg_size)
        return Block(shm.name, 0, size)


class ShmViews:
    """The receiving side: segments mapped by name, read and written in place, never unlinked
    here (their creator owns them; `forget` drops the mappings of one that is gone)."""

    def __init__(self) -> None:
        self._segments: dict[str, SharedMemory] = {}

    def view(self, block: Block | tuple[str, int, int], shape: Any, dtype: Any) -> np.ndarray:
        name, offset, size = block
        dtype = np.dtype(dtype)
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > size:
            raise ValueError(f"payload {tuple(shape)} {dtype} does not fit its {size}-byte block")
        return _view(self._attach(name).buf, shape, dtype, offset)

    def buffer(self, block: Block | tuple[str, int, int]) -> memoryview:
        name, offset, size = block
        return self._attach(name).buf[offset:offset + size]

    def _attach(self, name: str) -> SharedMemory:
        shm = self._segments.get(name)
        if shm is None:
            if not name.startswith(SHM_PREFIX):
                raise ValueError(f"not a batchrtc shared-memory segment: {name!r}")
            shm = SharedMemory(name=name)
            # Python < 3.13 registers an attached segment with this process's resource tracker,
            # which would unlink it when this process exits: the creator owns it, not us.
            try:
                resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
            except Exception:
                pass
            self._segments[name] = shm
        return shm

    def forget(self, prefix: str) -> None:
        for name in [n for n in self._segments if n.startswith(prefix)]:
            _drop(self._segments.pop(name), unlink=False)

    def close(self) -> None:
        for shm in self._segments.values():
            _drop(shm, unlink=False)
        self._segments.clear()


def unlink_prefix(prefix: str) -> int:
    """Unlink every segment whose name starts with `prefix` (its creator is gone)."""
    return _unlink_where(lambda name: name.startswith(prefix))


def sweep_dead() -> int:
    """Unlink batchrtc segments whose creating process no longer exists (SIGKILLed earlier)."""

    def dead(name: str) -> bool:
        pid = name[len(SHM_PREFIX):].split("_", 1)[0]
        return name.startswith(SHM_PREFIX) and pid.isdigit() and not pid_alive(int(pid))

    return _unlink_where(dead)


def _unlink_where(pred: Any) -> int:
    n = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if pred(name):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                n += 1
            except OSError:
                pass
    return n


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (a zombie counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
