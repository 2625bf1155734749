"""StateSlots: a device-resident state table for recurrent models served in batches.

Each stream owns one row ("slot") of every state tensor. A batch gathers its rows, runs the
model once and scatters the new state back with an in-place index copy, so state never
leaves the device. Generations guard against a stream that ended (slot released, perhaps
reacquired by a new stream) while its batch was running: its stale write-back is skipped.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Mapping, Sequence

import torch

from .errors import SlotsExhausted

__all__ = ["StateSlots"]


class StateSlots:
    """A table of ``capacity`` rows for each named state tensor of shape ``[capacity, *shape]``.

    ``acquire`` hands out zeroed rows (lowest free index first, keeping live rows dense);
    ``release`` zeroes the row and bumps its generation. A lock makes acquire/release/
    gather/scatter safe to call from different threads (e.g. release from the event loop
    while a batch runs on the batcher's worker thread).
    """

    def __init__(
        self,
        capacity: int,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not shapes:
            raise ValueError("shapes must name at least one state tensor")
        self._capacity = int(capacity)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.tensors: dict[str, torch.Tensor] = {
            name: torch.zeros((self._capacity, *tuple(shape)), device=self.device, dtype=dtype)
            for name, shape in shapes.items()
        }
        self._lock = threading.Lock()
        self._free: list[int] = list(range(self._capacity))  # a heap (sorted list is one)
        self._used = [False] * self._capacity
        self._gen = [0] * self._capacity

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._capacity - len(self._free)

    def acquire(self) -> int:
        """Take a free slot (its rows are all zero). Raises SlotsExhausted when none is free."""
        with self._lock:
            if not self._free:
                raise SlotsExhausted(
                    f"all {self._capacity} state slots are in use; raise capacity or end streams"
                )
            slot = heapq.heappop(self._free)
            self._used[slot] = True
            return slot

    def release(self, slot: int) -> None:
        """Zero ``slot``'s rows, bump its generation and free it. Releasing a free slot is a ValueError."""
        with self._lock:
            self._check(slot)
            if not self._used[slot]:
                raise ValueError(f"slot {slot} is not in use (double release?)")
            for t in self.tensors.values():
                t[slot].zero_()
            self._gen[slot] += 1
            self._used[slot] = False
            heapq.heappush(self._free, slot)

    def generation(self, slot: int) -> int:
        """Incremented at each release: compare to detect that a slot changed owner."""
        self._check(slot)
        return self._gen[slot]

    def gather(self, slots: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Copies of the rows of ``slots``: name -> ``[len(slots), *shape]`` on the table's device."""
        idx = self._index(slots)
        with self._lock:
            return {name: t.index_select(0, idx) for name, t in self.tensors.items()}

    def scatter(
        self,
        slots: Sequence[int] | torch.Tensor,
        values: Mapping[str, torch.Tensor],
        *,
        generations: Sequence[int] | None = None,
    ) -> None:
        """Write ``values[name][i]`` into row ``slots[i]`` of each named tensor, in place.

        ``values`` may name a subset of the tensors. Rows are skipped when the slot is not in
        use, or when ``generations`` is given and the slot's generation differs from it (the
        stream ended meanwhile), so a stale batch never writes into a freed or reused row.
        """
        slot_list = slots.tolist() if isinstance(slots, torch.Tensor) else [int(s) for s in slots]
        n = len(slot_list)
        if len(set(slot_list)) != n:
            raise ValueError(f"scatter: duplicate slots in {slot_list}")
        if generations is not None and len(generations) != n:
            raise ValueError(f"scatter: {len(generations)} generations for {n} slots")
        for name, v in values.items():
            if name not in self.tensors:
                raise KeyError(f"scatter: unknown state tensor {name!r} (have {list(self.tensors)})")
            want = (n, *self.tensors[name].shape[1:])
            if tuple(v.shape) != want:
                raise ValueError(f"scatter: {name!r} has shape {tuple(v.shape)}, expected {want}")
        for s in slot_list:
            self._check(s)
        with self._lock:
            keep = [
                i
                for i, s in enumerate(slot_list)
                if self._used[s] and (generations is None or self._gen[s] == generations[i])
            ]
            if not keep:
                return
            idx = self._index([slot_list[i] for i in keep])
            rows = None if len(keep) == n else torch.tensor(keep, dtype=torch.long, device=self.device)
            for name, v in values.items():
                v = v.to(device=self.device, dtype=self.dtype, non_blocking=True)
                if rows is not None:
                    v = v.index_select(0, rows)
                self.tensors[name].index_copy_(0, idx, v)

    # ------------------------------------------------------------------ helpers

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self._capacity:
            raise ValueError(f"slot {slot} out of range [0, {self._capacity})")

    def _index(self, slots: Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(slots, torch.Tensor):
            return slots.to(device=self.device, dtype=torch.long)
        return torch.tensor(list(slots), dtype=torch.long, device=self.device)
