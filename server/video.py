"""Batched video handlers: many sessions' frames, one model call.

Mark a handler with `@batched(...)`. It receives a batch — frames of one shape stacked as
a uint8 RGB tensor `[B, H, W, 3]` already on the model's device — plus each frame's
additional-input values, and returns one output per frame: a frame (`np.ndarray` or tensor
`[H, W, 3]`, or one `[B, H, W, 3]` tensor for the whole batch), `AdditionalOutputs`, or
`(frame, AdditionalOutputs)`. Frames of different shapes are batched separately.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batching import DynamicBatcher
from models.device import default_device

BatchFn = Callable[[torch.Tensor, list[tuple[Any, ...]]], Sequence[Any] | torch.Tensor]


@dataclass
class _Frame:
    array: np.ndarray  # [H, W, 3] uint8 RGB
    args: tuple[Any, ...]


class BatchedHandler:
    """A batched frame handler and its shared batcher (one per handler, not per session)."""

    def __init__(
        self,
        fn: BatchFn,
        *,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 10.0,
        deadline_ms: float = 100.0,
        max_queue_size: int = 1024,
        device: str | torch.device | None = None,
    ) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_queue_delay_ms = max_queue_delay_ms
        self.deadline_ms = deadline_ms
        self.max_queue_size = max_queue_size
        self.device = torch.device(device) if device is not None else default_device()
        self._batcher: DynamicBatcher[_Frame, Any] | None = None
        self._lock = threading.Lock()
        self.__name__ = getattr(fn, "__name__", "batched")
        self.__doc__ = fn.__doc__

    def copy(self) -> BatchedHandler:
        return self  # shared by every session: that is the point

    @property
    def batcher(self) -> DynamicBatcher[_Frame, Any]:
        with self._lock:
            if self._batcher is None:
                self._batcher = DynamicBatcher(
                    self._run,
                    name=f"video:{self.__name__}",
                    max_batch_size=self.max_batch_size,
                    max_queue_delay_ms=self.max_queue_delay_ms,
                    max_queue_size=self.max_queue_size,
                    group_key=lambda f: f.array.shape,
                )
            return self._batcher

    async def submit(self, frame: np.ndarray, args: tuple[Any, ...]) -> Any:
        """One frame in, its output back. Late frames are dropped (a newer one exists)."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"video frames must be uint8 [H, W, 3]; got {frame.dtype} {frame.shape}")
        deadline = time.monotonic() + self.deadline_ms / 1000
        return await self.batcher.submit(_Frame(frame, args), deadline=deadline, drop_if_late=True)

    def _run(self, items: list[_Frame]) -> list[Any]:
        shape = (len(items), *items[0].array.shape)
        if self.device.type == "cuda":
            # Stack straight into pinned memory (one host copy), then an asynchronous H2D copy.
            host = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            np.stack([f.array for f in items], out=host.numpy())
            frames = host.to(self.device, non_blocking=True)
        else:
            frames = torch.from_numpy(np.stack([f.array for f in items]))
        with torch.inference_mode():
            outs = self.fn(frames, [f.args for f in items])
        if isinstance(outs, torch.Tensor):  # one [B, H, W, 3] tensor: one transfer back
            arr = outs.to("cpu").numpy()
            return [arr[i] for i in range(len(items))]
        outs = list(outs)
        if len(outs) != len(items):
            raise ValueError(f"batched handler returned {len(outs)} outputs for {len(items)} frames")
        return [_to_host(o) for o in outs]

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()


def _to_host(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.to("cpu").numpy()
    if isinstance(out, tuple):
        return tuple(_to_host(o) for o in out)
    return out


def batched(
    fn: BatchFn | None = None,
    *,
    max_batch_size: int = 32,
    max_queue_delay_ms: float = 10.0,
    deadline_ms: float = 100.0,
    device: str | torch.device | None = None,
) -> Any:
    """Mark a frame handler as batched: `@batched` or `@batched(max_batch_size=64, ...)`."""

    def wrap(f: BatchFn) -> BatchedHandler:
        return BatchedHandler(
            f,
            max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            deadline_ms=deadline_ms,
            device=device,
        )

    return wrap(fn) if fn is not None else wrap
