"""Batched video handlers: many sessions' frames, one model call.

Mark a handler with `@batched(...)`. It receives a batch — frames of one shape stacked as
a uint8 RGB tensor `[B, H, W, 3]` already on the model's device — plus each frame's
additional-input values, and returns one output per frame: a frame (`np.ndarray` or tensor
`[H, W, 3]`, or one `[B, H, W, 3]` tensor for the whole batch), `AdditionalOutputs`, or
`(frame, AdditionalOutputs)`. Frames of different shapes are batched separately.

With `process=True` (the default on CUDA) the handler runs in a child process of its own
(`batching.process.ProcessRunner`): the model's many small torch calls then do not queue for
the front end's GIL behind aiortc's codec and RTP threads (measured on an H200: a detector batch
of 8 took 23 ms alone and ~76 ms inside the server), and a handler that hangs past
`call_timeout_s` is killed and restarted instead of blocking every session. Frames travel
through shared memory; the handler must be a module-level function (the child imports it).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batching import BatchingConfig, DynamicBatcher, ResultCountError
from batching.process import ProcessRunner
from models.device import default_device

from .config import load_settings
from .engine import engine_client

logger = logging.getLogger(__name__)

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
        process: bool | None = None,
        call_timeout_s: float | None = 30.0,
    ) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_queue_delay_ms = max_queue_delay_ms
        self.deadline_ms = deadline_ms
        self.max_queue_size = max_queue_size
        self.device = torch.device(device) if device is not None else default_device()
        self.call_timeout_s = call_timeout_s
        self._explicit_process = bool(process)
        self.process = _want_process(process, self.device)
        if self.process and not _maybe_importable(fn):
            self._no_process(fn)
        self._batcher: DynamicBatcher[_Frame, Any] | None = None
        self._runner: ProcessRunner | None = None
        self._lock = threading.Lock()
        self.__name__ = getattr(fn, "__name__", "batched")
        # what names this handler in the engine process (engine mode)
        self.engine_name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', self.__name__)}"
        self.__doc__ = fn.__doc__

    def _no_process(self, fn: Any) -> None:
        what = getattr(fn, "__qualname__", repr(fn))
        if self._explicit_process:
            raise ValueError(
                f"process=True needs a module-level handler function (the child process imports "
                f"it by name); {what!r} is not importable"
            )
        logger.warning("batched handler %r is not importable by name; running it in-process", what)
        self.process = False

    def copy(self) -> BatchedHandler:
        return self  # shared by every session: that is the point

    @property
    def batcher(self) -> DynamicBatcher[_Frame, Any]:
        with self._lock:
            if self._batcher is None:
                ref = _importable_ref(self.fn) if self.process else None
                if self.process and ref is None:
                    self._no_process(self.fn)
                if ref is not None:
                    self._runner = ProcessRunner(
                        _ChildCompute(ref, str(self.device)),
                        name=f"video-{self.__name__}",
                        call_timeout_s=self.call_timeout_s,
                    )
                    # Start it now (in the background): the first frames then do not wait
                    # for the child's imports and model load on the batcher thread alone.
                    threading.Thread(target=self._start_runner, name="batchrtc-runner-start", daemon=True).start()
                self._batcher = DynamicBatcher(
                    self._run,
                    name=f"video:{self.__name__}",
                    # a late frame is dropped: a newer one exists
                    config=BatchingConfig(self.max_batch_size, self.max_queue_delay_ms, self.max_queue_size,
                                          deadline_ms=self.deadline_ms, drop_if_late=True),
                    group_key=lambda f: f.array.shape,
                )
            return self._batcher

    @property
    def existing_batcher(self) -> DynamicBatcher[_Frame, Any] | None:
        """The batcher if it has been created (`batcher` creates it)."""
        return self._batcher

    @property
    def runner(self) -> ProcessRunner | None:
        """The worker process's runner, with `process=True`, once the batcher exists."""
        return self._runner

    def _start_runner(self) -> None:
        runner = self._runner
        try:
            if runner is not None:
                runner.start()
        except Exception:  # reported again, per batch, by the first call
            logger.exception("batched handler %r: starting its process failed", self.__name__)

    async def submit(self, frame: np.ndarray, args: tuple[Any, ...], source: Any = None) -> Any:
        """One frame in, its output back. Late frames are dropped (a newer one exists).
        `source` (the session) lets the batcher find whose frames kill or hang the handler's
        process (see `DynamicBatcher.submit`); that session then gets `FaultySource`.
        In engine mode the frame goes to the engine process's batcher (through shared memory)."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"video frames must be uint8 [H, W, 3]; got {frame.dtype} {frame.shape}")
        client = engine_client()
        if client is not None:
            return await client.submit_video(self.engine_name, np.ascontiguousarray(frame), tuple(args),
                                             _source_key(source), timeout=self.call_timeout_s)
        deadline = time.monotonic() + self.deadline_ms / 1000
        return await self.batcher.submit(_Frame(frame, args), deadline=deadline, drop_if_late=True, source=source)

    # -- engine mode -------------------------------------------------------------------------
    def engine_spec(self) -> tuple[str, tuple[str, str], dict[str, Any]]:
        """What the engine process needs to run this handler: its name, where to import it
        from, and its batching settings."""
        ref = _importable_ref(self.fn)
        if ref is not None and ref[0] in ("__main__", "__mp_main__"):
            # `python -m pkg.mod`: the engine imports it by its real name (a script run by
            # path has none the engine could import).
            spec = getattr(sys.modules.get(ref[0]), "__spec__", None)
            ref = (spec.name, ref[1]) if spec is not None and spec.name else None
        if ref is None:
            raise ValueError(
                f"batched handler {self.__name__!r}: with an engine process (uvicorn --workers N or "
                "BATCHRTC_ENGINE=process) it must be a module-level function the engine can import"
            )
        cfg = {"max_batch_size": self.max_batch_size, "max_queue_delay_ms": self.max_queue_delay_ms,
               "deadline_ms": self.deadline_ms, "max_queue_size": self.max_queue_size,
               "device": str(self.device), "call_timeout_s": self.call_timeout_s}
        return self.engine_name, ref, cfg

    def add_producer(self) -> None:
        """A session feeds this handler (see `DynamicBatcher.add_producer`)."""
        client = engine_client()
        if client is not None:
            client.producer(self.engine_name, 1)
        else:
            self.batcher.add_producer()

    def remove_producer(self) -> None:
        client = engine_client()
        if client is not None:
            client.producer(self.engine_name, -1)
        elif self._batcher is not None:
            self._batcher.remove_producer()

    def forget_source(self, source: Any) -> None:
        client = engine_client()
        if client is not None:
            client.forget_source(self.engine_name, _source_key(source))
        elif self._batcher is not None:
            self._batcher.forget_source(source)

    def _run(self, items: list[_Frame]) -> list[Any]:
        shape = (len(items), *items[0].array.shape)
        args = [f.args for f in items]
        if self._runner is not None:
            # Stack straight into the shared-memory block the child reads (one host copy).
            buf = self._runner.input_buffer(shape, np.uint8)
            np.stack([f.array for f in items], out=buf)
            return self._runner(buf, args)
        frames = _frames_on(self.device, shape, lambda out: np.stack([f.array for f in items], out=out))
        return _call(self.fn, frames, args)

    def start(self) -> None:
        """With `process=True`: start the child process now (in the background), so the first
        session does not wait for its imports and model load. Called at server start-up."""
        if self.process:
            self.batcher

    def close(self, *, restartable: bool = False) -> None:
        """Stop the batcher and the child process. A closed batcher fails `/health`; with
        `restartable=True` (server shutdown) they are dropped instead, and a later session
        (the app served again) starts them afresh."""
        with self._lock:
            batcher, runner = self._batcher, self._runner
            if restartable:
                self._batcher = self._runner = None
        if batcher is not None:
            batcher.close()
        if runner is not None:
            runner.close()


def _source_key(source: Any) -> Any:
    """What names a session in the engine process (the session itself does not travel)."""
    return None if source is None else getattr(source, "log_id", None) or id(source)


def _want_process(process: bool | None, device: torch.device) -> bool:
    """Explicit argument, else `BATCHRTC_VIDEO_PROCESS` (1/0), else on CUDA only (where the
    GIL contention was measured; on CPU the extra process buys nothing measured yet)."""
    if process is not None:
        return bool(process)
    env = load_settings().video_process
    return env if env is not None else device.type == "cuda"


def _maybe_importable(fn: Any) -> bool:
    """Cheap check at decoration time (the module attribute does not exist yet then)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return bool(module and qualname and "<locals>" not in qualname and "<lambda>" not in qualname)


def _importable_ref(fn: Any) -> tuple[str, str] | None:
    """(module, qualname) that resolves back to `fn` (or to a BatchedHandler wrapping it).
    A `__main__` script works too: spawned children re-import it as `__mp_main__`."""
    if not _maybe_importable(fn):
        return None
    module, qualname = fn.__module__, fn.__qualname__
    try:
        return (module, qualname) if _resolve((module, qualname)) is fn else None
    except Exception:
        return None


def _resolve(ref: tuple[str, str]) -> Any:
    obj: Any = importlib.import_module(ref[0])
    for part in ref[1].split("."):
        obj = getattr(obj, part)
    return obj.fn if isinstance(obj, BatchedHandler) else obj


class _ChildCompute:
    """What the handler's child process runs: frames from shared memory -> device -> fn -> host.

    Pickled by (module, qualname) of the handler; unpickling in the child imports the handler's
    module, so an import error surfaces when the child starts, not at the first frame."""

    def __init__(self, ref: tuple[str, str], device: str) -> None:
        self.ref, self.device = ref, device
        self.fn: Any = None

    def __getstate__(self) -> tuple[tuple[str, str], str]:
        return self.ref, self.device

    def __setstate__(self, state: tuple[tuple[str, str], str]) -> None:
        self.ref, self.device = state
        self.fn = _resolve(self.ref)

    def __call__(self, batch: np.ndarray, args: list[tuple[Any, ...]]) -> list[Any]:
        fn = self.fn if self.fn is not None else _resolve(self.ref)
        # A copy either way: the shared block is reused by the next batch.
        frames = _frames_on(torch.device(self.device), batch.shape, lambda out: np.copyto(out, batch))
        return _call(fn, frames, args)


def _frames_on(device: torch.device, shape: tuple[int, ...], fill: Callable[[np.ndarray], Any]) -> torch.Tensor:
    """A uint8 batch on `device`, written by `fill(host_array)`: on CUDA straight into pinned
    memory (one host copy), then an asynchronous host-to-device copy."""
    if device.type == "cuda":
        host = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        fill(host.numpy())
        return host.to(device, non_blocking=True)
    out = np.empty(shape, np.uint8)
    fill(out)
    return torch.from_numpy(out)


def _call(fn: BatchFn, frames: torch.Tensor, args: list[tuple[Any, ...]]) -> list[Any]:
    """Run `fn` on a batch and bring its outputs to the host as numpy."""
    n = frames.shape[0]
    with torch.inference_mode():
        outs = fn(frames, args)
    if isinstance(outs, torch.Tensor):  # one [B, H, W, 3] tensor: one transfer back
        if outs.ndim != 4 or outs.shape[0] != n:
            raise ResultCountError(f"batched handler returned a tensor of shape {tuple(outs.shape)} for {n} frames; "
                                   f"expected [{n}, H, W, 3]")
        arr = outs.to("cpu").numpy()
        return [arr[i] for i in range(n)]
    try:
        outs = list(outs)
    except TypeError:
        raise ResultCountError(f"batched handler returned {type(outs).__name__}; expected one output per frame") from None
    if len(outs) != n:
        # Not retried in halves: a handler that miscounts would pass singletons through.
        raise ResultCountError(f"batched handler returned {len(outs)} outputs for {n} frames")
    return [_to_host(o) for o in outs]


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
    process: bool | None = None,
    call_timeout_s: float | None = 30.0,
) -> Any:
    """Mark a frame handler as batched: `@batched` or `@batched(max_batch_size=64, ...)`.

    `process`: run it in a child process (default: on CUDA; `BATCHRTC_VIDEO_PROCESS=1/0`
    overrides). `call_timeout_s`: in a child process, a batch running longer is killed (its
    frames get `WorkerTimeout`) and the child restarted.
    """

    def wrap(f: BatchFn) -> BatchedHandler:
        return BatchedHandler(
            f,
            max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            deadline_ms=deadline_ms,
            device=device,
            process=process,
            call_timeout_s=call_timeout_s,
        )

    return wrap(fn) if fn is not None else wrap
